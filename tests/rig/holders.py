"""
Teardown of Podman stdin holders (``ctrlagent/engine/podman/stdinholder.py``)
that a test left: by the pids their pid files recorded, each checked to still
be a holder before it is signalled.
"""

from __future__ import annotations

import os
import signal
import time

from ctrlagent.engine.podman.holders import holder_pids

__all__ = ["is_holder", "kill_left_holders", "end_holders"]


def is_holder(pid: int) -> bool:
    """True while ``pid`` runs and is a stdin holder (not a reused pid)."""
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            cmdline = f.read(4096)
        with open("/proc/{}/stat".format(pid)) as f:
            state = f.read(512).rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"stdinholder.py" in cmdline and state != "Z"


def kill_left_holders(directory: str) -> list[int]:
    """SIGKILL the holders whose pid files are in ``directory``; the pids that were alive."""
    killed = []
    for pid in holder_pids(directory):
        if is_holder(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def end_holders(directory: str, seconds: float = 10.0) -> list[int]:
    """
    Test teardown, once the containers are removed: wait (bounded) for the
    holders under ``directory`` to end with them, then SIGKILL those left;
    the pids that had to be killed (a holder that outlived its container).
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(is_holder(pid) for pid in holder_pids(directory)):
            return []
        time.sleep(0.05)
    return kill_left_holders(directory)
