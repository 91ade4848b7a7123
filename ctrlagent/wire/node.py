"""
The node's own figures as records, and their shapes for the Panel.

``ctrlagent.system`` (the ``IHost``) returns these; each shape is registered
with :func:`ctrlagent.wire.json.to_json` beside its record, with the keys the
Panel has always read (PROTOCOL.md sections 2 and 3):

- ``HostSnapshot``: ``get_system_metrics`` and ``system.status`` data,
  ``{cpu, cpuCount, memory: {total, used, free, percent}, disk: {...},
  uptime, load, timestamp}``;
- ``HostInfo``: the ``system_info`` frame and action, the union of the
  Panel's and the Go agent's shapes;
- ``HostLoad``: the ``systemLoad`` of a pong, ``{cpu, memory, disk}`` percents.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ctrlagent.wire.json import to_json


@dataclass(frozen=True)
class HostUsage:
    """Bytes of a resource (memory, the data directory's disk) and the used share, 0-100."""

    total: int
    used: int
    free: int
    percent: float


@to_json.register
def _usage_shape(usage: HostUsage) -> dict[str, Any]:
    return {
        "total": usage.total,
        "used": usage.used,
        "free": usage.free,
        "percent": usage.percent,
    }


@dataclass(frozen=True)
class HostSnapshot:
    """The host's load now: CPU percent since the previous snapshot, memory, disk."""

    cpu: float
    cpu_count: int
    memory: HostUsage
    disk: HostUsage
    uptime: int  # seconds since boot
    load: tuple[float, ...]  # 1, 5 and 15 minute load averages
    timestamp: str  # ISO 8601, UTC ("...Z")


@to_json.register
def _snapshot_shape(snap: HostSnapshot) -> dict[str, Any]:
    return {
        "cpu": snap.cpu,
        "cpuCount": snap.cpu_count,
        "memory": to_json(snap.memory),
        "disk": to_json(snap.disk),
        "uptime": snap.uptime,
        "load": list(snap.load),
        "timestamp": snap.timestamp,
    }


@dataclass(frozen=True)
class HostLoad:
    """The percents a pong reports: CPU, memory and the data directory's disk."""

    cpu: float
    memory: float
    disk: float


@to_json.register
def _load_shape(load: HostLoad) -> dict[str, Any]:
    return {"cpu": load.cpu, "memory": load.memory, "disk": load.disk}


@dataclass(frozen=True)
class NetworkAddress:
    """
    One address of a network interface, in Node's ``os.networkInterfaces()``
    shape (which the Panel displays): IPv4 with its ``netmask``, IPv6 with its
    ``prefixLength``.
    """

    address: str
    family: str  # "IPv4" | "IPv6"
    internal: bool
    netmask: str | None = None  # IPv4 only (None when unknown)
    prefix_length: int | None = None  # IPv6 only


@to_json.register
def _address_shape(address: NetworkAddress) -> dict[str, Any]:
    if address.family == "IPv6":
        return {
            "address": address.address,
            "prefixLength": address.prefix_length,
            "family": address.family,
            "internal": address.internal,
        }
    return {
        "address": address.address,
        "netmask": address.netmask,
        "family": address.family,
        "internal": address.internal,
    }


@dataclass(frozen=True)
class HostInfo:
    """What the node is: identity, hardware, engine and capabilities."""

    node_id: str
    agent_version: str
    hostname: str
    os: str  # platform.system(), lower case ("linux")
    release: str
    arch: str
    cpu_model: str
    cpu_count: int
    memory_total: int
    memory_free: int
    disk_total: int
    disk_free: int
    uptime: int
    load_average: tuple[float, ...]
    docker_version: str | None  # None: the engine did not answer
    capabilities: tuple[str, ...]
    # Interface name -> its addresses.
    networks: Mapping[str, tuple[NetworkAddress, ...]] = field(default_factory=dict)
    timestamp: str = ""
    # How disk limits are enforced on this node: "btrfs" (qgroups) or "walk".
    disk_mode: str = "walk"


@to_json.register
def _info_shape(info: HostInfo) -> dict[str, Any]:
    # Both known shapes at once: each name the Panel or the Go agent reads.
    return {
        "nodeId": info.node_id,
        "agentVersion": info.agent_version,
        "version": info.agent_version,
        "hostname": info.hostname,
        "os": info.os,
        "platform": info.os,
        "release": info.release,
        "arch": info.arch,
        "cpu": info.cpu_model,
        "cpuCount": info.cpu_count,
        "cpus": info.cpu_count,
        "memory": info.memory_total,
        "totalMemory": info.memory_total,
        "freeMemory": info.memory_free,
        "totalDisk": info.disk_total,
        "freeDisk": info.disk_free,
        "uptime": info.uptime,
        "loadAverage": list(info.load_average),
        "dockerVersion": info.docker_version,
        "docker": info.docker_version is not None,
        "capabilities": list(info.capabilities),
        "networks": {
            name: [to_json(address) for address in addresses]
            for name, addresses in info.networks.items()
        },
        "timestamp": info.timestamp,
        "diskMode": info.disk_mode,
    }


__all__ = ["HostInfo", "HostLoad", "HostSnapshot", "HostUsage", "NetworkAddress"]
