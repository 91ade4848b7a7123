"""
Walking, measuring, cleaning and removing directory trees a game server built.

Blocking; runs in a thread pool.  Every tree walk of the agent goes through
``Walk``: disk usage (the file manager's quota and the server manager's
limit check), search, archive creation, deletion of a path or of a whole
server directory, and the pass that hands a data directory back to its
server after an install.  The game server shapes these trees, so a tree may
be thousands of levels deep, change while it is walked, and hold links,
device nodes, FIFOs and sockets anywhere.  The rules:

- Iterative: an explicit stack of frames, never recursion, so depth costs a
  list entry per level, not a Python stack frame (the interpreter's limit
  was hit at about 1,000 levels).
- Bounded: at most ``FD_WINDOW`` directory fds are held per walk, whatever
  the depth.  Deeper frames give up their fd; going back up re-opens a
  parent through the child's ``..`` and accepts it only if it is the very
  directory (device and inode) walked down through, else finds it again by
  name from the nearest open ancestor, checking every identity, and stops
  with ``TreeChanged`` when that fails.  At most ``max_depth`` levels are
  descended (``truncated`` tells); deletion goes deeper still by moving
  too-deep subtrees up, so a tree of any depth can be removed.
- Never through a link: every directory is opened ``O_NOFOLLOW |
  O_DIRECTORY`` relative to its parent's fd, and a directory on another
  device (a mount point) is never entered.
- Identity before removal: what the agent removes or puts back because it
  once placed it there (``take_if_same``) is first moved aside and checked
  by device and inode, so a name that someone else has written since is
  left alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

from ctrlagent.errors import Conflict, PermissionDenied
from ctrlagent.files.paths import KEEP_PREFIX, TMP_PREFIX, WORK_PREFIXES, Components

# Directory fds one walk holds at most (its top included).
FD_WINDOW = 16
# Levels a walk descends at most.  Deeper than any real game's data; it bounds
# the memory a walk can be made to hold (one small frame per level).
MAX_TREE_DEPTH = 65_536
# Levels search and archive creation descend: they bound what one request
# can make the agent do (and a Panel path's length).
MAX_LISTING_DEPTH = 64

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Ident = tuple[int, int]

_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


# The hidden name a directory copy is built under (``fsops.copy``).
COPY_PREFIX = TMP_PREFIX + "copy-"


class TreeChanged(Conflict):
    """A directory being walked was moved or replaced meanwhile; try again."""


def ident(st: os.stat_result) -> Ident:
    """What identifies a file for as long as it exists: device and inode."""
    return st.st_dev, st.st_ino


class Entry:
    """
    One name a walk met, valid until the walk moves on: ``dir_fd`` holds
    ``name``; ``depth`` counts the directories between the walk's top and
    ``dir_fd`` (0 for the top's own entries).  ``is_dir`` is what the
    directory listing said (never following a link); a walk descends into a
    directory entry unless the consumer sets ``descend = False``.  With
    ``post_order`` walks, ``leaving`` entries name each directory again once
    everything beneath it has been met.
    """

    __slots__ = ("_st", "_walk", "depth", "descend", "dir_fd", "is_dir", "leaving", "name")

    def __init__(self, walk: Walk, dir_fd: int, name: str, depth: int, is_dir: bool,
                 leaving: bool = False) -> None:
        self._walk = walk
        self.dir_fd = dir_fd
        self.name = name
        self.depth = depth
        self.is_dir = is_dir
        self.leaving = leaving
        self.descend = True
        self._st: os.stat_result | None = None

    def lstat(self) -> os.stat_result:
        """``fstatat`` of the entry, not following a link (cached)."""
        if self._st is None:
            self._st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        return self._st

    @property
    def rel(self) -> Components:
        """The entry's components relative to the walk's top."""
        return self._walk.components(self.depth) + (self.name,)


class _Frame:
    __slots__ = ("fd", "ident", "name", "names")

    def __init__(self, fd: int, name: str, ident: Ident, names: list[tuple[str, bool]]) -> None:
        self.fd = fd
        self.name = name
        self.ident = ident
        self.names = names


class Walk:
    """
    A depth-first walk of the directory ``top_fd`` (any fd of it, ``O_PATH``
    included; not closed), iterated as ``Entry`` objects, pre-order.

    ``sort`` meets names in order; names starting with ``hide`` are skipped
    (with their subtrees); ``max_depth`` bounds descent (``truncated`` is
    set when something was not descended, for depth or for being another
    filesystem); ``listed`` counts the names read so far, so a caller can
    bound its work.  A walk left before its end releases its fds on
    ``close`` (or leaving its ``with`` block).
    """

    def __init__(self, top_fd: int, *, max_depth: int = MAX_TREE_DEPTH, sort: bool = False,
                 hide: tuple[str, ...] = (), post_order: bool = False) -> None:
        self.top_fd = top_fd
        self.max_depth = max_depth
        self.sort = sort
        self.hide = hide
        self.post_order = post_order
        self.truncated = False
        # Mount points met (and not entered).
        self.mounts = 0
        self.listed = 0
        self._frames: list[_Frame] = []
        self._open = 0
        # The open frames are frames[0] and frames[_low:]: one contiguous
        # window above the top, which always stays open.
        self._low = 1
        self.dev = -1
        self._gen: Generator[Entry, None, None] | None = None

    def __iter__(self) -> Iterator[Entry]:
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    def __enter__(self) -> Walk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the walk's fds (a walk left before its end)."""
        if self._gen is not None:
            self._gen.close()

    def _run(self) -> Generator[Entry, None, None]:
        fd = os.open(".", DIR_FLAGS, dir_fd=self.top_fd)
        frames = self._frames
        try:
            st = os.fstat(fd)
            self.dev = st.st_dev
            frames.append(_Frame(fd, "", ident(st), self._list(fd)))
        except BaseException:
            os.close(fd)
            raise
        self._open = 1
        try:
            while frames:
                frame = frames[-1]
                if frame.names:
                    name, is_dir = frame.names.pop()
                    entry = Entry(self, frame.fd, name, len(frames) - 1, is_dir)
                    yield entry
                    if entry.descend and entry.is_dir:
                        if entry.depth < self.max_depth:
                            self._enter(frame, name)
                        else:
                            self.truncated = True
                    continue
                frames.pop()
                if not frames:
                    os.close(frame.fd)
                    self._open -= 1
                    return
                parent = frames[-1]
                try:
                    if parent.fd < 0:
                        parent.fd = self._reopen(frame.fd, len(frames) - 1)
                        self._open += 1
                        self._low = len(frames) - 1
                finally:
                    os.close(frame.fd)
                    frame.fd = -1
                    self._open -= 1
                if len(frames) == 1:
                    self._low = 1
                if self.post_order:
                    yield Entry(self, parent.fd, frame.name, len(frames) - 1, True, leaving=True)
        finally:
            for frame in frames:
                if frame.fd >= 0:
                    os.close(frame.fd)
            frames.clear()
            self._open = 0

    def components(self, depth: int) -> Components:
        """Names of the directories from the top down to the one at ``depth``."""
        return tuple(f.name for f in self._frames[1:depth + 1])

    def hoist(self, entry: Entry) -> bool:
        """
        Move the directory ``entry`` up into the walk's top under a hidden
        name, to be met again there (depth 0): how a deletion reaches below
        ``max_depth`` without holding more frames.  False if it is gone.
        """
        top = self._frames[0]
        new = TMP_PREFIX + "deep-" + secrets.token_hex(8)
        try:
            rename_noreplace(entry.dir_fd, entry.name, top.fd, new)
        except FileNotFoundError:
            return False
        top.names.append((new, True))
        entry.descend = False
        return True

    def _list(self, fd: int) -> list[tuple[str, bool]]:
        hide = self.hide
        try:
            with os.scandir(fd) as it:
                names = [(e.name, _is_dir(e)) for e in it if not e.name.startswith(hide)]
        except OSError:
            # Unreadable (a non-root agent, a directory of mode 000): not
            # walked; a removal then fails on it rather than skip it silently.
            self.truncated = True
            return []
        self.listed += len(names)
        if self.sort:
            # Popped from the end: ascending order.
            names.sort(reverse=True)
        return names

    def _enter(self, parent: _Frame, name: str) -> None:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent.fd)
        except OSError:
            # Gone, or replaced by a file or a link since the listing: not
            # descended, never followed.
            return
        try:
            st = os.fstat(fd)
            if st.st_dev != self.dev:
                # A mount point: never walk (or delete, or chown) into another
                # filesystem.
                self.truncated = True
                self.mounts += 1
                os.close(fd)
                return
            names = self._list(fd)
        except BaseException:
            os.close(fd)
            raise
        frames = self._frames
        frames.append(_Frame(fd, name, ident(st), names))
        self._open += 1
        if self._open > FD_WINDOW:
            victim = frames[self._low]
            os.close(victim.fd)
            victim.fd = -1
            self._low += 1
            self._open -= 1

    def _reopen(self, child_fd: int, index: int) -> int:
        """An fd of frame ``index``, found from its child (open as ``child_fd``)."""
        frames = self._frames
        want = frames[index].ident
        try:
            fd = os.open("..", DIR_FLAGS, dir_fd=child_fd)
        except OSError:
            fd = -1
        if fd >= 0:
            if ident(os.fstat(fd)) == want:
                return fd
            os.close(fd)
        # The child was moved: look for the parent by name, from the nearest
        # ancestor still open, accepting only the directories walked before.
        j = index - 1
        while frames[j].fd < 0:
            j -= 1
        cur = frames[j].fd
        owned = False
        try:
            for k in range(j + 1, index + 1):
                try:
                    nxt = os.open(frames[k].name, DIR_FLAGS, dir_fd=cur)
                except OSError:
                    raise TreeChanged("a directory was moved during the walk") from None
                if owned:
                    os.close(cur)
                cur, owned = nxt, True
                if ident(os.fstat(cur)) != frames[k].ident:
                    raise TreeChanged("a directory was replaced during the walk")
            return cur
        except BaseException:
            if owned:
                os.close(cur)
            raise


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir(follow_symlinks=False)
    except OSError:
        return False


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """``renameat2(RENAME_NOREPLACE)``; ``FileExistsError`` when ``dst`` exists."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        # Old libc: check, then rename.  The window can only replace a name
        # in the same tree, never anything outside it.
        try:
            os.stat(dst, dir_fd=dst_dir, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    r = fn(ctypes.c_int(src_dir), os.fsencode(src), ctypes.c_int(dst_dir), os.fsencode(dst),
           ctypes.c_uint(_RENAME_NOREPLACE))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src)


# -- acting on a name only while it is still ours ------------------------------

def take_if_same(dir_fd: int, name: str, want: Ident) -> str | None:
    """
    Move ``name`` aside to a hidden name, if it is ``want``; return that
    name, else None (and ``name`` stays as it is).

    The check is made on the moved file, after the move, so nothing put at
    ``name`` by someone else can be taken by a check-then-act race: a file
    that is not ``want`` is put back (``RENAME_NOREPLACE``).  Meanwhile
    ``name`` is absent for a moment; should a write land there in that
    moment, it is newer than the file taken aside, which then stays aside
    (a hidden temp name: the usage walk sweeps it).
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if ident(st) != want:
        return None
    aside = TMP_PREFIX + secrets.token_hex(8)
    try:
        rename_noreplace(dir_fd, name, dir_fd, aside)
    except FileNotFoundError:
        return None
    if ident(os.stat(aside, dir_fd=dir_fd, follow_symlinks=False)) == want:
        return aside
    try:
        rename_noreplace(dir_fd, aside, dir_fd, name)
    except FileExistsError:
        pass  # a newer write took the name: it stands
    return None


def unlink_if_same(dir_fd: int, name: str, want: Ident) -> bool:
    """Remove the non-directory ``name`` only while it is ``want``; True if removed."""
    aside = take_if_same(dir_fd, name, want)
    if aside is None:
        return False
    os.unlink(aside, dir_fd=dir_fd)
    return True


def rmdir_if_same(dir_fd: int, name: str, want: Ident) -> bool:
    """
    Remove the directory ``name`` if it is ``want`` and empty; True if removed.

    ``rmdir`` itself refuses a directory that someone has put a file into
    (atomically), which is what matters here; a directory is not moved aside,
    since a write beneath it would then make a second one.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if ident(st) != want or not stat.S_ISDIR(st.st_mode):
        return False
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EBUSY):
            return False
        raise
    return True


# -- measuring -----------------------------------------------------------------

def tree_usage(top_fd: int, *, allocated: bool = False,
               sweep_before: float | None = None) -> tuple[int, bool]:
    """
    ``(bytes, complete)`` beneath the directory ``top_fd``: the apparent size
    of regular files, or with ``allocated`` the blocks of every
    non-directory.  With ``sweep_before``, agent work files (temp files of
    interrupted writes, kept originals, the trees of interrupted copies)
    untouched since then are leftovers of a crash and are removed on the way.
    A tree that changes under the walk gives what was counted (``complete``
    False): usage is an estimate.
    """
    total = 0
    walk = Walk(top_fd)
    try:
        for e in walk:
            if e.is_dir:
                if sweep_before is not None and e.name.startswith(COPY_PREFIX):
                    # The tree of a copy the agent died in the middle of.
                    try:
                        if e.lstat().st_mtime < sweep_before:
                            e.descend = False
                            remove_tree(e.dir_fd, e.name)
                    except (OSError, Conflict):
                        pass  # the next walk tries again
                continue
            try:
                st = e.lstat()
                if (sweep_before is not None and e.name.startswith(WORK_PREFIXES)
                        and stat.S_ISREG(st.st_mode)):
                    # A kept file has its original's mtime; its ctime is when
                    # it was linked.  A write in progress keeps touching its
                    # temp file.
                    touched = st.st_ctime if e.name.startswith(KEEP_PREFIX) else st.st_mtime
                    if touched < sweep_before:
                        os.unlink(e.name, dir_fd=e.dir_fd)
                        continue
                if allocated:
                    total += st.st_blocks * 512
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
            except OSError:
                continue  # changed under us
    except TreeChanged:
        return total, False
    return total, not walk.truncated


# -- removing ------------------------------------------------------------------

def remove_tree(parent_fd: int, name: str, *, max_depth: int = MAX_TREE_DEPTH,
                passes: int = 3) -> int:
    """
    Remove ``name`` of ``parent_fd`` and, if it is a directory, everything
    beneath it, of any depth; return the bytes of the regular files removed.

    Links are removed, never followed; a mount point inside is never
    entered: ``PermissionDenied`` once the rest is removed.  Should the tree
    keep changing (another writer), up to ``passes`` walks are made, then
    ``Conflict``: what is left can be removed by trying again.
    """
    freed = 0
    for _ in range(passes):
        try:
            top = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return freed
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            # Not a directory (or a link to one): the name itself goes.
            return freed + _unlink_counted(parent_fd, name)
        try:
            emptied, mounts = _empty(top, max_depth)
            freed += emptied
        except TreeChanged:
            continue
        finally:
            os.close(top)
        if mounts:
            raise PermissionDenied(
                "{} holds another filesystem (a mount point): not removed".format(name))
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return freed
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        return freed
    raise Conflict("{} kept changing while it was being deleted; try again".format(name))


def _unlink_counted(dir_fd: int, name: str) -> int:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _empty(top: int, max_depth: int) -> tuple[int, int]:
    """Remove everything beneath the directory ``top``: ``(bytes freed, mount points left)``."""
    freed = 0
    walk = Walk(top, post_order=True, max_depth=max_depth)
    for e in walk:
        if e.leaving:
            try:
                os.rmdir(e.name, dir_fd=e.dir_fd)
            except OSError as err:
                # Filled meanwhile (the next pass sees it) or gone: both fine.
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
            continue
        if e.is_dir:
            if e.depth >= max_depth:
                walk.hoist(e)
            continue
        try:
            freed += _unlink_counted(e.dir_fd, e.name)
        except IsADirectoryError:
            # A directory since the listing: walk into it now.
            if e.depth >= max_depth:
                walk.hoist(e)
            else:
                e.is_dir = True
    return freed, walk.mounts


# -- handing a tree back to its server ---------------------------------------------

@dataclass
class Reclaimed:
    """What ``reclaim_tree`` did."""

    # Special files removed, by kind ("device", "fifo", "socket"), and a few
    # of their paths (relative to the top) for the log.
    removed: dict[str, int] = field(default_factory=dict)
    examples: list[Components] = field(default_factory=list)
    # Files and directories whose setuid/setgid bits were cleared.
    cleared: int = 0
    # Entries that could not be fixed (the walk goes on).
    failed: int = 0
    # Not everything was walked (depth bound, a mount point, a moved directory).
    truncated: bool = False

    @property
    def removed_total(self) -> int:
        """Special files removed, of every kind."""
        return sum(self.removed.values())

    def example_paths(self, max_chars: int = 100) -> list[str]:
        """The examples as quoted paths, long ones shortened in the middle (for a log line)."""
        out = []
        for comps in self.examples:
            path = "/" + "/".join(comps)
            if len(path) > max_chars:
                path = path[:max_chars // 2 - 2] + "/.../" + path[-(max_chars // 2 - 3):]
            out.append(repr(path))
        return out


_SPECIAL = {stat.S_IFCHR: "device", stat.S_IFBLK: "device", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}


def reclaim_tree(top_fd: int, uid: int, gid: int, *, chown: bool = True,
                 max_examples: int = 5) -> Reclaimed:
    """
    Make everything beneath the directory ``top_fd`` the server's again
    after an install ran in it as root: owned by ``uid:gid`` (with
    ``chown``), no setuid/setgid bit on any file or directory, and no
    device node, FIFO or socket.  Links are changed themselves, never
    followed; every entry is opened ``O_PATH | O_NOFOLLOW`` (opening a device
    for real could act on it) and acted on through that fd, so a name
    swapped meanwhile changes nothing but the swapped-in file of the same
    tree.
    """
    out = Reclaimed()
    walk = Walk(top_fd)
    try:
        for e in walk:
            try:
                fd = os.open(e.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dir_fd)
            except FileNotFoundError:
                continue
            except OSError:
                out.failed += 1
                continue
            try:
                st = os.fstat(fd)
                kind = _SPECIAL.get(stat.S_IFMT(st.st_mode))
                if kind is not None:
                    e.is_dir = False
                    if unlink_if_same(e.dir_fd, e.name, ident(st)):
                        out.removed[kind] = out.removed.get(kind, 0) + 1
                        if len(out.examples) < max_examples:
                            out.examples.append(e.rel)
                    continue
                e.is_dir = stat.S_ISDIR(st.st_mode)
                setid = stat.S_ISUID | stat.S_ISGID
                had = st.st_mode & setid and (stat.S_ISREG(st.st_mode)
                                              or stat.S_ISDIR(st.st_mode))
                if chown and (st.st_uid, st.st_gid) != (uid, gid):
                    _chown_fd(fd, uid, gid)
                    st = os.fstat(fd)  # a chown by root clears setuid on executables itself
                if had and st.st_mode & setid:
                    _chmod_fd(fd, stat.S_IMODE(st.st_mode) & ~setid, e.dir_fd, e.name)
                if had:
                    out.cleared += 1
            except OSError:
                out.failed += 1
            finally:
                os.close(fd)
    except TreeChanged:
        out.truncated = True
    out.truncated = out.truncated or walk.truncated
    return out


def _chown_fd(fd: int, uid: int, gid: int) -> None:
    """``fchownat(fd, "", AT_EMPTY_PATH)``: works on ``O_PATH`` fds, links included."""
    r = _libc.fchownat(ctypes.c_int(fd), b"", ctypes.c_int(uid), ctypes.c_int(gid),
                       ctypes.c_int(_AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_PROC_FDS = os.path.isdir("/proc/self/fd")


def _chmod_fd(fd: int, mode: int, dir_fd: int, name: str) -> None:
    """``chmod`` of the regular file or directory an ``O_PATH`` fd holds."""
    if _PROC_FDS:
        # fchmod refuses O_PATH fds; the fd's /proc magic link reaches the
        # very inode, whatever its name has become meanwhile.
        os.chmod("/proc/self/fd/{}".format(fd), mode)
        return
    # No /proc: open the name for real (it was a regular file or directory
    # a moment ago) and change it only if it is still the same inode.
    real = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                   | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if ident(os.fstat(real)) == ident(os.fstat(fd)):
            os.fchmod(real, mode)
    finally:
        os.close(real)
