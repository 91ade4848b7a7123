"""
The backup archive: a PAX tar of a server root, compressed with zstd as it
is written, hashed (sha256) on the way out.  Blocking; thread-side.

Writing (``write_archive``) walks the root with ``trees.Walk`` from the
root's fd: never through a link, never into another filesystem, agent work
files hidden.  Links are stored as links (their target as read, never
followed); regular files are read through an fd opened ``O_NOFOLLOW``;
device nodes, FIFOs and sockets are left out with a note.  Memory is bounded
whatever the tree: one copy buffer, the walk's frames, zstd's window.

A file that changes while it is read cannot crash the backup: the tar header
already promised ``size`` bytes, so exactly that many are written (a file
that shrank is padded with zeros, one that grew is cut), and the backup
completes with a note naming how many files changed, as GNU tar does.

Reading (``ArchiveReader``) is the other half for ``restore``: it hashes the
compressed bytes as they are read and bounds what they may expand to, so a
tampered archive can neither fill memory nor pass unnoticed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

import zstandard

from ctrlagent.backups.ignore import IgnoreRules
from ctrlagent.errors import CtrlAgentError, InsufficientResources
from ctrlagent.files import trees
from ctrlagent.files.paths import WORK_PREFIXES

COPY_CHUNK = 1024 * 1024
# Compressed chunks waiting for the hash and the driver's write.
OFFLOAD_DEPTH = 4
# Bytes of one job of zstandard's in-process workers (the fallback without
# the zstd program; memory of the agent itself: a few of these per worker).
# The zstd program keeps its default (8 MiB at level 3, as ``tar -I 'zstd
# -T0'``): 4 MiB jobs cost it 30 MiB less memory (40 against 72 MiB) but
# 6-9 % more CPU (more overlap between jobs to search again), 0.25 s per
# GiB, turn by turn on the 1 GiB benchmark.
ZSTD_JOB_SIZE = 4 * 1024 * 1024
# Pieces smaller than this (headers, small files) are gathered into one write.
SMALL_WRITE = 256 * 1024
# Levels a backup descends; a deeper subtree is left out with a note.
MAX_BACKUP_DEPTH = 1024
# Notes kept per backup (the rest are counted).
MAX_NOTES = 20
# zstd window a reader accepts: 128 MiB bounds a tampered frame's memory.
MAX_WINDOW = 1 << 27
# Decompressed bytes that are not file content (tar headers and padding) an
# archive may hold beyond the content size it was recorded with.
MAX_OVERHEAD = 64 * 1024 * 1024

Progress = Callable[[int, int], None]  # (content bytes read, files done)


class BackupCorrupt(CtrlAgentError):
    """A backup archive that is damaged, truncated, or not what was written."""


class BackupCancelled(CtrlAgentError):
    """The backup was stopped (the agent is shutting down)."""


@dataclass
class ArchiveStats:
    """What a written archive holds."""

    files: int = 0  # regular files
    entries: int = 0  # every member (directories and links too)
    bytes: int = 0  # content bytes of the regular files
    size: int = 0  # compressed bytes
    checksum: str = ""  # sha256 of the compressed bytes, hex
    changed: int = 0  # files that changed while they were read
    skipped: int = 0  # special files and unreadable entries left out
    truncated: bool = False  # a subtree too deep, or another filesystem, left out
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)

    def summary(self) -> str | None:
        """One line about what the archive does not hold exactly, or None."""
        parts = []
        if self.changed:
            parts.append("{} file(s) changed while being backed up".format(self.changed))
        if self.skipped:
            parts.append("{} special or unreadable entr(y/ies) left out".format(self.skipped))
        if self.truncated:
            parts.append("a mount point or a too deep subtree was left out")
        return "; ".join(parts) or None


class HashingSink:
    """Counts and hashes bytes on their way to ``write`` (a driver's writer)."""

    def __init__(self, write: Callable[[bytes], Any]) -> None:
        self._write = write
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.sha.update(data)
        # Handed on as it is (a view of the compressor pipe's buffer, no
        # copy): a driver copies what it keeps (``ArchiveWriter.write``).
        self._write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _copy_exact(fd: int, size: int, out: Callable[[Any], Any],
                advance: Callable[[int], None]) -> bool:
    """
    Write exactly ``size`` bytes of the open file ``fd`` to ``out``, in
    chunks of up to ``COPY_CHUNK``: zeros after a premature end (the file
    shrank), nothing past ``size`` (it grew).  True when it ended early.
    """
    left = size
    short = False
    while left > 0:
        want = min(left, COPY_CHUNK)
        data = b""
        if not short:
            try:
                data = os.read(fd, want)
            except OSError:
                data = b""
            short = not data
        if short:
            data = bytes(want)
        out(data)
        left -= len(data)
        advance(len(data))
    return short


def _splice_exact(fd: int, size: int, tar: _TarWriter, splice: Callable[[int, int], int],
                  advance: Callable[[int], None]) -> bool:
    """
    ``_copy_exact`` through ``splice`` (the kernel moves the file's pages
    into the compressor's pipe: no copy in and out of this process, no
    GIL held meanwhile); zeros after a premature end, nothing past ``size``.
    """
    tar.flush()
    left = size
    short = False
    while left > 0:
        want = min(left, COPY_CHUNK)
        if not short:
            try:
                n = splice(fd, want)
            except OSError as e:
                if left == size and e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    # A filesystem that cannot splice: read it instead.
                    return _copy_exact(fd, size, tar._out, advance)
                n = 0
            short = not n
        if short:
            tar.write(bytes(want))
            n = want
        tar.offset += n
        left -= n
        advance(n)
    return short


def write_archive(root_fd: int, write: Callable[[bytes], Any], rules: IgnoreRules, *,
                  level: int | None = 3, progress: Progress | None = None,
                  progress_interval: float = 1.0,
                  on_member: Callable[[str], None] | None = None,
                  cancelled: Callable[[], bool] | None = None,
                  file_fd: int | None = None) -> ArchiveStats:
    """
    Write the archive of the directory ``root_fd`` to ``write``; return what
    it holds.  ``progress(bytes, files)`` is called at most every
    ``progress_interval`` seconds (thread-side); ``on_member`` after each
    member (the seam where tests change the tree mid-walk); ``cancelled()``
    is asked between reads and stops the work with ``BackupCancelled``.
    ``level=None`` writes a plain tar (for a store that compresses and
    deduplicates itself, as restic).

    ``file_fd``, an empty regular file open for reading and writing (a
    local driver's temporary file), is where the zstd program then writes
    the archive itself, as ``tar -I zstd`` does: ``write`` is not called
    (it still is where there is no zstd program, or for a plain tar).
    """
    stats = ArchiveStats()
    zstd = shutil.which(ZSTD_PROGRAM) if level is not None else None
    direct = file_fd is not None and zstd is not None
    sink = HashingSink(_discard if direct else write)
    # Three stages run at once, as the processes of ``tar | zstd -T0 >
    # file`` do: this thread walks, reads and builds the tar stream; zstd
    # compresses it in a process of its own (``_Compressor``), or in
    # zstandard's worker threads where there is no zstd program; a thread
    # of ours hashes the archive and hands it to the driver, or, where
    # zstd writes the file itself, reads it back behind zstd (from the
    # page cache) to hash it: the compressed stream then never passes
    # through a pipe into the agent and out again.  Pipes and bounded
    # queues between them bound the memory.
    offload: _Offload | None = None
    child: _Compressor | None = None
    last = [time.monotonic()]

    def advance(n: int) -> None:
        if cancelled is not None and cancelled():
            raise BackupCancelled("the backup was cancelled: the agent is stopping")
        stats.bytes += n
        if progress is not None:
            now = time.monotonic()
            if now - last[0] >= progress_interval:
                last[0] = now
                progress(stats.bytes, stats.files)

    try:
        if level is not None and zstd is not None:
            child = _Compressor(zstd_command(zstd, level), sink.write,
                                out_fd=file_fd if direct else None)
            _write_tar(root_fd, child.write, rules, stats, advance, on_member, cancelled,
                       child.splice)
            child.close()
        else:
            offload = _Offload(sink.write, OFFLOAD_DEPTH, "backup-sink")
            if level is None:
                _write_tar(root_fd, offload.write, rules, stats, advance, on_member, cancelled)
            else:
                z = _in_process_compressor(level, offload)
                _write_tar(root_fd, z.write, rules, stats, advance, on_member, cancelled)
                z.flush(zstandard.FLUSH_FRAME)
                z.close()
            offload.close()
    finally:
        if child is not None:
            child.abort()
        if offload is not None:
            offload.abort()
    stats.size = sink.size
    stats.checksum = sink.sha.hexdigest()
    if progress is not None:
        progress(stats.bytes, stats.files)
    return stats


def zstd_command(program: str, level: int) -> list[str]:
    """
    The zstd program's command line: ``zstd -T0 -<level>`` as ``tar -I
    'zstd -T0'`` runs it (the same frames from the same tar stream), quiet,
    to stdout, and ``--no-sparse``: every byte written in order (a hole
    would be skipped with a seek), so what the hasher reads behind is final.
    """
    return [program, "-q", "-c", "-T0", "-{}".format(level), "--no-sparse"]


def _discard(data: Any) -> None:
    """The driver's ``write`` where the compressor writes the file itself."""


def _in_process_compressor(level: int, out: _Offload) -> Any:
    """
    A zstd stream writer to ``out`` using zstandard's worker threads (one
    per core, as ``zstd -T0``), for a host without the zstd program: the
    same archive, but slower on a busy machine (its feeding shares our GIL
    with the walk; see ``_Compressor``).
    """
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=-1, job_size=ZSTD_JOB_SIZE, write_checksum=True)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    return cctx.stream_writer(out, closefd=False,  # type: ignore[arg-type]
                              write_size=COPY_CHUNK)


def _write_tar(root_fd: int, write: Callable[[bytes], Any], rules: IgnoreRules,
               stats: ArchiveStats, advance: Callable[[int], None],
               on_member: Callable[[str], None] | None,
               cancelled: Callable[[], bool] | None,
               splice: Callable[[int, int], int] | None = None) -> None:
    tar = _TarWriter(write, splice)
    walk = trees.Walk(root_fd, max_depth=MAX_BACKUP_DEPTH, sort=True, hide=WORK_PREFIXES)
    try:
        for e in walk:
            rel = "/".join(e.rel)
            try:
                st = e.lstat()
            except OSError:
                e.descend = False
                continue  # gone since the listing
            if stat.S_ISDIR(st.st_mode):
                if not e.is_dir or rules.matches(rel + "/"):
                    # Ignored, or a directory only since the listing
                    # (the walk would not enter it): left out.
                    e.descend = False
                    continue
                tar.member(rel, st, tarfile.DIRTYPE)
            else:
                e.descend = False
                if rules.matches(rel):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    _add_link(tar, e, rel, st, stats)
                elif stat.S_ISREG(st.st_mode):
                    if not _add_file(tar, e, rel, stats, advance):
                        continue
                else:
                    stats.skipped += 1
                    stats.note("special file left out: {}".format(rel))
                    continue
            stats.entries += 1
            if cancelled is not None and cancelled():
                raise BackupCancelled("the backup was cancelled: the agent is stopping")
            if on_member is not None:
                on_member(rel)
    except trees.TreeChanged:
        stats.truncated = True
        stats.note("a directory was moved during the backup; the rest of it is left out")
    finally:
        walk.close()
    if walk.truncated:
        stats.truncated = True
    tar.close()


class _Offload:
    """
    ``write`` calls handed to a thread of their own through a bounded queue
    (at most ``depth`` chunks, so memory stays bounded); its error is raised
    at the next ``write`` or at ``close``.
    """

    def __init__(self, write: Callable[[bytes], Any], depth: int, name: str) -> None:
        self._write = write
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None or self._stop:
                return
            if self._error is not None:
                continue  # drain: the writer learns of the error at its next write
            try:
                self._write(data)
            except BaseException as e:
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._stop = True
            raise error
        if self._stop:
            raise BackupCancelled("the backup was stopped")

    def write(self, data: Any) -> int:
        self._raise()
        # The caller may reuse its buffer: a copy unless bytes.
        item = data if type(data) is bytes else bytes(data)
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return len(data)
            except queue.Full:
                # A consumer that was stopped (``abort``) takes no more.
                self._raise()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Wait until everything is written; raise the writer's error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop the thread without writing the rest (idempotent)."""
        if self._thread.is_alive():
            self._stop = True
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass  # a producer refilled it meanwhile: the thread sees _stop
            self._thread.join(60)  # a write stuck in a dead driver: given up


# The compressor, as the ``tar -I zstd`` a backup is measured against.
ZSTD_PROGRAM = "zstd"
# Bytes of each pipe to and from it (fcntl F_SETPIPE_SZ; 64 KiB by default).
PIPE_SIZE = 4 * 1024 * 1024
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
STDERR_TAIL = 4096
# Seconds the hasher of a file zstd writes waits once it has caught up (only
# how far it lags: zstd's end wakes it at once); each wake takes the GIL.
FOLLOW_POLL = 0.1
# Bytes the hasher of a file zstd writes reads back at a time: a buffer that
# stays in the core's L2 cache (512 KiB here), so the copy out of the page
# cache and the sha256 of it both run from the cache.  256 KiB and more
# cost the hasher 0.25-0.3 s more CPU per GiB of archive (1.0-1.3 s
# against 0.8-0.85 s, thread CPU, turn by turn on the 1 GiB benchmark).
HASH_READ = 128 * 1024
# zstd's messages (strerror, in the C locale) for a disk that is full.
_FULL_DISK = ("No space left on device", "Disk quota exceeded", "File too large")


def widen_pipe(fd: int) -> int:
    """
    Make the pipe ``fd`` ``PIPE_SIZE`` bytes, or as large as the host lets
    an agent without ``CAP_SYS_RESOURCE`` make it (``fs.pipe-max-size``,
    1 MiB by default: a container's agent, where 4 MiB is refused); its
    size then.  A 64 KiB pipe (the default) makes the walk wait for zstd
    at every 64 KiB: five times the context switches (16,000 against
    3,000 per GiB) and 0.4-1.1 s more per GiB on a busy 2-core machine.
    """
    for size in (PIPE_SIZE, _pipe_max_size()):
        if size > 0:
            try:
                return int(fcntl.fcntl(fd, _F_SETPIPE_SZ, size))
            except OSError:
                pass  # not allowed: the next size, or the pipe as it is
    try:
        return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    except OSError:
        return 0


def _pipe_max_size() -> int:
    """The largest pipe an unprivileged process may make here (0: unknown)."""
    try:
        with open("/proc/sys/fs/pipe-max-size", "rb") as f:
            return min(int(f.read().strip() or 0), PIPE_SIZE)
    except (OSError, ValueError):
        return 0


class CompressorFailed(CtrlAgentError):
    """The compressor child ended before the archive was whole."""


class _Compressor:
    """
    The zstd program running as a child: ``write`` feeds it the tar stream
    through a pipe; a thread reads the compressed stream it writes and hands
    it to ``sink``.  With ``out_fd`` (a regular file, empty, open for
    reading and writing) the child writes the archive there itself, and the
    thread reads the file back behind it (``pread``, from the page cache)
    for ``sink`` (the hash).  A failure on either side (the sink's error,
    the child's death) ends the child and is raised at the next ``write``
    or at ``close``, so neither side is left blocked on a full pipe.
    """

    def __init__(self, argv: list[str], sink: Callable[[Any], Any],
                 out_fd: int | None = None) -> None:
        self._sink = sink
        self._error: BaseException | None = None
        self._err = b""
        # Set once the child has exited: nothing more comes to the file.
        self._ended = threading.Event()
        self._file = out_fd
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if out_fd is None else out_fd,
                stderr=subprocess.PIPE, close_fds=True, bufsize=0,
                # Its messages in English: a full disk is told by them.
                env=dict(os.environ, LC_ALL="C"))
        except OSError as e:
            raise CompressorFailed("the backup compressor cannot be started ({})".format(
                e.strerror)) from None
        assert self._proc.stdin and self._proc.stderr
        self._in = self._proc.stdin.fileno()
        pipes = [self._in]
        if out_fd is None:
            assert self._proc.stdout is not None
            self._out = self._proc.stdout.fileno()
            pipes.append(self._out)
        for fd in pipes:
            widen_pipe(fd)
        reader = self._read_archive if out_fd is None else self._follow_file
        self._threads = [
            threading.Thread(target=reader, name="backup-sink", daemon=True),
            threading.Thread(target=self._read_errors, name="backup-zstd-err", daemon=True)]
        for t in self._threads:
            t.start()

    def _read_archive(self) -> None:
        # Large reads, so that this thread needs the GIL (which the walk
        # holds most of the time) once per few MiB of archive; into one
        # buffer, so that they cost no fresh memory each.
        buf = bytearray(PIPE_SIZE)
        view = memoryview(buf)
        try:
            while n := os.readv(self._out, [buf]):
                self._sink(view[:n])
        except BaseException as e:
            self._error = e
            # The walk's next write then fails at once (EPIPE) rather than
            # waiting on a pipe nobody drains.
            self._proc.kill()

    def _follow_file(self) -> None:
        # The child appends to the file in order (no seeks, ``--no-sparse``);
        # every byte below the file's size has been written, so reading
        # behind it sees the archive as it will stay.  Caught up, it waits
        # a little (or for the child's end) and reads on.
        assert self._file is not None
        buf = bytearray(HASH_READ)
        view = memoryview(buf)
        offset = 0
        try:
            while True:
                ended = self._ended.is_set()  # before the read: then EOF is the end
                n = os.preadv(self._file, [buf], offset)
                if n:
                    self._sink(view[:n])
                    offset += n
                elif ended:
                    return
                else:
                    self._ended.wait(FOLLOW_POLL)
        except BaseException as e:
            self._error = e
            self._proc.kill()

    def _read_errors(self) -> None:
        assert self._proc.stderr is not None
        while chunk := self._proc.stderr.read(4096):
            self._err = (self._err + chunk)[-STDERR_TAIL:]

    def write(self, data: Any) -> int:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._in, view):]
        except BrokenPipeError:
            self._broken()
        return len(data)

    def _broken(self) -> NoReturn:
        """The child stopped reading: raise why (never an ``OSError``, which
        a read of the server's files may raise and be handled as such)."""
        self._finish()
        raise CompressorFailed("the backup compressor stopped reading")

    def splice(self, fd: int, n: int) -> int:
        """Move up to ``n`` bytes of the file ``fd`` (from its offset) into the pipe."""
        try:
            return os.splice(fd, self._in, n)
        except BrokenPipeError:
            # The file's side is not to blame: the next write (the zeros
            # of a short file) meets the broken pipe and raises its reason.
            return 0

    def close(self) -> None:
        """End the stream; wait until the whole archive went to the sink."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()  # end of input: the child ends the frame
        except BrokenPipeError:
            pass
        self._finish()

    def _finish(self) -> None:
        """Wait for the child and the threads; raise what went wrong."""
        code = self._proc.wait()
        self._ended.set()
        for t in self._threads:
            t.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if code != 0:
            tail = " ".join(self._err.decode("utf-8", "replace").strip().splitlines()[-2:])
            if any(text in tail for text in _FULL_DISK):
                # Where the child writes the file itself, its write error
                # is the driver's: the code a full disk has everywhere.
                raise InsufficientResources("not enough room for the backup: {}".format(
                    tail[-300:]))
            raise CompressorFailed("the backup compressor failed (exit {}): {}".format(
                code, tail[-300:] or "no message"))

    def abort(self) -> None:
        """End the child without waiting for the rest (idempotent)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._ended.set()
        for t in self._threads:
            t.join(60)  # a sink stuck in a dead driver: given up
        # Closed only once their readers are gone (a closed fd's number
        # may be reused by the time a reader reads it again).
        pipes = [self._proc.stdin]
        if not self._threads[0].is_alive():
            pipes.append(self._proc.stdout)  # None when zstd writes the file
        if not self._threads[1].is_alive():
            pipes.append(self._proc.stderr)
        for f in pipes:
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


_MAX_OCTAL_11 = 8 ** 11
# The header's fields that are the same for every member we build: uid and
# gid 0, the checksum counted as spaces, the magic, empty owner names, no
# device numbers, no prefix.
_IDS = b"0000000\x00" * 2
_TAIL = tarfile.POSIX_MAGIC + bytes(64 + 16 + 167)
_FIXED_SUM = sum(_IDS) + sum(b" " * 8) + sum(_TAIL)


def member_header(name: str, mode: int, size: int, mtime: int, typeflag: bytes,
                  link: str = "") -> bytes | None:
    """
    The header ``tarfile`` writes (PAX format, ``utf-8``,
    ``surrogateescape``) for the common member, built at once from its
    fields (``tarfile``'s way, field by field through a ``TarInfo``, costs
    more than reading a small file): an ASCII name (a directory's ending in
    ``/``) and link of at most 100 bytes, owner 0 without names, size and
    time in range.  None for any other member (the caller then asks tarfile).
    """
    if len(name) > 100 or len(link) > 100 or not name.isascii() or not link.isascii() \
            or not (0 <= size < _MAX_OCTAL_11 and 0 <= mtime < _MAX_OCTAL_11):
        return None
    raw_name, raw_link = name.encode("ascii"), link.encode("ascii")
    fields = b"%07o\0%011o\0%011o\0" % (mode & 0o7777, size, mtime)
    chksum = _FIXED_SUM + sum(raw_name) + sum(fields) + typeflag[0] + sum(raw_link)
    return b"".join((raw_name.ljust(100, b"\0"), fields[:8], _IDS, fields[8:],
                     b"%06o\0 " % chksum, typeflag, raw_link.ljust(100, b"\0"), _TAIL))


def ustar_header(info: tarfile.TarInfo) -> bytes | None:
    """
    ``member_header`` for ``info``: the header
    ``info.tobuf(PAX_FORMAT, "utf-8", "surrogateescape")`` gives, or None
    where it is not a common member.
    """
    name = info.name
    if info.isdir() and not name.endswith("/"):
        name += "/"
    if info.uname or info.gname or info.uid or info.gid or info.pax_headers \
            or not isinstance(info.mtime, int):
        return None
    size = 0 if info.type in (tarfile.DIRTYPE, tarfile.SYMTYPE) else info.size
    return member_header(name, info.mode, size, info.mtime, info.type, info.linkname)


class _TarWriter:
    """
    A PAX tar stream written straight to ``write``: tarfile's headers (or
    ``ustar_header``'s, the same bytes, for the common member), the content
    in large chunks, the small pieces gathered into 1 MiB writes.  (The
    stream mode of ``tarfile`` cuts everything into 10 KiB records and copies
    its buffer at each: most of a backup's time.)
    """

    def __init__(self, write: Callable[[Any], Any],
                 splice: Callable[[int, int], int] | None = None) -> None:
        self.write = write
        # (file fd, at most n bytes) -> bytes moved, where the output is a pipe.
        self.splice = splice
        self.offset = 0
        self._pending: list[Any] = []
        self._pending_bytes = 0

    def _out(self, data: Any) -> None:
        n = len(data)
        self.offset += n
        if n >= SMALL_WRITE:
            self.flush()
            self.write(data)
            return
        self._pending.append(data)
        self._pending_bytes += n
        if self._pending_bytes >= COPY_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write the gathered small pieces now."""
        if self._pending:
            self.write(b"".join(self._pending))
            self._pending = []
            self._pending_bytes = 0

    def member(self, rel: str, st: os.stat_result, typeflag: bytes, size: int = 0,
               link: str = "") -> None:
        """The header of the member ``rel`` (``st`` its stat) of type ``typeflag``."""
        # Permission bits only: no setuid/setgid/sticky travels in a backup.
        mode = 0o777 if typeflag == tarfile.SYMTYPE else stat.S_IMODE(st.st_mode) & 0o777
        mtime = int(st.st_mtime)
        buf = member_header(rel + "/" if typeflag == tarfile.DIRTYPE else rel, mode, size,
                            mtime, typeflag, link)
        if buf is None:
            info = tarfile.TarInfo(rel)
            info.mtime, info.mode, info.type, info.size, info.linkname = \
                mtime, mode, typeflag, size, link
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            buf = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._out(buf)

    def pad(self, size: int) -> None:
        rest = size % tarfile.BLOCKSIZE
        if rest:
            self._out(_ZEROS[:tarfile.BLOCKSIZE - rest])

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record (as tar does)."""
        self._out(bytes(2 * tarfile.BLOCKSIZE))
        rest = self.offset % tarfile.RECORDSIZE
        if rest:
            self._out(bytes(tarfile.RECORDSIZE - rest))
        self.flush()


_ZEROS = bytes(tarfile.BLOCKSIZE)


def _add_link(tar: _TarWriter, e: trees.Entry, rel: str, st: os.stat_result,
              stats: ArchiveStats) -> None:
    try:
        target = os.readlink(e.name, dir_fd=e.dir_fd)
    except OSError:
        target = ""
    tar.member(rel, st, tarfile.SYMTYPE, link=target)


def _add_file(tar: _TarWriter, e: trees.Entry, rel: str, stats: ArchiveStats,
              advance: Callable[[int], None]) -> bool:
    try:
        # Never blocking on a FIFO, never a controlling terminal, whatever
        # the game swapped in since the listing (checked by fstat below).
        fd = os.open(e.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=e.dir_fd)
    except OSError:
        # Gone, swapped for a link (ELOOP) or unreadable since the listing.
        stats.skipped += 1
        stats.note("could not be read: {}".format(rel))
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            stats.skipped += 1  # swapped for a FIFO or a device meanwhile
            stats.note("special file left out: {}".format(rel))
            return False
        tar.member(rel, st, tarfile.REGTYPE, st.st_size)
        if tar.splice is not None and st.st_size >= SMALL_WRITE:
            short = _splice_exact(fd, st.st_size, tar, tar.splice, advance)
        else:
            short = _copy_exact(fd, st.st_size, tar._out, advance)
        tar.pad(st.st_size)
        after = os.fstat(fd)
        if short or after.st_size != st.st_size or after.st_mtime_ns != st.st_mtime_ns:
            stats.changed += 1
            stats.note("changed while being backed up: {}".format(rel))
    finally:
        os.close(fd)
    stats.files += 1
    return True


class ArchiveReader:
    """
    The decompressed tar stream of a backup read from ``raw`` (a binary file
    object), hashing the compressed bytes and bounding the decompressed ones
    to ``max_bytes``.  ``finish()`` reads what is left and raises
    ``BackupCorrupt`` unless the size and checksum are the recorded ones.
    """

    def __init__(self, raw: IO[bytes], max_bytes: int, compressed: bool = True) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes
        self.total = 0
        self._z: Any = _Raw(self)
        if compressed:
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
            self._z = dctx.stream_reader(_Raw(self),  # type: ignore[arg-type]
                                         read_across_frames=False, closefd=False)

    # The raw side, as zstandard reads it.
    def read_raw(self, n: int) -> bytes:
        data = self._raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        """Decompressed bytes (what tarfile reads)."""
        try:
            data = self._z.read(COPY_CHUNK if n is None or n < 0 else n)
        except zstandard.ZstdError as e:
            raise BackupCorrupt("backup archive is corrupt: {}".format(e)) from None
        self.total += len(data)
        if self.total > self.max_bytes:
            raise BackupCorrupt("backup archive expands beyond its recorded size")
        return data

    def finish(self, size: int | None, checksum: str | None) -> None:
        """Drain the archive and check it against what was recorded."""
        while self.read(COPY_CHUNK):
            pass
        while self.read_raw(COPY_CHUNK):
            pass
        if size is not None and self.size != size:
            raise BackupCorrupt("backup archive is truncated or altered ({} bytes, {} recorded)"
                                .format(self.size, size))
        if checksum and self.sha.hexdigest() != checksum:
            raise BackupCorrupt("backup archive checksum does not match: it is damaged")


class _Raw:
    """What zstandard's stream_reader reads: ``ArchiveReader.read_raw``."""

    def __init__(self, reader: ArchiveReader) -> None:
        self.reader = reader

    def read(self, n: int = -1) -> bytes:
        return self.reader.read_raw(COPY_CHUNK if n is None or n < 0 else n)


def open_tar(reader: ArchiveReader) -> tarfile.TarFile:
    """The tar stream of ``reader`` (one pass)."""
    return tarfile.open(fileobj=reader, mode="r|",  # type: ignore[call-overload]
                        encoding="utf-8", errors="surrogateescape")
