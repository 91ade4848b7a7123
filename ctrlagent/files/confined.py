"""
Race-free resolution of paths beneath a server root.

Everything here is synchronous and blocking: it runs in the thread pool.

``Confined`` holds a file descriptor of the server root and resolves
components (from ``paths.normalise``) to *(directory fd, final name)*, so that
callers act on the final name with ``*at`` calls (``dir_fd=``) and never hand
the kernel a path that it could resolve differently a moment later.

Two resolvers, one meaning:

- ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` where the kernel (and
  seccomp) allows it: the kernel refuses any ``..`` or symlink that leaves
  the root, atomically.
- A manual walk otherwise, and whenever the final component is a symlink we
  must follow: each component is opened with ``O_PATH | O_NOFOLLOW`` relative
  to the fd of its parent.  A symlink is read and its target's components are
  pushed onto the walk, so it is resolved by the same confined walk; ``..``
  pops our own stack of directory fds, so it can never climb above the root
  fd.  At most ``MAX_SYMLINK_HOPS`` links are followed.

Symlink policy (both resolvers): a relative symlink whose target stays inside
the root is followed; an absolute symlink, or one that climbs above the root,
is refused with ``PermissionDenied``.  Nothing is opened outside the root.

A concurrent swap of a component for a symlink between our check and our use
cannot redirect us: every open is ``O_NOFOLLOW`` from an fd we hold, so the
swap either makes the open fail with ``ELOOP`` (refused) or is resolved by the
confined walk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    FileNotFound,
    InvalidInput,
    PermissionDenied,
)
from ctrlagent.files import trees
from ctrlagent.files.paths import Components, display

# What an operation made, to undo it only while it is still there: its
# components and its (device, inode).
Made = tuple[Components, trees.Ident]

MAX_SYMLINK_HOPS = 40

_SYS_OPENAT2 = 437  # the same number on every architecture (new syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _probe_openat2() -> bool:
    """True when openat2 with RESOLVE_BENEATH works here (kernel >= 5.6, no seccomp veto)."""
    try:
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fd = _openat2(root, ".", os.O_PATH | os.O_DIRECTORY, _RESOLVE_BENEATH)
    except OSError:
        return False
    finally:
        os.close(root)
    os.close(fd)
    return True


OPENAT2_AVAILABLE = _probe_openat2()


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """``renameat2(RENAME_NOREPLACE)``: refuses with ``Conflict`` if ``dst`` exists."""
    try:
        trees.rename_noreplace(src_dir, src, dst_dir, dst)
    except FileExistsError:
        raise Conflict("{} already exists".format(dst)) from None


def os_error(e: OSError, what: str) -> CtrlAgentError:
    """Map an ``OSError`` from a confined operation to a protocol error."""
    if e.errno == errno.ENOENT:
        return FileNotFound("{} does not exist".format(what))
    if e.errno in (errno.ELOOP, errno.EXDEV):
        return PermissionDenied("{} leads outside the server directory".format(what))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied("{}: {}".format(what, e.strerror))
    if e.errno == errno.ENOTDIR:
        return FileNotFound("{}: it or one of its parents is not a directory".format(what))
    if e.errno == errno.EISDIR:
        return InvalidInput("{} is a directory".format(what), field="path")
    if e.errno == errno.ENOTEMPTY:
        return Conflict("{} is not empty".format(what))
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        from ctrlagent.errors import InsufficientResources

        return InsufficientResources("{}: {}".format(what, e.strerror))
    return CtrlAgentError("{}: {}".format(what, e.strerror))


class Confined:
    """
    One server root, opened as a directory fd for the length of an operation.

    ``uid``/``gid`` own what is created when the agent runs as root.
    ``use_openat2`` picks the resolver (``None``: openat2 where available);
    tests run both.
    """

    def __init__(self, root_path: str, uid: int = -1, gid: int = -1,
                 use_openat2: bool | None = None) -> None:
        self.uid = uid
        self.gid = gid
        self.chown = os.geteuid() == 0 and uid >= 0
        # The root path itself comes from the agent's config, not from the
        # Panel, so it may be followed as given.
        try:
            self.root_fd = os.open(root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.root_fd = self._create_root(root_path)
        except OSError as e:
            raise os_error(e, "server directory") from None
        self.use_openat2 = OPENAT2_AVAILABLE if use_openat2 is None else use_openat2

    def _create_root(self, root_path: str) -> int:
        """
        Create a server directory that does not exist yet (a server whose
        install has not written anything), but only its last component: a
        missing parent means a wrong data directory, which is not guessed at.
        """
        parent, name = os.path.split(os.path.normpath(root_path))
        try:
            parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise FileNotFound("server directory {} does not exist".format(root_path)) from None
        try:
            try:
                os.mkdir(name, 0o755, dir_fd=parent_fd)
            except FileExistsError:
                pass
            fd, _ = self._make_dir(parent_fd, name)
            os.close(fd)
            return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=parent_fd)
        except OSError as e:
            raise os_error(e, "server directory") from None
        finally:
            os.close(parent_fd)

    def close(self) -> None:
        """Release the root fd."""
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> Confined:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolution ---------------------------------------------------------

    def resolve(
        self,
        components: Components,
        *,
        follow_final: bool,
        create_dirs: bool = False,
        created: list[Made] | None = None,
    ) -> tuple[int, str | None, Components]:
        """
        Resolve ``components`` to ``(dir_fd, name, real_components)``.

        ``dir_fd`` is an ``O_PATH`` fd of the directory that holds ``name``
        (the caller closes it); ``name`` is ``None`` when the path is that
        directory itself (the root, or a symlink to ``..``).  The final
        component need not exist.  With ``follow_final``, a final symlink
        inside the tree is followed.  With ``create_dirs``, missing parents are
        created (0755, owned by the server user) and the ones this call made
        (not one made concurrently by someone else) are appended to
        ``created`` with their identity.
        """
        if self.use_openat2 and components:
            fast = self._resolve_openat2(components, follow_final)
            if fast is not None:
                return fast
        return self._resolve_walk(components, follow_final, create_dirs, created)

    def _resolve_openat2(
        self, components: Components, follow_final: bool
    ) -> tuple[int, str | None, Components] | None:
        parent = "/".join(components[:-1]) or "."
        try:
            fd = _openat2(self.root_fd, parent, os.O_PATH | os.O_DIRECTORY,
                          _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EAGAIN):
                # Let the walk create parents or name the missing piece.  EAGAIN:
                # the kernel saw a concurrent rename while resolving "..", and
                # asks the caller to retry; the walk is that retry.
                return None
            raise os_error(e, display(components)) from None
        name = components[-1]
        if follow_final:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                os.close(fd)
                return None
        # Through a symlinked parent the real path differs from the given one;
        # the walk knows it, openat2 does not.  Callers that need the real path
        # (rollback, chunks) pass components with no symlinks, or use the walk.
        return fd, name, components

    def _resolve_walk(
        self,
        components: Components,
        follow_final: bool,
        create_dirs: bool,
        created: list[Made] | None,
    ) -> tuple[int, str | None, Components]:
        stack = [os.dup(self.root_fd)]
        real: list[str] = []
        pending = list(reversed(components))
        hops = 0
        try:
            while pending:
                name = pending.pop()
                last = not pending
                if name in ("", "."):
                    continue
                if name == "..":
                    if len(stack) == 1:
                        raise PermissionDenied(
                            "{} leads outside the server directory".format(display(components)))
                    os.close(stack.pop())
                    real.pop()
                    continue
                if last and not follow_final:
                    return self._keep_top(stack), name, tuple(real) + (name,)
                try:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                except FileNotFoundError:
                    if last:
                        return self._keep_top(stack), name, tuple(real) + (name,)
                    if not create_dirs:
                        raise FileNotFound(
                            "{} does not exist".format(display(components))) from None
                    fd, made = self._make_dir(stack[-1], name)
                    if made and created is not None:
                        created.append((tuple(real) + (name,), trees.ident(os.fstat(fd))))
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        os.close(fd)
                        raise PermissionDenied("too many symlinks in {}".format(
                            display(components)))
                    try:
                        target = os.readlink("", dir_fd=fd)
                    finally:
                        os.close(fd)
                    if target.startswith("/"):
                        raise PermissionDenied(
                            "{} leads outside the server directory".format(display(components)))
                    pending.extend(reversed(target.split("/")))
                    continue
                if last:
                    os.close(fd)
                    return self._keep_top(stack), name, tuple(real) + (name,)
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    raise FileNotFound(
                        "{}: {} is not a directory".format(display(components), name))
                stack.append(fd)
                real.append(name)
            return self._keep_top(stack), None, tuple(real)
        except BaseException:
            for fd in stack:
                os.close(fd)
            raise

    @staticmethod
    def _keep_top(stack: list[int]) -> int:
        """Close every fd of the walk but the innermost directory, which is returned."""
        top = stack.pop()
        for fd in stack:
            os.close(fd)
        stack.clear()
        return top

    def _make_dir(self, parent_fd: int, name: str) -> tuple[int, bool]:
        """The fd of directory ``name`` made under ``parent_fd``, and whether we made it."""
        try:
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            made = True
        except FileExistsError:
            made = False  # made concurrently: fine, we open it without following below
        return self.open_new_dir(parent_fd, name), made

    def open_new_dir(self, parent_fd: int, name: str) -> int:
        """
        Open the directory ``name`` just made under ``parent_fd`` (never
        through a link) and give it mode 0755 and the server's user; return
        its fd.
        """
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
        try:
            os.fchmod(fd, 0o755)
            self.own(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def settle_new_dir(self, parent_fd: int, name: str) -> None:
        """``open_new_dir`` for a directory the caller does not need open."""
        os.close(self.open_new_dir(parent_fd, name))

    def own(self, fd: int) -> None:
        """Give ``fd`` to the server's user when we are root."""
        if self.chown:
            os.fchown(fd, self.uid, self.gid)

    # -- opening the final object -------------------------------------------

    @contextmanager
    def parent(
        self, components: Components, *, follow_final: bool, create_dirs: bool = False,
        created: list[Made] | None = None,
    ) -> Iterator[tuple[int, str | None, Components]]:
        """``resolve`` as a context manager that closes the directory fd."""
        try:
            fd, name, real = self.resolve(components, follow_final=follow_final,
                                          create_dirs=create_dirs, created=created)
        except OSError as e:
            raise os_error(e, display(components)) from None
        try:
            yield fd, name, real
        finally:
            os.close(fd)

    def open(self, components: Components, flags: int, *, follow_final: bool = True) -> int:
        """
        Open the object at ``components`` with ``flags`` (``O_NOFOLLOW`` is
        always added).  The root opens as ``.``.
        """
        with self.parent(components, follow_final=follow_final) as (dir_fd, name, _):
            try:
                return os.open(name or ".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as e:
                raise os_error(e, display(components)) from None

    def lstat(self, components: Components) -> os.stat_result:
        """``lstat`` of the final component (not followed)."""
        with self.parent(components, follow_final=False) as (dir_fd, name, _):
            try:
                return os.stat(name or ".", dir_fd=dir_fd, follow_symlinks=False)
            except OSError as e:
                raise os_error(e, display(components)) from None

    def stat(self, components: Components) -> os.stat_result:
        """``stat`` of the final object, following symlinks only inside the root."""
        with self.parent(components, follow_final=True) as (dir_fd, name, _):
            try:
                st = os.stat(name or ".", dir_fd=dir_fd, follow_symlinks=False)
            except OSError as e:
                raise os_error(e, display(components)) from None
        if stat.S_ISLNK(st.st_mode):
            # Swapped in after resolution: refuse rather than follow.
            raise PermissionDenied("{} changed during the operation".format(display(components)))
        return st
