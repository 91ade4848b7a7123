"""
Hostile HTTP clients without credentials, on loopback, bounded in count and time.

- About a thousand slow clients each open a connection and send half a
  request header, then nothing.  The agent runs with the soft open-file limit
  systemd gives a service (1024).  ``/health``, the Panel's discovery probe,
  must still answer within about a second.
- Twenty clients announce request bodies of 20 MiB (under the body limit)
  without any credential, and stream them.  The credential is checked on the
  headers, before any body is read: each gets its 401 at once, and the agent's
  memory (VmRSS) and the bytes it holds in (temporary) files stay bounded.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import select
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from tests.faults.rig import FaultAgent, open_file_bytes

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.docker, pytest.mark.slow]

SLOW_CLIENTS = 1100
HEALTH_WITHIN = 1.5  # seconds: "about a second"
BIG_CLIENTS = 20
ANNOUNCED = 20 * 1024 * 1024
SENT_AT_MOST = 8 * 1024 * 1024  # per client: bounded even if the agent reads it all
MIB = 1024 * 1024


@contextlib.contextmanager
def _open_files(n: int) -> Iterator[None]:
    """Raise this process's soft open-file limit for ``n`` more sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, n + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connect_all(port: int, count: int, deadline: float) -> list[socket.socket]:
    """``count`` non-blocking connections to the agent (those that complete in time)."""
    pending = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        code = s.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            s.close()
            continue
        pending.append(s)
    connected = []
    # poll, not select: these descriptors go past select's 1024.
    poller = select.poll()
    by_fd = {s.fileno(): s for s in pending}
    for fd in by_fd:
        poller.register(fd, select.POLLOUT)
    try:
        while by_fd and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                s = by_fd.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected.append(s)
                else:
                    s.close()
    finally:
        for s in by_fd.values():
            s.close()
    return connected


def _probe_health(agent: FaultAgent) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(agent.base_url + "/health", timeout=HEALTH_WITHIN + 3) as r:
        assert r.status == 200
        r.read()
    return time.monotonic() - started


def test_health_answers_within_a_second_while_a_thousand_slow_clients_hang(
    make_agent: Callable[..., FaultAgent],
) -> None:
    agent = make_agent()
    agent.nofile = 1024
    agent.start()
    assert _probe_health(agent) < HEALTH_WITHIN
    with _open_files(SLOW_CLIENTS):
        clients = _connect_all(agent.port, SLOW_CLIENTS, time.monotonic() + 10)
        try:
            half = (
                b"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
            )
            for s in clients:
                with contextlib.suppress(OSError):
                    s.send(half)
            time.sleep(1.0)
            timings = []
            for _ in range(5):
                try:
                    timings.append(_probe_health(agent))
                except OSError as e:
                    timings.append(float("inf"))
                    print("/health failed: {}".format(e))  # noqa: T201
                time.sleep(0.3)
        finally:
            for s in clients:
                s.close()
    assert max(timings) < HEALTH_WITHIN, (
        "/health took {} s with {} slow clients connected".format(
            ["{:.2f}".format(t) for t in timings], len(clients)
        )
    )
    # And once they are gone the agent serves the Panel as before.
    assert agent.call("system.ping")["success"] is True


def test_unauthenticated_big_bodies_are_refused_before_they_are_read(
    make_agent: Callable[..., FaultAgent],
) -> None:
    agent = make_agent().start()
    pid = agent.pid
    exclude = (agent.log_path,)
    base_rss = agent.rss_kib() * 1024
    base_files = open_file_bytes(pid, exclude)
    head = (
        "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: {}\r\n\r\n".format(ANNOUNCED)
    ).encode()
    clients = []
    for _ in range(BIG_CLIENTS):
        s = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
        s.sendall(head)
        s.setblocking(False)
        clients.append(s)
    sent = {s: 0 for s in clients}
    answers = {s: b"" for s in clients}
    open_ = set(clients)
    chunk = b"x" * 65536
    peak_rss, peak_files = base_rss, base_files
    deadline = time.monotonic() + 8
    last_sample = 0.0
    try:
        while time.monotonic() < deadline:
            writers = [s for s in open_ if sent[s] < SENT_AT_MOST]
            poller = select.poll()
            for s in open_:
                poller.register(s, select.POLLIN | (select.POLLOUT if s in writers else 0))
            events = dict(poller.poll(50))
            readable = [s for s in open_ if events.get(s.fileno(), 0) & (select.POLLIN
                                                                         | select.POLLHUP
                                                                         | select.POLLERR)]
            writable = [s for s in writers if events.get(s.fileno(), 0) & select.POLLOUT]
            for s in readable:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                answers[s] += data
                if not data:
                    open_.discard(s)
            for s in writable:
                if s not in open_:
                    continue
                try:
                    sent[s] += s.send(chunk)
                except OSError:
                    open_.discard(s)
            now = time.monotonic()
            if now - last_sample > 0.1:
                last_sample = now
                peak_rss = max(peak_rss, agent.rss_kib() * 1024)
                peak_files = max(peak_files, open_file_bytes(pid, exclude))
            if all(answers[s] for s in clients) and not any(
                s in open_ and sent[s] < SENT_AT_MOST for s in clients
            ):
                break
    finally:
        for s in clients:
            s.close()
    statuses = [answers[s].split(b"\r\n", 1)[0].decode(errors="replace") for s in clients]
    total_sent = sum(sent.values())
    assert peak_files - base_files < 16 * MIB, (
        "the agent held {:.0f} MiB in files for {} clients without credentials "
        "({:.0f} MiB sent)".format((peak_files - base_files) / MIB, BIG_CLIENTS, total_sent / MIB)
    )
    assert peak_rss - base_rss < 64 * MIB, (
        "the agent's memory grew by {:.0f} MiB ({:.0f} MiB sent)".format(
            (peak_rss - base_rss) / MIB, total_sent / MIB
        )
    )
    refused = [st for st in statuses if st.startswith("HTTP/1.1 401")]
    assert len(refused) == BIG_CLIENTS, (
        "answers to unauthenticated uploads: {} ({:.0f} MiB of bodies sent)".format(
            sorted(set(statuses)), total_sent / MIB
        )
    )
    assert agent.call("system.ping")["success"] is True
