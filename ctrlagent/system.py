"""
What the node itself looks like: host load and identity.

``SystemInfo`` is the ``IHost``: ``snapshot()`` (a ``HostSnapshot``) feeds
``get_system_metrics`` and ``system.status``, ``system_load()`` (a ``HostLoad``)
the ``systemLoad`` of WebSocket pongs, and ``system_info()`` (a ``HostInfo``)
the ``system_info`` frame and action.  The records and their shapes for the
Panel (PROTOCOL.md sections 2 and 3) are in ``ctrlagent.wire.node``.

Values are real and cheap: ``/proc`` files, ``statvfs`` of the data directory
and the network interfaces, read in a thread because even ``/proc`` reads and
``statvfs`` on a hung mount may block.

Host CPU percent is the busy share of the jiffies elapsed since the previous
snapshot (since boot for the first one), as ``top`` computes it.
"""

from __future__ import annotations

import fcntl
import os
import platform
import socket
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent import __version__
from ctrlagent.config import AgentConfig
from ctrlagent.files import btrfs
from ctrlagent.interfaces import IHost
from ctrlagent.wire.node import HostInfo, HostLoad, HostSnapshot, HostUsage, NetworkAddress

# What this agent can do, announced in system_info for Panels that look.
CAPABILITIES = [
    "docker",
    "http-api",
    "websocket",
    "console",
    "files",
    "archives",
    "mods",
    "metrics",
    "server-aliases",
]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def read_cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat``."""
    with open(path, encoding="ascii") as f:
        fields = f.readline().split()
    if not fields or fields[0] != "cpu":
        raise ValueError("unexpected first line of {}".format(path))
    values = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]; guest
    # time is already counted in user/nice, so only the first eight add up.
    values = values[:8]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values)
    return total - idle, total


def cpu_percent(previous: tuple[int, int], current: tuple[int, int]) -> float:
    """Busy share between two ``read_cpu_times`` samples, 0-100."""
    busy = current[0] - previous[0]
    total = current[1] - previous[1]
    if total <= 0:
        return 0.0
    return round(max(0.0, min(100.0, 100.0 * busy / total)), 2)


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` in bytes, keyed by its names (``MemTotal``, ...)."""
    out: dict[str, int] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if not parts:
                continue
            try:
                value = int(parts[0])
            except ValueError:
                continue
            if len(parts) > 1 and parts[1] == "kB":
                value *= 1024
            out[name.strip()] = value
    return out


def disk_usage(path: str) -> tuple[int, int, int]:
    """``(total, used, free)`` bytes of the filesystem holding ``path`` (or its nearest parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and probe != os.path.dirname(probe):
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = total - st.f_bfree * st.f_frsize
    return total, used, free


def disk_mode(config: AgentConfig) -> str:
    """
    How the node enforces disk limits (``[disk] mode`` as resolved at start):
    "btrfs" when it may and the data directory's filesystem has quotas
    enabled, else "walk".
    """
    if config.disk.mode == "walk":
        return "walk"
    fsid = btrfs.fsid_of(config.data_dir)
    return "btrfs" if fsid is not None and btrfs.qgroups_enabled(fsid) else "walk"


def read_uptime(path: str = "/proc/uptime") -> float:
    """Seconds since the host booted."""
    with open(path, encoding="ascii") as f:
        return float(f.read().split()[0])


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU model name, or the machine type when ``/proc/cpuinfo`` has none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


def _ipv4(sock: socket.socket, name: str, request: int) -> str | None:
    packed = struct.pack("256s", name.encode()[:15])
    try:
        result = fcntl.ioctl(sock.fileno(), request, packed)
    except OSError:
        return None
    return socket.inet_ntoa(result[20:24])


def network_interfaces(
    if_inet6: str = "/proc/net/if_inet6",
) -> dict[str, tuple[NetworkAddress, ...]]:
    """Interface name -> its IPv4 and IPv6 addresses."""
    out: dict[str, list[NetworkAddress]] = {}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            entries = out.setdefault(name, [])
            address = _ipv4(sock, name, _SIOCGIFADDR)
            if address is not None:
                entries.append(
                    NetworkAddress(
                        address=address,
                        netmask=_ipv4(sock, name, _SIOCGIFNETMASK),
                        family="IPv4",
                        internal=address.startswith("127."),
                    )
                )
    try:
        with open(if_inet6, encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                raw, prefix, name = parts[0], int(parts[2], 16), parts[5]
                address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(raw))
                out.setdefault(name, []).append(
                    NetworkAddress(
                        address=address,
                        prefix_length=prefix,
                        family="IPv6",
                        internal=address == "::1",
                    )
                )
    except OSError:
        pass
    return {name: tuple(entries) for name, entries in out.items()}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


@implementer(IHost)
class SystemInfo:
    """
    Host status for the dispatcher and the Panel link (the ``IHost``).

    ``reactor`` runs blocking reads in its thread pool; ``docker_version``
    answers the engine's version (or None when unreachable) for ``system_info``.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        docker_version: Callable[[], Deferred[str | None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._docker_version = docker_version
        self._previous_cpu: tuple[int, int] | None = None

    async def _in_thread(self, f: Callable[[], Any]) -> Any:
        if IReactorThreads.providedBy(self._reactor):
            return await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f)
        # A test clock has no threads: the reads are local and quick anyway.
        return f()

    def _now(self) -> float:
        if IReactorTime.providedBy(self._reactor):
            return float(self._reactor.seconds())
        return time.time()

    def _read_host(self) -> dict[str, Any]:
        """Blocking: every host figure at once."""
        cpu_times = read_cpu_times()
        mem = read_meminfo()
        total_disk, used_disk, free_disk = disk_usage(self._config.data_dir)
        mem_total = mem.get("MemTotal", 0)
        mem_free = mem.get("MemAvailable", mem.get("MemFree", 0))
        return {
            "cpu_times": cpu_times,
            "mem_total": mem_total,
            "mem_free": mem_free,
            "disk_total": total_disk,
            "disk_used": used_disk,
            "disk_free": free_disk,
            "uptime": read_uptime(),
            "load": _load(),
            "disk_mode": disk_mode(self._config),
        }

    async def snapshot(self) -> HostSnapshot:
        """The host's CPU, memory and disk use now (bytes and percents)."""
        host = await self._in_thread(self._read_host)
        current = host["cpu_times"]
        previous = self._previous_cpu or (0, 0)
        self._previous_cpu = current
        mem_used = max(0, host["mem_total"] - host["mem_free"])

        def percent(used: int, total: int) -> float:
            return round(100.0 * used / total, 2) if total else 0.0

        return HostSnapshot(
            cpu=cpu_percent(previous, current),
            cpu_count=os.cpu_count() or 1,
            memory=HostUsage(
                total=host["mem_total"],
                used=mem_used,
                free=host["mem_free"],
                percent=percent(mem_used, host["mem_total"]),
            ),
            disk=HostUsage(
                total=host["disk_total"],
                used=host["disk_used"],
                free=host["disk_free"],
                percent=percent(host["disk_used"], host["disk_total"]),
            ),
            uptime=int(host["uptime"]),
            load=tuple(host["load"]),
            timestamp=_now_iso(),
        )

    async def system_load(self) -> HostLoad:
        """CPU, memory and disk percents, for the pong's ``systemLoad``."""
        snap = await self.snapshot()
        return HostLoad(cpu=snap.cpu, memory=snap.memory.percent, disk=snap.disk.percent)

    async def _docker(self) -> str | None:
        if self._docker_version is None:
            return None
        try:
            return await self._docker_version()
        except Exception as e:
            # Docker being down is a fact to report, not an error of ours.
            self.log.warn("docker version unavailable: {error}", error=str(e))  # noqa: G010
            return None

    async def system_info(self, node_id: str | None = None) -> HostInfo:
        """What the node is, with real values (the ``system_info`` data)."""
        host = await self._in_thread(self._read_host)
        networks = await self._in_thread(network_interfaces)
        docker_version = await self._docker()
        return HostInfo(
            node_id=node_id or self._config.node_id,
            agent_version=__version__,
            hostname=socket.gethostname(),
            os=platform.system().lower(),
            release=platform.release(),
            arch=platform.machine(),
            cpu_model=cpu_model(),
            cpu_count=os.cpu_count() or 1,
            memory_total=host["mem_total"],
            memory_free=host["mem_free"],
            disk_total=host["disk_total"],
            disk_free=host["disk_free"],
            uptime=int(host["uptime"]),
            load_average=tuple(host["load"]),
            docker_version=docker_version,
            capabilities=tuple(CAPABILITIES),
            networks=networks,
            timestamp=_now_iso(),
            disk_mode=host["disk_mode"],
        )


def make_host(
    reactor: Any,
    config: AgentConfig,
    *,
    engine_version: Callable[[], Deferred[str | None]] | None = None,
) -> SystemInfo:
    """The host's view for the action registry and the Panel link (``IHost``)."""
    return SystemInfo(reactor, config, docker_version=engine_version)
