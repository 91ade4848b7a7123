"""
A local Docker registry for tests of the pull path.

``LocalRegistry`` runs Debian's ``docker-registry serve <config.yml>`` on
``127.0.0.1:<free port>`` with a temporary storage directory (never the
packaged config, which wants an htpasswd file of its own).  Loopback
registries are insecure-allowed by the engine by default, so pushing to and
pulling from it exercises the real pull with progress, offline.

With ``credentials=(user, password)`` the registry requires HTTP basic auth
(bcrypt htpasswd); two registries may share one storage directory, so an
image pushed to an open one can be pulled from an authenticated one.

Synchronous on purpose: used from pytest session fixtures and scripts.  The
process is stopped by its own pid.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.rig.processes import spawn_logged, stop_process, wait_until_ready

REGISTRY_BINARY = "/usr/bin/docker-registry"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bcrypt(password: str) -> str:
    """An htpasswd bcrypt hash (the only kind the registry accepts)."""
    import bcrypt  # a test dependency: only the registry fixture needs it

    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt()).decode("ascii")


class LocalRegistry:
    """One ``docker-registry`` process on loopback and its temporary files."""

    def __init__(
        self,
        storage_dir: str | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="ctrlagent-registry-"))
        self.storage = Path(storage_dir) if storage_dir else self.base / "storage"
        self.credentials = credentials
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.base / "registry.log"

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, the registry part of image references."""
        return "127.0.0.1:{}".format(self.port)

    def _write_config(self) -> Path:
        self.storage.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "storage:",
            "  filesystem:",
            "    rootdirectory: {}".format(self.storage),
            "  delete:",
            "    enabled: true",
            "http:",
            "  addr: 127.0.0.1:{}".format(self.port),
        ]
        if self.credentials is not None:
            user, password = self.credentials
            htpasswd = self.base / "htpasswd"
            htpasswd.write_text("{}:{}\n".format(user, _bcrypt(password)))
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: ctrlagent-test",
                "    path: {}".format(htpasswd),
            ]
        config = self.base / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def answers(self) -> bool:
        """True when ``GET /v2/`` answers (200, or 401 with auth)."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
            conn.close()
        except OSError:
            return False
        return status in (200, 401)

    def start(self, timeout: float = 15.0) -> LocalRegistry:
        """Start the registry and wait until ``/v2/`` answers."""
        if not os.path.exists(REGISTRY_BINARY):
            raise RuntimeError(
                "{} missing: apt-get install docker-registry".format(REGISTRY_BINARY)
            )
        self.port = free_port()
        config = self._write_config()
        self.process = spawn_logged(
            [REGISTRY_BINARY, "serve", str(config)], self.log_path, start_new_session=True
        )
        try:
            wait_until_ready(self.process, self.answers, timeout, "docker-registry", self.log_path)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the process by its pid and delete the temporary files."""
        stop_process(self.process, timeout=10)
        self.process = None
        shutil.rmtree(self.base, ignore_errors=True)

    def push(self, docker_host: str, image: str, repository: str) -> str:
        """
        Push local ``image`` of the engine at ``docker_host`` as
        ``<address>/<repository>``; return that reference.
        """
        target = "{}/{}".format(self.address, repository)
        env = dict(os.environ, DOCKER_HOST=docker_host)
        for args in (["tag", image, target], ["push", target]):
            proc = subprocess.run(["docker", *args], capture_output=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(
                    "docker {} failed: {}".format(args[0], proc.stderr.decode(errors="replace"))
                )
        return target

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
