"""
The blocking file operations behind ``FileManager``, one function per action.

Every function here runs in the thread pool and takes an open ``Confined``
root; every path it touches is resolved through it and acted on with
``dir_fd=`` calls.  Results are records of ``ctrlagent.wire.files`` (which
also spells them as PROTOCOL.md section 2's ``data``).

Symlinks in listings: an entry that is a symlink is marked ``symlink``.
When its target resolves inside the server directory the entry reports the
target's type, size and times; otherwise (dangling, absolute, or leaving the
root) it is reported as a file marked ``broken``, with the link's own
metadata, and every operation through it is refused.  ``owner``/``group``
are names (numbers when the host has no such user).  Deleting or renaming a
symlink acts on the link; ``set_file_permissions`` refuses links (and
hard-linked files).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    FileNotFound,
    InsufficientResources,
    InvalidInput,
    PermissionDenied,
)
from ctrlagent.files import trees, usage
from ctrlagent.files.confined import Confined, Made, os_error, rename_noreplace
from ctrlagent.files.paths import (
    KEEP_PREFIX,
    TMP_PREFIX,
    WORK_PREFIXES,
    Components,
    display,
)
from ctrlagent.wire.files import FileEntry, FileInfo, FileListing, FileSearch

# Work files untouched for this long are leftovers of a crash; usage walks remove them.
STALE_TMP_SECONDS = 3600
COPY_CHUNK = 1024 * 1024
# Directories deeper than this are not descended by search and archive
# creation: they bound the work one request can cause.
MAX_DEPTH = trees.MAX_LISTING_DEPTH

# A file an extraction replaced, kept (hard-linked) under a hidden name beside
# it until the extraction has succeeded, so that a failed one can put it back:
# (components of the file, kept name, identity of what the extraction placed
# there, identity of the original).
Replaced = tuple[Components, str, trees.Ident, trees.Ident]


class Quota:
    """
    The bytes an operation may still add to a server's directory.

    ``room`` is ``None`` for an unlimited server.  ``charge`` raises
    ``InsufficientResources`` before the limit is crossed; ``delta`` is what
    the operation added in net, for the usage cache.
    """

    def __init__(self, room: int | None) -> None:
        self.room = room
        self.delta = 0

    def charge(self, n: int) -> None:
        """Account for ``n`` more bytes, refusing if they do not fit."""
        if self.room is not None and self.delta + n > self.room:
            raise InsufficientResources("the server's disk limit would be exceeded")
        self.delta += n

    def credit(self, n: int) -> None:
        """Account for ``n`` bytes freed (a replaced file)."""
        self.delta -= n


_names_lock = threading.Lock()
_user_names: dict[int, str] = {}
_group_names: dict[int, str] = {}


def _user(uid: int) -> str:
    name = _user_names.get(uid)  # a dict read is atomic; the lock guards the fill
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        with _names_lock:
            _user_names[uid] = name
    return name


def _group(gid: int) -> str:
    name = _group_names.get(gid)
    if name is None:
        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        with _names_lock:
            _group_names[gid] = name
    return name


def entry(name: str, st: os.stat_result, rel: Components, path: str | None = None,
          *, symlink: bool = False, broken: bool = False) -> FileEntry:
    """
    One listing entry for ``name`` with metadata ``st`` at path ``rel``
    (``path``: its display form, when the caller has it already).  A
    ``broken`` link is described as a file.
    """
    is_dir = not broken and stat.S_ISDIR(st.st_mode)
    return FileEntry(name, "directory" if is_dir else "file", 0 if is_dir else st.st_size,
                     st.st_mtime, stat.S_IMODE(st.st_mode), _user(st.st_uid), _group(st.st_gid),
                     path if path is not None else display(rel), symlink, broken)


def _symlink_entry(c: Confined, name: str, lst: os.stat_result, rel: Components) -> FileEntry:
    try:
        st = c.stat(rel)
    except (PermissionDenied, FileNotFound, InvalidInput):
        return entry(name, lst, rel, symlink=True, broken=True)
    return entry(name, st, rel, symlink=True)


# -- listing and search -------------------------------------------------------

def list_files(c: Confined, comps: Components, limit: int, offset: int,
               server_id: str = "") -> FileListing:
    """
    List a directory: directories first, then by name; ``offset``/``limit``
    page through huge directories.  Sorting uses the type the directory
    itself records (``d_type``), so only the returned page is ``stat``-ed and
    no file is ever opened.
    """
    fd = c.open(comps, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            # Only (type, key, name) per entry: a huge directory costs names,
            # not DirEntry objects.
            names = [(not e.is_dir(follow_symlinks=False), e.name.lower(), e.name)
                     for e in it if not e.name.startswith(WORK_PREFIXES)]
        names.sort()
        page = names[offset:offset + limit]
        files = []
        links = False
        prefix = display(comps).rstrip("/") + "/"
        for _, _, name in page:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the scan
            rel = comps + (name,)
            if stat.S_ISLNK(st.st_mode):
                links = True
                files.append(_symlink_entry(c, name, st, rel))
            else:
                files.append(entry(name, st, rel, prefix + name))
    finally:
        os.close(fd)
    if links:
        # Sorting by d_type put symlinks to directories among the files; put
        # them where a user expects them within this page.
        files.sort(key=lambda f: (f.kind != "directory", f.name.lower(), f.name))
    return FileListing(server_id, display(comps), tuple(files), len(names), offset, limit,
                       offset + limit < len(names))


def search_files(c: Confined, comps: Components, query: str, file_type: str,
                 max_results: int, max_scanned: int = 200_000,
                 server_id: str = "") -> FileSearch:
    """
    Names under ``comps`` containing ``query`` (case-insensitive), in
    depth-first name order.  Symlinked directories are not descended (no
    loops, no escapes); at most ``MAX_DEPTH`` levels, ``max_results``
    entries, and ``max_scanned`` names looked at, so one search of a huge
    tree cannot hold a worker for minutes.
    """
    needle = query.lower()
    found: list[FileEntry] = []
    complete = True
    top = c.open(comps, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with trees.Walk(top, max_depth=MAX_DEPTH, sort=True, hide=WORK_PREFIXES) as walk:
            for e in walk:
                if walk.listed > max_scanned:
                    complete = False
                    break
                try:
                    st = e.lstat()
                except FileNotFoundError:
                    continue
                kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
                if needle in e.name.lower() and file_type in ("all", kind):
                    rel = comps + e.rel
                    if stat.S_ISLNK(st.st_mode):
                        found.append(_symlink_entry(c, e.name, st, rel))
                    else:
                        found.append(entry(e.name, st, rel))
                    if len(found) >= max_results:
                        complete = False
                        break
    except trees.TreeChanged:
        complete = False
    finally:
        os.close(top)
    return FileSearch(server_id, display(comps), query, tuple(found), not complete)


# -- reading ------------------------------------------------------------------

def _read_rest(fd: int, room: int, comps: Components) -> bytes:
    parts: list[bytes] = []
    while True:
        data = os.read(fd, COPY_CHUNK)
        if not data:
            return b"".join(parts)
        room -= len(data)
        if room < 0:
            raise InsufficientResources(
                "{} grew beyond the read limit while being read".format(display(comps)))
        parts.append(data)


def read_bytes(c: Confined, comps: Components,
               max_bytes: int) -> tuple[bytes | bytearray, os.stat_result]:
    """
    The content of a regular file, refused with ``InsufficientResources`` if
    it is larger than ``max_bytes``.  Opened non-blocking so that a FIFO
    cannot hang a worker thread; anything but a regular file is refused.
    """
    fd = c.open(comps, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidInput("{} is a directory".format(display(comps)), field="path")
        if not stat.S_ISREG(st.st_mode):
            raise PermissionDenied("{} is not a regular file".format(display(comps)))
        if st.st_size > max_bytes:
            raise InsufficientResources(
                "{} is {} bytes, more than the {} bytes that can be read at once; "
                "use an archive or SFTP".format(display(comps), st.st_size, max_bytes))
        # One buffer of the expected size (plus one byte to notice growth),
        # filled in place: no chunk list to join, no second copy.
        buf = bytearray(st.st_size + 1)
        view = memoryview(buf)
        total = 0
        while total < len(buf):
            n = os.readv(fd, [view[total:]])
            if n == 0:
                break
            total += n
        view.release()
        if total > st.st_size:
            # The file grew while we read: go on, but never hold more than the cap.
            if total > max_bytes:
                raise InsufficientResources(
                    "{} grew beyond {} bytes while being read".format(display(comps), max_bytes))
            return bytes(buf) + _read_rest(fd, max_bytes - total, comps), st
        del buf[total:]
        return buf, st
    finally:
        os.close(fd)


# -- writing ------------------------------------------------------------------

def _existing(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def write_atomic(
    c: Confined,
    comps: Components,
    chunks: Iterable[bytes],
    quota: Quota,
    *,
    fsync: bool = True,
    mode: int | None = None,
    created: list[Made] | None = None,
    size: int | None = None,
    replaced: list[Replaced] | None = None,
) -> os.stat_result:
    """
    Replace (or create) the file at ``comps`` with ``chunks``, atomically.

    The data goes to a fresh temp file beside the target (``O_CREAT |
    O_EXCL | O_NOFOLLOW``), is fsync-ed, and renamed over the target, so a
    crash leaves the old file or the new one, never half of either.  A final
    symlink inside the tree is followed (the target is written); one that
    leaves the tree is refused.  Missing parents are created.  New files are
    0644 unless ``mode`` says otherwise; a replaced file keeps its mode minus
    setuid/setgid.  ``created`` collects the new file (and the parents this
    write made) with their identities when it did not exist before
    (extraction rolls those back on failure).  With ``replaced``, a file that
    did exist is kept under a hidden name (a hard link, no copy, when the
    filesystem allows one) and recorded, for ``restore_replaced`` or
    ``discard_replaced``.
    """
    if not comps:
        raise InvalidInput("cannot write to the server directory itself", field="path")
    with c.parent(comps, follow_final=True, create_dirs=True, created=created) as (
            dir_fd, name, real):
        if name is None:
            raise InvalidInput("{} is a directory".format(display(comps)), field="path")
        old = _existing(dir_fd, name)
        if old is not None:
            if stat.S_ISDIR(old.st_mode):
                raise InvalidInput("{} is a directory".format(display(comps)), field="path")
            if stat.S_ISLNK(old.st_mode):
                raise PermissionDenied("{} changed during the write".format(display(comps)))
            quota.credit(old.st_size)
            if mode is None:
                mode = stat.S_IMODE(old.st_mode) & 0o1777
        if mode is None:
            mode = 0o644
        if size is None and isinstance(chunks, (list, tuple)):
            size = sum(len(b) for b in chunks)
        if size is not None:
            # Size known up front: refuse before touching the directory at all.
            try:
                quota.charge(size)
            except InsufficientResources:
                if old is not None:
                    quota.credit(-old.st_size)
                raise
        tmp = TMP_PREFIX + secrets.token_hex(8)
        keep = _keep_original(name, dir_fd) if old is not None and replaced is not None else None
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dir_fd)
        except OSError as e:
            if keep is not None:
                _unlink_quietly(keep, dir_fd)
            if old is not None:
                quota.credit(-old.st_size)
            raise os_error(e, display(comps)) from None
        try:
            try:
                written = 0
                for chunk in chunks:
                    written += len(chunk)
                    if size is None:
                        quota.charge(len(chunk))
                    elif written > size:
                        raise InvalidInput("more data than announced", field="content")
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                os.fchmod(fd, mode)
                c.own(fd)
                if fsync:
                    os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as e:
            _unlink_quietly(tmp, dir_fd)
            if keep is not None:
                _unlink_quietly(keep, dir_fd)
            if old is not None:
                quota.credit(-old.st_size)
            if isinstance(e, OSError):
                raise os_error(e, display(comps)) from None
            raise
        placed = trees.ident(st)
        if old is None and created is not None:
            created.append((real, placed))
        if keep is not None and old is not None and replaced is not None:
            replaced.append((real, keep, placed, trees.ident(old)))
        return st


def _keep_original(name: str, dir_fd: int) -> str | None:
    """
    Hard-link ``name`` to a hidden name beside it; the hidden name, or None
    when the filesystem refuses links (no hard links, ``protected_hardlinks``
    for a file of another user): the write then goes on without a way back,
    as a plain overwrite would.
    """
    keep = KEEP_PREFIX + secrets.token_hex(8)
    try:
        os.link(name, keep, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return keep


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def restore_replaced(c: Confined, replaced: list[Replaced]) -> None:
    """
    Put back, newest first, the files ``write_atomic`` kept, confined and
    best effort; each only while its path still holds what that write placed
    there.  A path someone has written since keeps their file (the kept
    original is dropped: the newer write superseded it anyway), so undoing an
    operation never undoes anyone else's.
    """
    for target, kept, placed, original in reversed(replaced):
        try:
            with c.parent(target, follow_final=False) as (dir_fd, name, _):
                if name is not None:
                    _put_back(dir_fd, name, kept, placed, original)
        except (OSError, CtrlAgentError):
            continue  # never mask the error that caused the rollback
    replaced.clear()


def _put_back(dir_fd: int, name: str, kept: str, placed: trees.Ident,
              original: trees.Ident) -> None:
    try:
        st = os.stat(kept, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if trees.ident(st) != original:
        return  # not the original any more: nothing to put back
    ours = trees.take_if_same(dir_fd, name, placed)
    if ours is None:
        # Written by someone else since: theirs stands.
        _unlink_quietly(kept, dir_fd)
        return
    try:
        trees.rename_noreplace(dir_fd, kept, dir_fd, name)
    except FileExistsError:
        # A write landed in the moment the name was free: it is newer.
        _unlink_quietly(kept, dir_fd)
    _unlink_quietly(ours, dir_fd)


def discard_replaced(c: Confined, replaced: list[Replaced]) -> None:
    """Drop the kept originals once the work that replaced them has succeeded."""
    for target, kept, _, original in replaced:
        try:
            with c.parent(target, follow_final=False) as (dir_fd, _name, _):
                # Our own hidden name, but checked: never drop a file that is
                # not the kept original.
                trees.unlink_if_same(dir_fd, kept, original)
        except (OSError, CtrlAgentError):
            continue  # a leftover is swept by the next usage walk
    replaced.clear()


def undo_created(c: Confined, created: list[Made]) -> None:
    """
    Remove, newest first, the files and directories an operation created,
    confined and best effort; each only while its path still holds exactly
    what the operation made (a file written there since stays), and a
    directory only when empty (so files others put into it stay, and it with
    them).
    """
    for rel, made in reversed(created):
        try:
            with c.parent(rel, follow_final=False) as (dir_fd, name, _):
                if name is None:
                    continue
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    trees.rmdir_if_same(dir_fd, name, made)
                else:
                    trees.unlink_if_same(dir_fd, name, made)
        except (OSError, CtrlAgentError):
            continue  # never mask the error that caused the rollback
    created.clear()


def text_chunks(content: str, chunk_chars: int = COPY_CHUNK) -> tuple[int, Iterator[bytes]]:
    """
    ``(UTF-8 size, chunks)`` of ``content``, encoded piece by piece so that a
    64 MiB config never needs a second 64 MiB buffer.  The size of ASCII text
    is its length; other text is measured by encoding it once, up front.
    """
    size = len(content) if content.isascii() else len(content.encode("utf-8"))

    def gen() -> Iterator[bytes]:
        for i in range(0, len(content), chunk_chars):
            yield content[i:i + chunk_chars].encode("utf-8")

    return size, gen()


def create_directory(c: Confined, comps: Components) -> None:
    """``mkdir -p`` beneath the root; an existing file in the way is a ``Conflict``."""
    if not comps:
        return
    with c.parent(comps, follow_final=True, create_dirs=True) as (dir_fd, name, _):
        if name is None:
            return
        try:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return
            raise Conflict("{} exists and is not a directory".format(display(comps))) from None
        except OSError as e:
            raise os_error(e, display(comps)) from None
        c.settle_new_dir(dir_fd, name)


def delete(c: Confined, comps: Components) -> int:
    """
    Remove a file, symlink (the link, never its target) or directory tree of
    any depth (``trees.remove_tree``: iterative, by directory fd, never
    following a link).  Returns the bytes freed.  The root itself cannot be
    deleted.
    """
    if not comps:
        raise PermissionDenied("refusing to delete the server directory itself")
    with c.parent(comps, follow_final=False) as (dir_fd, name, _):
        assert name is not None
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            return trees.remove_tree(dir_fd, name)
        except OSError as e:
            raise os_error(e, display(comps)) from None


def rename(c: Confined, src: Components, dst: Components, dst_field: str = "newPath") -> None:
    """
    Move ``src`` to ``dst`` (never replacing an existing ``dst``); a link
    moves as the link.  ``dst_field`` names the destination in errors.
    """
    if not src or not dst:
        raise PermissionDenied("cannot move the server directory itself")
    if dst[:len(src)] == src:
        raise InvalidInput("cannot move a directory into itself", field=dst_field)
    with c.parent(src, follow_final=False) as (src_fd, src_name, _):
        assert src_name is not None
        with c.parent(dst, follow_final=False, create_dirs=True) as (dst_fd, dst_name, _):
            assert dst_name is not None
            try:
                os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
                rename_noreplace(src_fd, src_name, dst_fd, dst_name)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    # The kernel's word for a directory moved beneath itself
                    # (through a link the lexical check cannot see).
                    raise InvalidInput("cannot move a directory into itself",
                                       field=dst_field) from None
                raise os_error(e, display(src)) from None


# -- copying ------------------------------------------------------------------

@dataclass
class CopyCount:
    """What a copy made: regular files, directories, links, bytes written."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    size: int = 0


def copy(c: Confined, quota: Quota, src: Components, dst: Components,
         src_field: str = "sourcePath", dst_field: str = "destinationPath") -> CopyCount:
    """
    Copy the file, link or directory tree ``src`` to ``dst``, which must not
    exist, all or nothing.

    - Confined: both paths resolve through ``c``; the tree is walked by
      directory fd, never through a link (``trees.Walk``).  A symlink is
      copied as a symlink with the same target, never followed, whatever it
      points at: a link planted to leave the root stays a link that every
      operation refuses to follow.  A file swapped for a link while it is
      copied is met ``O_NOFOLLOW`` and copied as the link it has become.
      FIFOs, sockets and device nodes are not copied (refused at the top).
    - Never into itself: a directory cannot be copied beneath itself, by
      name or through a link to one of its ancestors.
    - Quota: the source's size is checked against the room left before
      anything is written, and every byte is charged as it is written (the
      source may grow meanwhile).
    - All or nothing: the copy is built under a hidden temp name beside
      ``dst`` and renamed into place (``RENAME_NOREPLACE``) at the end; on
      any failure (quota, a tree too deep or changing, a disk error) the
      temp tree and any parent directory the copy made are removed.  A
      source deeper than ``MAX_DEPTH`` levels, holding a mount point or an
      unreadable directory is refused rather than copied in part.
    """
    if not src:
        raise PermissionDenied("cannot copy the server directory itself")
    if not dst:
        raise InvalidInput("the destination cannot be the server directory", field=dst_field)
    if dst[:len(src)] == src:
        raise InvalidInput("cannot copy a directory into itself", field=dst_field)
    count = CopyCount()
    created: list[Made] = []
    with c.parent(src, follow_final=False) as (src_dir, src_name, _):
        assert src_name is not None
        try:
            st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        except OSError as e:
            raise os_error(e, display(src)) from None
        kind = stat.S_IFMT(st.st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise PermissionDenied("{} is not a regular file, directory or symlink"
                                   .format(display(src)))
        top_fd = -1
        if kind == stat.S_IFDIR:
            try:
                top_fd = os.open(src_name, trees.DIR_FLAGS, dir_fd=src_dir)
            except OSError as e:
                raise os_error(e, display(src)) from None
        try:
            if top_fd >= 0:
                if trees.ident(os.fstat(top_fd)) != trees.ident(st):
                    raise Conflict("{} changed during the copy; try again".format(display(src)))
                # What a mount point or an unreadable directory hides is not
                # counted; the copy itself refuses those.
                needed, _ = trees.tree_usage(top_fd)
            else:
                needed = st.st_size if kind == stat.S_IFREG else 0
            if quota.room is not None and quota.delta + needed > quota.room:
                raise InsufficientResources(
                    "copying {} ({} bytes) would exceed the server's disk limit"
                    .format(display(src), needed))
            with c.parent(dst, follow_final=False, create_dirs=True, created=created) as (
                    dst_dir, dst_name, _):
                try:
                    assert dst_name is not None
                    if _existing(dst_dir, dst_name) is not None:
                        raise Conflict("{} already exists".format(display(dst)))
                    if top_fd >= 0:
                        _refuse_inside(dst_dir, c.root_fd, trees.ident(st), dst_field)
                    _copy_into(c, quota, count, src_dir, src_name, st, top_fd,
                               dst_dir, dst_name, display(src))
                except BaseException:
                    undo_created(c, created)
                    raise
        finally:
            if top_fd >= 0:
                os.close(top_fd)
    return count


def _refuse_inside(dir_fd: int, root_fd: int, src: trees.Ident, field: str) -> None:
    """
    Refuse when the directory ``dir_fd`` is the directory ``src`` or lies
    beneath it: climbs by ``..`` up to the server root (the path there may
    have gone through links, so the names say nothing).
    """
    root = trees.ident(os.fstat(root_fd))
    cur = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        for _ in range(trees.MAX_TREE_DEPTH):
            here = trees.ident(os.fstat(cur))
            if here == src:
                raise InvalidInput("cannot copy a directory into itself", field=field)
            if here == root:
                return
            up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = up
    finally:
        os.close(cur)
    raise PermissionDenied("the destination is not beneath the server directory")


def _copy_into(c: Confined, quota: Quota, count: CopyCount, src_dir: int, src_name: str,
               st: os.stat_result, top_fd: int, dst_dir: int, dst_name: str,
               what: str) -> None:
    """Build the copy under a temp name in ``dst_dir``, then rename it to ``dst_name``."""
    tmp = trees.COPY_PREFIX + secrets.token_hex(8)
    try:
        if stat.S_ISLNK(st.st_mode):
            _copy_link(src_dir, src_name, dst_dir, tmp, count)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(c, quota, count, src_dir, src_name, dst_dir, tmp)
        else:
            _copy_tree(c, quota, count, top_fd, st, dst_dir, tmp, what)
        rename_noreplace(dst_dir, tmp, dst_dir, dst_name)
    except BaseException as e:
        try:
            trees.remove_tree(dst_dir, tmp)
        except (OSError, CtrlAgentError):
            pass  # a leftover temp tree is swept by the next usage walk
        quota.credit(count.size)
        if isinstance(e, OSError):
            raise os_error(e, what) from None
        raise


def _copy_link(src_dir: int, src_name: str, dst_dir: int, dst_name: str,
               count: CopyCount) -> None:
    target = os.readlink(src_name, dir_fd=src_dir)
    os.symlink(target, dst_name, dir_fd=dst_dir)
    count.symlinks += 1


def _copy_file(c: Confined, quota: Quota, count: CopyCount, src_dir: int, src_name: str,
               dst_dir: int, dst_name: str) -> None:
    """
    Copy one regular file, opened ``O_NOFOLLOW``: swapped for a link since
    it was listed, it is copied as that link; anything else that is not a
    regular file any more is left out.
    """
    try:
        fd = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=src_dir)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _copy_link(src_dir, src_name, dst_dir, dst_name, count)
            return
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        out = os.open(dst_name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
        try:
            while True:
                data = os.read(fd, COPY_CHUNK)
                if not data:
                    break
                quota.charge(len(data))
                count.size += len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
            os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o1777)
            c.own(out)
        finally:
            os.close(out)
        count.files += 1
    finally:
        os.close(fd)


def _copy_tree(c: Confined, quota: Quota, count: CopyCount, top_fd: int,
               top_st: os.stat_result, dst_dir: int, dst_name: str, what: str) -> None:
    """
    Copy the directory ``top_fd`` to a new directory ``dst_name``: one
    destination fd per level walked (at most ``MAX_DEPTH`` + 1).  Each
    directory keeps its mode, with the owner's ``rwx`` added so that the
    copy can be filled (and removed again on failure).
    """
    os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
    stack = [os.open(dst_name, trees.DIR_FLAGS, dir_fd=dst_dir)]
    try:
        c.own(stack[0])
        os.fchmod(stack[0], (stat.S_IMODE(top_st.st_mode) & 0o1777) | 0o700)
        count.directories += 1
        with trees.Walk(top_fd, max_depth=MAX_DEPTH, hide=WORK_PREFIXES) as walk:
            for e in walk:
                while len(stack) > e.depth + 1:
                    os.close(stack.pop())
                out = stack[-1]
                try:
                    st = e.lstat()
                except FileNotFoundError:
                    continue  # removed since the listing
                if stat.S_ISDIR(st.st_mode):
                    if e.depth + 1 > MAX_DEPTH:
                        raise InsufficientResources(
                            "{} is more than {} levels deep: not copied".format(what, MAX_DEPTH))
                    os.mkdir(e.name, 0o700, dir_fd=out)
                    fd = os.open(e.name, trees.DIR_FLAGS, dir_fd=out)
                    stack.append(fd)
                    c.own(fd)
                    os.fchmod(fd, (stat.S_IMODE(st.st_mode) & 0o1777) | 0o700)
                    e.is_dir = True
                    count.directories += 1
                elif stat.S_ISLNK(st.st_mode):
                    e.is_dir = False
                    _copy_link(e.dir_fd, e.name, out, e.name, count)
                elif stat.S_ISREG(st.st_mode):
                    e.is_dir = False
                    _copy_file(c, quota, count, e.dir_fd, e.name, out, e.name)
                else:
                    e.is_dir = False  # FIFOs, sockets, devices: not copied
            if walk.truncated:
                raise Conflict(
                    "{} holds a mount point or a directory that cannot be read: not copied"
                    .format(what))
    finally:
        for fd in stack:
            os.close(fd)


def file_info(c: Confined, comps: Components) -> FileInfo:
    """
    ``get_file_info`` data.  A symlink is described as in listings: its
    target's metadata when the target is inside the root, else the link's own
    as a ``broken`` one.
    """
    st = c.lstat(comps)
    name = comps[-1] if comps else "/"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = c.stat(comps)
        except (PermissionDenied, FileNotFound, InvalidInput):
            return FileInfo(entry(name, st, comps, symlink=True, broken=True))
        return FileInfo(entry(name, target, comps, symlink=True))
    return FileInfo(entry(name, st, comps))


def set_permissions(c: Confined, comps: Components, mode: int) -> None:
    """
    ``chmod`` that never follows a symlink: the final component is checked
    with ``fstatat(AT_SYMLINK_NOFOLLOW)``, opened ``O_NOFOLLOW`` (a link
    swapped in meanwhile fails with ``ELOOP``), re-checked by inode, and
    changed with ``fchmod``.  Only regular files and directories.
    """
    with c.parent(comps, follow_final=False) as (dir_fd, name, _):
        target = name or "."
        try:
            st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            raise os_error(e, display(comps)) from None
        if stat.S_ISLNK(st.st_mode):
            raise PermissionDenied("{} is a symlink; permissions of links are not changed"
                                   .format(display(comps)))
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise PermissionDenied("{} is not a regular file or directory".format(display(comps)))
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            # A hard link shares its inode with a name we cannot see, perhaps
            # outside the server directory: changing it would change that too.
            raise PermissionDenied("{} has other hard links; permissions not changed"
                                   .format(display(comps)))
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            raise os_error(e, display(comps)) from None
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise PermissionDenied("{} changed during the operation".format(display(comps)))
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


# -- chunked uploads ----------------------------------------------------------

def assemble_chunks(c: Confined, parts: list[Components], target: Components,
                    quota: Quota) -> os.stat_result:
    """
    Concatenate the chunk files ``parts`` (in order) into ``target``
    atomically, then delete them.  The chunks are already counted in the
    server's usage; the assembled file replaces them.
    """
    sizes = [c.lstat(p).st_size for p in parts]

    def stream() -> Iterable[bytes]:
        for p in parts:
            fd = c.open(p, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PermissionDenied("{} is not a regular file".format(display(p)))
                while True:
                    data = os.read(fd, COPY_CHUNK * 4)
                    if not data:
                        break
                    yield data
            finally:
                os.close(fd)

    # The chunks are freed right after: let the assembly use their room.
    quota.credit(sum(sizes))
    st = write_atomic(c, target, stream(), quota)
    for p in parts:
        # Only the chunk files themselves: a name that has become a directory
        # since is not ours to remove.
        try:
            with c.parent(p, follow_final=False) as (dir_fd, name, _):
                if name is not None:
                    os.unlink(name, dir_fd=dir_fd)
        except (OSError, CtrlAgentError):
            continue
    return st


def existing_chunks(c: Confined, target: Components) -> list[tuple[int, str]]:
    """``(index, name)`` of the ``<name>.chunk<N>`` files beside ``target``, sorted."""
    from ctrlagent.files.paths import split_chunk

    prefix = target[-1] + ".chunk"
    out = []
    fd = c.open(target[:-1], os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            for e in it:
                if e.name.startswith(prefix) and e.is_file(follow_symlinks=False):
                    parsed = split_chunk(target[:-1] + (e.name,))
                    if parsed is not None and parsed[0] == target:
                        out.append((parsed[1], e.name))
    finally:
        os.close(fd)
    out.sort()
    return out


# -- disk usage ---------------------------------------------------------------

def disk_usage(c: Confined) -> int:
    """
    Bytes used beneath the root, as the agent's shared ``usage.Meter``
    measures them: the qgroup's figure of a btrfs subvolume, else the
    apparent size of every regular file at any depth (a budgeted, cached,
    coalesced walk).  A walk removes stale temp files of interrupted writes
    on the way.
    """
    meter = usage.shared_meter()
    return meter.measure(c.root_fd, sweep_before=time.time() - STALE_TMP_SECONDS).apparent
