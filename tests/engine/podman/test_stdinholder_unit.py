"""
Unit tests of the stdin holder's framing, the names of its files, and reaching a holder
while the agent stops (no engine: a memory reactor).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ProcessDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from ctrlagent.engine.docker.errors import DockerError, DockerUnavailable
from ctrlagent.engine.podman.holders import SOCKET_PATH_MAX, StdinHolders, holder_pids
from ctrlagent.engine.podman.stdinholder import MAX_FRAME, FrameReader, frame
from ctrlagent.work import is_cancellation

CID = "ab" * 32


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50))
def test_frames_come_out_whole_whatever_the_reads_cut(payloads: list[bytes], cut: int) -> None:
    stream = b"".join(frame(p) for p in payloads)
    reader = FrameReader()
    out: list[bytes] = []
    for i in range(0, len(stream), cut):
        out.extend(reader.feed(stream[i:i + cut]))
    assert out == payloads


def test_a_frame_longer_than_the_bound_is_refused_on_both_ends() -> None:
    with pytest.raises(ValueError):
        frame(b"x" * (MAX_FRAME + 1))
    reader = FrameReader()
    with pytest.raises(ValueError):
        reader.feed((MAX_FRAME + 1).to_bytes(4, "big"))


def test_holder_sockets_are_named_by_container_id_and_run_only(tmp_path: Path) -> None:
    holders = StdinHolders(None, str(tmp_path), "/run/podman/podman.sock")
    path = holders.socket_path(CID, 1_796_000_000_123_456_789)
    assert path == str(tmp_path / "{}-1796000000123456789.sock".format(CID[:24]))
    for bad in ("../../etc/x", "abc", CID.upper(), CID + "/x"):
        with pytest.raises(DockerError):
            holders.socket_path(bad, 1)


def test_a_directory_too_long_for_a_socket_address_is_reached_through_its_descriptor(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    holders = StdinHolders(None, str(deep), "/run/podman/podman.sock")
    path = holders.socket_path(CID, 1)
    assert len(path) > SOCKET_PATH_MAX and holders.fits()
    address = holders._address(path)
    assert len(address) <= SOCKET_PATH_MAX
    assert os.path.samefile(os.path.dirname(address), str(deep))


def test_holder_pids_reads_only_pid_files_holding_a_number(tmp_path: Path) -> None:
    (tmp_path / "a.pid").write_text("123\n")
    (tmp_path / "b.pid").write_text("not a pid")
    (tmp_path / "c.sock").write_text("456")
    assert list(holder_pids(str(tmp_path))) == [123]
    assert list(holder_pids(str(tmp_path / "missing"))) == []


# -- the agent stopping while it reaches a holder ----------------------------------------------


class _Reactor(MemoryReactorClock):
    """Connects that never complete unless told, and launches that never end unless told."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Any] = []

    def spawnProcess(self, protocol: Any, executable: Any, args: Any = (), env: Any = None,  # noqa: N802
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,  # noqa: N803
                     childFDs: Any = None) -> None:  # noqa: N803
        self.launches.append(protocol)


def _warnings() -> tuple[list[dict], Any]:
    seen: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    return seen, observer


def test_a_holder_connect_cancelled_by_the_agent_stopping_is_cancellation_not_a_gone_holder(
    tmp_path: Path,
) -> None:
    reactor = _Reactor()
    holders = StdinHolders(reactor, str(tmp_path), "/run/podman/podman.sock")
    # The run's holder is there (its socket): the connect is under way when the agent stops.
    Path(holders.socket_path(CID, 7)).write_text("")
    seen, observer = _warnings()
    try:
        opened = Deferred.fromCoroutine(holders.open(CID, 7, "/attach"))
        assert not opened.called and len(reactor.connectors) == 1
        opened.cancel()
        failure = _failure(opened)
    finally:
        globalLogPublisher.removeObserver(observer)
    # Cancellation (the tracker's is_cancellation), not "the holder ended": no
    # ClosedStdin, no warning, no holder started, the connect abandoned (nothing half-open).
    assert failure.check(CancelledError) and is_cancellation(failure)
    assert seen == []
    assert reactor.connectors[0].stoppedConnecting
    assert len(reactor.unixClients) == 1 and reactor.launches == []


def test_a_holder_start_cancelled_by_the_agent_stopping_is_cancellation_not_a_timeout(
    tmp_path: Path,
) -> None:
    reactor = _Reactor()
    holders = StdinHolders(reactor, str(tmp_path), "/run/podman/podman.sock", timeout=5.0)
    seen, observer = _warnings()
    try:
        opened = Deferred.fromCoroutine(holders.open(CID, 7, "/attach"))
        # No holder yet: its socket is not there, so the connect fails and one is started.
        _, factory, _, _ = reactor.unixClients[0]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectError("no socket")))
        assert len(reactor.launches) == 1 and not opened.called
        opened.cancel()
        failure = _failure(opened)
        # The launch that goes on alone ends later: nothing more happens.
        reactor.launches[0].outReceived(b"ready 4242\n")
        reactor.launches[0].processEnded(Failure(ProcessDone(0)))
        reactor.advance(10)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failure.check(CancelledError) and is_cancellation(failure)
    assert seen == []
    assert len(reactor.unixClients) == 1  # no connect after the cancellation
    assert reactor.getDelayedCalls() == []  # its timer went with it


def test_a_holder_that_never_answers_its_launch_is_still_a_timeout(tmp_path: Path) -> None:
    reactor = _Reactor()
    holders = StdinHolders(reactor, str(tmp_path), "/run/podman/podman.sock", timeout=5.0)
    opened = Deferred.fromCoroutine(holders.open(CID, 7, "/attach"))
    _, factory, _, _ = reactor.unixClients[0]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectError("no socket")))
    reactor.advance(5)
    failure = _failure(opened)
    assert failure.check(DockerUnavailable) and not is_cancellation(failure)
    assert "did not answer in 5 s" in failure.getErrorMessage()


def _failure(d: Deferred[Any]) -> Failure:
    results: list[Any] = []
    d.addBoth(results.append)
    assert len(results) == 1 and isinstance(results[0], Failure), results
    return results[0]
