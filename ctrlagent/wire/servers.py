"""
The server domain's results as records, and their shapes on the Panel's wire.

``ServerManager`` (and ``ctrlagent.testing.FakeServerManager``) return these
frozen dataclasses; each one's JSON shape is registered with ``to_json``
beside it, giving exactly the keys the Panel reads (PROTOCOL.md section 2):
camelCase, lowercase ``status`` plus ``panelStatus``, ISO timestamps with
milliseconds (``wire.time.iso_ms``).  Optional keys are left out when they
have nothing to say, as the Panel has always seen them.

``coerce_metrics`` reads a metrics mapping of unknown quality (a sample from
elsewhere, a test's dict) into a ``Metrics`` record: a missing or odd field
becomes zero rather than breaking the Panel's poller.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ctrlagent.records import record
from ctrlagent.wire.json import to_json
from ctrlagent.wire.time import MAX_EPOCH, iso_ms, iso_ms_or_none, parse_timestamp

__all__ = [
    "Allocation",
    "Metrics",
    "CrashReport",
    "ServerBrief",
    "ServerStatus",
    "Created",
    "Deleted",
    "Updated",
    "Ack",
    "ConsoleStatus",
    "coerce_metrics",
    "coerced_as_is",
]


@record
class Metrics:
    """
    A server's latest resource sample in the Panel's units: CPU in percent
    of one core, memory and disk in MB, network and block I/O in bytes,
    ``uptime`` in seconds, ``at`` the time of the answer (epoch seconds).
    """

    cpu: float = 0.0
    memory_mb: float = 0.0
    memory_limit_mb: float = 0.0
    disk_mb: float = 0.0
    rx: int = 0
    tx: int = 0
    blk_read: int = 0
    blk_write: int = 0
    pids: int = 0
    uptime: float = 0.0
    players: int = 0
    at: float = 0.0


@to_json.register
def _metrics(m: Metrics) -> dict[str, Any]:
    return {
        "cpu": m.cpu,
        "memory": m.memory_mb,
        "memoryLimit": m.memory_limit_mb,
        "disk": m.disk_mb,
        "network": {"in": m.rx, "out": m.tx},
        "blockIo": {"read": m.blk_read, "write": m.blk_write},
        "pids": m.pids,
        "uptime": m.uptime,
        "players": m.players,
        "timestamp": iso_ms(m.at),
    }


@dataclass(frozen=True)
class CrashReport:
    """What the agent knows about a server's last crash (``lines``: the console's tail)."""

    at: float
    exit_code: int | None
    oom_killed: bool
    lines: tuple[str, ...]
    restarted: bool


@to_json.register
def _crash(c: CrashReport) -> dict[str, Any]:
    return {
        "timestamp": iso_ms(c.at),
        "exitCode": c.exit_code,
        "oomKilled": c.oom_killed,
        "lines": list(c.lines),
        "restarted": c.restarted,
    }


@record
class Allocation:
    """
    A port a server publishes: ``ip:port`` on the host, ``internal`` in the
    container, on each of ``protocols``; the ``primary`` one is
    ``{{SERVER_PORT}}``.
    """

    ip: str
    port: int
    internal: int
    protocols: tuple[str, ...] = ("tcp", "udp")
    primary: bool = False


@to_json.register
def _allocation(a: Allocation) -> dict[str, Any]:
    return {
        "ip": a.ip,
        "port": a.port,
        "internal": a.internal,
        "protocol": "/".join(a.protocols),
        "protocols": list(a.protocols),
        "primary": a.primary,
    }


@dataclass(frozen=True)
class ServerBrief:
    """The short answer of a power action: where the server is now."""

    server_id: str
    state: str
    panel_status: str
    container_id: str | None


@to_json.register
def _brief(b: ServerBrief) -> dict[str, Any]:
    return {
        "serverId": b.server_id,
        "status": b.state,
        "panelStatus": b.panel_status,
        "containerId": b.container_id,
    }


@record
class ServerStatus:
    """
    A server's status: ``resources`` and ``uptime`` while it is active,
    ``error`` after a failure, ``last_crash`` once it crashed,
    ``power_action`` while one runs (each left out of the JSON when absent).
    """

    server_id: str
    name: str
    state: str
    panel_status: str
    container_id: str | None
    desired_state: str
    image: str
    aliases: tuple[str, ...] = ()
    error: str | None = None
    resources: Metrics | None = None
    uptime: float | None = None
    last_crash: CrashReport | None = None
    power_action: str | None = None
    allocations: tuple[Allocation, ...] = ()


@to_json.register
def _status(s: ServerStatus) -> dict[str, Any]:
    out: dict[str, Any] = {
        "serverId": s.server_id,
        "name": s.name,
        "status": s.state,
        "panelStatus": s.panel_status,
        "containerId": s.container_id,
        "desiredState": s.desired_state,
        "image": s.image,
        "aliases": list(s.aliases),
    }
    if s.allocations:
        out["allocations"] = [_allocation(a) for a in s.allocations]
    if s.error:
        out["error"] = s.error
    if s.resources is not None:
        out["resources"] = _metrics(s.resources)
    if s.uptime is not None:
        out["uptime"] = s.uptime
    if s.last_crash is not None:
        out["lastCrash"] = _crash(s.last_crash)
    if s.power_action:
        out["powerAction"] = s.power_action
    return out


@dataclass(frozen=True)
class Created:
    """
    A server was defined (and installed, or is still installing in the
    background), publishing ``allocations``; ``warnings`` are what the
    engine said it accepted but does not apply (a limit this kernel lacks).
    """

    server_id: str
    container_id: str | None
    state: str
    allocations: tuple[Allocation, ...] = ()
    warnings: tuple[str, ...] = ()


@to_json.register
def _created(c: Created) -> dict[str, Any]:
    out: dict[str, Any] = {
        "serverId": c.server_id, "containerId": c.container_id, "status": c.state,
    }
    return _extras(out, c.allocations, c.warnings)


def _extras(
    out: dict[str, Any], allocations: tuple[Allocation, ...], warnings: tuple[str, ...]
) -> dict[str, Any]:
    """``out`` with ``allocations`` and ``warnings`` when there are any."""
    if allocations:
        out["allocations"] = [_allocation(a) for a in allocations]
    if warnings:
        out["warnings"] = list(warnings)
    return out


@dataclass(frozen=True)
class Deleted:
    """A server was removed (its files too when ``purged``)."""

    server_id: str
    purged: bool


@to_json.register
def _deleted(d: Deleted) -> dict[str, Any]:
    return {"serverId": d.server_id, "status": "deleted", "purged": d.purged}


@dataclass(frozen=True)
class Updated:
    """
    A server's definition changed (``limits_applied_live``: its container
    has the new limits; ``warnings``: what the engine said it does not apply).
    """

    brief: ServerBrief
    limits_applied_live: bool
    warnings: tuple[str, ...] = ()


@to_json.register
def _updated(u: Updated) -> dict[str, Any]:
    return _extras({**_brief(u.brief), "limitsAppliedLive": u.limits_applied_live}, (),
                   u.warnings)


@dataclass(frozen=True)
class Ack:
    """The action was done for ``server_id`` (a console command written, ...)."""

    server_id: str


@to_json.register
def _ack(a: Ack) -> dict[str, Any]:
    return {"serverId": a.server_id}


@dataclass(frozen=True)
class ConsoleStatus:
    """Whether the console is followed, when it last printed, how many lines it keeps."""

    connected: bool
    last_activity: float | None
    buffer_size: int


@to_json.register
def _console_status(c: ConsoleStatus) -> dict[str, Any]:
    return {
        "connected": c.connected,
        "lastActivity": iso_ms_or_none(c.last_activity),
        "bufferSize": c.buffer_size,
    }


def _float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _int(value: Any) -> int:
    number = _float(value)
    try:
        return int(number)
    except (OverflowError, ValueError):  # pragma: no cover - _float is finite
        return 0


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# Integers below this survive coerce_metrics's float conversion exactly.
_EXACT_INT = 2**53
_FLOAT_FIELDS = ("cpu", "memory_mb", "memory_limit_mb", "disk_mb", "uptime")
_INT_FIELDS = ("rx", "tx", "blk_read", "blk_write", "pids", "players")


def coerced_as_is(m: Metrics) -> bool:
    """
    Whether ``coerce_metrics`` of ``m``'s Panel shape gives ``m``'s very shape
    back: every figure a finite float or an exactly convertible integer where
    the Panel's shape has one, and a time ``iso_ms`` writes as it is.  Such a
    record (what the agent's own servers answer) needs no round trip.
    """
    if type(m) is not Metrics or type(m.at) not in (float, int) or not 0 <= m.at <= MAX_EPOCH:
        return False
    for name in _FLOAT_FIELDS:
        value = getattr(m, name)
        if type(value) is not float or not math.isfinite(value):
            return False
    for name in _INT_FIELDS:
        value = getattr(m, name)
        if type(value) is not int or not -_EXACT_INT < value < _EXACT_INT:
            return False
    return True


def coerce_metrics(raw: Mapping[str, Any], at: float) -> Metrics:
    """
    A ``Metrics`` record from a metrics mapping in the Panel's shape, whatever
    it holds: numbers where numbers belong (an odd or missing field is zero),
    an integer ``players``, and ``at`` unless ``timestamp`` tells a time.
    """
    network = _mapping(raw.get("network"))
    block = _mapping(raw.get("blockIo"))
    stamped = parse_timestamp(raw.get("timestamp"))
    return Metrics(
        cpu=_float(raw.get("cpu")),
        memory_mb=_float(raw.get("memory")),
        memory_limit_mb=_float(raw.get("memoryLimit")),
        disk_mb=_float(raw.get("disk")),
        rx=_int(network.get("in")),
        tx=_int(network.get("out")),
        blk_read=_int(block.get("read")),
        blk_write=_int(block.get("write")),
        pids=_int(raw.get("pids")),
        uptime=_float(raw.get("uptime")),
        players=_int(raw.get("players")),
        at=stamped if stamped is not None else at,
    )
