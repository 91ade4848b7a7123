"""
twistd's daemon mode: the waiting parent hears the daemon's one line, or
sees it die, and never waits forever (the e2e side is in
tests/e2e/test_startup_failures.py).
"""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import pytest
from twisted.scripts import _twistd_unix

from ctrlagent.daemon import DaemonStatus, daemonizing, tell_the_parent_our_line


@pytest.fixture
def wait_for_start(monkeypatch: pytest.MonkeyPatch) -> object:
    """The parent's patched wait, undone after the test; its stderr captured."""
    runner = _twistd_unix.UnixApplicationRunner
    monkeypatch.setattr(runner, "_waitForStart", runner._waitForStart)
    monkeypatch.setattr(sys, "__stderr__", io.StringIO())
    tell_the_parent_our_line()
    return runner._waitForStart


def waited(wait: object, read_end: int) -> int:
    """Run the parent's wait in a thread: its exit code; fails if it hangs."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(wait(None, read_end)))  # type: ignore[operator]
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the parent would wait forever"
    return result[0]


def test_the_parent_prints_the_daemons_line_and_exits_1(
    wait_for_start: object, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    pidfile = tmp_path / "agent.pid"
    pidfile.write_text("123")
    config = {"statusPipe": os.dup(write_end), "pidfile": str(pidfile)}
    DaemonStatus(config).failed("ctrlagent: error: cannot listen (address already in use)")
    assert config["statusPipe"] is None  # twistd writes nothing more
    assert not pidfile.exists()
    assert waited(wait_for_start, read_end) == 1  # it also closed its own write end
    assert sys.__stderr__.getvalue() == (  # type: ignore[union-attr]
        "ctrlagent: error: cannot listen (address already in use)\n")
    os.close(read_end)


def test_a_daemon_that_dies_without_a_word_ends_the_wait_with_1(wait_for_start: object) -> None:
    read_end, write_end = os.pipe()
    os.close(os.dup(write_end))  # the daemon's copy, closed as it dies
    # The parent's own copy (write_end) is still open, as in twistd.
    assert waited(wait_for_start, read_end) == 1
    assert "ended before it started" in sys.__stderr__.getvalue()  # type: ignore[union-attr]
    os.close(read_end)


def test_a_started_daemon_and_twistds_own_message_keep_their_meaning(
    wait_for_start: object,
) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"0")
    assert waited(wait_for_start, read_end) == 0
    os.close(read_end)
    read_end, write_end = os.pipe()
    os.write(write_end, b"1 ValueError: boom")
    assert waited(wait_for_start, read_end) == 1
    assert "An error has occurred: b'ValueError: boom'" in sys.__stderr__.getvalue()  # type: ignore[union-attr]
    os.close(read_end)


def test_only_a_daemonizing_twistd_gets_a_status() -> None:
    class Options(dict):  # type: ignore[type-arg]
        parent: object = None

    assert daemonizing(Options()) is None
    sub = Options()
    sub.parent = {"nodaemon": True}
    assert daemonizing(sub) is None
    sub.parent = {"nodaemon": False, "statusPipe": 5}
    assert daemonizing(sub) is sub.parent
