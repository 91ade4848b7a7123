"""
Container resource figures from the engine's raw stats documents.

Pure code: it turns one ``GET /containers/{id}/stats`` document into a
``ContainerStats`` with the same arithmetic as ``docker stats``:

- CPU percent: container CPU time delta over system CPU time delta, times the
  number of online CPUs, times 100 (so 2 busy cores read 200 %).
- Memory used: usage minus the inactive file cache (``total_inactive_file`` on
  cgroup v1, ``inactive_file`` on cgroup v2), which is what the kernel can
  reclaim and not what the server uses.
- Network: rx/tx bytes summed over every interface.
- Block I/O: read/write bytes summed over every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ContainerStats", "parse_stats", "cpu_percent", "memory_used"]


@dataclass(frozen=True)
class ContainerStats:
    """One sample of a container's resource use."""

    cpu_percent: float
    memory_bytes: int
    memory_limit_bytes: int
    rx_bytes: int
    tx_bytes: int
    blk_read: int
    blk_write: int
    pids: int
    read_time: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The figures as a plain mapping (for JSON messages)."""
        return {
            "cpu_percent": self.cpu_percent,
            "memory_bytes": self.memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "blk_read": self.blk_read,
            "blk_write": self.blk_write,
            "pids": self.pids,
        }


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def cpu_percent(doc: dict[str, Any]) -> float:
    """CPU use in percent of one core, as ``docker stats`` computes it."""
    cpu = doc.get("cpu_stats") or {}
    pre = doc.get("precpu_stats") or {}
    usage = cpu.get("cpu_usage") or {}
    pre_usage = pre.get("cpu_usage") or {}
    cpu_delta = _int(usage.get("total_usage")) - _int(pre_usage.get("total_usage"))
    system_delta = _int(cpu.get("system_cpu_usage")) - _int(pre.get("system_cpu_usage"))
    online = _int(cpu.get("online_cpus")) or len(usage.get("percpu_usage") or ()) or 1
    if cpu_delta <= 0 or system_delta <= 0 or not _int(pre.get("system_cpu_usage")):
        return 0.0
    return cpu_delta / system_delta * online * 100.0


def memory_used(doc: dict[str, Any]) -> int:
    """Memory used without the reclaimable inactive file cache."""
    mem = doc.get("memory_stats") or {}
    usage = _int(mem.get("usage"))
    stats = mem.get("stats") or {}
    if "total_inactive_file" in stats:
        inactive = _int(stats["total_inactive_file"])
        if inactive < usage:
            return usage - inactive
    inactive = _int(stats.get("inactive_file"))
    if inactive < usage:
        return usage - inactive
    return usage


def _blkio(doc: dict[str, Any]) -> tuple[int, int]:
    entries = (doc.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    read = write = 0
    for entry in entries:
        op = str(entry.get("op", "")).lower()
        if op == "read":
            read += _int(entry.get("value"))
        elif op == "write":
            write += _int(entry.get("value"))
    return read, write


def parse_stats(doc: Any) -> ContainerStats:
    """
    Turn one raw stats document into a ``ContainerStats``.

    A document that is not an object (the engine sends ``null`` for a
    container that went away mid-stream) reads as all zeroes, like a stopped
    container, rather than failing the stats loop.
    """
    if not isinstance(doc, dict):
        doc = {}
    rx = tx = 0
    for iface in (doc.get("networks") or {}).values():
        if not isinstance(iface, dict):
            continue
        rx += _int(iface.get("rx_bytes"))
        tx += _int(iface.get("tx_bytes"))
    blk_read, blk_write = _blkio(doc)
    return ContainerStats(
        cpu_percent=round(cpu_percent(doc), 3),
        memory_bytes=memory_used(doc),
        memory_limit_bytes=_int((doc.get("memory_stats") or {}).get("limit")),
        rx_bytes=rx,
        tx_bytes=tx,
        blk_read=blk_read,
        blk_write=blk_write,
        pids=_int((doc.get("pids_stats") or {}).get("current")),
        read_time=str(doc.get("read", "")),
    )
