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

DEV = ROOT / ".dev"


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
    DEV.mkdir(exist_ok=True)
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and engine_answers(host[len("unix://") :]):
        return run_agent(host)
    _ensure_engine_binaries()
    sys.stderr.write("run-agent: no Docker engine at {}; starting a private one\n".format(host))
    # A start that fails (or is interrupted) removes what it made itself.
    private = PrivateDockerd().start()
    try:
        sys.stderr.write("run-agent: private engine at {}\n".format(private.host))
        return run_agent(private.host)
    finally:
        sys.stderr.write("run-agent: stopping the private engine\n")
        private.stop()


def run_agent(host: str) -> int:
    """Run twistd against ``host`` until it exits or this runner is told to stop."""
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
    args += sys.argv[1:]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sys.stderr.write(
        "run-agent: http://127.0.0.1:{}/health ; the API secret is in {}\n".format(
            os.environ.get("HEALTH_PORT", "8081"), secret_file
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
