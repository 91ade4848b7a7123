"""
How much a server's data directory holds, cheaply (blocking; thread side).

One ``Meter`` answers for the whole agent (``shared_meter()``: the server
manager's limit checks, the file manager's and SFTP's quotas), in one of two
modes (``[disk] mode``, resolved by ``servers.datadir``):

- ``btrfs``: a directory that is a subvolume with a readable qgroup is
  measured by reading that qgroup (``files.btrfs.referenced``), plus the
  qgroups of the subvolumes nested beneath it (``nested_referenced``: one
  search of the root tree per subvolume): no walk at all.  Anything else
  falls back to the walk.
- ``walk``: a walk of the tree, made cheap three ways:

  1. **Cached by directory.**  Each directory's own total (the files right
     in it) and the names of its subdirectories are kept, keyed by its inode
     and checked against its ``mtime`` and ``ctime``.  A directory whose
     times did not change had no entry added, removed or renamed, so its
     listing is reused and its files are not looked at again: one ``fstat``
     per directory instead of one per file.  What this skips, precisely: a
     file *rewritten in place* (appended to, truncated, overwritten) changes
     its own size and times but not its directory's, so that growth shows
     up when the directory is next looked at in full, at most
     ``walk_full_interval`` seconds later (0: every file every time; plus
     the time to the next measure when measures are further apart).  Each
     directory is looked at in full once per interval, no more: its next
     full look is due one interval after the last (after its first, at a
     point of the first interval set by its inode, so that the full looks
     are spread evenly over the measures, a fifth of the tree per measure
     at the defaults, instead of all falling in one).  The agent's own
     writes keep the file manager's and SFTP's figures current in between
     (their deltas).
  2. **Budgeted.**  Between batches of ``walk_batch`` entries the walk
     pauses so that it is busy (CPU and disk waits together) at most
     ``walk_share`` of the time.
  3. **Coalesced.**  Two measures of the same directory never run at once:
     a request arriving while a walk runs waits for it and shares its figure.

The walk never follows a link and never leaves the directory's mount:
every directory is opened with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`` from the top; a btrfs subvolume
nested inside (another device number, the same mount) is walked and counted
like any directory.  A subtree deeper than a path ``openat2`` takes is
measured whole by ``trees.Walk`` (uncached, on the top's device only), so
totals stay exact; without openat2 the whole tree is.  The totals are
``trees.tree_usage``'s (where no subvolume is nested): apparent size of
regular files, and allocated blocks of every non-directory.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ctrlagent.errors import Conflict
from ctrlagent.files import btrfs, trees
from ctrlagent.files.confined import OPENAT2_AVAILABLE, _openat2
from ctrlagent.files.paths import KEEP_PREFIX, WORK_PREFIXES

# RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
_RESOLVE = 0x01 | 0x02 | 0x04 | 0x08
# Bytes of a relative path handed to openat2 at most (PATH_MAX is 4096), and
# its components at most: resolving a path costs one lookup per component,
# so deeper subtrees are walked by fd (uncached) rather than re-resolved
# from the top for every directory (quadratic in a hostile chain).
MAX_RELATIVE = 3800
MAX_CACHED_DEPTH = 64
# Seconds one pause of a budgeted walk lasts at most.
MAX_PAUSE = 2.0


@dataclass(frozen=True)
class Usage:
    """
    A directory's use: ``apparent`` (sizes of its regular files) and
    ``allocated`` (blocks of every non-directory), equal when read from a
    qgroup (its ``referenced`` bytes).  ``complete`` is False when a part
    could not be measured (it changed meanwhile, another filesystem inside);
    ``source`` is ``qgroup``, ``walk`` or ``cached``.
    """

    apparent: int
    allocated: int
    complete: bool = True
    source: str = "walk"
    # Why a part could not be counted when the tree's own shape is the cause
    # (what a hostile game can make: subvolumes nested past what is counted,
    # another device below the walk's depth), not files changing meanwhile.
    # The server manager treats such a figure as over the disk limit.
    uncounted: str = ""


class Budget:
    """
    A duty cycle for one walk: ``spend(n)`` after ``n`` entries; every
    ``batch`` entries it sleeps so that the time spent working is at most
    ``share`` of the time elapsed.  ``stop`` (an Event) cuts pauses short.
    """

    def __init__(self, share: float = 1.0, batch: int = 2000,
                 stop: threading.Event | None = None) -> None:
        self.share = share
        self.batch = batch
        self.stop = stop if stop is not None else threading.Event()
        self.count = 0
        self.paused = 0.0
        self._resumed = time.monotonic()

    def spend(self, n: int = 1) -> None:
        """Account for ``n`` entries; pause when a batch is done."""
        self.count += n
        if self.count < self.batch:
            return
        self.count = 0
        if self.share >= 1.0:
            return
        busy = time.monotonic() - self._resumed
        pause = min(MAX_PAUSE, busy * (1.0 - self.share) / self.share)
        if pause > 0:
            self.stop.wait(pause)
            self.paused += pause
        self._resumed = time.monotonic()


@dataclass
class _Dir:
    """What a walk learnt of one directory (its own files, its subdirectories)."""

    mtime_ns: int
    ctime_ns: int
    apparent: int
    allocated: int
    subdirs: tuple[str, ...]
    looked_at: float
    # When its files are next due for a full look (see ``_next_due``).
    due: float


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    result: Usage | None = None
    error: BaseException | None = None
    joined: int = 0


def plain_usage(top_fd: int, budget: Budget | None = None,
                sweep_before: float | None = None) -> Usage:
    """
    Both figures of the tree ``top_fd`` by a plain ``trees.Walk`` (no cache),
    within ``budget``; with ``sweep_before``, agent work files untouched
    since then are removed on the way (as ``trees.tree_usage``).
    """
    apparent = allocated = 0
    walk = trees.Walk(top_fd)
    complete = True
    try:
        for e in walk:
            if budget is not None:
                budget.spend()
            if e.is_dir:
                if _swept_copy(e.dir_fd, e.name, sweep_before):
                    e.descend = False
                continue
            try:
                st = e.lstat()
            except OSError:
                continue
            if _swept(st, e.name, e.dir_fd, sweep_before):
                continue
            allocated += st.st_blocks * 512
            if stat.S_ISREG(st.st_mode):
                apparent += st.st_size
    except trees.TreeChanged:
        complete = False
    uncounted = (
        "{} directories on another device (nested subvolumes or mounts) inside it".format(
            walk.mounts) if walk.mounts else ""
    )
    return Usage(apparent, allocated, complete and not walk.truncated, "walk", uncounted)


def _swept_copy(dir_fd: int, name: str, sweep_before: float | None) -> bool:
    """
    Remove the tree of a directory copy the agent died in the middle of
    (``trees.COPY_PREFIX``, untouched since ``sweep_before``; as
    ``trees.tree_usage``).  A copy in progress keeps touching its tree.
    """
    if sweep_before is None or not name.startswith(trees.COPY_PREFIX):
        return False
    try:
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime >= sweep_before:
            return False
        trees.remove_tree(dir_fd, name)
    except (OSError, Conflict):
        return False  # the next walk tries again
    return True


def _swept(st: os.stat_result, name: str, dir_fd: int, sweep_before: float | None) -> bool:
    """Remove a leftover work file of the agent (as ``trees.tree_usage`` does)."""
    if sweep_before is None or not name.startswith(WORK_PREFIXES) or not stat.S_ISREG(st.st_mode):
        return False
    touched = st.st_ctime if name.startswith(KEEP_PREFIX) else st.st_mtime
    if touched >= sweep_before:
        return False
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        return False
    return True


def cached_usage(top_fd: int, cache: dict[tuple[int, int], _Dir], *, budget: Budget,
                 full_interval: float, now: float, sweep_before: float | None = None,
                 ) -> tuple[Usage, dict[tuple[int, int], _Dir]]:
    """
    The tree ``top_fd``'s use, reusing ``cache`` ((device, inode) -> ``_Dir``) for
    directories unchanged since they were looked at (see the module's
    docstring); returns the figure and the cache for the next time (only
    the directories met this time).
    """
    if not OPENAT2_AVAILABLE:
        return plain_usage(top_fd, budget, sweep_before), {}
    new: dict[tuple[int, int], _Dir] = {}
    top = os.open(".", trees.DIR_FLAGS, dir_fd=top_fd)
    try:
        dev = os.fstat(top).st_dev
        apparent = allocated = 0
        complete = True
        uncounted = ""
        stack = [("", 0)]
        while stack:
            rel, depth = stack.pop()
            try:
                fd = _openat2(top, rel or ".", trees.DIR_FLAGS, _RESOLVE)
            except OSError:
                complete = False  # gone, or replaced by a link, since its listing
                continue
            try:
                st = os.fstat(fd)
                # openat2 crossed no mount (RESOLVE_NO_XDEV): a directory of
                # another device here is a nested btrfs subvolume (any user
                # may make one), part of the tree and counted with it.  Its
                # inode numbers are its own: the cache is keyed by both.
                key = (st.st_dev, st.st_ino)
                d = cache.get(key)
                if (d is None or d.mtime_ns != st.st_mtime_ns or d.ctime_ns != st.st_ctime_ns
                        or now >= d.due):
                    d = _look(fd, st, now, budget, sweep_before,
                              _next_due(d, st.st_ino, now, full_interval))
                else:
                    budget.spend()
                new[key] = d
                apparent += d.apparent
                allocated += d.allocated
                for name in d.subdirs:
                    child = rel + "/" + name if rel else name
                    if depth < MAX_CACHED_DEPTH and len(os.fsencode(child)) <= MAX_RELATIVE:
                        stack.append((child, depth + 1))
                        continue
                    # Too deep: measure that subtree whole.
                    try:
                        sub = os.open(name, trees.DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        complete = False
                        continue
                    try:
                        if os.fstat(sub).st_dev != dev:
                            # A nested subvolume (or a mount) this deep is
                            # not walked: its bytes would go uncounted.
                            complete = False
                            uncounted = uncounted or (
                                "a directory on another device (a nested subvolume or a"
                                " mount) more than {} levels deep".format(MAX_CACHED_DEPTH))
                            continue
                        part = plain_usage(sub, budget, sweep_before)
                    finally:
                        os.close(sub)
                    apparent += part.apparent
                    allocated += part.allocated
                    complete = complete and part.complete
                    uncounted = uncounted or part.uncounted
            finally:
                os.close(fd)
    finally:
        os.close(top)
    return Usage(apparent, allocated, complete, "cached", uncounted), new


def _next_due(old: _Dir | None, ino: int, now: float, interval: float) -> float:
    """
    When a directory looked at in full ``now`` is next due for a full look:
    one ``interval`` after the full look it was due for, so that it keeps
    its place in the cycle (the measures that come after ``now`` look at
    the same share of the tree each); one interval after ``now`` when a
    change of its own made this look; the first time, at a point of the
    first interval its inode sets (spread evenly).
    """
    if interval <= 0:
        return now
    if old is None:
        return now + interval * (((ino * 0x9E3779B1) & 0xFFFF) + 1) / 0x10000
    if now < old.due:
        return now + interval
    return old.due + interval * ((now - old.due) // interval + 1)


def _look(fd: int, st: os.stat_result, now: float, budget: Budget,
          sweep_before: float | None, due: float) -> _Dir:
    """List the directory ``fd`` and stat its files (never following a link)."""
    apparent = allocated = 0
    subdirs: list[str] = []
    try:
        with os.scandir(fd) as it:
            for e in it:
                budget.spend()
                try:
                    if e.is_dir(follow_symlinks=False):
                        if not _swept_copy(fd, e.name, sweep_before):
                            subdirs.append(e.name)
                        continue
                    est = e.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                if _swept(est, e.name, fd, sweep_before):
                    continue
                allocated += est.st_blocks * 512
                if stat.S_ISREG(est.st_mode):
                    apparent += est.st_size
    except OSError:
        pass  # unreadable: counted as empty, as trees.Walk does
    return _Dir(st.st_mtime_ns, st.st_ctime_ns, apparent, allocated, tuple(subdirs), now, due)


class Meter:
    """
    Measures data directories (thread-safe; see the module's docstring).

    ``mode`` is ``btrfs`` or ``walk``; ``share``, ``batch`` and
    ``full_interval`` are ``[disk]``'s ``walk_share``, ``walk_batch`` and
    ``walk_full_interval``.  ``walks`` counts the walks made (a request
    that joined another's walk made none).
    """

    def __init__(self, mode: str = "walk", share: float = 1.0, batch: int = 2000,
                 full_interval: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.share = share
        self.batch = batch
        self.full_interval = full_interval
        self.clock = clock
        self.walks = 0
        self.joins = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._caches: dict[tuple[int, int], dict[tuple[int, int], _Dir]] = {}

    def configure(self, mode: str, share: float, batch: int, full_interval: float) -> None:
        """Take the resolved mode and ``[disk]``'s walk settings."""
        self.mode = mode
        self.share = share
        self.batch = batch
        self.full_interval = full_interval

    def measure(self, top_fd: int, sweep_before: float | None = None,
                stop: threading.Event | None = None) -> Usage:
        """
        The use of the directory ``top_fd`` (any fd of it, ``O_PATH``
        included).  Once ``stop`` is set (the agent stops), a walk no longer
        pauses for its budget: it ends as soon as it can.
        """
        st = os.fstat(top_fd)
        if self.mode == "btrfs":
            try:
                sub = btrfs.subvolume_of(top_fd)
                used = btrfs.referenced(sub) if sub is not None else None
            except OSError:
                used = None
            if used is not None:
                assert sub is not None
                # Subvolumes nested inside (the game may make them) have
                # qgroups of their own, outside the server's: counted here.
                nested, whole, capped = btrfs.nested_referenced(top_fd, sub)
                uncounted = (
                    "more than {} subvolumes nested in it".format(btrfs.MAX_NESTED)
                    if capped else ""
                )
                return Usage(used + nested, used + nested, whole, "qgroup", uncounted)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                flight.joined += 1
                self.joins += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            return flight.result
        try:
            with self._lock:
                self.walks += 1
                cache = self._caches.get(key, {})
            budget = Budget(self.share, self.batch, stop if stop is not None else self.stopping)
            usage, cache = cached_usage(top_fd, cache, budget=budget,
                                        full_interval=self.full_interval, now=self.clock(),
                                        sweep_before=sweep_before)
            with self._lock:
                self._caches[key] = cache
            flight.result = usage
            return usage
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def measure_path(self, path: str, sweep_before: float | None = None,
                     stop: threading.Event | None = None) -> Usage:
        """``measure`` of the directory ``path`` (never through a link); zero if absent."""
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return Usage(0, 0, True, "walk")
        try:
            return self.measure(fd, sweep_before, stop)
        finally:
            os.close(fd)

    def forget(self, path: str) -> None:
        """Drop what is cached of the directory ``path`` (a server deleted or converted)."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return
        with self._lock:
            self._caches.pop((st.st_dev, st.st_ino), None)


_shared = Meter()


def shared_meter() -> Meter:
    """The agent's one ``Meter`` (configured by ``servers.datadir.DataDirs``)."""
    return _shared
