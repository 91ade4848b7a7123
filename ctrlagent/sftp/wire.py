"""
The SFTP version 3 wire format (draft-ietf-secsh-filexfer-02), pure.

``Reader`` takes fields off one packet and raises ``BadMessage`` for anything
short, long or malformed, so that no client input can raise anything else;
the ``pack_*`` functions build answers.  Paths travel as bytes and are turned
into components beneath the server root by ``components``: SFTP paths are
absolute in the session's own tree (``/`` is the server directory) or relative
to it, ``..`` at the top stays at the top (as under ``ChrootDirectory``), and
a NUL byte or an overlong name is refused.  No I/O, no reactor.
"""

from __future__ import annotations

import functools
import os
import stat
import struct
import time
from dataclasses import dataclass

from ctrlagent.files.paths import NAME_MAX, PATH_MAX, Components

# Packet types.
FXP_INIT = 1
FXP_VERSION = 2
FXP_OPEN = 3
FXP_CLOSE = 4
FXP_READ = 5
FXP_WRITE = 6
FXP_LSTAT = 7
FXP_FSTAT = 8
FXP_SETSTAT = 9
FXP_FSETSTAT = 10
FXP_OPENDIR = 11
FXP_READDIR = 12
FXP_REMOVE = 13
FXP_MKDIR = 14
FXP_RMDIR = 15
FXP_REALPATH = 16
FXP_STAT = 17
FXP_RENAME = 18
FXP_READLINK = 19
FXP_SYMLINK = 20
FXP_STATUS = 101
FXP_HANDLE = 102
FXP_DATA = 103
FXP_NAME = 104
FXP_ATTRS = 105
FXP_EXTENDED = 200
FXP_EXTENDED_REPLY = 201

# Status codes.
FX_OK = 0
FX_EOF = 1
FX_NO_SUCH_FILE = 2
FX_PERMISSION_DENIED = 3
FX_FAILURE = 4
FX_BAD_MESSAGE = 5
FX_OP_UNSUPPORTED = 8

# Open flags.
FXF_READ = 0x01
FXF_WRITE = 0x02
FXF_APPEND = 0x04
FXF_CREAT = 0x08
FXF_TRUNC = 0x10
FXF_EXCL = 0x20

# Attribute flags.
ATTR_SIZE = 0x01
ATTR_UIDGID = 0x02
ATTR_PERMISSIONS = 0x04
ATTR_ACMODTIME = 0x08
ATTR_EXTENDED = 0x80000000

# What we accept and promise (OpenSSH's sftp-server uses the same figures).
MAX_PACKET = 256 * 1024
MAX_READ = MAX_PACKET - 1024
MAX_WRITE = MAX_PACKET - 1024
MAX_EXTENDED_ATTRS = 64


class BadMessage(Exception):
    """A packet that does not parse."""


@dataclass(frozen=True)
class Attrs:
    """The SFTP v3 ATTRS fields a client sent (``None``: not sent)."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    permissions: int | None = None
    atime: int | None = None
    mtime: int | None = None


class Reader:
    """Fields of one packet, in order; every shortfall is a ``BadMessage``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise BadMessage("packet too short")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def byte(self) -> int:
        """One unsigned byte."""
        return self._take(1)[0]

    def u32(self) -> int:
        """A big-endian uint32."""
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        """A big-endian uint64."""
        return int(struct.unpack(">Q", self._take(8))[0])

    def string(self) -> bytes:
        """A length-prefixed string."""
        return self._take(self.u32())

    def attrs(self) -> Attrs:
        """An ATTRS structure."""
        flags = self.u32()
        size = self.u64() if flags & ATTR_SIZE else None
        uid = gid = None
        if flags & ATTR_UIDGID:
            uid, gid = self.u32(), self.u32()
        permissions = self.u32() if flags & ATTR_PERMISSIONS else None
        atime = mtime = None
        if flags & ATTR_ACMODTIME:
            atime, mtime = self.u32(), self.u32()
        if flags & ATTR_EXTENDED:
            count = self.u32()
            if count > MAX_EXTENDED_ATTRS:
                raise BadMessage("too many extended attributes")
            for _ in range(count):
                self.string()
                self.string()
        return Attrs(size, uid, gid, permissions, atime, mtime)

    def rest(self) -> bytes:
        """Whatever is left."""
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    def end(self) -> None:
        """Refuse trailing bytes."""
        if self.pos != len(self.data):
            raise BadMessage("trailing bytes in packet")


def u32(n: int) -> bytes:
    """A big-endian uint32."""
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    """A big-endian uint64."""
    return struct.pack(">Q", n)


def string(b: bytes) -> bytes:
    """A length-prefixed string."""
    return struct.pack(">I", len(b)) + b


def packet(kind: int, body: bytes) -> bytes:
    """One framed packet."""
    return struct.pack(">IB", len(body) + 1, kind) + body


def pack_attrs(st: os.stat_result | None) -> bytes:
    """ATTRS of a stat result (``None``: no attributes)."""
    if st is None:
        return u32(0)
    return _ATTRS.pack(
        ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME,
        max(st.st_size, 0),
        st.st_uid & 0xFFFFFFFF,
        st.st_gid & 0xFFFFFFFF,
        st.st_mode & 0xFFFFFFFF,
        int(st.st_atime) & 0xFFFFFFFF,
        int(st.st_mtime) & 0xFFFFFFFF,
    )


_ATTRS = struct.Struct(">IQIIIII")


def status(request_id: int, code: int, message: str) -> bytes:
    """An FXP_STATUS packet."""
    text = message.encode("utf-8", "replace")[:1024]
    return packet(FXP_STATUS, u32(request_id) + u32(code) + string(text) + string(b"en"))


def name_packet(request_id: int, names: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """An FXP_NAME packet of ``(filename, longname, packed attrs)``."""
    body = [u32(request_id), u32(len(names))]
    for filename, longname, attrs in names:
        body.append(string(filename))
        body.append(string(longname))
        body.append(attrs)
    return packet(FXP_NAME, b"".join(body))


def components(path: bytes) -> Components:
    """
    The components beneath the root of an SFTP path (see the module's rules).
    Raises ``BadMessage`` for a NUL byte or an overlong path or name.
    """
    if b"\x00" in path:
        raise BadMessage("path contains a NUL byte")
    if len(path) > PATH_MAX:
        raise BadMessage("path is too long")
    out: list[str] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out:
                out.pop()
            continue
        if len(part) > NAME_MAX:
            raise BadMessage("path has a name longer than {} bytes".format(NAME_MAX))
        out.append(part.decode("utf-8", "surrogateescape"))
    return tuple(out)


def display(comps: Components) -> bytes:
    """The SFTP form of components: ``/`` or ``/a/b``."""
    return ("/" + "/".join(comps)).encode("utf-8", "surrogateescape")


_KIND = {
    stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFREG: "-", stat.S_IFCHR: "c",
    stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s",
}


@functools.lru_cache(maxsize=4096)
def _perms(mode: int) -> str:
    return _KIND.get(stat.S_IFMT(mode), "?") + stat.filemode(mode)[1:]


@functools.lru_cache(maxsize=65536)
def _when(mtime: int, recent: bool) -> str:
    return time.strftime("%b %d %H:%M" if recent else "%b %d  %Y", time.gmtime(mtime))


def longname(name: bytes, st: os.stat_result) -> bytes:
    """The ``ls -l`` line OpenSSH's client shows for ``ls -l``."""
    mtime = int(st.st_mtime)
    # Files of one directory mostly share their modes and seconds: both
    # formattings are cached, which halves the cost of a 10k-entry listing.
    recent = abs(int(time.time()) - mtime) < 180 * 86400
    line = "{} {:>3} {:<8} {:<8} {:>8} {} ".format(
        _perms(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_size, _when(mtime, recent))
    return line.encode("ascii") + name
