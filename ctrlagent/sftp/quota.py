"""
Disk usage of each server as its SFTP sessions see it (thread-side).

Every write that makes a file bigger is charged here *before* it reaches the
disk, under the server's lock, and refused with ``InsufficientResources`` when
it would take the server's directory past ``ServerRoot.disk_limit_bytes``: a
refused write writes nothing, so a file is never left bigger than the limit
allows.  The usage figure is measured (``fsops.disk_usage``: the qgroup of a
btrfs subvolume, else a budgeted, cached walk of apparent sizes, as the file
manager counts; docs/DISK.md) at most every ``ttl`` seconds and kept current
in between by the deltas of our own writes, truncations and removals; what
the game server writes itself shows up at the next measure.  On btrfs the
kernel refuses writes past the qgroup limit too (``EDQUOT``, answered as a
quota failure).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ctrlagent.errors import InsufficientResources
from ctrlagent.files import fsops
from ctrlagent.files.confined import Confined
from ctrlagent.interfaces import ServerRoot


@dataclass
class _Usage:
    lock: threading.Lock = field(default_factory=threading.Lock)
    walked_at: float | None = None
    used: int = 0


class UsageTracker:
    """Bytes used per server directory, shared by all sessions (thread-safe)."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._servers: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    def _entry(self, root: ServerRoot) -> _Usage:
        with self._lock:
            entry = self._servers.get(root.path)
            if entry is None:
                entry = self._servers[root.path] = _Usage()
            return entry

    def _fresh(self, entry: _Usage, c: Confined) -> None:
        now = self.clock()
        if entry.walked_at is None or now - entry.walked_at > self.ttl:
            entry.used = fsops.disk_usage(c)
            entry.walked_at = now

    def charge(self, root: ServerRoot, c: Confined, n: int) -> None:
        """Account for ``n`` more bytes, or refuse them if they do not fit."""
        if n <= 0 or root.disk_limit_bytes is None:
            return
        entry = self._entry(root)
        with entry.lock:
            self._fresh(entry, c)
            if entry.used + n > root.disk_limit_bytes:
                raise InsufficientResources(
                    "disk quota exceeded: the server may hold {} bytes".format(
                        root.disk_limit_bytes))
            entry.used += n

    def credit(self, root: ServerRoot, n: int) -> None:
        """Account for ``n`` bytes freed (or a charge that was not used)."""
        if n <= 0 or root.disk_limit_bytes is None:
            return
        entry = self._entry(root)
        with entry.lock:
            entry.used = max(0, entry.used - n)

    def used(self, root: ServerRoot) -> int | None:
        """The current figure (``None`` before the first walk)."""
        entry = self._entry(root)
        with entry.lock:
            return entry.used if entry.walked_at is not None else None
