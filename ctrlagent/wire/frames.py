"""
Frames the agent sends on the WebSocket link to the Panel (PROTOCOL.md section 3).

Each builder returns a plain dict for ``wire.json.encode`` (the one encoder of
both transports, which never fails).  Every frame is stamped with
``wire.time.iso_ms`` of the time it is given (seconds since the epoch), so the
link decides what "now" is and tests stay deterministic.  The frames the Panel
sends are read in ``wire.incoming``.

Pure: no reactor, no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ctrlagent.errors import CtrlAgentError
from ctrlagent.events import BackupProgress, BackupStatusChanged, ResourceUpdate, StatusChanged
from ctrlagent.wire.command import ActionResult
from ctrlagent.wire.json import to_json
from ctrlagent.wire.time import iso_ms


def _response(command_id: Any, id_field: str, now: float, success: bool) -> dict[str, Any]:
    frame: dict[str, Any] = {"id": command_id}
    if id_field != "id":
        # A legacy frame's requestId/messageId goes back under its own name too.
        frame[id_field] = command_id
    frame.update(type="response", timestamp=iso_ms(now), success=success)
    return frame


def response_success(
    command_id: Any, result: ActionResult, now: float, *, id_field: str = "id"
) -> dict[str, Any]:
    """The final reply to a command that worked."""
    frame = _response(command_id, id_field, now, True)
    if result.message is not None:
        frame["message"] = result.message
    frame["data"] = to_json(result.data)
    return frame


def response_failure(
    command_id: Any, code: str, message: str, now: float, *, id_field: str = "id"
) -> dict[str, Any]:
    """The final reply to a command that failed (``error`` is an object on WebSocket)."""
    frame = _response(command_id, id_field, now, False)
    frame["error"] = {"code": code, "message": message}
    return frame


def response_for_error(
    command_id: Any, error: CtrlAgentError, now: float, *, id_field: str = "id"
) -> dict[str, Any]:
    """``response_failure`` for a ``CtrlAgentError``."""
    return response_failure(command_id, error.code, error.message, now, id_field=id_field)


def error_frame(error: CtrlAgentError, now: float, **context: Any) -> dict[str, Any]:
    """
    ``{"type": "error"}``: a failure that no command id can be given to (a frame
    that cannot be decoded, a legacy command sent without an id).  The error is
    both the Issue #27 ``error`` object and the Go agent's legacy ``data`` shape;
    ``context`` (``action``, ``serverId``, ``frameType``) goes into ``data``.
    """
    data: dict[str, Any] = {"code": error.code, "message": error.message}
    data.update({key: value for key, value in context.items() if value is not None})
    return {
        "type": "error",
        "timestamp": iso_ms(now),
        "error": {"code": error.code, "message": error.message},
        "data": data,
    }


def heartbeat(node_id: str, now: float) -> dict[str, Any]:
    """The 30-second liveness frame; the Panel marks the node offline after 60 s without it."""
    stamp = iso_ms(now)
    return {
        "type": "heartbeat",
        "data": {"nodeId": node_id, "timestamp": stamp, "status": "online"},
        "timestamp": stamp,
    }


def _load_figure(value: Any) -> float:
    """A percent from a bare number or a ``{..., "percent"}`` host-snapshot entry."""
    if isinstance(value, Mapping):
        value = value.get("percent")
    return _number(value)


def _as_mapping(value: Any) -> Mapping[str, Any]:
    """A domain result (a record or a mapping) as its JSON object; ``{}`` when it is not one."""
    value = to_json(value)
    return value if isinstance(value, Mapping) else {}


def pong(ping_id: Any, now: float, *, active_servers: int, system_load: Any) -> dict[str, Any]:
    """
    The answer to ``{"type": "ping", "id": X}``; ``system_load`` is the host's
    load (a record or a mapping of ``cpu``/``memory``/``disk`` percents).
    """
    load = _as_mapping(system_load)
    return {
        "type": "pong",
        "id": ping_id,
        "timestamp": iso_ms(now),
        "data": {
            "agentStatus": "online",
            "activeServers": active_servers,
            "systemLoad": {
                "cpu": _load_figure(load.get("cpu")),
                "memory": _load_figure(load.get("memory")),
                "disk": _load_figure(load.get("disk")),
            },
        },
    }


def system_info(info: Any, node_id: str, now: float) -> dict[str, Any]:
    """The ``system_info`` frame (``info``: a record or a mapping); ``nodeId`` is always present."""
    data = dict(_as_mapping(info))
    data.setdefault("nodeId", node_id)
    return {"type": "system_info", "timestamp": iso_ms(now), "data": data}


def event(name: str, data: Mapping[str, Any], now: float) -> dict[str, Any]:
    """An "Issue #27" event frame (no id)."""
    return {"type": "event", "timestamp": iso_ms(now), "event": name, "data": dict(data)}


def legacy(frame_type: str, data: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A legacy typed frame ``{type, data}`` for older consumers."""
    return {"type": frame_type, "timestamp": iso_ms(now), "data": dict(data)}


# The frame that answers each legacy typed frame that worked (and came
# without an id: with one, a ``response`` answers it).  The Panels of that
# generation read ``file_content`` for files and ``server_status`` for
# servers; a failure is an ``error`` frame whatever the type.
LEGACY_ANSWER_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "file_read": "file_content",
        "file_write": "file_content",
        "server_create": "server_status",
        "server_start": "server_status",
        "server_stop": "server_status",
        "server_restart": "server_status",
        "server_delete": "server_status",
        "server_command": "server_status",
        "server_update": "server_status",
        "server_suspend": "server_status",
        "server_unsuspend": "server_status",
        "server_reinstall": "server_status",
        "server_power": "server_status",
    }
)


def legacy_answer(
    frame_type: str,
    data: Any,
    params: Mapping[str, Any],
    server_id: str | None,
    now: float,
    *,
    status: str | None = None,
) -> dict[str, Any]:
    """
    The answer to a legacy typed frame (``frame_type``) whose action worked:
    ``data`` is the action's answer, ``params`` what the frame asked.

    - ``file_read``: ``file_content {serverId, path, content, encoding, size, modified}``;
    - ``file_write``: ``file_content {serverId, path, size, modified, written: true}``
      (no ``content``: the Panel just sent it);
    - the server frames: ``server_status {serverId, status, ..}``, the status
      from the answer, else ``status`` (the server's current one), else ``unknown``.
    """
    body = dict(_as_mapping(data))
    answer = LEGACY_ANSWER_TYPES.get(frame_type, "server_status")
    if server_id is not None:
        body.setdefault("serverId", server_id)
    if frame_type == "file_write":
        body = {
            "serverId": body.get("serverId"),
            "path": body.get("path", params.get("path")),
            "size": body.get("size"),
            "modified": body.get("modified"),
            "written": True,
        }
    elif answer == "server_status" and not isinstance(body.get("status"), str):
        body["status"] = status or "unknown"
    return legacy(answer, body, now)


def status_changed_frames(
    server_id: str,
    previous: str,
    current: str,
    now: float,
    *,
    error: str | None = None,
    container_id: str | None = None,
    with_legacy: bool = True,
) -> list[dict[str, Any]]:
    """``server_status_changed`` (plus the legacy ``server_status``) for one transition."""
    data: dict[str, Any] = {
        "serverId": server_id,
        "previousStatus": previous,
        "currentStatus": current,
        "status": current,
    }
    if error is not None:
        data["error"] = error
    if container_id is not None:
        data["containerId"] = container_id
    frames = [event("server_status_changed", data, now)]
    if with_legacy:
        frames.append(legacy("server_status", {"serverId": server_id, "status": current}, now))
    return frames


def frames_for_status(ev: StatusChanged, *, with_legacy: bool = True) -> list[dict[str, Any]]:
    """The frames a ``StatusChanged`` event becomes."""
    return status_changed_frames(
        ev.server_id,
        ev.previous,
        ev.current,
        ev.timestamp,
        error=ev.error,
        container_id=ev.container_id,
        with_legacy=with_legacy,
    )


def console_frames(
    server_id: str,
    stream: str,
    lines: Sequence[str],
    timestamp: float,
    *,
    with_legacy: bool = True,
) -> list[dict[str, Any]]:
    """
    One batch of console lines of one server and stream; ``timestamp`` is the
    first line's.

    ``server_log`` carries both ``message`` (the lines joined with ``\\n``, for a
    Panel that shows one message per event) and ``lines`` (the list).
    """
    if not lines:
        return []
    message = "\n".join(lines)
    stamp = iso_ms(timestamp)
    data = {
        "serverId": server_id,
        "stream": stream,
        "message": message,
        "lines": list(lines),
        "timestamp": stamp,
    }
    frames = [event("server_log", data, timestamp)]
    if with_legacy:
        frames.append(
            legacy(
                "server_output",
                {"serverId": server_id, "output": message, "stream": stream, "timestamp": stamp},
                timestamp,
            )
        )
    return frames


def _number(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def resource_frames(
    ev: ResourceUpdate, now: float, *, status: str | None = None, with_legacy: bool = True
) -> list[dict[str, Any]]:
    """
    ``resource_update`` (plus the legacy ``server_status`` with ``stats`` when
    the server's status is known) for one sample.

    The Panel breaks on a missing ``network`` and wants ``players`` as an integer,
    so both are always present whatever the sample holds.
    """
    metrics = _as_mapping(ev.metrics)
    network = metrics.get("network")
    if not isinstance(network, Mapping):
        network = {}
    data: dict[str, Any] = dict(metrics)
    data.update(
        {
            "serverId": ev.server_id,
            "cpu": _number(metrics.get("cpu")),
            "memory": _number(metrics.get("memory")),
            "disk": _number(metrics.get("disk")),
            "network": {
                "in": int(_number(network.get("in"))),
                "out": int(_number(network.get("out"))),
            },
            "players": int(_number(metrics.get("players"))),
        }
    )
    frames = [event("resource_update", data, now)]
    if with_legacy and status is not None:
        stats = {k: v for k, v in data.items() if k != "serverId"}
        legacy_data = {"serverId": ev.server_id, "status": status, "stats": stats}
        frames.append(legacy("server_status", legacy_data, now))
    return frames


def events_dropped(
    node_id: str, dropped: int, now: float, reasons: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """
    Tells the Panel that ``dropped`` older event frames were lost (never
    responses); ``reasons`` counts them by why they had to wait
    (``linkDown``, ``panelNotReading``, ``synchronising``).
    """
    data: dict[str, Any] = {"nodeId": node_id, "dropped": dropped}
    if reasons:
        data["reasons"] = dict(reasons)
    return event("events_dropped", data, now)


def backup_progress(ev: BackupProgress, now: float) -> dict[str, Any]:
    """
    ``backup_progress``: how far a running backup or restore (``operation``)
    has come: ``{serverId, backupId, operation, bytes, files, totalBytes, percent}``.
    """
    return event(
        "backup_progress",
        {
            "serverId": ev.server_id,
            "backupId": ev.backup_id,
            "operation": ev.operation,
            "bytes": ev.bytes,
            "files": ev.files,
            "totalBytes": ev.total_bytes,
            "percent": _number(ev.percent),
        },
        now,
    )


def backup_status_changed(ev: BackupStatusChanged, now: float) -> dict[str, Any]:
    """
    ``backup_status_changed``: a backup or restore started (``running``) or
    ended (``completed``/``failed``): ``{serverId, backupId, operation,
    status, size, checksum?, error?}``.
    """
    data: dict[str, Any] = {
        "serverId": ev.server_id,
        "backupId": ev.backup_id,
        "operation": ev.operation,
        "status": ev.status,
        "size": ev.size,
    }
    if ev.checksum is not None:
        data["checksum"] = ev.checksum
    if ev.error is not None:
        data["error"] = ev.error
    return event("backup_status_changed", data, now)


__all__ = [
    "LEGACY_ANSWER_TYPES",
    "backup_progress",
    "backup_status_changed",
    "console_frames",
    "error_frame",
    "event",
    "events_dropped",
    "frames_for_status",
    "heartbeat",
    "legacy",
    "legacy_answer",
    "pong",
    "resource_frames",
    "response_failure",
    "response_for_error",
    "response_success",
    "status_changed_frames",
    "system_info",
]
