"""
Child processes of the test rig: started with their output in a log file,
waited for until they answer, and stopped by their own pid.

Shared by the private dockerd, the local registry and the agent subprocess.
``ProcessIdentity`` names a process by its pid *and* its start time, so that a
record written by an earlier run is never taken for an unrelated process that
got the same pid since.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessIdentity:
    """
    One process, as ``/proc`` knows it: its pid and its start time (clock
    ticks after boot, field 22 of ``/proc/<pid>/stat``).

    Only ever used to *look* at a process (is it still there?), never to
    signal one: the rig stops only the processes it holds a handle to.
    """

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int, proc: Path = Path("/proc")) -> ProcessIdentity | None:
        """The identity of the running process ``pid``; None when there is none."""
        fields = _stat_fields(pid, proc)
        if fields is None or fields[0] == "Z":
            return None
        return cls(pid, int(fields[19]))

    def running(self, proc: Path = Path("/proc")) -> bool:
        """True while this very process exists and is not a zombie."""
        fields = _stat_fields(self.pid, proc)
        return fields is not None and fields[0] != "Z" and int(fields[19]) == self.start


def _stat_fields(pid: int, proc: Path) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first), None when unreadable."""
    if pid <= 0:
        return None
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = raw[raw.rfind(")") + 1 :].split()
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return fields


def spawn_logged(argv: Sequence[str], log_path: Path, **popen: object) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log_path``, stdin closed."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen
        )


def wait_until_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    log_path: Path,
) -> None:
    """
    Poll ``ready()`` until it is true; raise with the log's tail when ``proc``
    exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                "{} exited with {}:\n{}".format(what, proc.returncode, _tail(log_path))
            )
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError("{} not ready within {}s:\n{}".format(what, timeout, _tail(log_path)))


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30.0
) -> int | None:
    """Signal ``proc`` by its pid, wait, and SIGKILL it if it outlives ``timeout``."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return ""
