"""
``FileManager``: every file and mod action of PROTOCOL.md section 2, confined
to each server's directory.

The reactor thread only validates payloads and awaits: every filesystem
operation runs in a thread pool (``deferToThreadPool``), at most
``max_concurrent_operations`` at a time (``DeferredSemaphore``), each opening
the server root as a directory fd (``confined.Confined``) and acting through
``dir_fd=`` calls (see ``confined`` for the symlink rules and ``paths`` for how
Panel paths are read, URL-encoded forms being literal names).  Each action
answers with a record of ``ctrlagent.wire.files``; the transports turn it
into the Panel's JSON (``wire.json.to_json``).

Disk limits: a server's usage (apparent size of its files) is walked at most
every ``disk_usage_ttl`` seconds and kept up to date in between by the deltas
of our own writes; writes, uploads, archive creation, extraction and mod
installs are refused with ``InsufficientResources`` before they would exceed
``ServerRoot.disk_limit_bytes``.  What the game server itself writes shows up
at the next walk.

Chunked uploads
---------------
The Panel splits a big upload into ``upload_file`` calls for ``<path>.chunk0``,
``<path>.chunk1``, ...  Each chunk is stored (atomically, counted against the
disk limit) as that very file beside the target.  The chunks are assembled
into ``<path>``, in index order, atomically, and then deleted, when either:

1. a chunk arrives with ``total_chunks`` (payload ``totalChunks``) and chunks
   ``0 .. total_chunks-1`` are then all present; or
2. a plain ``upload_file`` of ``<path>`` arrives with empty content while
   ``<path>.chunk0 .. .chunkK`` exist (a gap in the indices is refused).

``chunk_index`` (payload ``chunkIndex``) with a plain ``path`` means the same
as ``<path>.chunk<chunk_index>``.  Chunk files left without an assembly stay
visible as ordinary files, so nothing is ever silently lost.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.config import FilesConfig
from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    FileNotFound,
    InsufficientResources,
    InvalidInput,
    NotText,
)
from ctrlagent.files import archives, fsops, mods, workshop
from ctrlagent.files.confined import Confined, os_error
from ctrlagent.files.paths import (
    Components,
    chunk_components,
    display,
    normalise,
    parse_mode,
    split_chunk,
)
from ctrlagent.interfaces import IFileManager, ServerRoot
from ctrlagent.wire.files import (
    ArchiveCreated,
    ArchiveExtracted,
    Copied,
    Done,
    FileBytes,
    FileInfo,
    FileListing,
    FilePermissions,
    FileSearch,
    FileText,
    FileWritten,
    ModInstalled,
    ModList,
    PermissionsSet,
    Renamed,
)

T = TypeVar("T")

MAX_CHUNKS = 100_000


class IModFetcher(Interface):
    """Downloads a mod; ``ctrlagent.files.fetch.SafeFetcher`` is the real one."""

    def fetch(url: str, sink: Callable, max_bytes: int, timeout: float) -> Deferred:  # type: ignore[misc]
        """Stream ``url`` into ``await sink(bytes)``; fire with the byte count."""


def _decode(content: object, encoding: str | None) -> bytes:
    if not isinstance(content, str):
        raise InvalidInput("content must be a string", field="content")
    enc = (encoding or "base64").lower().replace("-", "")
    if enc in ("utf8", "text"):
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput("content is not valid text", field="content") from None
    if enc != "base64":
        raise InvalidInput("encoding must be base64 or utf8", field="encoding")
    if content.startswith("data:") and ";base64," in content[:256]:
        content = content.split(";base64,", 1)[1]
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("content is not valid base64", field="content") from None


def _guarded(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` (thread-side); an ``OSError`` that got this far becomes a protocol error."""
    try:
        return fn(*args)
    except OSError as e:
        raise os_error(e, "file operation") from None


class DownloadAborted(CtrlAgentError):
    """A write arrived for a mod download that had already been closed."""


class _Download:
    """A mod download in progress: a temp file in the mods folder (thread-side)."""

    def __init__(self, manager: FileManager, root: ServerRoot, mods_dir: Components) -> None:
        self.c = Confined(root.path, root.uid, root.gid, manager.use_openat2)
        try:
            fsops.create_directory(self.c, mods_dir)
            self.dir_fd, name, _ = self.c.resolve(mods_dir, follow_final=True)
            if name is not None:
                fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self.dir_fd)
                os.close(self.dir_fd)
                self.dir_fd = fd
            self.quota = fsops.Quota(manager._room(self.c, root))
            self.tmp = fsops.TMP_PREFIX + secrets.token_hex(8)
            self.fd = os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        except BaseException:
            self.c.close()
            raise
        self.size = 0
        # A timed-out fetch closes the download while a write of its last
        # chunk may still run in another worker: without this lock that write
        # could land in whatever file reused the closed fd number.
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.fd < 0:
                raise DownloadAborted("the download was closed")
            self.quota.charge(len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self.size += len(data)

    def commit(self, file_name: str) -> None:
        """Make the download the mod file (replacing an older version)."""
        with self.lock:
            self._commit(file_name)

    def _commit(self, file_name: str) -> None:
        try:
            os.fchmod(self.fd, 0o644)
            self.c.own(self.fd)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            try:
                old = os.stat(file_name, dir_fd=self.dir_fd, follow_symlinks=False)
                self.quota.credit(old.st_size)
            except FileNotFoundError:
                pass
            os.rename(self.tmp, file_name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError as e:
            raise os_error(e, file_name) from None

    def close(self) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            except OSError:
                pass
        os.close(self.dir_fd)
        self.c.close()


@implementer(IFileManager)
class FileManager:
    """
    The file actions of every server on this node.

    ``reactor`` runs the Deferreds; ``threadpool`` does the blocking work
    (default: the reactor's); ``fetcher`` downloads mods (tests inject one
    that may reach a loopback server); ``use_openat2`` picks the resolver
    (``None``: openat2 where the kernel allows it); ``workshop`` downloads
    Steam Workshop items (``files.workshop.IWorkshopDownloader``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: FilesConfig,
        threadpool: ThreadPool | None = None,
        fetcher: Any = None,
        use_openat2: bool | None = None,
        workshop: Any = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        if fetcher is None:
            from ctrlagent.files.fetch import SafeFetcher

            fetcher = SafeFetcher(reactor, self.threadpool, max_redirects=config.mod_max_redirects)
        self.fetcher = fetcher
        # Downloads Steam Workshop items (files.workshop.IWorkshopDownloader); None: refused.
        self.workshop = workshop
        self.use_openat2 = use_openat2
        self._semaphore = DeferredSemaphore(config.max_concurrent_operations)
        self._usage: dict[str, tuple[float, int]] = {}
        self._usage_lock = threading.Lock()
        self._locks: dict[tuple[str, str], DeferredLock] = {}

    # -- plumbing -----------------------------------------------------------

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        await self._semaphore.acquire()
        try:
            return await deferToThreadPool(self.reactor, self.threadpool, _guarded, fn, *args)
        finally:
            self._semaphore.release()

    async def _run(self, root: ServerRoot, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(confined_root, *args)`` in the pool."""
        return await self._in_pool(self._call, root, fn, args)

    def _call(self, root: ServerRoot, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with Confined(root.path, root.uid, root.gid, self.use_openat2) as c:
            return fn(c, *args)

    async def _run_quota(self, root: ServerRoot, fn: Callable[..., T], *args: Any) -> T:
        """Like ``_run`` with a ``Quota`` as the second argument of ``fn``."""

        def with_quota(c: Confined) -> T:
            quota = fsops.Quota(self._room(c, root))
            try:
                result = fn(c, quota, *args)
            except BaseException:
                self._forget_usage(root)
                raise
            self._account(root, quota.delta)
            return result

        return await self._run(root, with_quota)

    def _room(self, c: Confined, root: ServerRoot) -> int | None:
        """Bytes the server may still add (thread-side), ``None`` if unlimited."""
        if root.disk_limit_bytes is None:
            return None
        now = time.monotonic()
        with self._usage_lock:
            cached = self._usage.get(root.path)
        if cached is None or now - cached[0] > self.config.disk_usage_ttl:
            usage = fsops.disk_usage(c)
            with self._usage_lock:
                self._usage[root.path] = (now, usage)
        else:
            usage = cached[1]
        return root.disk_limit_bytes - usage

    def _account(self, root: ServerRoot, delta: int) -> None:
        with self._usage_lock:
            cached = self._usage.get(root.path)
            if cached is not None:
                self._usage[root.path] = (cached[0], max(0, cached[1] + delta))

    def _forget_usage(self, root: ServerRoot) -> None:
        with self._usage_lock:
            self._usage.pop(root.path, None)

    def _lock(self, root: ServerRoot, what: str) -> DeferredLock:
        key = (root.path, what)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = DeferredLock()
        return lock

    # -- listing ------------------------------------------------------------

    @async_to_deferred
    async def list_files(self, root: ServerRoot, path: str, limit: int | None = None,
                         offset: int = 0) -> FileListing:
        """A page of the directory ``path``, directories first, then by name."""
        comps = normalise(path)
        cap = self.config.max_list_entries
        if limit is None:
            limit = cap
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidInput("limit must be a non-negative integer", field="limit")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidInput("offset must be a non-negative integer", field="offset")
        return await self._run(root, fsops.list_files, comps, min(limit, cap), offset,
                               root.server_id)

    @async_to_deferred
    async def search_files(self, root: ServerRoot, path: str, query: str,
                           file_type: str = "all") -> FileSearch:
        """Entries under ``path`` whose name contains ``query``."""
        comps = normalise(path)
        if not isinstance(query, str) or not query or "\x00" in query:
            raise InvalidInput("query must be a non-empty string", field="query")
        file_type = file_type or "all"
        if file_type not in ("file", "directory", "all"):
            raise InvalidInput("fileType must be file, directory or all", field="fileType")
        return await self._run(root, fsops.search_files, comps, query, file_type,
                               self.config.search_max_results, self.config.search_max_scanned,
                               root.server_id)

    # -- reading ------------------------------------------------------------

    @async_to_deferred
    async def read_file(self, root: ServerRoot, path: str, lossy: bool = False) -> FileText:
        """
        UTF-8 text of a file.  A file that is not valid UTF-8 is refused with
        ``NotText`` (its bytes come through ``download_file``), unless
        ``lossy``: then invalid bytes are replaced with U+FFFD and the answer
        says ``lossy``.  Text that goes back through ``write_file`` must never
        have been read lossy, or the file is silently changed.
        """
        comps = normalise(path)

        def read(c: Confined) -> FileText:
            data, st = fsops.read_bytes(c, comps, self.config.max_read_bytes)
            try:
                text = data.decode("utf-8")
                replaced = False
            except UnicodeDecodeError as e:
                if not lossy:
                    raise NotText(
                        "{} is not UTF-8 text (byte {} is not valid UTF-8): read its bytes with"
                        " download_file, or ask read_file for lossy text with lossy: true"
                        .format(display(comps), e.start),
                        details={"path": display(comps), "offset": e.start}) from None
                text = data.decode("utf-8", "replace")
                replaced = True
            return FileText(root.server_id, display(comps), text, len(data), st.st_mtime,
                            replaced)

        return await self._run(root, read)

    @async_to_deferred
    async def download_file(self, root: ServerRoot, path: str) -> FileBytes:
        """A file's bytes, base64."""
        comps = normalise(path)

        def read(c: Confined) -> FileBytes:
            data, st = fsops.read_bytes(c, comps, self.config.max_read_bytes)
            return FileBytes(root.server_id, display(comps),
                             base64.b64encode(data).decode("ascii"), len(data), st.st_mtime)

        return await self._run(root, read)

    @async_to_deferred
    async def get_file_info(self, root: ServerRoot, path: str) -> FileInfo:
        """Metadata of one file or directory."""
        comps = normalise(path)
        return await self._run(root, fsops.file_info, comps)

    # -- writing ------------------------------------------------------------

    @async_to_deferred
    async def write_file(self, root: ServerRoot, path: str, content: str) -> FileWritten:
        """Atomically replace a file with UTF-8 ``content``."""
        comps = normalise(path)
        if not isinstance(content, str):
            raise InvalidInput("content must be a string", field="content")

        def write(c: Confined, quota: fsops.Quota) -> FileWritten:
            try:
                size, chunks = fsops.text_chunks(content)
            except UnicodeEncodeError:
                raise InvalidInput("content is not valid text", field="content") from None
            st = fsops.write_atomic(c, comps, chunks, quota, size=size)
            return FileWritten(display(comps), st.st_size, st.st_mtime)

        return await self._run_quota(root, write)

    @async_to_deferred
    async def upload_file(self, root: ServerRoot, path: str, content: str,
                          encoding: str = "base64", chunk_index: int | None = None,
                          total_chunks: int | None = None) -> FileWritten:
        """Store uploaded bytes (see the module docstring for chunks)."""
        comps = normalise(path)
        if not comps:
            raise InvalidInput("path names the server directory", field="path")
        for name, value in (("chunkIndex", chunk_index), ("totalChunks", total_chunks)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_CHUNKS):
                raise InvalidInput("{} must be an integer 0-{}".format(name, MAX_CHUNKS),
                                   field=name)
        chunk = split_chunk(comps)
        if chunk_index is not None and chunk is None:
            chunk = (comps, chunk_index)
            comps = chunk_components(comps, chunk_index)
        if chunk is None:
            if content == "":
                async with self._lock(root, "chunks"):
                    assembled = await self._run_quota(root, self._assemble_all, comps)
                if assembled is not None:
                    return assembled

            def write(c: Confined, quota: fsops.Quota) -> FileWritten:
                st = fsops.write_atomic(c, comps, [_decode(content, encoding)], quota)
                return FileWritten(display(comps), st.st_size, st.st_mtime)

            return await self._run_quota(root, write)

        target, index = chunk
        if total_chunks is not None and index >= total_chunks:
            raise InvalidInput("chunkIndex must be below totalChunks", field="chunkIndex")

        def write_chunk(c: Confined, quota: fsops.Quota) -> FileWritten:
            st = fsops.write_atomic(c, comps, [_decode(content, encoding)], quota, fsync=False)
            if total_chunks is not None:
                have = fsops.existing_chunks(c, target)
                if [i for i, _ in have] == list(range(total_chunks)):
                    parts = [target[:-1] + (name,) for _, name in have]
                    final = fsops.assemble_chunks(c, parts, target, quota)
                    return FileWritten(display(comps), st.st_size, chunk=index, assembled=True,
                                       target=display(target), target_size=final.st_size)
            return FileWritten(display(comps), st.st_size, chunk=index, assembled=False)

        async with self._lock(root, "chunks"):
            return await self._run_quota(root, write_chunk)

    def _assemble_all(self, c: Confined, quota: fsops.Quota,
                      target: Components) -> FileWritten | None:
        try:
            have = fsops.existing_chunks(c, target)
        except FileNotFound:
            return None
        if not have:
            return None
        indices = [i for i, _ in have]
        if indices != list(range(len(have))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise InvalidInput("chunk {} of {} is missing".format(missing[0], display(target)),
                               field="path")
        st = fsops.assemble_chunks(c, [target[:-1] + (n,) for _, n in have], target, quota)
        return FileWritten(display(target), st.st_size, st.st_mtime, assembled=True,
                           chunks=len(have))

    @async_to_deferred
    async def create_directory(self, root: ServerRoot, path: str) -> Done:
        """``mkdir -p``."""
        comps = normalise(path)
        await self._run(root, fsops.create_directory, comps)
        return Done(display(comps))

    @async_to_deferred
    async def delete_file(self, root: ServerRoot, path: str) -> Done:
        """Remove a file, link or directory tree."""
        comps = normalise(path)

        def remove(c: Confined) -> int:
            freed = fsops.delete(c, comps)
            self._account(root, -freed)
            return freed

        await self._run(root, remove)
        self.log.info("server {server_id}: deleted {path}", server_id=root.server_id,
                      path=display(comps))
        return Done(display(comps), "deleted {}".format(display(comps)))

    @async_to_deferred
    async def rename_file(self, root: ServerRoot, old_path: str,
                          new_path: str) -> Renamed:
        """Move within the server directory; an existing target is a ``Conflict``."""
        src = normalise(old_path, field="oldPath")
        dst = normalise(new_path, field="newPath")
        await self._run(root, fsops.rename, src, dst)
        return Renamed(display(src), display(dst))

    @async_to_deferred
    async def move_file(self, root: ServerRoot, source_path: str,
                        destination_path: str) -> Copied:
        """``rename_file`` under the Panel's ``sourcePath``/``destinationPath`` names."""
        src = normalise(source_path, field="sourcePath")
        dst = normalise(destination_path, field="destinationPath")
        await self._run(root, fsops.rename, src, dst, "destinationPath")
        return Copied(display(src), display(dst))

    @async_to_deferred
    async def copy_file(self, root: ServerRoot, source_path: str,
                        destination_path: str) -> Copied:
        """
        Copy a file, symlink or directory tree to a path that does not exist,
        all or nothing, within the disk limit (``fsops.copy``).
        """
        src = normalise(source_path, field="sourcePath")
        dst = normalise(destination_path, field="destinationPath")
        count = await self._run_quota(root, fsops.copy, src, dst)
        self.log.info("server {server_id}: copied {src} to {dst} ({size} bytes)",
                      server_id=root.server_id, src=display(src), dst=display(dst),
                      size=count.size)
        return Copied(display(src), display(dst), count.files, count.directories,
                      count.symlinks, count.size)

    @async_to_deferred
    async def get_file_permissions(self, root: ServerRoot, path: str) -> FilePermissions:
        """A path's permission bits and owner (a link inside the root: its target's)."""
        comps = normalise(path)
        info = await self._run(root, fsops.file_info, comps)
        e = info.entry
        return FilePermissions(display(comps), e.mode, e.owner, e.group)

    @async_to_deferred
    async def set_file_permissions(self, root: ServerRoot, path: str,
                                   mode: str) -> PermissionsSet:
        """``chmod`` without following links or allowing setuid/setgid."""
        comps = normalise(path)
        value = parse_mode(mode)
        await self._run(root, fsops.set_permissions, comps, value)
        return PermissionsSet(display(comps), value)

    # -- archives -----------------------------------------------------------

    @async_to_deferred
    async def create_archive(self, root: ServerRoot, files: list, archive_path: str,
                             fmt: str) -> ArchiveCreated:
        """Archive ``files`` into ``archive_path``."""
        if not isinstance(files, list) or not files:
            raise InvalidInput("files must be a non-empty list of paths", field="files")
        comps = [normalise(f, field="files") for f in files]
        archive = normalise(archive_path, field="archivePath")
        if (fmt or "tar.gz") not in archives.FORMATS:
            raise InvalidInput("format must be zip, tar or tar.gz", field="format")
        return await self._run_quota(
            root, lambda c, q: archives.create(c, comps, archive, fmt or "tar.gz", q))

    @async_to_deferred
    async def extract_archive(self, root: ServerRoot, archive_path: str,
                              extract_path: str) -> ArchiveExtracted:
        """Extract beneath ``extract_path``: counts of members extracted and skipped."""
        archive = normalise(archive_path, field="archivePath")
        dest = normalise(extract_path or "/", field="extractPath")
        limits = archives.ExtractLimits(
            max_bytes=self.config.archive_max_bytes,
            max_ratio=self.config.archive_max_ratio,
            max_entries=self.config.archive_max_entries,
        )
        extracted, skipped = await self._run_quota(
            root, lambda c, q: archives.extract(c, archive, dest, q, limits))
        self.log.info("server {server_id}: extracted {count} entries of {archive} into {dest}",
                      server_id=root.server_id, count=extracted,
                      archive=display(archive), dest=display(dest))
        return ArchiveExtracted(display(archive), display(dest), extracted, skipped)

    # -- mods ---------------------------------------------------------------

    def _mods_dir(self) -> Components:
        return normalise(self.config.mods_dir, field="mods_dir")

    @async_to_deferred
    async def install_mod(self, root: ServerRoot, params: dict) -> ModInstalled:
        """Download or copy a mod into the mods folder and record it."""
        if not isinstance(params, dict):
            raise InvalidInput("payload must be an object", field="payload")
        req = mods.parse_install(params)
        mods_dir = self._mods_dir()
        async with self._lock(root, "mods"):
            manifest = await self._run(root, mods.read_manifest, mods_dir)
            self._report_manifest(root, manifest)
            for m in manifest.mods:
                if m.get("fileName") == req.file_name and m["id"] != req.mod_id:
                    raise Conflict("{} already belongs to mod {}".format(req.file_name, m["id"]))
            if (len(manifest.mods) >= mods.MAX_MODS
                    and all(m["id"] != req.mod_id for m in manifest.mods)):
                raise InsufficientResources("a server has at most {} mods".format(mods.MAX_MODS))
            if req.workshop is not None:
                size = await workshop.install_item(self.workshop, root, req, mods_dir,
                                                   manifest.mods, self._run_quota)
            elif req.url is not None:
                size = await self._download_mod(root, req, mods_dir)
            else:
                assert req.source is not None
                source = req.source
                size = await self._run_quota(
                    root, lambda c, q: mods.copy_into(c, source, mods_dir + (req.file_name,), q))
            entry = mods.record(req, size)

            def save(c: Confined) -> None:
                dir_fd = mods.open_folder(c, mods_dir)
                if dir_fd is None:
                    raise FileNotFound("the mods folder disappeared during the install")
                try:
                    # Read again under the lock; its problems were reported above.
                    current = mods.read_manifest_at(dir_fd).mods
                    for old in current:
                        name = old.get("fileName")
                        if old["id"] == req.mod_id and name not in (None, req.file_name):
                            # A validated plain name, removed in the mods
                            # folder only (mods.remove_mod).
                            self._account(root, -mods.remove_mod(dir_fd, old))
                    current = [m for m in current if m["id"] != req.mod_id] + [entry]
                    mods.write_manifest(c, dir_fd, current)
                finally:
                    os.close(dir_fd)

            await self._run(root, save)
        self.log.info("server {server_id}: installed mod {mod_id} ({size} bytes)",
                      server_id=root.server_id, mod_id=req.mod_id, size=size)
        return ModInstalled(mods.public(entry))

    def _report_manifest(self, root: ServerRoot, manifest: mods.Manifest) -> None:
        """One warning per read of a manifest with entries that were ignored."""
        if manifest.problems:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "server {server_id}: {count} problems in its mods manifest, ignored: {first}",
                server_id=root.server_id, count=len(manifest.problems),
                first="; ".join(manifest.problems[:3]))

    async def _download_mod(self, root: ServerRoot, req: mods.ModRequest,
                            mods_dir: Components) -> int:
        download = await self._in_pool(_Download, self, root, mods_dir)
        try:
            async def sink(data: bytes) -> None:
                await deferToThreadPool(self.reactor, self.threadpool, _guarded,
                                        download.write, data)

            assert req.url is not None
            await self.fetcher.fetch(req.url, sink, self.config.mod_download_max_bytes,
                                     self.config.mod_download_timeout)
            await self._in_pool(download.commit, req.file_name)
            self._account(root, download.quota.delta)
            return download.size
        finally:
            await self._in_pool(download.close)

    @async_to_deferred
    async def uninstall_mod(self, root: ServerRoot, mod_id: str) -> ModList:
        """Remove a mod's file and record; the mods that remain."""
        if not isinstance(mod_id, (str, int)) or isinstance(mod_id, bool) or mod_id == "":
            raise InvalidInput("modId is required", field="modId")
        wanted = str(mod_id)
        mods_dir = self._mods_dir()

        def remove(c: Confined) -> tuple[list[dict[str, Any]], mods.Manifest]:
            dir_fd = mods.open_folder(c, mods_dir)
            if dir_fd is None:
                raise FileNotFound("mod {} is not installed".format(wanted))
            try:
                manifest = mods.read_manifest_at(dir_fd)
                current = manifest.mods
                match = [m for m in current if m["id"] == wanted]
                if not match:
                    raise FileNotFound("mod {} is not installed".format(wanted))
                self._account(root, -mods.remove_mod(dir_fd, match[0]))
                remaining = [m for m in current if m["id"] != wanted]
                mods.write_manifest(c, dir_fd, remaining)
                return remaining, manifest
            finally:
                os.close(dir_fd)

        async with self._lock(root, "mods"):
            remaining, manifest = await self._run(root, remove)
        self._report_manifest(root, manifest)
        self.log.info("server {server_id}: uninstalled mod {mod_id}",
                      server_id=root.server_id, mod_id=wanted)
        return ModList(tuple(mods.public(m) for m in remaining))

    @async_to_deferred
    async def list_mods(self, root: ServerRoot) -> ModList:
        """The mods recorded in the server's manifest."""
        manifest = await self._run(root, mods.read_manifest, self._mods_dir())
        self._report_manifest(root, manifest)
        return ModList(tuple(mods.public(m) for m in manifest.mods))
