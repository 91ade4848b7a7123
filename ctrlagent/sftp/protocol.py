"""
The SFTP v3 server protocol, hardened against hostile clients.

Twisted's ``FileTransferServer`` trusts its input (an unbounded buffer, asserts
on trailing bytes, tracebacks in the log for short packets, no bound on
requests in flight), so the agent speaks the wire itself and drives an
``ISFTPServer`` (``filesystem.ServerFileSystem``):

- a packet longer than ``wire.MAX_PACKET`` (or shorter than a header), or
  anything before INIT, closes the channel at once;
- a packet that does not parse answers ``SSH_FX_BAD_MESSAGE``; an unknown
  type or extension ``SSH_FX_OP_UNSUPPORTED``; a bogus handle
  ``SSH_FX_FAILURE``; reads are capped at ``wire.MAX_READ`` bytes;
- at most ``MAX_IN_FLIGHT`` requests run at once, and none starts while
  ``MAX_BACKLOG`` bytes of answers wait for the client's window; further
  packets wait in the buffer, and past ``HIGH_WATER`` buffered bytes the SSH
  connection stops being read (``pause``/``resume``), so a pipelining client
  costs bounded memory and bounded thread-pool work;
- every error becomes a status code with a one-line message; only a bug of
  ours (an exception that is not a file-system answer) is logged with its
  traceback.

Open file and directory handles are closed when the channel closes, after the
requests in flight have finished; ``finished`` fires then.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ctrlagent.errors import (
    CtrlAgentError,
    InsufficientResources,
    NotFound,
    PermissionDenied,
)
from ctrlagent.files.confined import os_error
from ctrlagent.sftp import wire
from ctrlagent.sftp.filesystem import ServerFileSystem, SftpDirectory, SftpFile
from ctrlagent.sftp.wire import BadMessage, Reader

MAX_IN_FLIGHT = 64
# Answer bytes waiting for the client's SSH window past which no new request
# is started (a client that asks for data faster than it reads it).
MAX_BACKLOG = 8 * 1024 * 1024
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024

Handler = Callable[[int, Reader], Coroutine[Any, Any, bytes]]


class SessionCounters:
    """Bytes moved by one session (read by ``list_sftp_sessions``)."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.bytes_written = 0


def _attrs_dict(a: wire.Attrs) -> dict[str, int]:
    out: dict[str, int] = {}
    if a.size is not None:
        out["size"] = a.size
    if a.uid is not None and a.gid is not None:
        out["uid"], out["gid"] = a.uid, a.gid
    if a.permissions is not None:
        out["permissions"] = a.permissions
    if a.atime is not None and a.mtime is not None:
        out["atime"], out["mtime"] = a.atime, a.mtime
    return out


def _pack_dict_attrs(attrs: dict[str, int]) -> bytes:
    flags = 0
    body = b""
    if "size" in attrs:
        flags |= wire.ATTR_SIZE
        body += wire.u64(attrs["size"])
    if "uid" in attrs and "gid" in attrs:
        flags |= wire.ATTR_UIDGID
        body += wire.u32(attrs["uid"] & 0xFFFFFFFF) + wire.u32(attrs["gid"] & 0xFFFFFFFF)
    if "permissions" in attrs:
        flags |= wire.ATTR_PERMISSIONS
        body += wire.u32(attrs["permissions"] & 0xFFFFFFFF)
    if "atime" in attrs and "mtime" in attrs:
        flags |= wire.ATTR_ACMODTIME
        body += wire.u32(attrs["atime"] & 0xFFFFFFFF) + wire.u32(attrs["mtime"] & 0xFFFFFFFF)
    return wire.u32(flags) + body


class SftpProtocol(Protocol):
    """
    One SFTP subsystem channel.  ``pause``/``resume`` stop and restart reading
    the SSH connection (flow control); ``counters`` receives the bytes moved.
    """

    log = Logger()

    def __init__(
        self,
        fs: ServerFileSystem,
        *,
        max_handles: int = 256,
        counters: SessionCounters | None = None,
        pause: Callable[[], None] = lambda: None,
        resume: Callable[[], None] = lambda: None,
        backlog: Callable[[], int] = lambda: 0,
        label: str = "sftp",
    ) -> None:
        self.fs = fs
        self.max_handles = max_handles
        self.counters = counters if counters is not None else SessionCounters()
        self._pause = pause
        self._resume = resume
        self._backlog = backlog
        self.label = label
        self._buf = bytearray()
        self._paused = False
        self._pumping = False
        self._initialised = False
        self._in_flight = 0
        self._closed = False
        self._dropping = False
        self._files: dict[bytes, SftpFile] = {}
        self._dirs: dict[bytes, SftpDirectory] = {}
        self._drained: list[Deferred[None]] = []
        self.finished: Deferred[None] = Deferred()
        self._handlers: dict[int, Handler] = {
            wire.FXP_OPEN: self._open,
            wire.FXP_CLOSE: self._close,
            wire.FXP_READ: self._read,
            wire.FXP_WRITE: self._write,
            wire.FXP_LSTAT: self._lstat,
            wire.FXP_STAT: self._stat,
            wire.FXP_FSTAT: self._fstat,
            wire.FXP_SETSTAT: self._setstat,
            wire.FXP_FSETSTAT: self._fsetstat,
            wire.FXP_OPENDIR: self._opendir,
            wire.FXP_READDIR: self._readdir,
            wire.FXP_REMOVE: self._remove,
            wire.FXP_MKDIR: self._mkdir,
            wire.FXP_RMDIR: self._rmdir,
            wire.FXP_REALPATH: self._realpath,
            wire.FXP_RENAME: self._rename,
            wire.FXP_READLINK: self._readlink,
            wire.FXP_SYMLINK: self._symlink,
            wire.FXP_EXTENDED: self._extended,
        }

    # -- framing -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        if self._dropping:
            return
        self._buf += data
        self._pump()

    def _pump(self) -> None:
        # A request answered at once (a bogus handle, REALPATH) ends inside
        # _dispatch and calls back here: the loop below is already running and
        # goes on by itself, so nesting would only grow the stack, packet by packet.
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_packets()
        finally:
            self._pumping = False

    def _pump_packets(self) -> None:
        buf = self._buf
        while (self._in_flight < MAX_IN_FLIGHT and len(buf) >= 4 and not self._dropping
               and self._backlog() < MAX_BACKLOG):
            (length,) = struct.unpack_from(">I", buf)
            if length < 5 or length > wire.MAX_PACKET:
                self._drop("a packet of {} bytes".format(length))
                return
            if len(buf) < 4 + length:
                break
            packet = bytes(buf[4:4 + length])
            del buf[:4 + length]
            self._dispatch(packet)
        if not self._paused and len(buf) > HIGH_WATER:
            self._paused = True
            self._pause()
        elif self._paused and len(buf) < LOW_WATER:
            self._paused = False
            self._resume()

    def output_drained(self) -> None:
        """The client read what was waiting: take requests again."""
        if not self._closed:
            self._pump()

    def _drop(self, why: str) -> None:
        """Close the channel on input that cannot be answered."""
        self._dropping = True
        self._buf.clear()
        self.log.info("{label}: closing the channel after {why}", label=self.label, why=why)
        if self.transport is not None:
            self.transport.loseConnection()

    def _send(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(data)

    def _dispatch(self, packet: bytes) -> None:
        kind = packet[0]
        r = Reader(packet[1:])
        if not self._initialised:
            if kind != wire.FXP_INIT:
                self._drop("a request before INIT")
                return
            self._init(r)
            return
        try:
            request_id = r.u32()
        except BadMessage:
            self._drop("a packet without a request id")
            return
        handler = self._handlers.get(kind)
        if handler is None:
            self._send(wire.status(request_id, wire.FX_OP_UNSUPPORTED,
                                   "unsupported request type {}".format(kind)))
            return
        self._in_flight += 1
        d = Deferred.fromCoroutine(handler(request_id, r))
        d.addCallbacks(self._send, self._failed, errbackArgs=(request_id,))
        d.addBoth(self._request_done)

    def _init(self, r: Reader) -> None:
        try:
            version = r.u32()
        except BadMessage:
            self._drop("a short INIT")
            return
        self._initialised = True
        extensions = self.fs.gotVersion(version, {})
        body = wire.u32(3) + b"".join(
            wire.string(k) + wire.string(v) for k, v in extensions.items())
        self._send(wire.packet(wire.FXP_VERSION, body))

    def _request_done(self, _: object) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)
        if not self._closed:
            self._pump()

    def _failed(self, failure: Failure, request_id: int) -> None:
        code, message = self._status_of(failure)
        self._send(wire.status(request_id, code, message))

    def _status_of(self, failure: Failure) -> tuple[int, str]:
        e = failure.value
        if isinstance(e, OSError):
            e = os_error(e, "the operation")
        if isinstance(e, EOFError):
            return wire.FX_EOF, "end of file"
        if isinstance(e, BadMessage):
            return wire.FX_BAD_MESSAGE, str(e)
        if isinstance(e, NotFound):
            return wire.FX_NO_SUCH_FILE, str(e)
        if isinstance(e, PermissionDenied):
            return wire.FX_PERMISSION_DENIED, str(e)
        if isinstance(e, InsufficientResources):
            return wire.FX_FAILURE, str(e)
        if isinstance(e, CtrlAgentError):
            return wire.FX_FAILURE, str(e)
        if isinstance(e, NotImplementedError):
            return wire.FX_OP_UNSUPPORTED, "unsupported: {}".format(e)
        self.log.failure("{label}: request failed", failure, label=self.label)
        return wire.FX_FAILURE, "internal error"

    # -- connection end ------------------------------------------------------

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self._closed = True
        self._buf.clear()
        if self._paused:
            # The SSH connection may carry on without this channel.
            self._paused = False
            self._resume()
        d = Deferred.fromCoroutine(self._cleanup())
        d.addErrback(lambda f: self.log.failure("{label}: cleanup failed", f, label=self.label))
        d.addBoth(lambda _: self.finished.callback(None))

    async def _cleanup(self) -> None:
        if self._in_flight:
            drained: Deferred[None] = Deferred()
            self._drained.append(drained)
            await drained
        handles: list[SftpFile | SftpDirectory] = [*self._files.values(), *self._dirs.values()]
        self._files.clear()
        self._dirs.clear()
        for h in handles:
            await h.close()
        await self.fs.close()

    # -- handles ---------------------------------------------------------------

    def _new_handle(self) -> bytes:
        if len(self._files) + len(self._dirs) >= self.max_handles:
            raise CtrlAgentError("too many open handles (at most {})".format(self.max_handles))
        return secrets.token_bytes(8)

    def _file(self, handle: bytes) -> SftpFile:
        f = self._files.get(handle)
        if f is None:
            raise CtrlAgentError("invalid file handle")
        return f

    def _dir(self, handle: bytes) -> SftpDirectory:
        d = self._dirs.get(handle)
        if d is None:
            raise CtrlAgentError("invalid directory handle")
        return d

    # -- requests ----------------------------------------------------------------

    @staticmethod
    def _ok(request_id: int) -> bytes:
        return wire.status(request_id, wire.FX_OK, "OK")

    async def _open(self, rid: int, r: Reader) -> bytes:
        path, pflags, attrs = r.string(), r.u32(), r.attrs()
        r.end()
        self._new_handle()  # refuse before opening anything
        f = await self.fs.openFile(path, pflags, _attrs_dict(attrs))
        try:
            if self._closed:
                raise CtrlAgentError("the session ended")
            handle = self._new_handle()
        except CtrlAgentError:
            await f.close()
            raise
        self._files[handle] = f
        return wire.packet(wire.FXP_HANDLE, wire.u32(rid) + wire.string(handle))

    async def _close(self, rid: int, r: Reader) -> bytes:
        handle = r.string()
        r.end()
        obj: SftpFile | SftpDirectory | None = self._files.pop(handle, None)
        if obj is None:
            obj = self._dirs.pop(handle, None)
        if obj is None:
            raise CtrlAgentError("invalid handle")
        await obj.close()
        return self._ok(rid)

    async def _read(self, rid: int, r: Reader) -> bytes:
        handle, offset, length = r.string(), r.u64(), r.u32()
        r.end()
        data = await self._file(handle).readChunk(offset, min(length, wire.MAX_READ))
        if not data:
            raise EOFError()
        self.counters.bytes_read += len(data)
        return wire.packet(wire.FXP_DATA, wire.u32(rid) + wire.string(data))

    async def _write(self, rid: int, r: Reader) -> bytes:
        handle, offset, data = r.string(), r.u64(), r.string()
        r.end()
        await self._file(handle).writeChunk(offset, data)
        self.counters.bytes_written += len(data)
        return self._ok(rid)

    async def _stat_path(self, rid: int, r: Reader, follow: bool) -> bytes:
        path = r.string()
        r.end()
        st = await self.fs.stat(path, follow)
        return wire.packet(wire.FXP_ATTRS, wire.u32(rid) + wire.pack_attrs(st))

    async def _lstat(self, rid: int, r: Reader) -> bytes:
        return await self._stat_path(rid, r, False)

    async def _stat(self, rid: int, r: Reader) -> bytes:
        return await self._stat_path(rid, r, True)

    async def _fstat(self, rid: int, r: Reader) -> bytes:
        handle = r.string()
        r.end()
        obj: SftpFile | SftpDirectory | None = self._files.get(handle) or self._dirs.get(handle)
        if obj is None:
            raise CtrlAgentError("invalid handle")
        st = await self.fs._run(self.fs.files.fstat, obj.handle)
        return wire.packet(wire.FXP_ATTRS, wire.u32(rid) + wire.pack_attrs(st))

    async def _setstat(self, rid: int, r: Reader) -> bytes:
        path, attrs = r.string(), r.attrs()
        r.end()
        await self.fs.setAttrs(path, _attrs_dict(attrs))
        return self._ok(rid)

    async def _fsetstat(self, rid: int, r: Reader) -> bytes:
        handle, attrs = r.string(), r.attrs()
        r.end()
        await self._file(handle).setAttrs(_attrs_dict(attrs))
        return self._ok(rid)

    async def _opendir(self, rid: int, r: Reader) -> bytes:
        path = r.string()
        r.end()
        self._new_handle()
        d = await self.fs.openDirectory(path)
        try:
            if self._closed:
                raise CtrlAgentError("the session ended")
            handle = self._new_handle()
        except CtrlAgentError:
            await d.close()
            raise
        self._dirs[handle] = d
        return wire.packet(wire.FXP_HANDLE, wire.u32(rid) + wire.string(handle))

    async def _readdir(self, rid: int, r: Reader) -> bytes:
        handle = r.string()
        r.end()
        batch = await self._dir(handle).read_batch()
        if not batch:
            raise EOFError()
        return wire.name_packet(rid, [(n, ln, wire.pack_attrs(st)) for n, ln, st in batch])

    async def _remove(self, rid: int, r: Reader) -> bytes:
        path = r.string()
        r.end()
        await self.fs.removeFile(path)
        return self._ok(rid)

    async def _mkdir(self, rid: int, r: Reader) -> bytes:
        path, attrs = r.string(), r.attrs()
        r.end()
        await self.fs.makeDirectory(path, _attrs_dict(attrs))
        return self._ok(rid)

    async def _rmdir(self, rid: int, r: Reader) -> bytes:
        path = r.string()
        r.end()
        await self.fs.removeDirectory(path)
        return self._ok(rid)

    async def _realpath(self, rid: int, r: Reader) -> bytes:
        path = r.string()
        r.end()
        real = self.fs.realPath(path)
        return wire.name_packet(rid, [(real, real, _pack_dict_attrs({}))])

    async def _rename(self, rid: int, r: Reader) -> bytes:
        old, new = r.string(), r.string()
        r.end()
        await self.fs.renameFile(old, new)
        return self._ok(rid)

    async def _readlink(self, rid: int, r: Reader) -> bytes:
        path = r.string()
        r.end()
        text = await self.fs.readLink(path)
        return wire.name_packet(rid, [(text, text, _pack_dict_attrs({}))])

    async def _symlink(self, rid: int, r: Reader) -> bytes:
        # OpenSSH (and so every common client) sends the target first and
        # the link's path second, the reverse of the draft.
        target, link = r.string(), r.string()
        r.end()
        await self.fs.makeLink(link, target)
        return self._ok(rid)

    async def _extended(self, rid: int, r: Reader) -> bytes:
        name = r.string()
        if name == b"posix-rename@openssh.com":
            old, new = r.string(), r.string()
            r.end()
            await self.fs.posix_rename(old, new)
            return self._ok(rid)
        if name == b"fsync@openssh.com":
            handle = r.string()
            r.end()
            f = self._file(handle)
            await self.fs._run(self.fs.files.fsync, f.handle)
            return self._ok(rid)
        if name in (b"statvfs@openssh.com", b"fstatvfs@openssh.com"):
            which = r.string()
            r.end()
            if name == b"statvfs@openssh.com":
                wire.components(which)  # validated; every path is on the root's filesystem
            else:
                self._file(which)
            figures = await self.fs._run(self.fs.files.statvfs)
            body = b"".join(wire.u64(max(0, int(x))) for x in figures)
            return wire.packet(wire.FXP_EXTENDED_REPLY, wire.u32(rid) + body)
        if name == b"limits@openssh.com":
            r.end()
            body = (wire.u64(wire.MAX_PACKET) + wire.u64(wire.MAX_READ)
                    + wire.u64(wire.MAX_WRITE) + wire.u64(self.max_handles))
            return wire.packet(wire.FXP_EXTENDED_REPLY, wire.u32(rid) + body)
        raise NotImplementedError(name.decode("ascii", "replace")[:64])

