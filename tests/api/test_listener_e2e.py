"""
The real agent (``twistd -n ctrlagent``) against clients that try to exhaust
it without the secret, measured from outside the process:

- 20 clients each announcing and pushing a 24 MiB body get 401 at once; the
  agent opens no temporary file and its memory does not grow by the uploads;
- with the process limited to 1,024 open files, 1,100 connections that never
  finish their headers do not stop ``/health`` from answering within a second.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import agent_process, make_agent  # noqa: F401 - the e2e fixtures
from tests.rig.agentproc import ROOT, AgentProcess, _twistd
from tests.rig.processes import spawn_logged, wait_until_ready

pytestmark = pytest.mark.e2e

BIG = 24 * 1024 * 1024


def rss_kib(pid: int) -> int:
    for line in Path("/proc/{}/status".format(pid)).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def deleted_files(pid: int) -> list[str]:
    """Open files of ``pid`` that have no name (temporary files)."""
    found = []
    for fd in os.listdir("/proc/{}/fd".format(pid)):
        try:
            target = os.readlink("/proc/{}/fd/{}".format(pid, fd))
        except OSError:
            continue
        if target.endswith("(deleted)") or target.startswith("/tmp/#"):
            found.append(target)
    return found


def read_bytes(pid: int) -> int:
    """Bytes ``pid`` has read through read(2)-like calls, sockets included."""
    for line in Path("/proc/{}/io".format(pid)).read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def timed_health(agent: AgentProcess) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(agent.base_url + "/health", timeout=5) as response:
        assert json.loads(response.read())["nodeId"] == agent.node_id
    return time.monotonic() - started


class Uploader:
    """A non-blocking client announcing ``total`` bytes and pushing what the kernel takes."""

    def __init__(self, port: int, total: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.pending = (
            "POST /api/command HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
            "Content-Length: {}\r\n\r\n".format(total)
        ).encode()
        self.sent = 0
        self.total = total
        self.received = b""
        self.closed = False

    def pump(self) -> None:
        chunk = b"B" * 65536
        while not self.closed and (self.pending or self.sent < self.total):
            try:
                n = self.sock.send(self.pending or chunk)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            if self.pending:
                self.pending = self.pending[n:]
            else:
                self.sent += n
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
            self.received += data


def test_unauthenticated_uploads_are_answered_401_and_never_stored(
    agent_process: AgentProcess,  # noqa: F811 - the fixture
) -> None:
    agent = agent_process
    assert agent.process is not None
    pid = agent.process.pid
    before = rss_kib(pid)
    read_before = read_bytes(pid)
    clients = [Uploader(agent.port, BIG) for _ in range(20)]
    temp_files: list[str] = []
    peak = before
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(c.received for c in clients):
            for c in clients:
                c.pump()
            temp_files += deleted_files(pid)
            peak = max(peak, rss_kib(pid))
            time.sleep(0.005)
        statuses = [c.received.split(b" ", 2)[1] for c in clients if c.received]
        assert statuses == [b"401"] * 20
        assert all(b'"AUTH_FAILED"' in c.received for c in clients)
        # While the clients were pushing, nothing of their bodies was stored.
        assert temp_files == []
        assert peak - before < 16 * 1024
        # The agent itself read next to nothing of the bodies (what the
        # clients pushed sits in the kernel's socket buffers, which may be
        # large enough here to take a whole body): rchar counts every byte the
        # process read from any socket or file.
        assert read_bytes(pid) - read_before < 8 * 1024 * 1024, sum(c.sent for c in clients)
    finally:
        for c in clients:
            c.sock.close()
    assert timed_health(agent) < 1.0
    assert "Traceback" not in agent.log_path.read_text(errors="replace")


class LimitedAgent(AgentProcess):
    """An agent whose process may hold at most ``nofile`` open files."""

    nofile = 1024

    def start(self, timeout: float = 30.0) -> AgentProcess:
        self._write_config()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("AGENT_SECRET", None)
        limit = self.nofile

        def limit_files() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.process = spawn_logged(
            [_twistd(), "--nodaemon", "--pidfile=", "ctrlagent", "--config", str(self.config_path)],
            self.log_path,
            cwd=str(self.workdir),
            env=env,
            preexec_fn=limit_files,
        )
        wait_until_ready(self.process, self._answers, timeout, "the agent", self.log_path)
        return self


@pytest.mark.slow
def test_health_answers_under_more_slow_connections_than_the_agent_has_files(
    tmp_path: Path, docker_engine: object
) -> None:
    agent = LimitedAgent(tmp_path / "limited", docker_engine.host)  # type: ignore[attr-defined]
    agent.start()
    slow: list[socket.socket] = []
    try:
        for _ in range(1100):
            s = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: slow\r\n")  # never finished
            slow.append(s)
        time.sleep(0.5)
        for _ in range(5):
            assert timed_health(agent) < 1.0
        # The whole log: once the slow connections' header deadline passes,
        # a debug line per closed connection fills the tail ``log_text`` reads.
        log = agent.log_path.read_text(errors="replace")
        assert "Out of file descriptors" not in log
        assert "the open-file limit allows" in log
    finally:
        for s in slow:
            s.close()
        agent.stop()
    assert "Traceback" not in agent.log_path.read_text(errors="replace")
