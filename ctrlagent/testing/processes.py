"""
Child processes of the test rig: started with their output in a log file,
waited for until they answer, and stopped by their own pid.

Shared by the private dockerd, the local registry and the agent subprocess.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


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
