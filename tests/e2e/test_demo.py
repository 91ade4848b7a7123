"""
``scripts/run-agent --demo``: the agent creates and starts a real Minetest
server through its own API, the game answers on the published port, and a
second run finds the same server again instead of creating another.

The runner is driven as a user would drive it (a process with its own process
group, stopped with Ctrl-C), against the session's test engine through
``DOCKER_HOST`` and with its development directory in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.rig.agentproc import remove_containers_under

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.docker, pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _handshake(port: int) -> bytes:
    """DOCKER-IN-TESTS.md: one reliable packet; the answer starts with the protocol id."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        for _ in range(10):
            s.sendto(bytes.fromhex("4f457403000000" "03ffdc01"), ("127.0.0.1", port))
            try:
                data, _ = s.recvfrom(1024)
            except TimeoutError:
                continue
            s.sendto(bytes.fromhex("4f457403") + data[4:6] + bytes.fromhex("000003"),
                     ("127.0.0.1", port))
            return data
    return b""


class Run:
    """One ``run-agent --demo`` process, its output in a file."""

    def __init__(self, dev: Path, engine_host: str, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PANEL_URL", "PYTHONPATH")}
        env.update(
            CTRLAGENT_VENV=sys.prefix,
            CTRLAGENT_DEV_DIR=str(dev),
            CTRLAGENT_SFTP_ENABLED="false",
            DOCKER_HOST=engine_host,
        )
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(ROOT / "scripts" / "run-agent"), "--demo", "--port", str(port),
                 "--bind", "127.0.0.1"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal gives it
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.proc.poll() is None, self.text()
            time.sleep(0.2)
        raise AssertionError("no {!r} within {} s:\n{}".format(pattern, timeout, self.text()))

    def ctrl_c(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def _api(port: int, secret: str, path: str) -> Any:
    request = urllib.request.Request(
        "http://127.0.0.1:{}{}".format(port, path),
        headers={"Authorization": "Bearer " + secret},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_the_demo_runs_a_minetest_server_and_a_second_run_reattaches_it(
    tmp_path: Path, docker_engine: Any, minetest_image: str
) -> None:
    dev = tmp_path / "dev"
    port = _free_port()
    first = Run(dev, docker_engine.host, port, tmp_path / "first.log")
    second: Run | None = None
    try:
        joined = first.wait_for(r"address 127\.0\.0\.1, port (\d+)", 180)
        game_port = int(joined.group(1))
        assert _handshake(game_port)[:4] == bytes.fromhex("4f457403")
        assert "creating server minetest-demo" in first.text()
        # The Panel's create sends no ports: the agent allocated one from the demo's range.
        assert "the agent allocated port {} on 127.0.0.1".format(game_port) in first.text()
        assert 30000 <= game_port <= 30100
        assert first.ctrl_c() == 0, first.text()
        assert "Traceback" not in first.text(), first.text()
        # The world stays for the next run.
        assert (dev / "servers" / "minetest-demo" / "world").is_dir()

        second = Run(dev, docker_engine.host, port, tmp_path / "second.log")
        again = second.wait_for(r"address 127\.0\.0\.1, port (\d+)", 120)
        assert int(again.group(1)) == game_port
        assert "re-attached, not created again" in second.text()
        assert "creating server" not in second.text()
        assert _handshake(game_port)[:4] == bytes.fromhex("4f457403")
        # The operator CLI line it prints works as printed.
        cli = second.wait_for(r"(?m)^\s+(\S.*) console minetest-demo$", 5).group(1)
        listed = subprocess.run(
            cli.split() + ["servers"], capture_output=True, text=True, timeout=60, check=False
        )
        assert listed.returncode == 0 and "minetest-demo" in listed.stdout, listed
        secret = (dev / "secret").read_text().strip()
        servers = _api(port, secret, "/api/servers")["data"]
        assert [s["serverId"] for s in servers["servers"]] == ["minetest-demo"]
        assert second.ctrl_c() == 0, second.text()
        assert "Traceback" not in second.text(), second.text()
    finally:
        for run in (first, second):
            if run is not None and run.proc.poll() is None:
                run.ctrl_c()
        remove_containers_under(docker_engine.host, dev / "servers")
