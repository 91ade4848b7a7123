"""
The servers' data directories on the host: where each lives, making it ready
for its server, measuring it, enforcing its disk limit, purging it.

Everything inside a data directory was written by a game server (or its
install script, run as root): it is hostile.  The passes never follow a link,
hand the tree back to the server's user, and run in the disk thread pool,
never on the reactor.

Disk limits (``[disk] mode``, docs/DISK.md): in ``btrfs`` mode each server's
directory is a subvolume whose qgroup limit is the server's disk limit, so
the kernel itself refuses writes past it, and its usage is read from the
qgroup (``files.btrfs``).  A server's directory is made so (created as a
subvolume, or an existing plain directory converted) only while the server
is stopped (``prepare(..., settle=True)``, which the server calls before a
start and an install); a limit update changes the qgroup's limit; a purge
deletes the subvolume.  In ``walk`` mode usage is walked within a budget and
cached by directory (``files.usage``).
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ctrlagent.config import DiskConfig
from ctrlagent.files import btrfs, trees
from ctrlagent.files.confined import os_error
from ctrlagent.files.usage import Meter, Usage, shared_meter
from ctrlagent.startup import StartupError

T = TypeVar("T")


# Where a conversion copies a plain data directory before the swap: beside
# it in the data root, a name no server id can have (they never start with ".").
CONVERT_PREFIX = ".ctrlagent-convert-"
# Where an old tree is kept when it changed during its conversion.
KEPT_PREFIX = ".ctrlagent-preconvert-"
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


class DataDirs:
    """
    The data directories under ``root``, and the disk thread pool that walks
    them.  ``disk`` is ``[disk]``; ``meter`` measures (default: the agent's
    shared one, which the file manager and SFTP use too).
    """

    log = Logger()

    def __init__(self, reactor: Any, root: str, pool: ThreadPool,
                 disk: DiskConfig | None = None, meter: Meter | None = None) -> None:
        self.reactor = reactor
        self.root = root
        self.pool = pool
        self.disk = disk if disk is not None else DiskConfig()
        self.meter = meter if meter is not None else shared_meter()
        # "btrfs" or "walk", once resolved (``start`` or the first use).
        self._mode: str | None = None
        self._mode_lock = threading.Lock()
        # Why auto mode is walk (None: it is not, or not resolved).
        self.mode_reason: str | None = None
        # Servers whose directory is a subvolume with a qgroup (as last seen).
        self.subvolumes: set[str] = set()
        # One measure at a time in the disk pool: a budgeted walk sleeps in
        # its thread, and must not hold every thread a start or purge needs.
        self._measuring = DeferredSemaphore(1)
        # Set while the agent stops: walks stop pausing, so the disk pool's
        # threads are free to be joined.
        self._stopping = threading.Event()

    # -- mode --------------------------------------------------------------

    def start(self) -> str:
        """
        Resolve the node's disk mode now (blocking: the agent's start), and
        enable quotas when it is btrfs.  ``StartupError`` when ``disk.mode``
        is "btrfs" and the data directory cannot have them.
        """
        self._stopping.clear()
        return self._resolve()

    def stop(self) -> None:
        """The agent stops: a walk under way finishes without pausing for its budget."""
        self._stopping.set()

    @property
    def mode(self) -> str:
        """The node's disk mode: "btrfs" or "walk" (resolved on first use)."""
        return self._resolve()

    def _resolve(self) -> str:
        with self._mode_lock:
            if self._mode is None:
                self._close_root()
                self._mode = self._choose()
                self.meter.configure(self._mode, self.disk.walk_share, self.disk.walk_batch,
                                     self.disk.walk_full_interval)
                self.log.info("disk limits: {mode} mode{why}", mode=self._mode,
                              why=" ({})".format(self.mode_reason) if self.mode_reason else "")
            return self._mode

    def _close_root(self) -> None:
        """
        The data root is reachable by the agent's user alone (0700): a game
        writes whatever it likes in its directory (a setuid file, as root
        in a ``user: "image"`` container, or as the server's uid), and no
        host user but the agent's may reach it.  The containers see their
        directory through a bind mount, the Panel and SFTP through the agent.
        A root of another owner is left as it is (with a warning).
        """
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            # The directory itself, checked and changed through one descriptor.
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # made or reported at its first use, with the path
        try:
            st = os.fstat(fd)
            mode = st.st_mode & 0o7777
            if not mode & 0o077:
                return
            if st.st_uid != os.geteuid():
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "data directory {root} is mode {mode:o} and owned by uid {uid}: host"
                    " users may reach the servers' files; make it 0700 and the agent's",
                    root=self.root, mode=mode, uid=st.st_uid)
                return
            os.fchmod(fd, mode & ~0o077)
            self.log.info("data directory {root}: mode {mode:o} -> {new:o}, so that no host"
                          " user but the agent's reaches the servers' files",
                          root=self.root, mode=mode, new=mode & ~0o077)
        except OSError:
            pass  # reported at its first use, with the path
        finally:
            os.close(fd)

    def _choose(self) -> str:
        wanted = self.disk.mode
        if wanted == "walk":
            return "walk"
        reason = None
        if not btrfs.is_btrfs(self.root):
            reason = "the data directory {} is not on btrfs".format(self.root)
        elif os.geteuid() != 0:
            reason = "not root: btrfs quotas cannot be managed"
        else:
            try:
                btrfs.enable_quotas(self.root)
            except btrfs.BtrfsError as e:
                reason = "quotas cannot be enabled: {}".format(e)
        if reason is None:
            return "btrfs"
        if wanted == "btrfs":
            raise StartupError("disk.mode is btrfs but {}".format(reason))
        self.mode_reason = reason
        return "walk"

    def server_mode(self, server_id: str) -> str:
        """How the server's limit is enforced: "btrfs" (its qgroup) or "walk"."""
        return "btrfs" if server_id in self.subvolumes else "walk"

    def path(self, server_id: str) -> str:
        """The server's data directory on the host."""
        return os.path.join(self.root, server_id)

    def in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run blocking filesystem work in the disk pool."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    async def prepare(
        self, server_id: str, owner: tuple[int, int], recursive: bool = False, *,
        settle: bool = False, disk_limit: int | None = None,
    ) -> None:
        """
        Create the data directory owned by the server's user.  With
        ``recursive`` (after an install, whatever its exit code), hand the
        whole tree back to the server: everything owned by its user, no
        setuid/setgid bit, no device node, FIFO or socket (``_prepare_dir``).

        With ``settle`` (only while the server is stopped: before a start or
        an install), in btrfs mode the directory is made a subvolume (created,
        or converted from a plain directory) whose qgroup limit is
        ``disk_limit`` bytes (None: unlimited).  A conversion that fails
        leaves the directory as it was, measured by walking.
        """
        uid, gid = owner
        if settle and self.mode == "btrfs":
            await self.in_thread(self._settle, server_id, disk_limit)
        report = await self.in_thread(_prepare_dir, self.path(server_id), uid, gid, recursive)
        if report is None:
            return
        if report.removed_total or report.cleared or report.failed or report.truncated:
            # One line per pass, whatever it found.
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "server {server_id}: data directory handed back to the server: removed {count}"
                " special files ({kinds}){examples}; cleared setuid/setgid bits of {cleared}"
                " entries; {failed} entries could not be fixed{truncated}",
                server_id=server_id,
                count=report.removed_total,
                kinds=", ".join("{} {}".format(n, kind) for kind, n in
                                sorted(report.removed.items())) or "none",
                examples=(", e.g. " + ", ".join(report.example_paths())
                          if report.examples else ""),
                cleared=report.cleared,
                failed=report.failed,
                truncated="; a part could not be walked" if report.truncated else "",
            )

    def _settle(self, server_id: str, disk_limit: int | None) -> None:
        """Thread side of ``prepare(settle=True)`` in btrfs mode."""
        path = self.path(server_id)
        sub = _subvolume_at(path)
        if sub is None:
            try:
                if os.path.lexists(path):
                    kept = convert_to_subvolume(path)
                    self.meter.forget(path)
                    self.log.info("server {server_id}: data directory converted to a btrfs"
                                  " subvolume", server_id=server_id)
                    if kept is not None:
                        self.log.warn(  # noqa: G010 (twisted.logger has warn)
                            "server {server_id}: its files changed while its directory was"
                            " converted; the tree as it was before is kept in {kept}",
                            server_id=server_id, kept=kept)
                else:
                    btrfs.create_subvolume(path)
            except (btrfs.BtrfsError, OSError) as e:
                self.subvolumes.discard(server_id)
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "server {server_id}: its data directory stays a plain directory (its disk"
                    " limit is checked by walking): {error}",
                    server_id=server_id, error=str(e))
                return
            sub = _subvolume_at(path)
            if sub is None:
                return
        self._apply_limit(server_id, path, sub, disk_limit)

    def _apply_limit(self, server_id: str, path: str, sub: btrfs.Subvolume,
                     disk_limit: int | None) -> None:
        if btrfs.limit_of(sub) != disk_limit:
            try:
                btrfs.set_limit(path, disk_limit)
            except btrfs.BtrfsError as e:
                self.subvolumes.discard(server_id)
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "server {server_id}: its disk limit could not be set on its qgroup: {error}",
                    server_id=server_id, error=str(e))
                return
        self.subvolumes.add(server_id)

    def set_limit(self, server_id: str, disk_limit: int | None) -> Deferred[None]:
        """
        The server's disk limit changed: in btrfs mode, set it on its qgroup
        (a plain directory waits for its next start to be converted).
        """
        def apply() -> None:
            if self.mode != "btrfs":
                return
            path = self.path(server_id)
            sub = _subvolume_at(path)
            if sub is not None:
                self._apply_limit(server_id, path, sub, disk_limit)

        return self.in_thread(apply)

    def usage(self, server_id: str) -> Deferred[int]:
        """
        Bytes used beneath the server's data directory (in a thread): its
        qgroup's in btrfs mode, else allocated blocks by a budgeted walk.
        """
        return self.measure(server_id).addCallback(lambda used: used.allocated)

    def measure(self, server_id: str) -> Deferred[Usage]:
        """``usage`` with what the figure is worth (``Usage.uncounted``: a part
        the tree's shape kept from being counted)."""
        def measure() -> Usage:
            self._resolve()
            used = self.meter.measure_path(self.path(server_id), stop=self._stopping)
            if used.source == "qgroup":
                self.subvolumes.add(server_id)
            else:
                self.subvolumes.discard(server_id)
            return used

        return self._measuring.run(self.in_thread, measure)

    def report(self, server_ids: list[str], max_listed: int = 20) -> dict[str, Any]:
        """
        The node's disk mode for ``/health``: the mode, why auto chose walk,
        how many servers are limited by their qgroup and by the walk, and in
        btrfs mode (a few of) the servers not converted yet.
        """
        mode = self._mode or "unresolved"
        walked = sorted(sid for sid in server_ids if sid not in self.subvolumes)
        out: dict[str, Any] = {
            "mode": mode,
            "servers": {"btrfs": len(server_ids) - len(walked), "walk": len(walked)},
        }
        if self.mode_reason:
            out["reason"] = self.mode_reason
        if mode == "btrfs" and walked:
            out["walkServers"] = walked[:max_listed]
        return out

    def purge(self, server_id: str) -> Deferred[None]:
        """Remove the server's data directory, however deep (a failure is raised)."""
        self.subvolumes.discard(server_id)
        path = self.path(server_id)
        self.meter.forget(path)
        return self.in_thread(_purge, path)

    def unlink(self, path: str) -> Deferred[None]:
        """Remove a file of the agent's (gone already is fine)."""
        return self.in_thread(_unlink, path)


def _prepare_dir(path: str, uid: int, gid: int, recursive: bool) -> trees.Reclaimed | None:
    """
    Create the data directory ``path`` (its parents are the agent's own) and
    give it to ``uid:gid``; with ``recursive``, also everything beneath it
    (``trees.reclaim_tree``: iterative, fd-based, never following a link,
    clearing setuid/setgid bits and removing special files).  Returns that
    pass's ``trees.Reclaimed`` report, or None.
    """
    parent, name = os.path.split(os.path.normpath(path))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.mkdir(name, 0o755, dir_fd=parent_fd)
            except FileExistsError:
                pass
            # Never through a link: whatever is at the server's name must be
            # a real directory.
            fd = os.open(name, trees.DIR_FLAGS, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    try:
        try:
            os.fchown(fd, uid, gid)
            chown = True
        except PermissionError:
            chown = False  # not root (development): the tree stays ours
        mode = os.fstat(fd).st_mode & 0o7777
        if mode & 0o6000:
            os.fchmod(fd, mode & ~0o6000)
        if not recursive:
            return None
        return trees.reclaim_tree(fd, uid, gid, chown=chown)
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    finally:
        os.close(fd)


def _disk_usage(path: str, meter: Meter | None = None) -> int:
    """Bytes allocated beneath ``path``, at any depth (``meter``'s measure; 0 if absent)."""
    return (meter if meter is not None else Meter()).measure_path(path).allocated


def _subvolume_at(path: str) -> btrfs.Subvolume | None:
    """The subvolume whose root ``path`` is (never through a link), or None."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return btrfs.subvolume_of(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def copy_tree(src: str, dst: str) -> None:
    """
    Copy everything beneath ``src`` into the existing directory ``dst``
    exactly: modes, owners, times, links as links, hard links, extended
    attributes, sharing the data blocks where the filesystem can
    (``cp -a --reflink=auto``), never leaving ``src``'s filesystem.
    """
    done = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--one-file-system", "--", src + "/.", dst + "/"],
        capture_output=True, stdin=subprocess.DEVNULL, check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OSError("copy failed: {}".format(lines[-1] if lines else done.returncode))


def convert_to_subvolume(path: str, copy: Callable[[str, str], None] = copy_tree) -> str | None:
    """
    Make the plain directory ``path`` a subvolume of the same content,
    atomically (the server must be stopped): the tree is copied (``copy``)
    into a new subvolume beside it, which then takes the directory's name
    in one ``renameat2(RENAME_EXCHANGE)``; the old tree is removed after.
    Any failure before the exchange removes the new subvolume and leaves
    ``path`` exactly as it was.

    Should the old tree differ from the copy after the exchange (someone
    wrote into it meanwhile: a file manager or SFTP session), it is kept
    under ``KEPT_PREFIX + name`` beside it, never removed, and that path is
    returned (else None).
    """
    parent, name = os.path.split(os.path.normpath(path))
    tmp_name = CONVERT_PREFIX + name
    tmp = os.path.join(parent, tmp_name)
    _remove_any(parent, tmp_name)  # a crashed conversion's leftover
    btrfs.create_subvolume(tmp)
    try:
        copy(path, tmp)
        st = os.stat(path, follow_symlinks=False)
        os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
        os.chmod(tmp, stat_mode(st))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        _exchange(parent, tmp_name, name)
    except BaseException:
        try:
            btrfs.delete_subvolume(tmp)
        except (btrfs.BtrfsError, OSError):
            pass
        raise
    # The old plain tree now has the temporary name.
    if _signature(tmp) != _signature(path):
        kept = os.path.join(parent, KEPT_PREFIX + name)
        _remove_any(parent, KEPT_PREFIX + name)
        os.rename(tmp, kept)
        return kept
    _remove_any(parent, tmp_name)
    return None


def _signature(path: str) -> tuple[int, int, int]:
    """(entries, bytes of regular files, newest mtime) beneath ``path``: what a write changes."""
    count = size = newest = 0
    fd = os.open(path, trees.DIR_FLAGS)
    try:
        for e in trees.Walk(fd):
            count += 1
            if e.is_dir:
                continue
            try:
                st = e.lstat()
            except OSError:
                continue
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
            newest = max(newest, st.st_mtime_ns)
    finally:
        os.close(fd)
    return count, size, newest


def stat_mode(st: os.stat_result) -> int:
    """The permission bits of ``st`` (setuid/setgid included)."""
    return st.st_mode & 0o7777


def _exchange(parent: str, a: str, b: str) -> None:
    fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        r = _libc.renameat2(ctypes.c_int(fd), os.fsencode(a), ctypes.c_int(fd), os.fsencode(b),
                            ctypes.c_uint(_RENAME_EXCHANGE))
        if r != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), b)
    finally:
        os.close(fd)


def _remove_any(parent: str, name: str) -> None:
    """Remove ``parent/name``, a subvolume or a plain tree (absent is fine)."""
    path = os.path.join(parent, name)
    if not os.path.lexists(path):
        return
    if _subvolume_at(path) is not None:
        try:
            btrfs.delete_subvolume(path)
            return
        except btrfs.BtrfsError:
            pass  # e.g. a subvolume made inside it: empty it first, below
    fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        trees.remove_tree(fd, name)
    finally:
        os.close(fd)


def _purge(path: str) -> None:
    """
    Remove a server's data directory, however deep (``trees.remove_tree``,
    or deleting it at once when it is a subvolume); a failure is raised,
    never ignored, so the caller keeps the server.
    """
    if _subvolume_at(path) is not None:
        try:
            btrfs.delete_subvolume(path)
            return
        except btrfs.BtrfsError:
            pass  # emptied by the walk below, then removed as a directory
    parent, name = os.path.split(os.path.normpath(path))
    try:
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    try:
        trees.remove_tree(parent_fd, name)
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    finally:
        os.close(parent_fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


