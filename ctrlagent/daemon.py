"""
``twistd ctrlagent`` without ``-n``: a start-up failure told to the waiting parent.

twistd daemonizes before it starts the services: the process the operator
started forks, waits on a status pipe for the daemon to write ``0`` (started)
or ``1 <exception>`` and exits with that.  Two things go wrong for the agent:

- the agent ends a failed start with ``SystemExit`` (one critical line, no
  traceback), which twistd's ``postApplication`` does not catch, so nothing is
  written to the pipe; the waiting parent also still holds the pipe's write
  end, so it never sees EOF and waits forever;
- when something is written, the parent prints ``An error has occurred:
  b'...'`` and a second line, cut at 100 bytes.

``DaemonStatus`` writes the agent's own line to the pipe, and
``tell_the_parent_our_line`` makes the waiting parent print that one line and
exit 1 (twistd's own message, for a failure the agent did not describe, is
kept as it was).  With ``-n`` (what systemd runs) neither is used.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import MutableMapping
from typing import Any

# What the daemon writes ahead of its line, so that the parent tells it from
# twistd's own ``0`` / ``1 <exception>``.
_PREFIX = b"ctrlagent: "
# One write of at most PIPE_BUF bytes reaches the parent whole, in one read.
_MAX_LINE = 4000


class DaemonStatus:
    """The daemon's side of twistd's status pipe (``config["statusPipe"]``)."""

    def __init__(self, twistd_config: MutableMapping[str, Any]) -> None:
        self._config = twistd_config

    def failed(self, line: str) -> None:
        """Tell the waiting parent that the start failed, with ``line``; once."""
        fd = self._config.get("statusPipe")
        if not isinstance(fd, int):
            return
        # twistd removes its pidfile only after a start it saw fail.
        pidfile = self._config.get("pidfile")
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        # Taken, so that twistd itself writes nothing more to it.
        self._config["statusPipe"] = None
        data = line.replace("\n", " ").encode("utf-8", "backslashreplace")
        if not data.startswith(_PREFIX):
            data = _PREFIX + data
        try:
            os.write(fd, data[:_MAX_LINE] + b"\n")
        except OSError:
            pass  # the parent is gone: nobody is waiting
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def daemonizing(options: Any) -> MutableMapping[str, Any] | None:
    """twistd's own options when it daemonizes (no ``-n``), else None."""
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("nodaemon"):
        return None
    return parent  # type: ignore[no-any-return]


def tell_the_parent_our_line() -> None:
    """
    Make twistd's waiting parent print the daemon's line as it is and exit 1.

    Replaces ``UnixApplicationRunner._waitForStart`` in this process (the
    parent that forks runs it); twistd's own answers keep their meaning.
    """
    from twisted.scripts import _twistd_unix

    runner = _twistd_unix.UnixApplicationRunner
    if getattr(runner._waitForStart, "_ctrlagent", False):
        return

    def wait_for_start(self: Any, read_pipe: int) -> int:
        # twistd keeps the write end open here too: without closing it a
        # daemon that dies before writing would leave this parent waiting
        # forever instead of seeing EOF.
        _close_other_end(read_pipe)
        data = os.read(read_pipe, _MAX_LINE + 64)  # retried on EINTR by Python (PEP 475)
        if data == b"0":
            return 0
        stderr = sys.__stderr__
        if not data:
            text = (
                "ctrlagent: error: the agent's daemon process ended before it started;"
                " its log file says why"
            )
        elif data.startswith(_PREFIX):
            text = data.decode("utf-8", "replace").rstrip("\n")
        else:
            text = (
                "An error has occurred: {!r}\nPlease look at log file for more information."
            ).format(data[2:])
        if stderr is not None:
            stderr.write(text + "\n")
            stderr.flush()
        return 1

    wait_for_start._ctrlagent = True  # type: ignore[attr-defined]
    runner._waitForStart = wait_for_start  # type: ignore[method-assign, assignment]


def _close_other_end(read_pipe: int) -> None:
    """Close this process's descriptors of the write end of ``read_pipe``'s pipe."""
    try:
        inode = os.fstat(read_pipe).st_ino
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd == read_pipe:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue  # the listing's own descriptor, already closed
        if stat.S_ISFIFO(st.st_mode) and st.st_ino == inode:
            os.close(fd)
