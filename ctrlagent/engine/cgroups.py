"""
A running container's resource figures read straight from the host's kernel.

When the engine runs on this host, every figure of its stats API is in
files the kernel keeps for the container: its cgroup (CPU time, memory,
pids, block I/O) and its network namespace (``/proc/<pid>/net/dev``).
Reading a few of those files costs the agent far less than the engine's
stats API (an HTTP stream pushing a JSON document every second for every
server, and the engine reading the same files to write it), so a local
engine offers a ``CgroupStatsReader`` (``IContainerEngine.stats_reader``).

The figures are those of ``docker stats``:

- CPU: container CPU time over wall time between two reads, in percent of
  one core (the first read gives 0, as the engine's first sample does);
- memory: usage minus the inactive file cache (``total_inactive_file`` on
  cgroup v1, ``inactive_file`` on v2); the limit is the container's, or the
  host's memory when it has none;
- network: receive/transmit bytes summed over every interface but ``lo``;
- block I/O: read/write bytes summed over every device;
- pids: the tasks in the cgroup.

Both cgroup layouts are read: v1 (one hierarchy per controller, maybe with
an empty ``unified`` one beside them) and v2 (one unified hierarchy).  The
reader keeps its files open and reads them with ``pread`` from offset 0
(the kernel regenerates them on every read), so a sample costs a handful of
system calls and no ``open``.  These are small in-memory kernel files, never
disk I/O: reading them on the reactor thread is as cheap as a socket read.

Only ``errors`` and ``engine.interface`` are imported: pure file reading,
no engine, no reactor.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass

from zope.interface import implementer

from ctrlagent.engine.interface import IStatsReader, StatsSample
from ctrlagent.errors import EngineError, NotFound

__all__ = [
    "CgroupPaths",
    "CgroupStatsReader",
    "find_cgroup",
    "host_memory_bytes",
    "parse_blkio",
    "parse_io_stat",
    "keyed_value",
    "parse_net_dev",
]

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_ROOT = "/proc"
# A cgroup v1 "limit" at or above this is no limit (the kernel's page-rounded LONG_MAX).
_UNLIMITED = 1 << 62
_READ_SIZE = 64 * 1024
# What reading a file of a container that is gone fails with.
_GONE = frozenset((errno.ENOENT, errno.ENODEV, errno.ESRCH))


@dataclass(frozen=True)
class CgroupPaths:
    """Where one container's figures are: its cgroup directories and a pid inside it."""

    version: int
    # v1: one directory per controller; v2: the same directory for all.
    cpu: str
    memory: str
    pids: str
    blkio: str
    pid: int


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read(_READ_SIZE)


def find_cgroup(
    pid: int, container_id: str, *, proc: str = PROC_ROOT, root: str = CGROUP_ROOT
) -> CgroupPaths | None:
    """
    The cgroup directories of the container whose main process is ``pid``.

    None when they cannot be read here: the engine is on another host or in
    another pid namespace (``pid`` is then not the container's process: its
    cgroup must name ``container_id``, which both Docker's and Podman's
    cgroup names do), or a controller is missing.
    """
    if pid <= 0 or len(container_id) < 12:
        return None
    try:
        lines = _read_text(os.path.join(proc, str(pid), "cgroup")).splitlines()
    except OSError:
        return None
    v1: dict[str, str] = {}
    unified: str | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            unified = path
            continue
        for controller in controllers.split(","):
            v1[controller] = path
    if container_id not in "".join(list(v1.values()) + [unified or ""]):
        return None
    if "memory" in v1:
        dirs = {}
        for controller, mount_names in (
            ("cpu", ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")),
            ("memory", ("memory",)),
            ("pids", ("pids",)),
            ("blkio", ("blkio",)),
        ):
            key = "cpuacct" if controller == "cpu" else controller
            where = v1.get(key)
            if where is None:
                return None
            found = [
                os.path.join(root, name, where.lstrip("/"))
                for name in mount_names
                if os.path.isdir(os.path.join(root, name, where.lstrip("/")))
            ]
            if not found:
                return None
            dirs[controller] = found[0]
        return CgroupPaths(1, dirs["cpu"], dirs["memory"], dirs["pids"], dirs["blkio"], pid)
    if unified is not None and os.path.exists(os.path.join(root, "cgroup.controllers")):
        directory = os.path.join(root, unified.lstrip("/"))
        if os.path.isdir(directory):
            return CgroupPaths(2, directory, directory, directory, directory, pid)
    return None


def keyed_value(data: bytes, key: bytes) -> int | None:
    """
    The value of ``key`` in a ``key value`` file (``memory.stat``), found
    without parsing the other lines (the file has dozens; one or two are read).
    """
    at = data.find(b"\n" + key + b" ")
    if at < 0:
        if not data.startswith(key + b" "):
            return None
        at = -1
    start = at + len(key) + 2
    end = data.find(b"\n", start)
    try:
        return int(data[start:] if end < 0 else data[start:end])
    except ValueError:
        return None


def parse_blkio(text: str) -> tuple[int, int]:
    """Read/write bytes of a v1 ``blkio.*io_service_bytes_recursive`` file."""
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        try:
            value = int(parts[2])
        except ValueError:
            continue
        op = parts[1].lower()
        if op == "read":
            read += value
        elif op == "write":
            write += value
    return read, write


def parse_io_stat(text: str) -> tuple[int, int]:
    """Read/write bytes of a v2 ``io.stat`` file (``rbytes=``/``wbytes=`` per device)."""
    read = write = 0
    for line in text.splitlines():
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            try:
                if key == "rbytes":
                    read += int(value)
                elif key == "wbytes":
                    write += int(value)
            except ValueError:
                continue
    return read, write


def parse_net_dev(text: str) -> tuple[int, int]:
    """Receive/transmit bytes of ``/proc/<pid>/net/dev``, every interface but ``lo``."""
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep or name.strip() == "lo":
            continue
        fields = rest.split()
        if len(fields) < 9:
            continue
        try:
            rx += int(fields[0])
            tx += int(fields[8])
        except ValueError:
            continue
    return rx, tx


def host_memory_bytes(proc: str = PROC_ROOT) -> int:
    """The host's memory (``MemTotal``), 0 when it cannot be read."""
    try:
        for line in _read_text(os.path.join(proc, "meminfo")).splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class KeptFiles:
    """
    How many descriptors all readers keep open, at most ``limit``: a quarter
    of the process's open-file limit (about 7 per running server; 500
    servers keep 3,500 of ``LimitNOFILE=65536``).  Past it readers open,
    read and close each time, which costs more CPU but never starves the
    API's connections, the engine's sockets or the store of descriptors.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = 0

    def take(self) -> bool:
        """One more kept descriptor, if the share allows it."""
        if self.kept >= self.limit:
            return False
        self.kept += 1
        return True

    def give_back(self) -> None:
        self.kept = max(0, self.kept - 1)


def _kept_share() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(0, soft // 4)


_KEPT = KeptFiles(_kept_share())


@implementer(IStatsReader)
class CgroupStatsReader:
    """
    One running container's figures from its cgroup files (``IStatsReader``).

    ``now`` is a monotonic clock in seconds (the CPU percent is CPU time over
    the time between two reads).  ``read`` raises ``NotFound`` once the
    container is gone (its cgroup removed), ``EngineError`` when the files
    cannot be read for another reason (no descriptor left, no permission);
    either closes the reader.  ``close`` releases the files.
    """

    def __init__(
        self,
        paths: CgroupPaths,
        now: Callable[[], float],
        *,
        proc: str = PROC_ROOT,
        host_memory: int = 0,
    ) -> None:
        self.paths = paths
        self._now = now
        self._host_memory = host_memory
        self._fds: dict[str, int] = {}
        self._closed = False
        self._last_cpu: tuple[float, int] | None = None
        if paths.version == 1:
            self._cpu_file = os.path.join(paths.cpu, "cpuacct.usage")
            self._usage_file = os.path.join(paths.memory, "memory.usage_in_bytes")
            self._limit_file = os.path.join(paths.memory, "memory.limit_in_bytes")
            # runc's order: the bfq scheduler's figures, then cfq's, then the throttle layer's.
            self._blkio_file = next(
                (
                    os.path.join(paths.blkio, name)
                    for name in (
                        "blkio.bfq.io_service_bytes_recursive",
                        "blkio.io_service_bytes_recursive",
                    )
                    if os.path.exists(os.path.join(paths.blkio, name))
                ),
                os.path.join(paths.blkio, "blkio.throttle.io_service_bytes_recursive"),
            )
        else:
            self._cpu_file = os.path.join(paths.cpu, "cpu.stat")
            self._usage_file = os.path.join(paths.memory, "memory.current")
            self._limit_file = os.path.join(paths.memory, "memory.max")
            self._blkio_file = os.path.join(paths.blkio, "io.stat")
        self._stat_file = os.path.join(paths.memory, "memory.stat")
        self._pids_file = os.path.join(paths.pids, "pids.current")
        self._net_file = os.path.join(proc, str(paths.pid), "net", "dev")

    def _read(self, path: str, optional: bool = False) -> bytes:
        fd = self._fds.get(path)
        try:
            if fd is not None:
                return os.pread(fd, _READ_SIZE, 0)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if _KEPT.take():
                self._fds[path] = fd
                return os.pread(fd, _READ_SIZE, 0)
            # Past the share of descriptors readers may keep: read and close,
            # so that the API, the engine and the store never run short.
            try:
                return os.pread(fd, _READ_SIZE, 0)
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno in _GONE:
                if optional:
                    return b""
                self.close()
                raise NotFound("container cgroup gone ({})".format(e.strerror or e)) from None
            # Not the container's end (out of descriptors, no permission):
            # the caller falls back to the engine's stats API.
            self.close()
            raise EngineError("cannot read {} ({})".format(path, e.strerror or e)) from None

    def _text(self, path: str, optional: bool = False) -> str:
        return self._read(path, optional).decode("ascii", "replace")

    def read(self) -> StatsSample:
        """One sample now; ``NotFound`` when the container's cgroup is gone."""
        if self._closed:
            raise NotFound("stats reader closed")
        v1 = self.paths.version == 1
        if v1:
            cpu_ns = _int(self._read(self._cpu_file))
        else:
            cpu_ns = (keyed_value(self._read(self._cpu_file), b"usage_usec") or 0) * 1000
        now = self._now()
        percent = 0.0
        if self._last_cpu is not None:
            then, before = self._last_cpu
            if now > then and cpu_ns >= before:
                percent = (cpu_ns - before) / ((now - then) * 1e9) * 100.0
        self._last_cpu = (now, cpu_ns)
        usage = _int(self._read(self._usage_file))
        stat = self._read(self._stat_file)
        inactive = keyed_value(stat, b"total_inactive_file" if v1 else b"inactive_file") or 0
        memory = usage - inactive if inactive < usage else usage
        if v1:
            # The container's own limit, as memory.limit_in_bytes has it, in
            # the file already read (its parents set none: the engine's).
            limit = keyed_value(stat, b"hierarchical_memory_limit")
            if limit is None:
                limit = _int(self._read(self._limit_file))
        else:
            limit_text = self._read(self._limit_file).strip()
            limit = 0 if limit_text == b"max" else _int(limit_text)
        if (limit == 0 or limit >= _UNLIMITED) or (self._host_memory and limit > self._host_memory):
            limit = self._host_memory
        if v1:
            blk_read, blk_write = parse_blkio(self._text(self._blkio_file, optional=True))
        else:
            blk_read, blk_write = parse_io_stat(self._text(self._blkio_file, optional=True))
        rx, tx = parse_net_dev(self._text(self._net_file, optional=True))
        return StatsSample(
            cpu_percent=round(percent, 3),
            memory_bytes=memory,
            memory_limit_bytes=limit,
            rx_bytes=rx,
            tx_bytes=tx,
            blk_read=blk_read,
            blk_write=blk_write,
            pids=_int(self._read(self._pids_file, optional=True)),
        )

    def close(self) -> None:
        """Release the open files (idempotent); reads then say ``NotFound``."""
        self._closed = True
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            _KEPT.give_back()
            try:
                os.close(fd)
            except OSError:
                pass


def _int(data: bytes) -> int:
    try:
        return int(data.strip() or 0)
    except ValueError:
        return 0
