"""
Creating and extracting zip, tar and tar.gz (also .bz2/.xz) archives, confined.

Blocking; runs in the thread pool.  Extraction never calls ``extractall``:
each member is named by ``paths.member_components`` and written through
``fsops.write_atomic`` beneath the extraction directory, and the rules are:

- a member whose name climbs out with ``..`` refuses the whole archive
  (``PermissionDenied``); a leading ``/`` is stripped (as GNU tar does);
- symlink and hard-link members are skipped, never created, so no later
  member can be written "through" one; device, FIFO and other special
  members are skipped too;
- modes keep only the permission bits: files become 0644, or 0755 when the
  member had an execute bit; directories 0755; no setuid/setgid/sticky;
- bytes are counted as they are decompressed, against the server's disk
  room, ``archive_max_bytes``, and ``archive size * archive_max_ratio``
  (zip bombs), and members against ``archive_max_entries``;
- on any failure, every file and directory this extraction created is
  removed again, and every file it overwrote is put back: the original is
  kept under a hidden hard link until the extraction has succeeded.  The
  undo goes by identity (device and inode), not by path: a path that holds
  something else by then (a user's ``write_file`` meanwhile) keeps it, and a
  directory the extraction created stays when others have put files in it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from ctrlagent.errors import (
    InsufficientResources,
    InvalidInput,
)
from ctrlagent.files import fsops, trees
from ctrlagent.files.confined import Confined, Made, os_error
from ctrlagent.files.paths import Components, display, member_components
from ctrlagent.wire.files import ArchiveCreated

FORMATS = {"zip": "zip", "tar": "tar", "tar.gz": "tar.gz", "tgz": "tar.gz", "targz": "tar.gz"}
READ_CHUNK = 1024 * 1024
# Archives smaller than this may still expand to this much: the ratio bound
# is for bombs, not for a 2 KiB archive of a few configs.
RATIO_FLOOR_BYTES = 1024 * 1024
# Decompressed bytes that are not file content (tar headers and padding).
MAX_OVERHEAD_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on one extraction."""

    max_bytes: int
    max_ratio: float
    max_entries: int


class _Budget:
    """Counts decompressed bytes and members against every bound at once."""

    def __init__(self, archive_size: int, limits: ExtractLimits, quota: fsops.Quota) -> None:
        self.max_total = min(limits.max_bytes,
                             max(int(archive_size * limits.max_ratio), RATIO_FLOOR_BYTES))
        self.max_entries = limits.max_entries
        self.quota = quota
        self.total = 0
        self.entries = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise InsufficientResources(
                "archive has more than {} entries".format(self.max_entries))

    def bytes(self, n: int) -> None:
        self.total += n
        if self.total > self.max_total:
            raise InsufficientResources(
                "archive expands beyond {} bytes (size or compression-ratio bound)"
                .format(self.max_total))


class _Decompressed:
    """
    The decompressed tar stream, counted as it is read: every byte (headers,
    padding, member data) counts against the expansion bound, and bytes that
    did not end up in extracted files (headers, mostly) are bounded by
    ``MAX_OVERHEAD_BYTES``, so a giant PAX header cannot fill memory before a
    single member is written.
    """

    def __init__(self, raw: IO[bytes], budget: _Budget) -> None:
        self.raw = raw
        self.budget = budget
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n if n is not None and n >= 0 else READ_CHUNK)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            # gzip/bz2 report corrupt streams as OSError subclasses.
            raise InvalidInput("corrupt archive: {}".format(e), field="archivePath") from None
        self.total += len(data)
        if self.total - self.budget.total > MAX_OVERHEAD_BYTES:
            raise InsufficientResources("archive headers are too large")
        if self.total > self.budget.max_total + MAX_OVERHEAD_BYTES:
            raise InsufficientResources(
                "archive expands beyond {} bytes (size or compression-ratio bound)"
                .format(self.budget.max_total))
        return data


def _decompressor(f: IO[bytes]) -> Any:
    """The archive's content, decompressed by its magic (gzip, bzip2, xz or none)."""
    head = f.read(6)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(f, "rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f, "rb")
    return f


def _stream(src: IO[bytes], budget: _Budget) -> Iterator[bytes]:
    while True:
        data = src.read(READ_CHUNK)
        if not data:
            return
        budget.bytes(len(data))
        yield data


def _file_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


def extract(c: Confined, archive: Components, dest: Components, quota: fsops.Quota,
            limits: ExtractLimits,
            on_member: Callable[[Components], None] | None = None) -> tuple[int, int]:
    """
    Extract ``archive`` into ``dest`` (created if missing): the counts of
    members extracted and skipped.  ``on_member`` is called with each member's components once
    it has been written: the seam where tests interleave other writes.
    """
    fd = c.open(archive, os.O_RDONLY | os.O_NONBLOCK)
    f = os.fdopen(fd, "rb")
    undo = _Undo([], [], on_member)
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput("{} is not a file".format(display(archive)), field="archivePath")
        _mkdir(c, dest, undo.created)
        budget = _Budget(st.st_size, limits, quota)
        head = f.read(4)
        f.seek(0)
        if head[:2] == b"PK":
            result = _extract_zip(c, f, dest, budget, undo)
        else:
            result = _extract_tar(c, f, dest, budget, undo)
    except BaseException:
        _rollback(c, undo)
        raise
    finally:
        f.close()
    fsops.discard_replaced(c, undo.replaced)
    return result


@dataclass
class _Undo:
    """What an extraction changed, to undo it on failure."""

    created: list[Made]
    replaced: list[fsops.Replaced]
    on_member: Callable[[Components], None] | None = None

    def written(self, rel: Components) -> None:
        if self.on_member is not None:
            self.on_member(rel)


def _extract_zip(c: Confined, f: IO[bytes], dest: Components, budget: _Budget,
                 undo: _Undo) -> tuple[int, int]:
    try:
        zf = zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
        raise InvalidInput("not a valid zip archive: {}".format(e), field="archivePath") from None
    extracted = skipped = 0
    with zf:
        for info in zf.infolist():
            budget.entry()
            rel = dest + member_components(info.filename)
            unix_mode = info.external_attr >> 16
            kind = stat.S_IFMT(unix_mode)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                skipped += 1  # symlinks and special files are never created
                continue
            if info.is_dir() or kind == stat.S_IFDIR:
                _mkdir(c, rel, undo.created)
                continue
            if len(rel) == len(dest):
                skipped += 1
                continue
            try:
                with zf.open(info) as src:
                    fsops.write_atomic(c, rel, _stream(src, budget), budget.quota, fsync=False,
                                       mode=_file_mode(unix_mode), created=undo.created,
                                       replaced=undo.replaced)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
                raise InvalidInput("bad zip member {!r}: {}".format(info.filename, e),
                                   field="archivePath") from None
            extracted += 1
            undo.written(rel)
    return extracted, skipped


def _extract_tar(c: Confined, f: IO[bytes], dest: Components, budget: _Budget,
                 undo: _Undo) -> tuple[int, int]:
    extracted = skipped = 0
    try:
        # Stream mode: one pass, members decompressed as they come, through
        # our own decompressor so that every decompressed byte is counted.
        stream: Any = _Decompressed(_decompressor(f), budget)
        tf = tarfile.open(fileobj=stream, mode="r|")
    except tarfile.TarError as e:
        raise InvalidInput("not a zip or tar archive: {}".format(e), field="archivePath") from None
    try:
        with tf:
            for member in tf:
                budget.entry()
                rel = dest + member_components(member.name)
                if member.isdir():
                    _mkdir(c, rel, undo.created)
                    continue
                if not member.isreg() or len(rel) == len(dest):
                    skipped += 1  # symlinks, hard links, devices, FIFOs
                    continue
                src = tf.extractfile(member)
                if src is None:
                    skipped += 1
                    continue
                with src:
                    fsops.write_atomic(c, rel, _stream(src, budget), budget.quota, fsync=False,
                                       mode=_file_mode(member.mode), created=undo.created,
                                       replaced=undo.replaced)
                extracted += 1
                undo.written(rel)
    except (tarfile.TarError, EOFError) as e:
        raise InvalidInput("corrupt archive: {}".format(e), field="archivePath") from None
    return extracted, skipped


def _mkdir(c: Confined, rel: Components, created: list[Made]) -> None:
    if not rel:
        return
    with c.parent(rel, follow_final=True, create_dirs=True, created=created) as (
            dir_fd, name, real):
        if name is None:
            return
        try:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidInput("archive directory {} collides with a file".format(
                    display(rel)), field="archivePath") from None
            return
        except OSError as e:
            raise os_error(e, display(rel)) from None
        fd = c.open_new_dir(dir_fd, name)
        try:
            created.append((real, trees.ident(os.fstat(fd))))
        finally:
            os.close(fd)


def _rollback(c: Confined, undo: _Undo) -> None:
    """
    Put back what a failed extraction overwrote, then remove what it created,
    newest first, confined, each only while its path still holds what the
    extraction put there (``fsops.restore_replaced``, ``fsops.undo_created``).
    (A file created and then overwritten by a second member of the same name
    is first restored to its first version, then removed.)
    """
    fsops.restore_replaced(c, undo.replaced)
    fsops.undo_created(c, undo.created)


# -- creating -----------------------------------------------------------------

class _Growth:
    """Charges the quota for however far the archive being written has grown."""

    def __init__(self, out: IO[bytes], quota: fsops.Quota) -> None:
        self.out = out
        self.quota = quota
        self.charged = 0

    def check(self) -> None:
        written = self.out.tell()
        if written > self.charged:
            self.quota.charge(written - self.charged)
            self.charged = written


class _QuotaReader:
    """
    A source file handed to tarfile/zipfile that checks the archive's growth
    against the quota on every read, so creation stops at the disk limit.
    """

    def __init__(self, src: IO[bytes], growth: _Growth) -> None:
        self.src = src
        self.growth = growth

    def read(self, n: int = -1) -> bytes:
        self.growth.check()
        return self.src.read(n)


def _members(c: Confined, comps: Components) -> Iterator[tuple[Components, os.stat_result, int]]:
    """
    ``(components, stat, fd or -1)`` of every file and directory under
    ``comps`` (``fsops.MAX_DEPTH`` levels at most); symlinks and special files
    are skipped (archives hold no links).
    """
    st = c.lstat(comps)
    if stat.S_ISLNK(st.st_mode):
        return
    if stat.S_ISREG(st.st_mode):
        yield comps, st, c.open(comps, os.O_RDONLY | os.O_NONBLOCK, follow_final=False)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    yield comps, st, -1
    dir_fd = c.open(comps, os.O_RDONLY | os.O_DIRECTORY, follow_final=False)
    try:
        with trees.Walk(dir_fd, max_depth=fsops.MAX_DEPTH, sort=True,
                        hide=fsops.WORK_PREFIXES) as walk:
            for e in walk:
                try:
                    est = e.lstat()
                except FileNotFoundError:
                    e.descend = False
                    continue
                if stat.S_ISREG(est.st_mode):
                    try:
                        fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                     | os.O_CLOEXEC, dir_fd=e.dir_fd)
                    except OSError:
                        continue
                    fst = os.fstat(fd)
                    if not stat.S_ISREG(fst.st_mode):
                        os.close(fd)  # swapped for a FIFO or device meanwhile
                        continue
                    yield comps + e.rel, fst, fd
                elif stat.S_ISDIR(est.st_mode) and e.depth < fsops.MAX_DEPTH:
                    yield comps + e.rel, est, -1
                else:
                    e.descend = False
    finally:
        os.close(dir_fd)


def create(c: Confined, files: list[Components], archive: Components, fmt: str,
           quota: fsops.Quota) -> ArchiveCreated:
    """
    Write an archive of ``files`` (paths relative to the root; directories
    recursively) to ``archive``, atomically.  Member names are relative to
    the server root.
    """
    kind = FORMATS.get(fmt)
    if kind is None:
        raise InvalidInput("format must be zip, tar or tar.gz", field="format")
    if not archive:
        raise InvalidInput("archivePath names the server directory", field="archivePath")
    for comps in files:
        if not comps:
            raise InvalidInput("cannot archive the whole server directory into itself; "
                               "list its entries", field="files")
        c.lstat(comps)  # every listed path must exist (and be confined)
    with c.parent(archive, follow_final=True, create_dirs=True) as (dir_fd, name, _):
        if name is None:
            raise InvalidInput("archivePath is a directory", field="archivePath")
        tmp = fsops.TMP_PREFIX + os.urandom(8).hex()
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        out = os.fdopen(fd, "wb")
        growth = _Growth(out, quota)
        count = 0
        try:
            try:
                if kind == "zip":
                    count = _write_zip(c, files, out, growth)
                else:
                    count = _write_tar(c, files, out, growth,
                                       "w|gz" if kind == "tar.gz" else "w|")
                out.flush()
                growth.check()
                os.fchmod(out.fileno(), 0o644)
                c.own(out.fileno())
                os.fsync(out.fileno())
                size = out.tell()
            finally:
                out.close()
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
    return ArchiveCreated(display(archive), size, count)


def _write_tar(c: Confined, files: list[Components], out: IO[bytes], growth: _Growth,
               mode: str) -> int:
    count = 0
    with tarfile.open(fileobj=out, mode=mode, format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
        for top in files:
            for rel, st, fd in _members(c, top):
                info = tarfile.TarInfo("/".join(rel))
                info.mtime = int(st.st_mtime)
                info.mode = stat.S_IMODE(st.st_mode) & 0o777
                if fd < 0:
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                    continue
                with os.fdopen(fd, "rb") as src:
                    info.size = st.st_size
                    tf.addfile(info, _QuotaReader(src, growth))  # type: ignore[arg-type]
                count += 1
    return count


def _zip_name(rel: Components) -> str:
    """
    A member name zip can hold: names are UTF-8 there, and the game server
    may name a file with bytes that are not (they arrive as surrogates); those
    bytes become U+FFFD rather than failing the whole archive.
    """
    name = "/".join(rel)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


def _write_zip(c: Confined, files: list[Components], out: IO[bytes], growth: _Growth) -> int:
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for top in files:
            for rel, st, fd in _members(c, top):
                name = _zip_name(rel)
                if fd < 0:
                    zf.writestr(zipfile.ZipInfo(name + "/"), b"")
                    continue
                info = zipfile.ZipInfo.from_file("/dev/null", name)
                info.file_size = st.st_size
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | (stat.S_IMODE(st.st_mode) & 0o777)) << 16
                # Zip cannot hold dates before 1980.
                info.date_time = time.localtime(max(st.st_mtime, 315532800))[:6]
                with os.fdopen(fd, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    reader = _QuotaReader(src, growth)
                    # Copy the size seen at stat time, as tar does: a file that
                    # grows while it is read (a live log, or the archive
                    # itself) must not make the archive grow without end.
                    left = st.st_size
                    while left > 0:
                        data = reader.read(min(READ_CHUNK, left))
                        if not data:
                            break
                        dst.write(data)
                        left -= len(data)
                count += 1
    return count


