"""
One SFTP session's view of one game server's data directory.

``ServerFiles`` does the blocking work (it runs in the thread pool): every path
is resolved through ``ctrlagent.files.confined.Confined`` (openat2
``RESOLVE_BENEATH`` or the confined walk) and acted on with ``dir_fd=`` calls
or on file descriptors it opened itself with ``O_NOFOLLOW``; nothing outside
the root is ever opened, listed or changed, whatever links the game server or
the client arranges (``confined`` explains why a concurrent swap cannot
redirect us).  ``ServerFileSystem`` is the reactor side: Twisted's
``ISFTPServer`` (and ``ISFTPFile`` for open files) answering Deferreds from
the thread pool, so that ``ctrlagent.sftp.protocol`` never blocks the reactor.

Rules a user sees:

- ``/`` is the server directory; ``..`` at the top stays there.
- Symlinks are followed only inside the root; one that leads out (absolute,
  or climbing above the root) answers "permission denied".  Listings
  ``lstat`` entries (a link is shown as a link, never followed).  New links
  must point inside the root and are stored relative (an absolute target
  means the session's ``/``), so that the game server in its container reads
  them the same way.
- Only regular files are opened (no FIFOs or devices); new files and
  directories belong to the server's user (``ServerRoot.uid``/``gid``) and
  never get setuid, setgid or sticky bits; ownership cannot be changed.
- Every write that grows a file is charged to the server's disk limit first
  (``quota.UsageTracker``); one that does not fit fails and writes nothing.
- A read-only login may read and list, nothing else.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.conch.interfaces import ISFTPFile, ISFTPServer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    InvalidInput,
    PermissionDenied,
)
from ctrlagent.files import fsops
from ctrlagent.files.confined import Confined, os_error, rename_noreplace
from ctrlagent.files.paths import WORK_PREFIXES, Components, display
from ctrlagent.interfaces import ServerRoot
from ctrlagent.sftp import wire
from ctrlagent.sftp.quota import UsageTracker

T = TypeVar("T")

# Largest offset a read or write may reach: far beyond any real file, well
# inside what the kernel takes (a bigger one would be EFBIG or an overflow).
MAX_OFFSET = 1 << 60
# Entries per READDIR answer, and the bytes of names they may carry.
DIR_BATCH = 500
DIR_BATCH_BYTES = 160 * 1024

_READ_ONLY = "this login is read-only"


class Closed(CtrlAgentError):
    """A handle used after it was closed (or its session ended)."""


def attrs_dict(st: os.stat_result) -> dict[str, int]:
    """Twisted's attribute dict of a stat result."""
    return {
        "size": max(st.st_size, 0),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "permissions": st.st_mode,
        "atime": int(st.st_atime),
        "mtime": int(st.st_mtime),
    }


def _clean_mode(mode: int) -> int:
    """Permission bits only: never setuid, setgid or sticky."""
    return mode & 0o777


def link_target(link: Components, target: bytes) -> str:
    """
    The text to store for a new link at ``link`` pointing to ``target`` (an
    SFTP path): relative, from the link's directory, to a place inside the
    root.  A target that climbs above the root is refused.
    """
    if b"\x00" in target or not target:
        raise InvalidInput("bad link target", field="target")
    parent = list(link[:-1])
    if target.startswith(b"/"):
        dest = list(wire.components(target))
    else:
        dest = list(parent)
        for part in target.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not dest:
                    raise PermissionDenied("the link target leads outside the server directory")
                dest.pop()
                continue
            dest.append(part.decode("utf-8", "surrogateescape"))
    common = 0
    while common < min(len(parent), len(dest)) and parent[common] == dest[common]:
        common += 1
    rel = [".."] * (len(parent) - common) + dest[common:]
    return "/".join(rel) or "."


class FileHandle:
    """An open regular file; its fd is used and closed under ``lock``."""

    def __init__(self, fd: int, comps: Components, readable: bool, writable: bool,
                 append: bool) -> None:
        self.fd = fd
        self.comps = comps
        self.readable = readable
        self.writable = writable
        self.append = append
        # A worker still using the fd when the session ends must not see it
        # closed and reused for another file: close waits for it.
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class DirHandle:
    """An open directory: its fd and the names still to send."""

    def __init__(self, fd: int, comps: Components, names: list[str]) -> None:
        self.fd = fd
        self.comps = comps
        self.names = names
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class ServerFiles:
    """The blocking operations of one session (thread-side)."""

    def __init__(self, root: ServerRoot, usage: UsageTracker, read_only: bool,
                 use_openat2: bool | None = None,
                 locked: Callable[[], str | None] | None = None) -> None:
        self.root = root
        self.usage = usage
        self.read_only = read_only
        # Why the server's files are locked now (a restore), or None: the
        # servers' one lock state (IServerManager.files_locked), asked at
        # every write, so a handle opened before the lock writes no more.
        self.locked = locked
        self.use_openat2 = use_openat2
        self._c: Confined | None = None
        self._c_lock = threading.Lock()

    @property
    def c(self) -> Confined:
        """
        The root, opened once per session on first use, and again once the
        directory at the root's path is another one (a restore swapped it
        in): the session then sees the restored files, not the removed tree.
        """
        with self._c_lock:
            if self._c is not None and not self._same_root(self._c):
                self._c.close()
                self._c = None
            if self._c is None:
                self._c = Confined(self.root.path, self.root.uid, self.root.gid,
                                   self.use_openat2)
            return self._c

    def _same_root(self, c: Confined) -> bool:
        try:
            now = os.stat(self.root.path)  # as Confined opened it
            held = os.fstat(c.root_fd)
        except OSError:
            return True  # gone: the open root answers as it always did
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def shutdown(self) -> None:
        """Release the root fd."""
        with self._c_lock:
            if self._c is not None:
                self._c.close()
                self._c = None

    def _writable(self) -> None:
        if self.read_only:
            raise PermissionDenied(_READ_ONLY)
        reason = self.locked() if self.locked is not None else None
        if reason is not None:
            raise PermissionDenied(
                "the server's files are being {}; try again once that has finished".format(reason))

    # -- files ---------------------------------------------------------------

    def open_file(self, comps: Components, pflags: int, attrs: dict[str, Any]) -> FileHandle:
        """Open (or create) a regular file as SFTP's OPEN asks."""
        writing = bool(pflags & (wire.FXF_WRITE | wire.FXF_APPEND | wire.FXF_CREAT
                                 | wire.FXF_TRUNC))
        reading = bool(pflags & wire.FXF_READ) or not writing
        if writing:
            self._writable()
        if not comps:
            raise InvalidInput("/ is a directory", field="path")
        access = os.O_RDWR if reading and writing else os.O_WRONLY if writing else os.O_RDONLY
        flags = access | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        mode = _clean_mode(attrs.get("permissions", 0o644))
        c = self.c
        created = False
        with c.parent(comps, follow_final=True) as (dir_fd, name, _):
            if name is None:
                raise InvalidInput("{} is a directory".format(display(comps)), field="path")
            try:
                if pflags & wire.FXF_CREAT:
                    try:
                        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd)
                        created = True
                    except FileExistsError:
                        if pflags & wire.FXF_EXCL:
                            raise Conflict("{} already exists".format(display(comps))) from None
                        fd = os.open(name, flags, dir_fd=dir_fd)
                else:
                    fd = os.open(name, flags, dir_fd=dir_fd)
            except OSError as e:
                raise os_error(e, display(comps)) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidInput("{} is a directory".format(display(comps)), field="path")
            if not stat.S_ISREG(st.st_mode):
                raise PermissionDenied("{} is not a regular file".format(display(comps)))
            if created:
                os.fchmod(fd, mode)
                c.own(fd)
            if writing and pflags & wire.FXF_TRUNC and st.st_size:
                os.ftruncate(fd, 0)
                if st.st_nlink == 1:
                    self.usage.credit(self.root, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return FileHandle(fd, comps, reading, writing, bool(pflags & wire.FXF_APPEND))

    def read(self, h: FileHandle, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (``b""`` at the end)."""
        if not h.readable:
            raise PermissionDenied("the file was not opened for reading")
        length = min(length, wire.MAX_READ)
        if offset >= MAX_OFFSET:
            return b""
        with h.lock:
            if h.fd < 0:
                raise Closed("the file is closed")
            return os.pread(h.fd, length, offset)

    def write(self, h: FileHandle, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``, charged to the disk limit first."""
        if not h.writable:
            raise PermissionDenied("the file was not opened for writing")
        self._writable()
        with h.lock:
            if h.fd < 0:
                raise Closed("the file is closed")
            size = os.fstat(h.fd).st_size
            if h.append:
                offset = size
            if offset + len(data) > MAX_OFFSET:
                raise InvalidInput("the write reaches beyond the largest offset", field="offset")
            growth = max(0, offset + len(data) - size)
            self.usage.charge(self.root, self.c, growth)
            try:
                view = memoryview(data)
                while view:
                    n = os.pwrite(h.fd, view, offset)
                    view = view[n:]
                    offset += n
            except BaseException:
                # Never leave more than was allowed: give back what did not land.
                now = os.fstat(h.fd).st_size
                self.usage.credit(self.root, growth - max(0, now - size))
                raise

    def fstat(self, h: FileHandle | DirHandle) -> os.stat_result:
        """Attributes of an open handle."""
        with h.lock:
            if h.fd < 0:
                raise Closed("the handle is closed")
            return os.fstat(h.fd)

    def fsetstat(self, h: FileHandle, attrs: dict[str, Any]) -> None:
        """SETSTAT on an open file."""
        self._writable()
        with h.lock:
            if h.fd < 0:
                raise Closed("the file is closed")
            st = os.fstat(h.fd)
            self._refuse_chown(st, attrs)
            if "size" in attrs:
                self._truncate(h.fd, st, attrs["size"])
            if "permissions" in attrs:
                if st.st_nlink > 1:
                    raise PermissionDenied("{} has other hard links; permissions not changed"
                                           .format(display(h.comps)))
                os.fchmod(h.fd, _clean_mode(attrs["permissions"]))
            if "atime" in attrs and "mtime" in attrs:
                os.utime(h.fd, (attrs["atime"], attrs["mtime"]))

    def fsync(self, h: FileHandle) -> None:
        """fsync@openssh.com."""
        with h.lock:
            if h.fd < 0:
                raise Closed("the file is closed")
            os.fsync(h.fd)

    def _truncate(self, fd: int, st: os.stat_result, size: int) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise PermissionDenied("only regular files can be truncated")
        if size > MAX_OFFSET:
            raise InvalidInput("size is too large", field="size")
        if size > st.st_size:
            self.usage.charge(self.root, self.c, size - st.st_size)
        os.ftruncate(fd, size)
        if size < st.st_size and st.st_nlink == 1:
            self.usage.credit(self.root, st.st_size - size)

    @staticmethod
    def _refuse_chown(st: os.stat_result, attrs: dict[str, Any]) -> None:
        if ("uid" in attrs and attrs["uid"] != st.st_uid) or (
                "gid" in attrs and attrs["gid"] != st.st_gid):
            raise PermissionDenied("changing the owner of a file is not allowed")

    # -- paths -----------------------------------------------------------------

    def stat(self, comps: Components, follow: bool) -> os.stat_result:
        """STAT (links followed inside the root) or LSTAT."""
        return self.c.stat(comps) if follow else self.c.lstat(comps)

    def setstat(self, comps: Components, attrs: dict[str, Any]) -> None:
        """SETSTAT on a path: size, permissions, times; never the owner."""
        self._writable()
        c = self.c
        st = c.stat(comps)
        self._refuse_chown(st, attrs)
        if "size" in attrs:
            fd = c.open(comps, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
            try:
                self._truncate(fd, os.fstat(fd), attrs["size"])
            finally:
                os.close(fd)
        if "permissions" in attrs:
            with c.parent(comps, follow_final=True) as (dir_fd, name, real):
                # Set on the link's target inside the root, never through a link.
                fsops.set_permissions(c, real if name is not None else (),
                                      _clean_mode(attrs["permissions"]))
        if "atime" in attrs and "mtime" in attrs:
            with c.parent(comps, follow_final=True) as (dir_fd, name, _):
                try:
                    os.utime(name or ".", (attrs["atime"], attrs["mtime"]), dir_fd=dir_fd,
                             follow_symlinks=False)
                except OSError as e:
                    raise os_error(e, display(comps)) from None

    def open_dir(self, comps: Components) -> DirHandle:
        """OPENDIR: the directory's fd and its names (our work files hidden)."""
        fd = self.c.open(comps, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it if not e.name.startswith(WORK_PREFIXES)]
        except BaseException:
            os.close(fd)
            raise
        names.sort(reverse=True)  # popped from the end: sent in name order
        return DirHandle(fd, comps, names)

    def read_dir(self, h: DirHandle) -> list[tuple[bytes, bytes, os.stat_result]]:
        """The next batch of ``(name, longname, lstat)``; empty at the end."""
        out: list[tuple[bytes, bytes, os.stat_result]] = []
        size = 0
        with h.lock:
            if h.fd < 0:
                raise Closed("the directory is closed")
            while h.names and len(out) < DIR_BATCH and size < DIR_BATCH_BYTES:
                name = h.names.pop()
                try:
                    st = os.stat(name, dir_fd=h.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the listing
                raw = name.encode("utf-8", "surrogateescape")
                out.append((raw, wire.longname(raw, st), st))
                size += 2 * len(raw) + 128
        return out

    def remove(self, comps: Components) -> None:
        """REMOVE: a file or link (the link, never its target)."""
        self._writable()
        if not comps:
            raise PermissionDenied("cannot remove the server directory")
        with self.c.parent(comps, follow_final=False) as (dir_fd, name, _):
            assert name is not None
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise InvalidInput("{} is a directory".format(display(comps)), field="path")
                os.unlink(name, dir_fd=dir_fd)
            except OSError as e:
                raise os_error(e, display(comps)) from None
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            self.usage.credit(self.root, st.st_size)

    def mkdir(self, comps: Components, attrs: dict[str, Any]) -> None:
        """MKDIR (one level; the parent must exist)."""
        self._writable()
        if not comps:
            raise Conflict("/ already exists")
        c = self.c
        with c.parent(comps, follow_final=False) as (dir_fd, name, _):
            assert name is not None
            try:
                os.mkdir(name, 0o755, dir_fd=dir_fd)
                c.settle_new_dir(dir_fd, name)
                if "permissions" in attrs:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, dir_fd=dir_fd)
                    try:
                        os.fchmod(fd, _clean_mode(attrs["permissions"]) | 0o700)
                    finally:
                        os.close(fd)
            except FileExistsError:
                raise Conflict("{} already exists".format(display(comps))) from None
            except OSError as e:
                raise os_error(e, display(comps)) from None

    def rmdir(self, comps: Components) -> None:
        """RMDIR: an empty directory (never the root, never through a link)."""
        self._writable()
        if not comps:
            raise PermissionDenied("cannot remove the server directory")
        with self.c.parent(comps, follow_final=False) as (dir_fd, name, _):
            assert name is not None
            try:
                os.rmdir(name, dir_fd=dir_fd)
            except OSError as e:
                raise os_error(e, display(comps)) from None

    def rename(self, src: Components, dst: Components, replace: bool) -> None:
        """RENAME (never replacing), or posix-rename@openssh.com (replacing)."""
        self._writable()
        if not src or not dst:
            raise PermissionDenied("cannot move the server directory")
        if dst[:len(src)] == src:
            raise InvalidInput("cannot move a directory into itself", field="newpath")
        c = self.c
        with c.parent(src, follow_final=False) as (src_fd, src_name, _):
            with c.parent(dst, follow_final=False) as (dst_fd, dst_name, _):
                assert src_name is not None and dst_name is not None
                try:
                    os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
                    if not replace:
                        rename_noreplace(src_fd, src_name, dst_fd, dst_name)
                        return
                    try:
                        old = os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        old = None
                    os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                except OSError as e:
                    raise os_error(e, display(src)) from None
        if old is not None and stat.S_ISREG(old.st_mode) and old.st_nlink == 1:
            self.usage.credit(self.root, old.st_size)

    def readlink(self, comps: Components) -> bytes:
        """READLINK: the link's text, as stored."""
        with self.c.parent(comps, follow_final=False) as (dir_fd, name, _):
            if name is None:
                raise InvalidInput("/ is not a link", field="path")
            try:
                return os.fsencode(os.readlink(name, dir_fd=dir_fd))
            except OSError as e:
                if e.errno == 22:  # EINVAL: not a link
                    raise InvalidInput("{} is not a link".format(display(comps)),
                                       field="path") from None
                raise os_error(e, display(comps)) from None

    def symlink(self, link: Components, target: bytes) -> None:
        """SYMLINK: a new link at ``link`` to ``target`` inside the root."""
        self._writable()
        if not link:
            raise Conflict("/ already exists")
        # The walk tells the link's real directory (its parents may be
        # links themselves), from which the relative target is computed.
        with Confined(self.root.path, self.root.uid, self.root.gid, use_openat2=False) as c:
            with c.parent(link, follow_final=False) as (dir_fd, name, real):
                assert name is not None
                text = link_target(real, target)
                try:
                    os.symlink(text, name, dir_fd=dir_fd)
                except FileExistsError:
                    raise Conflict("{} already exists".format(display(link))) from None
                except OSError as e:
                    raise os_error(e, display(link)) from None
                if c.chown:
                    try:
                        os.chown(name, c.uid, c.gid, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError:
                        pass

    def statvfs(self) -> tuple[int, ...]:
        """statvfs@openssh.com figures, bounded by the disk limit when there is one."""
        fd = self.c.open((), os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.fstatvfs(fd)
        finally:
            os.close(fd)
        bsize = st.f_frsize or 4096
        blocks, bfree, bavail = st.f_blocks, st.f_bfree, st.f_bavail
        limit = self.root.disk_limit_bytes
        if limit is not None:
            used = self.usage.used(self.root) or 0
            blocks = limit // bsize
            bfree = bavail = max(0, limit - used) // bsize
        return (st.f_bsize, bsize, blocks, bfree, bavail, st.f_files, st.f_ffree,
                st.f_favail, 0, st.f_flag, st.f_namemax)


@implementer(ISFTPFile)
class SftpFile:
    """An open file as Twisted's ``ISFTPFile`` (Deferreds from the pool)."""

    def __init__(self, fs: ServerFileSystem, handle: FileHandle) -> None:
        self.fs = fs
        self.handle = handle

    def close(self) -> Deferred[None]:
        return self.fs._run(self.handle.close)

    def readChunk(self, offset: int, length: int) -> Deferred[bytes]:  # noqa: N802
        return self.fs._run(self.fs.files.read, self.handle, offset, length)

    def writeChunk(self, offset: int, data: bytes) -> Deferred[None]:  # noqa: N802
        return self.fs._run(self.fs.files.write, self.handle, offset, data)

    def getAttrs(self) -> Deferred[dict[str, int]]:  # noqa: N802
        return self.fs._run(lambda: attrs_dict(self.fs.files.fstat(self.handle)))

    def setAttrs(self, attrs: dict[str, Any]) -> Deferred[None]:  # noqa: N802
        return self.fs._run(self.fs.files.fsetstat, self.handle, attrs)


class SftpDirectory:
    """An open directory: ``read_batch`` fires with the next entries."""

    def __init__(self, fs: ServerFileSystem, handle: DirHandle) -> None:
        self.fs = fs
        self.handle = handle

    def read_batch(self) -> Deferred[list[tuple[bytes, bytes, os.stat_result]]]:
        """The next ``(name, longname, lstat)`` entries; empty at the end."""
        return self.fs._run(self.fs.files.read_dir, self.handle)

    def close(self) -> Deferred[None]:
        return self.fs._run(self.handle.close)


@implementer(ISFTPServer)
class ServerFileSystem:
    """
    Twisted's ``ISFTPServer`` over ``ServerFiles``: every call answers a
    Deferred from the thread pool.  Paths are SFTP byte paths.
    """

    avatar: Any = None  # ISFTPServer's attribute; the session holds the login

    def __init__(self, reactor: Any, threadpool: ThreadPool, files: ServerFiles) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.files = files

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    def gotVersion(self, otherVersion: int, extData: dict[bytes, bytes]) -> dict[bytes, bytes]:  # noqa: N802,N803
        return {
            b"posix-rename@openssh.com": b"1",
            b"statvfs@openssh.com": b"2",
            b"fstatvfs@openssh.com": b"2",
            b"fsync@openssh.com": b"1",
            b"limits@openssh.com": b"1",
        }

    def openFile(self, filename: bytes, flags: int, attrs: dict[str, Any]) -> Deferred[SftpFile]:  # noqa: N802
        comps = wire.components(filename)

        def open_() -> SftpFile:
            return SftpFile(self, self.files.open_file(comps, flags, attrs))

        return self._run(open_)

    def removeFile(self, filename: bytes) -> Deferred[None]:  # noqa: N802
        return self._run(self.files.remove, wire.components(filename))

    def renameFile(self, oldpath: bytes, newpath: bytes) -> Deferred[None]:  # noqa: N802
        return self._run(self.files.rename, wire.components(oldpath),
                         wire.components(newpath), False)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> Deferred[None]:
        """posix-rename@openssh.com: rename replacing the target."""
        return self._run(self.files.rename, wire.components(oldpath),
                         wire.components(newpath), True)

    def makeDirectory(self, path: bytes, attrs: dict[str, Any]) -> Deferred[None]:  # noqa: N802
        return self._run(self.files.mkdir, wire.components(path), attrs)

    def removeDirectory(self, path: bytes) -> Deferred[None]:  # noqa: N802
        return self._run(self.files.rmdir, wire.components(path))

    def openDirectory(self, path: bytes) -> Deferred[SftpDirectory]:  # noqa: N802
        comps = wire.components(path)
        return self._run(lambda: SftpDirectory(self, self.files.open_dir(comps)))

    def getAttrs(self, path: bytes, followLinks: bool) -> Deferred[dict[str, int]]:  # noqa: N802,N803
        comps = wire.components(path)
        return self._run(lambda: attrs_dict(self.files.stat(comps, bool(followLinks))))

    def stat(self, path: bytes, follow: bool) -> Deferred[os.stat_result]:
        """STAT/LSTAT as a stat result."""
        return self._run(self.files.stat, wire.components(path), follow)

    def setAttrs(self, path: bytes, attrs: dict[str, Any]) -> Deferred[None]:  # noqa: N802
        return self._run(self.files.setstat, wire.components(path), attrs)

    def readLink(self, path: bytes) -> Deferred[bytes]:  # noqa: N802
        return self._run(self.files.readlink, wire.components(path))

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> Deferred[None]:  # noqa: N802,N803
        return self._run(self.files.symlink, wire.components(linkPath), targetPath)

    def realPath(self, path: bytes) -> bytes:  # noqa: N802
        return wire.display(wire.components(path))

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> Deferred[bytes]:  # noqa: N802,N803
        # The protocol answers the extensions it knows itself.
        raise NotImplementedError(extendedName.decode("ascii", "replace"))

    def close(self) -> Deferred[None]:
        """Release the session's root fd (after its handles are closed)."""
        return self._run(self.files.shutdown)

