"""
btrfs subvolumes and qgroups for the servers' data directories (blocking).

When the data directory is on btrfs with quotas enabled, each server's
directory is a subvolume whose qgroup (``0/<subvolume id>``) has a
``max_referenced`` limit equal to the server's disk limit: the kernel refuses
writes past it (``EDQUOT``), whoever writes (the game in its container, the
file manager, SFTP, an archive extraction), and the usage is read from the
qgroup at once instead of by walking the files.

Reading is ioctl- and subprocess-free where the kernel allows (>= 5.9): the
subvolume id and the filesystem's uuid come from two unprivileged ioctls on
the directory itself (``INO_LOOKUP`` of the subvolume root, ``FS_INFO``), the
figure from ``/sys/fs/btrfs/<uuid>/qgroups/0_<id>/referenced``.  The qgroup
figures are those of the last transaction commit (at most ``commit=`` seconds
old, 30 by default).  Changing things (quota enable, subvolume create and
delete, limits) goes through the ``btrfs`` command (btrfs-progs).

A subvolume created *inside* a server's directory (any user may create
one, a game in its container too) has a qgroup of its own that the
server's limit does not include, whatever the agent does (docs/DISK.md):
``nested_referenced`` finds such subvolumes (a search of the root tree,
root only) so that the server's usage counts them, and
``delete_subvolume`` deletes them with the server's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import uuid
from dataclasses import dataclass

BTRFS_SUPER_MAGIC = 0x9123683E
# The inode number of every subvolume's root directory.
SUBVOLUME_ROOT_INO = 256

# _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args) (4096 bytes)
_IOC_INO_LOOKUP = 0xD0009412
# _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args) (1024 bytes)
_IOC_FS_INFO = 0x8400941F

# _IOWR(0x94, 17, struct btrfs_ioctl_search_args) (4096 bytes; CAP_SYS_ADMIN)
_IOC_TREE_SEARCH = 0xD0009411
_ROOT_TREE_OBJECTID = 1
_ROOT_REF_KEY = 156
_SEARCH_KEY = struct.Struct("=7Q4I4Q")  # struct btrfs_ioctl_search_key (104 bytes)
_SEARCH_HEADER = struct.Struct("=3Q2I")  # struct btrfs_ioctl_search_header (32 bytes)
_U64_MAX = 2**64 - 1
# Nested subvolumes looked for beneath one server's at most: past that the
# figure is marked incomplete (a game making thousands is hostile, and each
# costs the agent a read).
MAX_NESTED = 1024

SYSFS = "/sys/fs/btrfs"
# Seconds one btrfs command may take (a subvolume delete or quota enable is
# quick: the heavy part runs in the kernel's background).
COMMAND_TIMEOUT = 120.0

_libc = ctypes.CDLL(None, use_errno=True)


class BtrfsError(Exception):
    """A btrfs command failed; ``str()`` is its one-line reason."""


def fs_type(fd: int) -> int:
    """The ``f_type`` of the filesystem holding ``fd`` (``fstatfs``)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(ctypes.c_int(fd), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    # f_type is the first field (a long) of struct statfs on Linux.
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def is_btrfs(path: str) -> bool:
    """True when ``path`` (a directory, never followed if a link) is on btrfs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fs_type(fd) == BTRFS_SUPER_MAGIC
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Subvolume:
    """A subvolume root: its filesystem's uuid and its id (qgroup ``0/<id>``)."""

    fsid: str
    subvolid: int

    @property
    def qgroup_dir(self) -> str:
        """The qgroup's sysfs directory (present while quotas are enabled)."""
        return os.path.join(SYSFS, self.fsid, "qgroups", "0_{}".format(self.subvolid))


def _real_fd(fd: int) -> int:
    # ioctls refuse O_PATH fds: open the directory itself again through it.
    return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)


def subvolume_of(fd: int) -> Subvolume | None:
    """
    The subvolume whose root directory ``fd`` is (any fd of a directory,
    ``O_PATH`` included), or None when it is not one (not btrfs, or a plain
    directory).
    """
    st = os.fstat(fd)
    if st.st_ino != SUBVOLUME_ROOT_INO:
        return None
    real = _real_fd(fd)
    try:
        if fs_type(real) != BTRFS_SUPER_MAGIC:
            return None
        # INO_LOOKUP of the subvolume root object needs no privilege: it
        # answers the id of the tree fd is in.
        lookup = bytearray(4096)
        struct.pack_into("=QQ", lookup, 0, 0, SUBVOLUME_ROOT_INO)
        fcntl.ioctl(real, _IOC_INO_LOOKUP, lookup)
        subvolid = struct.unpack_from("=Q", lookup, 0)[0]
        info = bytearray(1024)
        fcntl.ioctl(real, _IOC_FS_INFO, info)
        fsid = str(uuid.UUID(bytes=bytes(info[16:32])))
    finally:
        os.close(real)
    return Subvolume(fsid, subvolid)


def child_subvolumes(fd: int, subvolid: int) -> list[int]:
    """
    The ids of the subvolumes whose root directory is right inside the
    subvolume ``subvolid`` (its ``ROOT_REF`` items in the root tree), on the
    filesystem of ``fd`` (a real fd, not ``O_PATH``).  Needs
    ``CAP_SYS_ADMIN`` (``PermissionError`` otherwise).
    """
    found: list[int] = []
    low = 0
    while True:
        args = bytearray(4096)
        _SEARCH_KEY.pack_into(
            args, 0, _ROOT_TREE_OBJECTID, subvolid, subvolid, low, _U64_MAX, 0, _U64_MAX,
            _ROOT_REF_KEY, _ROOT_REF_KEY, 4096, 0, 0, 0, 0, 0)
        fcntl.ioctl(fd, _IOC_TREE_SEARCH, args)
        count = struct.unpack_from("=I", args, 64)[0]
        if count == 0:
            return found
        pos = _SEARCH_KEY.size
        offset = low
        for _ in range(count):
            _, objectid, offset, kind, length = _SEARCH_HEADER.unpack_from(args, pos)
            pos += _SEARCH_HEADER.size + length
            if objectid == subvolid and kind == _ROOT_REF_KEY:
                found.append(offset)
        if offset == _U64_MAX:
            return found
        low = offset + 1


def nested_subvolumes(fd: int, subvolid: int, limit: int = MAX_NESTED) -> tuple[list[int], bool]:
    """
    Every subvolume beneath the subvolume ``subvolid``, at any depth, parents
    before their children, and whether that is all of them (False past
    ``limit``).  Any user may create a subvolume in a directory they can
    write (a game in its container too): its qgroup is not the server's.
    """
    found: list[int] = []
    queue = [subvolid]
    while queue:
        parent = queue.pop(0)
        for child in child_subvolumes(fd, parent):
            if len(found) >= limit:
                return found, False
            found.append(child)
            queue.append(child)
    return found, True


def nested_referenced(fd: int, sub: Subvolume) -> tuple[int, bool, bool]:
    """
    Bytes the subvolumes nested beneath ``sub`` reference (the sum of their
    qgroups' ``referenced``), whether all were counted (False when they
    cannot be listed, not root, or past ``MAX_NESTED``), and whether there
    were more than ``MAX_NESTED`` (what only a hostile tree does).
    """
    try:
        real = _real_fd(fd)
    except OSError:
        return 0, False, False
    try:
        ids, whole = nested_subvolumes(real, sub.subvolid, limit=MAX_NESTED)
    except OSError:
        return 0, False, False
    finally:
        os.close(real)
    capped = not whole
    total = 0
    for subvolid in ids:
        value = _read_int(os.path.join(SYSFS, sub.fsid, "qgroups", "0_{}".format(subvolid),
                                       "referenced"), None)
        if value is None:
            whole = False
        else:
            total += value
    return total, whole, capped


def qgroups_enabled(fsid: str) -> bool:
    """True when quotas are enabled (and consistent) on the filesystem ``fsid``."""
    base = os.path.join(SYSFS, fsid, "qgroups")
    if not os.path.isdir(base):
        return False
    return _read_int(os.path.join(base, "inconsistent"), 0) == 0


def referenced(sub: Subvolume) -> int | None:
    """
    Bytes the subvolume references (its qgroup's ``referenced``), or None
    when its qgroup cannot be read (quotas off or inconsistent, a kernel
    without qgroups in sysfs).
    """
    if not qgroups_enabled(sub.fsid):
        return None
    value = _read_int(os.path.join(sub.qgroup_dir, "referenced"), None)
    return value


def limit_of(sub: Subvolume) -> int | None:
    """The qgroup's ``max_referenced`` (None: no limit, or unreadable)."""
    value = _read_int(os.path.join(sub.qgroup_dir, "max_referenced"), None)
    return value or None


def _read_int(path: str, default: int | None) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or b"0")
    except (OSError, ValueError):
        return default


def fsid_of(path: str) -> str | None:
    """The uuid of the btrfs filesystem holding the directory ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if fs_type(fd) != BTRFS_SUPER_MAGIC:
            return None
        info = bytearray(1024)
        fcntl.ioctl(fd, _IOC_FS_INFO, info)
        return str(uuid.UUID(bytes=bytes(info[16:32])))
    except OSError:
        return None
    finally:
        os.close(fd)


# -- changing things (btrfs-progs) ---------------------------------------------

def tool() -> str | None:
    """The ``btrfs`` command, or None when btrfs-progs is not installed."""
    return shutil.which("btrfs")


def run(*args: str) -> str:
    """Run ``btrfs <args>``; its output, or ``BtrfsError`` with its reason."""
    exe = tool()
    if exe is None:
        raise BtrfsError("the btrfs command (btrfs-progs) is not installed")
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, timeout=COMMAND_TIMEOUT, check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BtrfsError("btrfs {}: {}".format(args[0] if args else "", e)) from None
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BtrfsError("btrfs {}: {}".format(
            " ".join(args[:2]), reason[-1] if reason else "exit {}".format(done.returncode)))
    return done.stdout.decode("utf-8", "replace")


def enable_quotas(path: str) -> None:
    """Enable quotas on the filesystem holding ``path`` (if not yet)."""
    fsid = fsid_of(path)
    if fsid is None or not os.path.isdir(os.path.join(SYSFS, fsid, "qgroups")):
        run("quota", "enable", path)
        fsid = fsid_of(path)
    if fsid is not None and not qgroups_enabled(fsid):
        # Enabling starts a rescan of what the filesystem holds already; the
        # figures are right once it ends (or after a rescan of our own).
        run("quota", "rescan", "-W", path)
        if not qgroups_enabled(fsid):
            run("quota", "rescan", "-w", path)


def create_subvolume(path: str) -> None:
    """Create the subvolume ``path`` (``FileExistsError`` if the name is taken)."""
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    run("subvolume", "create", path)


def delete_subvolume(path: str) -> None:
    """
    Delete the subvolume ``path``, the subvolumes nested inside it (the
    kernel refuses to delete a subvolume that holds any), and their qgroups
    (gone already is fine).
    """
    if not os.path.lexists(path):
        return
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        sub = subvolume_of(fd)
        nested: list[int] = []
        if sub is not None:
            real = _real_fd(fd)
            try:
                nested, _ = nested_subvolumes(real, sub.subvolid, limit=_U64_MAX)
            except OSError:
                nested = []  # not root: the delete below says what is wrong
            finally:
                os.close(real)
    finally:
        os.close(fd)
    parent = os.path.dirname(path)
    # Children before their parents (the list has parents first).
    for subvolid in reversed(nested):
        # By id, through the server's subvolume (btrfs-progs wants one).
        run("subvolume", "delete", "--subvolid", str(subvolid), path)
    run("subvolume", "delete", path)
    # The qgroup of a deleted subvolume stays until its blocks are freed
    # (newer kernels drop it themselves): a failure here is only clutter.
    for subvolid in ([sub.subvolid] if sub is not None else []) + nested:
        try:
            run("qgroup", "destroy", "0/{}".format(subvolid), parent)
        except BtrfsError:
            pass


def set_limit(path: str, limit_bytes: int | None) -> None:
    """Set the subvolume ``path``'s referenced limit (None: no limit)."""
    run("qgroup", "limit", "none" if limit_bytes is None else str(int(limit_bytes)), path)
