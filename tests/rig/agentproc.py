"""
The agent as a real ``twistd -n ctrlagent`` subprocess, for end-to-end tests
and benchmarks.

``AgentProcess`` writes a TOML config into a temp directory, starts twistd with
the container engine (Docker, or Podman with ``runtime="podman"``) and Panel
URL it is given, waits until ``/health`` answers,
and can be stopped gracefully (SIGTERM), killed (SIGKILL) and started again on
the same state, which is how restart-survival is tested.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.rig.processes import spawn_logged, stop_process, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _twistd() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    return str(candidate) if candidate.exists() else "twistd"


class AgentProcess:
    """One agent subprocess and its private state/data directories."""

    def __init__(
        self,
        workdir: Path,
        docker_host: str,
        panel_url: str | None = None,
        node_id: str = "e2e-node",
        extra_config: str = "",
        env: dict[str, str] | None = None,
        panel_settings: str = "",
        sftp_endpoint: str = "tcp:0:interface=127.0.0.1",
        runtime: str = "docker",
    ) -> None:
        self.workdir = workdir
        # The engine's API socket: Docker's, or Podman's service when
        # ``runtime`` is "podman" (the docker CLI speaks to both).
        self.docker_host = docker_host
        self.runtime = runtime
        self.panel_url = panel_url
        self.node_id = node_id
        self.secret = secrets.token_urlsafe(24)
        self.port = free_port()
        self.state_dir = workdir / "state"
        self.data_dir = workdir / "servers"
        self.log_path = workdir / "agent.log"
        self.config_path = workdir / "agent.toml"
        self.extra_config = extra_config
        self.panel_settings = panel_settings
        self.extra_env = env or {}
        # SFTP is on by default (port 2022): each test agent listens on its own
        # loopback port instead, so that agents never fight over one port.
        self.sftp_endpoint = sftp_endpoint
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return "http://127.0.0.1:{}".format(self.port)

    def headers(self) -> dict[str, str]:
        """Exactly the headers the Panel sends (PROTOCOL.md section 1)."""
        return {
            "Content-Type": "application/json",
            "Accept": "application/json, text/plain, */*",
            "Authorization": "Bearer " + self.secret,
        }

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        secret_file = self.workdir / "secret"
        secret_file.write_text(self.secret + "\n")
        secret_file.chmod(0o600)
        panel = (
            '[panel]\nurl = "{}"\n{}\n'.format(self.panel_url, self.panel_settings)
            if self.panel_url
            else "[panel]\nenabled = false\n"
        )
        # Before [docker] and [panel]: extra_config may continue the [panel] table.
        sftp = (
            ""
            if "[sftp]" in self.extra_config
            else '[sftp]\nendpoint = "{}"\n'.format(self.sftp_endpoint)
        )
        self.config_path.write_text(
            'node_id = "{node}"\nsecret_file = "{secret}"\nstate_dir = "{state}"\n'
            'data_dir = "{data}"\n[http]\nport = {port}\nbind = "127.0.0.1"\n{sftp}'
            '{runtime}[docker]\nhost = "{docker}"\n{panel}{extra}\n'.format(
                node=self.node_id,
                secret=secret_file,
                state=self.state_dir,
                data=self.data_dir,
                port=self.port,
                docker=self.docker_host,
                panel=panel,
                sftp=sftp,
                runtime=self._runtime_table(),
                extra=self.extra_config,
            )
        )

    def _runtime_table(self) -> str:
        if self.runtime == "docker" or "[runtime]" in self.extra_config:
            return ""
        return '[runtime]\nkind = "{}"\npodman_host = "{}"\n'.format(
            self.runtime, self.docker_host)

    def start(self, timeout: float = 30.0) -> AgentProcess:
        """Start twistd and wait until ``/health`` answers."""
        self._write_config()
        env = dict(os.environ)
        env.pop("AGENT_SECRET", None)
        env.pop("DOCKER_HOST", None)
        env["PYTHONPATH"] = str(ROOT)
        env.update(self.extra_env)
        self.process = spawn_logged(
            [_twistd(), "--nodaemon", "--pidfile=", "ctrlagent", "--config", str(self.config_path)],
            self.log_path,
            cwd=str(self.workdir),
            env=env,
        )
        wait_until_ready(self.process, self._answers, timeout, "the agent", self.log_path)
        return self

    def _answers(self) -> bool:
        try:
            self.health()
        except (OSError, urllib.error.URLError):
            return False
        return True

    def health(self) -> dict[str, Any]:
        """GET /health (raises on a transport error; 503 still returns the body)."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return dict(json.loads(e.read()))
            raise

    def command_sync(self, body: dict[str, Any], timeout: float = 35.0) -> dict[str, Any]:
        """POST /api/command synchronously (for fixtures and benchmarks)."""
        request = urllib.request.Request(
            self.base_url + "/api/command",
            data=json.dumps(body).encode(),
            headers=self.headers(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return dict(json.loads(response.read()))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Graceful stop (SIGTERM by pid), escalating to SIGKILL."""
        code = stop_process(self.process, timeout=timeout)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the agent, as a crash would: no shutdown code runs."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.process = None


def remove_containers_under(docker_host: str, data_dir: Path) -> None:
    """Remove the managed containers whose data directory is under ``data_dir``."""
    env = dict(os.environ, DOCKER_HOST=docker_host)
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=ctrl-alt-play.managed=true"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    ).stdout.split()
    if not ids:
        return
    # One inspect for all of them (the engine may be shared: many containers).
    listed = subprocess.run(
        ["docker", "inspect", "-f", "{{.Id}} {{range .Mounts}}{{.Source}} {{end}}", *ids],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    ).stdout
    mine = [line.split(" ", 1)[0] for line in listed.splitlines()
            if str(data_dir) in line.partition(" ")[2]]
    if mine:
        subprocess.run(["docker", "rm", "-f", "-v", *mine], capture_output=True, env=env,
                       check=False)
