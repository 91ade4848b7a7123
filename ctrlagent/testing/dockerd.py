"""
A private Docker engine for tests, benchmarks and the development run script.

``PrivateDockerd`` starts a ``dockerd`` with its own data root, exec root, Unix
socket and Linux bridge, so that it never disturbs another daemon on the
machine (see DOCKER-IN-TESTS.md: never ``--bridge=none``).  It is stopped by
its own pid after its containers are removed, and everything it created (the
bridge, the netns mount, the directory) is cleaned up.

This module is synchronous on purpose: it is used from pytest session fixtures
and plain scripts, before any reactor runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from ctrlagent.testing.processes import spawn_logged, stop_process, wait_until_ready


def engine_answers(socket_path: str, timeout: float = 2.0) -> bool:
    """True when a Docker engine answers ``GET /_ping`` on ``socket_path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = s.recv(256)
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]


def _used_networks() -> set[str]:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    routes = subprocess.run(
        ["ip", "-4", "route", "show"], capture_output=True, text=True, check=False
    ).stdout
    return {line for line in (out + routes).splitlines()}


def _pick_subnet_octet() -> int:
    used = "\n".join(_used_networks())
    for _ in range(200):
        octet = random.randint(130, 250)
        if " 10.{}.".format(octet) not in used and "\n10.{}.".format(octet) not in "\n" + used:
            return octet
    raise RuntimeError("no free 10.x.0.0/16 range for a private Docker bridge")


class PrivateDockerd:
    """
    One private ``dockerd`` process and the resources it owns.

    ``start()`` returns once the engine answers ``/_ping``; ``stop()`` removes
    its containers, terminates it by pid and deletes what it created.  The
    object can be started again after ``stop()`` with the same directory, which
    is how tests restart the daemon under a running agent.
    """

    def __init__(self, base_dir: str | None = None, name: str | None = None) -> None:
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="ctrlagent-dockerd-"))
        tag = name or "{:x}".format(random.getrandbits(28))
        self.bridge = ("cab" + tag)[:15]
        self.octet = _pick_subnet_octet()
        self.process: subprocess.Popen[bytes] | None = None
        self._bridge_made = False
        self.log_path = self.base / "dockerd.log"

    @property
    def socket_path(self) -> str:
        return str(self.base / "docker.sock")

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` value for this engine."""
        return "unix://" + self.socket_path

    @property
    def bridge_subnet(self) -> str:
        return "10.{}.255.0/24".format(self.octet)

    @property
    def pool_base(self) -> str:
        """Address pool for networks created on this engine (no host overlap)."""
        return "10.{}.0.0/17".format(self.octet)

    def _make_bridge(self) -> None:
        if self._bridge_made:
            return
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        self._bridge_made = True
        subprocess.run(
            ["ip", "addr", "add", "10.{}.255.1/24".format(self.octet), "dev", self.bridge],
            check=True,
        )
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)

    def start(self, timeout: float = 30.0) -> PrivateDockerd:
        """Start the engine and wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        for sub in ("data", "exec"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        config = {
            "default-address-pools": [{"base": self.pool_base, "size": 24}],
        }
        (self.base / "daemon.json").write_text(json.dumps(config))
        self._make_bridge()
        self.process = spawn_logged(
            [
                "dockerd",
                "--config-file",
                str(self.base / "daemon.json"),
                "--data-root",
                str(self.base / "data"),
                "--exec-root",
                str(self.base / "exec"),
                "--pidfile",
                str(self.base / "dockerd.pid"),
                "--host",
                self.host,
                "--bridge",
                self.bridge,
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=true",
            ],
            self.log_path,
            start_new_session=True,
        )
        wait_until_ready(
            self.process,
            lambda: engine_answers(self.socket_path, timeout=0.5),
            timeout,
            "dockerd",
            self.log_path,
        )
        return self

    def remove_all_containers(self) -> None:
        """Force-remove every container of this engine (cheaper than stop timeouts)."""
        if not engine_answers(self.socket_path):
            return
        env = dict(os.environ, DOCKER_HOST=self.host)
        ids = subprocess.run(
            ["docker", "ps", "-aq"], capture_output=True, text=True, env=env, check=False
        ).stdout.split()
        if ids:
            subprocess.run(
                ["docker", "rm", "-f", "-v", *ids], capture_output=True, env=env, check=False
            )

    def kill_engine(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the daemon process only (containers stay, for restart tests)."""
        stop_process(self.process, sig, timeout)
        self.process = None

    def stop(self) -> None:
        """Remove containers, stop the daemon by pid, delete what it made."""
        try:
            self.remove_all_containers()
        finally:
            self.kill_engine()
            subprocess.run(
                ["umount", str(self.base / "exec" / "netns" / "default")],
                capture_output=True,
                check=False,
            )
            if self._bridge_made:
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
                self._bridge_made = False
            # Leftover mounts under the data root (overlay) would make rmtree fail.
            subprocess.run(
                [
                    "sh",
                    "-c",
                    "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l".format(
                        self.base
                    ),
                ],
                capture_output=True,
                check=False,
            )
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivateDockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
