"""
The servers' data directories on the host: where each lives, making it ready
for its server, measuring it, purging it.

Everything inside a data directory was written by a game server (or its
install script, run as root): it is hostile.  The passes never follow a link,
hand the tree back to the server's user, and run in the disk thread pool,
never on the reactor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ctrlagent.files import trees
from ctrlagent.files.confined import os_error

T = TypeVar("T")


class DataDirs:
    """The data directories under ``root``, and the disk thread pool that walks them."""

    log = Logger()

    def __init__(self, reactor: Any, root: str, pool: ThreadPool) -> None:
        self.reactor = reactor
        self.root = root
        self.pool = pool

    def path(self, server_id: str) -> str:
        """The server's data directory on the host."""
        return os.path.join(self.root, server_id)

    def in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run blocking filesystem work in the disk pool."""
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    async def prepare(
        self, server_id: str, owner: tuple[int, int], recursive: bool = False
    ) -> None:
        """
        Create the data directory owned by the server's user.  With
        ``recursive`` (after an install, whatever its exit code), hand the
        whole tree back to the server: everything owned by its user, no
        setuid/setgid bit, no device node, FIFO or socket (``_prepare_dir``).
        """
        uid, gid = owner
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

    def usage(self, server_id: str) -> Deferred[int]:
        """Bytes allocated beneath the server's data directory (in a thread)."""
        return self.in_thread(_disk_usage, self.path(server_id))

    def purge(self, server_id: str) -> Deferred[None]:
        """Remove the server's data directory, however deep (a failure is raised)."""
        return self.in_thread(_purge, self.path(server_id))

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
        os.makedirs(parent, mode=0o755, exist_ok=True)
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


def _disk_usage(path: str) -> int:
    """Bytes allocated beneath ``path``, at any depth (``trees.tree_usage``)."""
    try:
        fd = os.open(path, trees.DIR_FLAGS)
    except OSError:
        return 0
    try:
        used, _ = trees.tree_usage(fd, allocated=True)
        return used
    finally:
        os.close(fd)


def _purge(path: str) -> None:
    """
    Remove a server's data directory, however deep (``trees.remove_tree``);
    a failure is raised, never ignored, so the caller keeps the server.
    """
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


