"""
Development runner behind ``scripts/run-agent``.

Finds or starts a Docker engine, writes a development secret, runs
``twistd -n ctrlagent`` as a child process and, on Ctrl-C, SIGTERM or SIGHUP,
stops the agent and then the private engine it started (by their own pids).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rig.dockerd import PrivateDockerd, engine_answers  # noqa: E402

# CTRLAGENT_DEV_DIR moves the development state (tests run the demo in a temp dir).
DEV = Path(os.environ.get("CTRLAGENT_DEV_DIR") or ROOT / ".dev").absolute()


def _ensure_engine_binaries() -> None:
    if shutil.which("dockerd") and shutil.which("docker"):
        return
    if os.geteuid() != 0:
        sys.exit(
            "run-agent: no dockerd here; install docker.io (as root: apt-get install docker.io)"
        )
    sys.stderr.write("run-agent: installing docker.io\n")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker.io", "iproute2"],
        check=True,
        env=env,
    )


def main() -> int:
    args = sys.argv[1:]
    demo = "--demo" in args
    args = [a for a in args if a != "--demo"]
    DEV.mkdir(parents=True, exist_ok=True)
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and engine_answers(host[len("unix://") :]):
        return run_agent(host, args, demo)
    _ensure_engine_binaries()
    sys.stderr.write("run-agent: no Docker engine at {}; starting a private one\n".format(host))
    # A start that fails (or is interrupted) removes what it made itself.
    private = PrivateDockerd().start()
    try:
        sys.stderr.write("run-agent: private engine at {}\n".format(private.host))
        return run_agent(private.host, args, demo)
    finally:
        sys.stderr.write("run-agent: stopping the private engine\n")
        private.stop()


def _api_port(args: list[str]) -> int:
    """The port the agent will listen on: ``--port``/``-p`` given to twistd, else HEALTH_PORT."""
    for i, arg in enumerate(args):
        if arg in ("--port", "-p") and i + 1 < len(args):
            return int(args[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return int(os.environ.get("HEALTH_PORT", "8081"))


def run_agent(host: str, extra: list[str], demo: bool) -> int:
    """Run twistd against ``host`` until it exits or this runner is told to stop."""
    image = None
    if demo:
        import demo as demo_run  # scripts/demo.py, beside this file

        image = demo_run.prepare_image(host)
    secret_file = DEV / "secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32) + "\n")
    secret_file.chmod(0o600)

    args = [
        # The twistd of the environment running this script (./.venv or CTRLAGENT_VENV).
        str(Path(sys.executable).with_name("twistd")),
        "--nodaemon",
        "--pidfile=",
        "ctrlagent",
        "--development",
        "--docker-host",
        host,
        "--secret-file",
        str(secret_file),
        "--state-dir",
        str(DEV / "state"),
        "--data-dir",
        str(DEV / "servers"),
    ]
    if "PANEL_URL" not in os.environ:
        args.append("--no-panel")
    if demo and not any(a in ("--config", "-c") or a.startswith("--config=") for a in extra):
        # The demo's game publishes on loopback only; its port comes from the range.
        demo_config = DEV / "demo.toml"
        demo_config.write_text(
            "# written by run-agent --demo\n[servers]\ndefault_bind_ip = \"127.0.0.1\"\n"
            'port_range = "30000-30100"\n'
        )
        args += ["--config", str(demo_config)]
    args += extra
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    port = _api_port(extra)
    sys.stderr.write(
        "run-agent: http://127.0.0.1:{}/health ; the API secret is in {}\n".format(
            port, secret_file
        )
    )
    # Its own process group: a terminal's Ctrl-C reaches this runner alone, which
    # stops the agent once (twistd signalled twice logs a ReactorNotRunning trace).
    child = subprocess.Popen(args, env=env, process_group=0)
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None and not stopping:
            stopping.append(signum)
            child.send_signal(signal.SIGTERM)

    # SIGHUP too: a closed terminal must not leave the agent and the engine behind.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        if demo and image is not None:
            api = demo_run.Api("http://127.0.0.1:{}".format(port), secret_file.read_text().strip())
            try:
                demo_run.run(
                    api,
                    DEV,
                    str(secret_file),
                    image,
                    lambda: child.poll() is None and not stopping,
                    port,
                )
            except (OSError, RuntimeError, ValueError) as e:
                if child.poll() is None and not stopping:
                    demo_run.say("stopped: {}".format(e))
        code = child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait()
    if stopping and code == -signal.SIGTERM:
        return 0  # stopped as asked
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
