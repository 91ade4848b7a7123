"""
Steam Workshop items: the seam to the steamcmd runner and the confined copy
of a downloaded item into a server's mods folder.

``IWorkshopDownloader`` is what the file manager asks for an item
(``servers.workshop.SteamCmdDownloader`` runs steamcmd in a helper container;
tests inject others).  It hands the caller the host directory steamcmd wrote
(its staging directory) and the components of the item beneath it, and
removes both container and staging directory afterwards, whatever happened.

Everything in the staging directory was written by a container that ran a
program from the internet: names, links, special files and sizes are
untrusted.  ``copy_item`` (thread-side) therefore reads it only through
directory fds opened without following a link, copies regular files and
directories only (a link, device, FIFO or socket is left out, and so is a
name that could not be managed in a server directory, ``paths.safe_file_name``),
bounds the depth, the number of entries and the bytes (``max_item_bytes`` and
the server's disk limit, through the ``Quota``), writes with the file
manager's rules (new files only, never through a link, owned by the server's
user, no setuid/setgid bit) into a hidden folder of the mods folder, and only
then renames that folder into place: a failed copy leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from zope.interface import Attribute, Interface

from ctrlagent.errors import Conflict, CtrlAgentError, InsufficientResources, InvalidInput
from ctrlagent.files import fsops, trees
from ctrlagent.files.confined import Confined, os_error
from ctrlagent.files.mods import ModRequest
from ctrlagent.files.paths import TMP_PREFIX, Components, display, safe_file_name
from ctrlagent.interfaces import ServerRoot

# Directories below the item's top that are copied; deeper is refused.
MAX_ITEM_DEPTH = 64
# Names reported (in the log) of what a copy left out.
MAX_SKIPPED_SHOWN = 5
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_log = Logger(namespace="ctrlagent.files.workshop")
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class WorkshopDownloadFailed(CtrlAgentError):
    """steamcmd did not deliver the item (its error, an exit code, a timeout, no content)."""

    code = "WORKSHOP_DOWNLOAD_FAILED"


class IWorkshopDownloader(Interface):
    """Downloads one Steam Workshop item and lends its files to a caller."""

    max_item_bytes = Attribute("int: the largest item a caller may copy")
    max_item_entries = Attribute("int: the most files and directories of one item")

    def download(  # type: ignore[misc]
        app_id: int | None,
        item_id: str,
        owner: tuple[int, int],
        use: Callable[[str, Components], Awaitable[Any]],
    ) -> Awaitable[Any]:
        """
        Download item ``item_id`` of app ``app_id`` (None: the node's
        default) as the user ``owner`` (uid, gid), then ``await
        use(staging_dir, item_components)`` and answer what it answers;
        ``WorkshopDownloadFailed`` when steamcmd did not deliver.  The
        staging directory is gone when this returns or raises.
        """


@dataclass
class CopyResult:
    """What ``copy_item`` copied: the bytes and what it left out (and why)."""

    size: int = 0
    entries: int = 0
    skipped: list[str] = field(default_factory=list)


def _open_item(staging: str, item: Components) -> int:
    """The item's directory fd, each component opened without following a link."""
    fd = os.open(staging, _DIR_FLAGS)
    try:
        for name in item:
            if safe_file_name(name) != name:
                raise WorkshopDownloadFailed("the downloaded item has an unusable path")
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise WorkshopDownloadFailed(
                        "steamcmd left no folder for the item ({} is missing or not a"
                        " folder)".format(display(item))) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Copier:
    """One item copy (thread-side); see the module docstring for its rules."""

    def __init__(self, c: Confined, quota: fsops.Quota, max_bytes: int, max_entries: int) -> None:
        self.c = c
        self.quota = quota
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.result = CopyResult()

    def skip(self, rel: Components, why: str) -> None:
        self.result.skipped.append("{} ({})".format(ascii(display(rel)), why))

    def copy_dir(self, src: int, dst: int, rel: Components) -> None:
        if len(rel) > MAX_ITEM_DEPTH:
            raise WorkshopDownloadFailed(
                "the item is nested deeper than {} folders".format(MAX_ITEM_DEPTH))
        # Streamed, not listed: a folder of millions of names stops at the bound.
        with os.scandir(src) as listing:
            for found in listing:
                self.copy_entry(src, dst, found.name, rel)

    def copy_entry(self, src: int, dst: int, name: str, rel: Components) -> None:
        """Copy the entry ``name`` of ``src`` into ``dst`` (or leave it out)."""
        here = rel + (name,)
        self.result.entries += 1
        if self.result.entries > self.max_entries:
            raise InsufficientResources(
                "the item holds more than {} files and folders".format(self.max_entries))
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            self.skip(here, "a name that is not UTF-8")
            return
        if safe_file_name(name) != name:
            self.skip(here, "a reserved name")
            return
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self.copy_subdir(src, dst, name, here)
        elif stat.S_ISREG(st.st_mode):
            self.copy_file(src, dst, name, here, st.st_mode)
        else:
            self.skip(here, "a link" if stat.S_ISLNK(st.st_mode) else "not a regular file")

    def copy_subdir(self, src: int, dst: int, name: str, rel: Components) -> None:
        try:
            child_src = os.open(name, _DIR_FLAGS, dir_fd=src)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # replaced meanwhile by a link
                self.skip(rel, "a link")
                return
            raise
        try:
            os.mkdir(name, 0o755, dir_fd=dst)
            child_dst = self.c.open_new_dir(dst, name)
            try:
                self.copy_dir(child_src, child_dst, rel)
            finally:
                os.close(child_dst)
        finally:
            os.close(child_src)

    def copy_file(self, src: int, dst: int, name: str, rel: Components, mode: int) -> None:
        try:
            fd_in = os.open(name, _FILE_FLAGS, dir_fd=src)
        except OSError as e:
            if e.errno == errno.ELOOP:
                self.skip(rel, "a link")
                return
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd_in).st_mode):
                self.skip(rel, "not a regular file")
                return
            fd_out = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=dst)
            try:
                os.fchmod(fd_out, 0o755 if mode & 0o111 else 0o644)
                self.c.own(fd_out)
                while True:
                    data = os.read(fd_in, fsops.COPY_CHUNK)
                    if not data:
                        break
                    # Counted as read, not as the size the item claims: a
                    # file that grows (or a sparse giant) stops at the limit.
                    if self.result.size + len(data) > self.max_bytes:
                        raise InsufficientResources(
                            "the item is larger than {} bytes".format(self.max_bytes))
                    self.quota.charge(len(data))
                    self.result.size += len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd_out, view):]
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)


def copy_item(
    c: Confined,
    quota: fsops.Quota,
    staging: str,
    item: Components,
    mods_dir: Components,
    name: str,
    replaces: bool,
    max_bytes: int,
    max_entries: int,
) -> CopyResult:
    """
    Copy the item ``staging/<item>`` into ``<mods_dir>/<name>`` of the
    server ``c`` (thread-side), counted against ``quota``.  ``replaces``:
    what already has that name is this mod's earlier version, replaced (its
    bytes credited); otherwise an existing ``name`` is a ``Conflict``.
    """
    if safe_file_name(name) != name:
        raise WorkshopDownloadFailed("{!r} is not a plain folder name".format(name))
    src = _open_item(staging, item)
    try:
        fsops.create_directory(c, mods_dir)
        dir_fd = c.open(mods_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return _copy_into(c, quota, src, dir_fd, name, replaces, max_bytes, max_entries)
        finally:
            os.close(dir_fd)
    finally:
        os.close(src)


def _copy_into(c: Confined, quota: fsops.Quota, src: int, dir_fd: int, name: str,
               replaces: bool, max_bytes: int, max_entries: int) -> CopyResult:
    if not replaces and _exists(dir_fd, name):
        raise Conflict("{} already exists in the mods folder".format(name))
    tmp = TMP_PREFIX + "workshop-" + secrets.token_hex(8)
    copier = _Copier(c, quota, max_bytes, max_entries)
    try:
        os.mkdir(tmp, 0o755, dir_fd=dir_fd)
        top = c.open_new_dir(dir_fd, tmp)
        try:
            copier.copy_dir(src, top, ())
        finally:
            os.close(top)
        aside = None
        if _exists(dir_fd, name):
            aside = TMP_PREFIX + "old-" + secrets.token_hex(8)
            trees.rename_noreplace(dir_fd, name, dir_fd, aside)
        try:
            trees.rename_noreplace(dir_fd, tmp, dir_fd, name)
        except BaseException:
            if aside is not None:
                trees.rename_noreplace(dir_fd, aside, dir_fd, name)
            raise
    except BaseException as e:
        try:
            trees.remove_tree(dir_fd, tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise os_error(e, name) from None
        raise
    if aside is not None:
        quota.credit(trees.remove_tree(dir_fd, aside))
    return copier.result


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def describe_skipped(skipped: list[str]) -> str:
    """A short sentence of what a copy left out, for the log."""
    shown = "; ".join(skipped[:MAX_SKIPPED_SHOWN])
    more = len(skipped) - MAX_SKIPPED_SHOWN
    return shown + ("; and {} more".format(more) if more > 0 else "")


async def install_item(
    downloader: Any,
    root: ServerRoot,
    req: ModRequest,
    mods_dir: Components,
    installed: list[dict[str, Any]],
    run_quota: Callable[..., Awaitable[Any]],
) -> int:
    """
    Download the workshop item of ``req`` with ``downloader`` and copy it into
    ``<mods_dir>/<req.file_name>`` (through the file manager's ``run_quota``:
    the pool, the disk limit); ``installed`` are the mods recorded now.
    Returns the bytes copied.
    """
    if downloader is None:
        raise InvalidInput("Steam Workshop downloads are not set up on this node",
                           field="downloadUrl")
    assert req.workshop is not None
    app_id, item_id = req.workshop
    replaces = any(m["id"] == req.mod_id and m.get("fileName") == req.file_name
                   for m in installed)

    async def use(staging: str, item: Components) -> CopyResult:
        result: CopyResult = await run_quota(root, lambda c, q: copy_item(
            c, q, staging, item, mods_dir, req.file_name, replaces,
            downloader.max_item_bytes, downloader.max_item_entries))
        return result

    copied: CopyResult = await downloader.download(app_id, item_id, (root.uid, root.gid), use)
    if copied.skipped:
        _log.warn(  # noqa: G010 (twisted.logger has warn)
            "server {server_id}: workshop item {item_id}: {count} entries left out: {what}",
            server_id=root.server_id, item_id=item_id, count=len(copied.skipped),
            what=describe_skipped(copied.skipped))
    return copied.size
