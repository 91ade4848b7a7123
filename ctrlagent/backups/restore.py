"""
Putting a backup back: extracted into a staging directory beside the
server's directory (same filesystem), then swapped in with one
``renameat2(RENAME_EXCHANGE)``.  Blocking; thread-side.

Until that exchange the server's files are not touched at all, so a bad
archive, a full disk or a crash mid-way leaves them exactly as they were
(a leftover staging directory is swept by ``sweep_staging``).  After it, the
old tree sits at the staging name and is removed; a crash in between leaves
the restored files in place and the old tree to the sweep.

The archive is checked before the exchange: its sha256 and size must be the
recorded ones, and it may not expand beyond its recorded content plus
``archive.MAX_OVERHEAD``.  Member rules (a backup may have been altered in
its store): an absolute name or a ``..`` refuses the whole archive; a
symlink is created as a link (never followed) unless its target is absolute
or climbs out of the root, when it is left out with a note; hard links,
devices, FIFOs and other special members are left out; modes keep only the
permission bits; everything is owned by the server's user.

Without ``truncate``, files the backup does not hold are kept: they are
hard-linked into the staging tree before the exchange (same filesystem, no
copy), so the live tree is still untouched until the swap.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import stat
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from ctrlagent.backups.archive import (
    COPY_CHUNK,
    MAX_NOTES,
    MAX_OVERHEAD,
    ArchiveReader,
    BackupCorrupt,
    open_tar,
)
from ctrlagent.errors import CtrlAgentError, PermissionDenied
from ctrlagent.files import trees
from ctrlagent.files.paths import WORK_PREFIXES, Components

STAGING_PREFIX = ".ctrlagent-restore-"
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
DIR_CACHE = 32


@dataclass
class RestoreResult:
    """What a restore did."""

    files: int = 0
    entries: int = 0
    kept: int = 0  # files the backup did not hold, kept (no truncate)
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.skipped += 1
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(ctypes.c_int(fd)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def exchange(dir_fd: int, a: str, b: str) -> None:
    """Swap the names ``a`` and ``b`` of ``dir_fd`` atomically."""
    r = _libc.renameat2(ctypes.c_int(dir_fd), os.fsencode(a), ctypes.c_int(dir_fd),
                        os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def member_components(name: str) -> Components:
    """A member's components; ``PermissionDenied`` for an absolute name or a ``..``."""
    if name.startswith("/") or "\x00" in name:
        raise PermissionDenied("backup member {!r} has an absolute name".format(name))
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise PermissionDenied("backup member {!r} leaves the server directory".format(name))
    return parts


def link_stays_inside(rel: Components, target: str) -> bool:
    """True when the link at ``rel`` with ``target`` resolves (lexically) inside the root."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    depth = len(rel) - 1  # the link's directory
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        else:
            depth += 1
    return True


class _Dirs:
    """
    Directory fds of the staging tree by components, a few kept open (LRU);
    any other is opened again from the nearest open one, never through a
    link, creating what is missing.
    """

    def __init__(self, top_fd: int, uid: int, gid: int, chown: bool) -> None:
        self.top_fd = top_fd
        self.uid, self.gid, self.chown = uid, gid, chown
        self.fds: OrderedDict[Components, int] = OrderedDict()

    def get(self, comps: Components, create: bool = True) -> int:
        if not comps:
            return self.top_fd
        fd = self.fds.get(comps)
        if fd is not None:
            self.fds.move_to_end(comps)
            return fd
        i = len(comps) - 1
        while i > 0 and comps[:i] not in self.fds:
            i -= 1
        cur = self.fds[comps[:i]] if i else self.top_fd
        for j in range(i, len(comps)):
            cur = self._open(cur, comps[j], create)
            self._keep(comps[:j + 1], cur)
        return cur

    def _open(self, parent: int, name: str, create: bool) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        os.mkdir(name, 0o755, dir_fd=parent)
        fd = os.open(name, flags, dir_fd=parent)
        if self.chown:
            os.fchown(fd, self.uid, self.gid)
        return fd

    def _keep(self, comps: Components, fd: int) -> None:
        self.fds[comps] = fd
        while len(self.fds) > DIR_CACHE:
            _, old = self.fds.popitem(last=False)
            os.close(old)

    def forget(self, comps: Components) -> None:
        """Drop the fds of ``comps`` and beneath (about to be replaced)."""
        n = len(comps)
        for key in [k for k in self.fds if k[:n] == comps]:
            os.close(self.fds.pop(key))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return True  # nothing in the way: the directory is made

def _remove_name(dir_fd: int, name: str) -> None:
    """Clear ``name`` (an earlier member of the same name) for a new member."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        trees.remove_tree(dir_fd, name)
    else:
        os.unlink(name, dir_fd=dir_fd)


def extract_into(top_fd: int, tf: tarfile.TarFile, uid: int, gid: int,
                 result: RestoreResult, on_member: Callable[[str], None] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 progress_interval: float = 1.0, strip: Components = ()) -> None:
    """
    Extract every member of ``tf`` beneath the (empty, private) directory
    ``top_fd``; ``progress(bytes, files)`` at most every ``progress_interval`` s.
    ``strip``: leading components every member has (restic's dump of a
    directory names it); a member outside them is a corrupt archive.
    """
    chown = os.geteuid() == 0 and uid >= 0
    written = 0
    last = time.monotonic()
    dirs = _Dirs(top_fd, uid, gid, chown)
    try:
        for member in tf:
            comps = member_components(member.name)
            if strip:
                if comps[:len(strip)] != strip:
                    if strip[:len(comps)] == comps:
                        continue  # a directory leading to the stripped one
                    raise BackupCorrupt("backup member {!r} is outside the backed-up "
                                        "directory".format(member.name))
                comps = comps[len(strip):]
            if not comps:
                continue
            parent = dirs.get(comps[:-1])
            name = comps[-1]
            result.entries += 1
            if member.isdir():
                if not _is_dir(parent, name):
                    _remove_name(parent, name)
                fd = dirs.get(comps)
                os.fchmod(fd, member.mode & 0o777)
            elif member.issym():
                dirs.forget(comps)
                _remove_name(parent, name)
                if not link_stays_inside(comps, member.linkname):
                    result.note("link leading outside left out: {}".format("/".join(comps)))
                    continue
                os.symlink(member.linkname, name, dir_fd=parent)
                if chown:
                    os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
            elif member.isreg():
                dirs.forget(comps)
                _remove_name(parent, name)
                src = tf.extractfile(member)
                if src is None:
                    raise BackupCorrupt("backup member {!r} has no data".format(member.name))
                _write_file(parent, name, src, member, uid, gid, chown)
                result.files += 1
                written += member.size
                if progress is not None and time.monotonic() - last >= progress_interval:
                    last = time.monotonic()
                    progress(written, result.files)
            else:
                result.note("special member left out: {}".format("/".join(comps)))
                continue
            if on_member is not None:
                on_member("/".join(comps))
        if progress is not None:
            progress(written, result.files)
    except (tarfile.TarError, EOFError) as e:
        raise BackupCorrupt("backup archive is corrupt: {}".format(e)) from None
    finally:
        dirs.close()


def _write_file(parent: int, name: str, src: IO[bytes], member: tarfile.TarInfo,
                uid: int, gid: int, chown: bool) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=parent)
    try:
        while True:
            data = src.read(COPY_CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fchmod(fd, member.mode & 0o777)
        if chown:
            os.fchown(fd, uid, gid)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def keep_unlisted(live_fd: int, top_fd: int, result: RestoreResult) -> None:
    """
    Hard-link into the staging tree ``top_fd`` every file of the live tree
    ``live_fd`` that the backup did not bring (directories made as needed);
    where both hold something different at one path, the backup's wins.
    ``PermissionDenied`` when the live tree holds a mount point, which a
    swap would leave behind.
    """
    dirs = _Dirs(top_fd, -1, -1, False)
    walk = trees.Walk(live_fd, hide=WORK_PREFIXES)
    try:
        for e in walk:
            rel = e.rel
            try:
                parent = dirs.get(rel[:-1], create=False)
                st = os.stat(e.name, dir_fd=e.dir_fd, follow_symlinks=False)
            except OSError:
                e.descend = False
                continue
            try:
                there = os.stat(e.name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is not None:
                e.descend = stat.S_ISDIR(there.st_mode) and stat.S_ISDIR(st.st_mode)
                continue
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(e.name, 0o755, dir_fd=parent)
                fd = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
                try:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
                    if os.geteuid() == 0:
                        os.fchown(fd, st.st_uid, st.st_gid)
                finally:
                    os.close(fd)
                continue
            e.descend = False
            os.link(e.name, e.name, src_dir_fd=e.dir_fd, dst_dir_fd=parent,
                     follow_symlinks=False)
            result.kept += 1
    finally:
        walk.close()
        dirs.close()
    if walk.mounts:
        raise PermissionDenied("the server directory holds a mount point; "
                               "restore with truncate or remove the mount first")
    if walk.truncated:
        raise CtrlAgentError("the server directory could not be read whole; nothing restored")


def _unescape_mount(field: str) -> str:
    """A mountinfo path field: octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_beneath(path: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points strictly beneath ``path`` (from the kernel's mount table)."""
    prefix = os.path.normpath(path).rstrip("/") + "/"
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            point = _unescape_mount(fields[4])
            if point.startswith(prefix):
                out.append(point)
    return out


def restore_root(root_path: str, raw: IO[bytes], *, size: int | None, checksum: str | None,
                 content_bytes: int | None, uid: int, gid: int, truncate: bool,
                 compressed: bool = True, on_member: Callable[[str], None] | None = None,
                 before_swap: Callable[[], None] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 progress_interval: float = 1.0, strip: Components = ()) -> RestoreResult:
    """
    Restore the archive ``raw`` into the server directory ``root_path``
    (see the module docstring).  ``before_swap`` is a test seam; ``strip``
    as ``extract_into``.
    """
    root_path = os.path.normpath(root_path)
    if mounts_beneath(root_path):
        # The swap would leave the mount in the old tree, which could then
        # never be removed: refused before anything is written.
        raise PermissionDenied("the server directory holds a mount point; remove it first")
    parent_path, root_name = os.path.split(root_path)
    parent_fd = os.open(parent_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    staging = "{}{}-{}".format(STAGING_PREFIX, root_name, secrets.token_hex(6))
    made = False
    result = RestoreResult()
    try:
        live_fd = os.open(root_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=parent_fd)
        try:
            live = os.fstat(live_fd)
            if live.st_dev != os.fstat(parent_fd).st_dev:
                raise CtrlAgentError("the server directory is a mount point: a restore "
                                     "cannot swap it in at once")
            os.mkdir(staging, 0o700, dir_fd=parent_fd)
            made = True
            top_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, dir_fd=parent_fd)
            try:
                max_bytes = (content_bytes if content_bytes is not None else 1 << 62) \
                    + MAX_OVERHEAD
                reader = ArchiveReader(raw, max_bytes, compressed)
                with open_tar_checked(reader) as tf:
                    extract_into(top_fd, tf, uid, gid, result, on_member, progress,
                                 progress_interval, strip)
                reader.finish(size, checksum)
                if not truncate:
                    keep_unlisted(live_fd, top_fd, result)
                os.fchmod(top_fd, stat.S_IMODE(live.st_mode))
                if os.geteuid() == 0:
                    os.fchown(top_fd, live.st_uid, live.st_gid)
                # Everything written reaches the disk before the swap makes it
                # the server's: one syncfs, not an fsync per file.
                _syncfs(top_fd)
            finally:
                os.close(top_fd)
        finally:
            os.close(live_fd)
        if before_swap is not None:
            before_swap()
        exchange(parent_fd, staging, root_name)
        # The old tree now has the staging name; its removal may be redone
        # by the sweep should it be interrupted.
        try:
            trees.remove_tree(parent_fd, staging)
        except (OSError, CtrlAgentError) as e:
            result.notes.append("old files not yet removed: {}".format(e))
        made = False
        return result
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            from ctrlagent.errors import InsufficientResources

            raise InsufficientResources("no room to restore the backup: {}".format(
                e.strerror)) from None
        raise CtrlAgentError("restore failed: {}".format(e.strerror or e)) from None
    finally:
        if made:
            try:
                trees.remove_tree(parent_fd, staging)
            except (OSError, CtrlAgentError):
                pass  # the sweep removes it later
        os.close(parent_fd)


class open_tar_checked:  # noqa: N801 - a context manager used like a function
    """``open_tar`` mapping an unreadable start of the archive to ``BackupCorrupt``."""

    def __init__(self, reader: ArchiveReader) -> None:
        self.reader = reader
        self.tf: tarfile.TarFile | None = None

    def __enter__(self) -> tarfile.TarFile:
        try:
            self.tf = open_tar(self.reader)
        except (tarfile.TarError, EOFError) as e:
            raise BackupCorrupt("backup archive is corrupt: {}".format(e)) from None
        return self.tf

    def __exit__(self, *exc: object) -> None:
        if self.tf is not None:
            self.tf.close()


def sweep_staging(parent_path: str, root_name: str | None = None) -> int:
    """
    Remove leftover staging directories (of ``root_name``, or of every
    server) in ``parent_path``; how many were removed.
    """
    pattern = re.compile(re.escape(STAGING_PREFIX) + (
        re.escape(root_name) if root_name else ".*") + "-[0-9a-f]{12}", re.DOTALL)
    removed = 0
    try:
        fd = os.open(parent_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        for name in os.listdir(fd):
            if pattern.fullmatch(name):
                try:
                    trees.remove_tree(fd, name)
                    removed += 1
                except (OSError, CtrlAgentError):
                    continue
    finally:
        os.close(fd)
    return removed
