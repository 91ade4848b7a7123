"""
Where archives are kept: the driver seam and the local-disk driver.

Drivers are blocking (thread-side).  An archive is written through
``open_writer``: bytes as they come, then ``commit`` (the archive exists,
whole, under its final name) or ``abort`` (nothing is left).  Until the
commit, a crash leaves only a partial object, which ``discard_partial``
removes on the next start.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import IO, Protocol

from ctrlagent.errors import NotFound

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_component(name: str) -> str:
    """``name`` if it is a plain file name, else its sha256 (never a path)."""
    if _SAFE_NAME.fullmatch(name) and ".." not in name:
        return name
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()


class ArchiveWriter(Protocol):
    """An archive being written."""

    @property
    def file_fd(self) -> int | None:
        """
        The regular file (empty, open for reading and writing) the archive
        is kept in, or None: the compressor may then write it there itself
        rather than call ``write``.
        """

    def write(self, data: bytes) -> None:
        """
        Append ``data``: a bytes-like object (often a view of a buffer the
        caller reuses), valid only during the call: copy what you keep.
        """

    def commit(self) -> str:
        """Make the archive whole and durable; its location."""

    def abort(self) -> None:
        """Remove whatever was written."""


class BackupDriver(Protocol):
    """A place archives are kept (blocking methods, run in the thread pool)."""

    name: str

    def open_writer(self, server_id: str, backup_id: str) -> ArchiveWriter:
        """A writer of the archive of ``backup_id``."""

    def open_reader(self, location: str, start: int = 0, length: int | None = None
                    ) -> IO[bytes]:
        """The archive at ``location`` (from byte ``start``, ``length`` bytes)."""

    def delete(self, location: str) -> None:
        """Remove the archive (nothing if it is gone already)."""

    def delete_all(self, locations: Sequence[str]) -> None:
        """
        Remove several archives, as ``delete`` removes each: in one go where
        the store can (restic forgets every snapshot and prunes once).
        """

    def discard_partial(self, server_id: str, backup_id: str) -> None:
        """Remove what an interrupted ``open_writer`` left."""

    def free_bytes(self) -> int | None:
        """Room left for archives, or None when unknown (remote stores)."""


class _LocalWriter:
    def __init__(self, dir_fd: int, tmp: str, final: str, location: str) -> None:
        self.dir_fd = dir_fd
        self.tmp = tmp
        self.final = final
        self.location = location
        # Read and write: the archive's hash is read back behind the
        # compressor that writes it (``write_archive``'s ``file_fd``).
        self.fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)

    @property
    def file_fd(self) -> int | None:
        """The temporary file, while it is open."""
        return self.fd if self.fd >= 0 else None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def commit(self) -> str:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.final, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        os.close(self.dir_fd)
        self.dir_fd = -1
        return self.location

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir_fd >= 0:
            try:
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            except OSError:
                pass
            os.close(self.dir_fd)
            self.dir_fd = -1


class LocalDriver:
    """
    Archives as files under ``directory`` (in the agent's state directory,
    never inside a server's own): ``<server>/<backup id>.tar.zst``, written
    as ``.<backup id>.partial`` and renamed once whole and synced.
    """

    name = "local"

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _server_dir(self, server_id: str) -> tuple[int, str]:
        comp = safe_component(server_id)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        top = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.mkdir(comp, 0o700, dir_fd=top)
            except FileExistsError:
                pass
            fd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=top)
        finally:
            os.close(top)
        return fd, comp

    def open_writer(self, server_id: str, backup_id: str) -> _LocalWriter:
        bid = safe_component(backup_id)
        fd, comp = self._server_dir(server_id)
        try:
            return _LocalWriter(fd, ".{}.partial".format(bid), bid + ".tar.zst",
                                "{}/{}.tar.zst".format(comp, bid))
        except BaseException:
            os.close(fd)
            raise

    def _path(self, location: str) -> str:
        parts = location.split("/")
        if len(parts) != 2 or not all(_SAFE_NAME.fullmatch(p) for p in parts):
            raise NotFound("backup archive location {!r} is not valid".format(location))
        return os.path.join(self.directory, *parts)

    def open_reader(self, location: str, start: int = 0, length: int | None = None
                    ) -> IO[bytes]:
        try:
            f = open(self._path(location), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise NotFound("the backup's archive is missing") from None
        if start:
            f.seek(start)
        return f if length is None else _Limited(f, length)  # type: ignore[return-value]

    def size(self, location: str) -> int:
        """The archive's size in bytes."""
        return os.stat(self._path(location)).st_size

    def delete(self, location: str) -> None:
        try:
            os.unlink(self._path(location))
        except FileNotFoundError:
            pass

    def delete_all(self, locations: Sequence[str]) -> None:
        for location in locations:
            self.delete(location)

    def discard_partial(self, server_id: str, backup_id: str) -> None:
        path = os.path.join(self.directory, safe_component(server_id),
                            ".{}.partial".format(safe_component(backup_id)))
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def free_bytes(self) -> int | None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize


class _Limited:
    """At most ``length`` bytes of ``f`` (a Range download)."""

    def __init__(self, f: IO[bytes], length: int) -> None:
        self.f = f
        self.left = length

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        data = self.f.read(n) if n else b""
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
