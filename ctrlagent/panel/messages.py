"""
Frames of the WebSocket link to the Panel (PROTOCOL.md section 3), parsed and built.

Pure: no reactor, no I/O, no clock.  Every builder takes the time it should
stamp (seconds since the epoch) so the link decides what "now" is and tests
stay deterministic.

Incoming frames are classified into a small set of typed messages:

- ``CommandFrame``: an "Issue #27" command, flat or with its fields nested in
  ``data``, or a legacy typed frame (``server_start``, ``file_read``, ...)
  mapped onto a section 2 action (see ``LEGACY_ACTIONS``);
- ``InvalidCommand``: something meant as a command that cannot be run (no
  action, a bad field); the link answers it with a failure response when it
  carries an id;
- ``SystemInfoRequest`` and ``PingFrame``;
- ``Ignored``: everything else (bad JSON, non-object frames, a browser's
  ``console``/``stats`` frames, unknown types).  The link never closes the
  connection because of a frame it does not understand.

Outgoing frames are plain dicts built here and encoded with ``encode``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Union

from ctrlagent.commands import ActionResult, Command, parse_command
from ctrlagent.errors import CtrlAgentError, InvalidInput
from ctrlagent.events import ResourceUpdate, StatusChanged

# Legacy typed frames (``{type, data}``) and the section 2 action each one means.
# ``server_power`` is resolved from its ``data.action`` (see ``POWER_ACTIONS``).
LEGACY_ACTIONS: Mapping[str, str] = {
    "server_create": "create_server",
    "server_start": "start_server",
    "server_stop": "stop_server",
    "server_restart": "restart_server",
    "server_delete": "delete_server",
    "server_command": "send_server_command",
    "file_read": "read_file",
    "file_write": "write_file",
    "server_update": "update_server",
    "server_suspend": "suspend_server",
    "server_unsuspend": "unsuspend_server",
    "server_reinstall": "reinstall_server",
}

# ``server_power {serverId, action}``: the power word and the action it means.
POWER_ACTIONS: Mapping[str, str] = {
    "start": "start_server",
    "stop": "stop_server",
    "restart": "restart_server",
    "kill": "kill_server",
}

# Frame types the Panel (or a browser sharing its socket) may send that carry
# nothing for the agent.  Listed only so that the log says "ignored" rather
# than "unknown".
KNOWN_IGNORED_TYPES = frozenset(
    {"console", "stats", "response", "event", "heartbeat", "pong", "system_info", "welcome",
     "connected", "ack", "error"}
)


@dataclass(frozen=True)
class CommandFrame:
    """A command to dispatch. ``legacy`` names the legacy frame type it came as."""

    command: Command
    legacy: str | None = None


@dataclass(frozen=True)
class InvalidCommand:
    """A frame meant as a command that cannot be run; answered when it has an id."""

    command_id: str | None
    error: CtrlAgentError


@dataclass(frozen=True)
class SystemInfoRequest:
    """``{"type": "system_info_request"}``: the Panel wants ``system_info`` now."""


@dataclass(frozen=True)
class PingFrame:
    """``{"type": "ping", "id": X}``: answer with a pong echoing ``X`` as it came."""

    ping_id: Any


@dataclass(frozen=True)
class Ignored:
    """A frame the agent does not act on, with why (for a debug log line)."""

    reason: str
    frame_type: str | None = None


Incoming = Union[CommandFrame, InvalidCommand, SystemInfoRequest, PingFrame, Ignored]


# --- time -----------------------------------------------------------------------------------

# datetime cannot represent years beyond 9999; clamp rather than raise on odd clocks.
_MAX_EPOCH = 253402300799.0


@functools.lru_cache(maxsize=64)
def _iso_second(whole: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of a whole epoch second; cached, as frames share seconds."""
    return datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_timestamp(seconds: float) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z`` (what the Panel's ``new Date()`` parses)."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        seconds = 0.0
    seconds = min(max(float(seconds), 0.0), _MAX_EPOCH)
    # As datetime does it: round to the microsecond, then cut to milliseconds
    # (every console frame is stamped, so this avoids a datetime per frame).
    frac, whole = math.modf(seconds)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return "{}.{:03d}Z".format(_iso_second(int(whole)), micros // 1000)


def parse_timestamp(value: Any) -> float | None:
    """
    Seconds since the epoch from an incoming frame's ``timestamp``, or ``None``.

    Panels send ISO strings (``...Z`` or with an offset), JavaScript millisecond
    numbers, second numbers, or nothing; anything else is ``None``.  Never raises.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
        if not math.isfinite(number) or number < 0:
            return None
        # Anything past the year 5138 in seconds is surely JavaScript milliseconds.
        if number > 1e11:
            number /= 1000.0
        return number if number <= _MAX_EPOCH else None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return parse_timestamp(float(text))
        except ValueError:
            pass
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        try:
            return parsed.timestamp()
        except (OverflowError, OSError, ValueError):
            return None
    return None


# --- incoming -------------------------------------------------------------------------------


def _command_id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _lift_nested(frame: Mapping[str, Any]) -> dict[str, Any]:
    """
    Turn the Go agent's nested form into the flat one.

    ``{"id", "type": "command", "data": {"action", "serverId", "payload"?, ...}}``
    becomes ``{"id", "action", "serverId", "payload", "data": {...rest}}`` so that
    ``parse_command`` merges the leftover ``data`` fields into the params.
    """
    body = dict(frame)
    data = frame.get("data")
    if "action" in frame or not isinstance(data, Mapping) or "action" not in data:
        return body
    inner = dict(data)
    body["action"] = inner.pop("action")
    for key in ("serverId", "payload"):
        if key in inner and body.get(key) is None:
            body[key] = inner.pop(key)
    if body.get("id") is None and "id" in inner:
        body["id"] = inner.pop("id")
    body["data"] = inner
    return body


def _legacy_body(frame_type: str, frame: Mapping[str, Any]) -> dict[str, Any]:
    """The command body a legacy typed frame means; raises ``InvalidInput``."""
    data = frame.get("data")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InvalidInput("data must be an object", field="data")
    params = dict(data)
    if frame_type == "server_power":
        word = params.pop("action", None)
        if not isinstance(word, str):
            raise InvalidInput("server_power needs data.action", field="data.action")
        word = word.strip().lower()
        if word.endswith("_server"):
            word = word[: -len("_server")]
        if word not in POWER_ACTIONS:
            raise InvalidInput(
                "server_power action must be start, stop, restart or kill", field="data.action"
            )
        action = POWER_ACTIONS[word]
    else:
        action = LEGACY_ACTIONS[frame_type]
    body: dict[str, Any] = {"action": action, "id": frame.get("id"), "data": params}
    # Some senders put serverId next to type rather than inside data.
    if frame.get("serverId") is not None:
        body["serverId"] = frame.get("serverId")
    return body


def classify(frame: Any) -> Incoming:
    """Classify one decoded JSON value (see the module docstring)."""
    if not isinstance(frame, Mapping):
        return Ignored("frame is not a JSON object")
    frame_type = frame.get("type")
    if frame_type is not None and not isinstance(frame_type, str):
        return Ignored("type is not a string")

    if frame_type == "system_info_request":
        return SystemInfoRequest()
    if frame_type == "ping":
        ping_id = frame.get("id")
        if ping_id is None and isinstance(frame.get("data"), Mapping):
            ping_id = frame["data"].get("id")
        return PingFrame(ping_id)

    legacy: str | None = None
    if frame_type is not None and (frame_type in LEGACY_ACTIONS or frame_type == "server_power"):
        legacy = frame_type
        try:
            body = _legacy_body(frame_type, frame)
        except CtrlAgentError as e:
            return InvalidCommand(_command_id(frame.get("id")), e)
    elif frame_type == "command" or (frame_type is None and ("action" in frame or "data" in frame)):
        body = _lift_nested(frame)
        if frame_type is None and "action" not in body:
            return Ignored("no type and no action")
    elif frame_type in KNOWN_IGNORED_TYPES:
        return Ignored("not for the agent", frame_type)
    else:
        return Ignored("unknown frame type", frame_type)

    try:
        return CommandFrame(parse_command(body), legacy)
    except CtrlAgentError as e:
        return InvalidCommand(_command_id(body.get("id")), e)


def parse_frame(payload: bytes | str) -> Incoming:
    """Decode and classify one WebSocket message; never raises."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            return Ignored("frame is not UTF-8")
    else:
        text = payload
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return Ignored("frame is not JSON")
    return classify(value)


# --- outgoing -------------------------------------------------------------------------------


# Built once: ``json.dumps`` with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def encode(frame: Mapping[str, Any]) -> bytes:
    """One frame as compact UTF-8 JSON; odd values (datetimes, paths) become strings."""
    return _ENCODER.encode(frame).encode("utf-8")


def response_success(command_id: str | None, result: ActionResult, now: float) -> dict[str, Any]:
    """The final reply to a command that worked."""
    frame: dict[str, Any] = {
        "id": command_id,
        "type": "response",
        "timestamp": iso_timestamp(now),
        "success": True,
    }
    if result.message is not None:
        frame["message"] = result.message
    frame["data"] = dict(result.data)
    return frame


def response_failure(command_id: str | None, code: str, message: str, now: float) -> dict[str, Any]:
    """The final reply to a command that failed (``error`` is an object on WebSocket)."""
    return {
        "id": command_id,
        "type": "response",
        "timestamp": iso_timestamp(now),
        "success": False,
        "error": {"code": code, "message": message},
    }


def response_for_error(command_id: str | None, error: CtrlAgentError, now: float) -> dict[str, Any]:
    """``response_failure`` for a ``CtrlAgentError``."""
    return response_failure(command_id, error.code, error.message, now)


def heartbeat(node_id: str, now: float) -> dict[str, Any]:
    """The 30-second liveness frame; the Panel marks the node offline after 60 s without it."""
    stamp = iso_timestamp(now)
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


def pong(
    ping_id: Any, now: float, *, active_servers: int, system_load: Mapping[str, Any]
) -> dict[str, Any]:
    """The answer to ``{"type": "ping", "id": X}``."""
    return {
        "type": "pong",
        "id": ping_id,
        "timestamp": iso_timestamp(now),
        "data": {
            "agentStatus": "online",
            "activeServers": active_servers,
            "systemLoad": {
                "cpu": _load_figure(system_load.get("cpu")),
                "memory": _load_figure(system_load.get("memory")),
                "disk": _load_figure(system_load.get("disk")),
            },
        },
    }


def system_info(info: Mapping[str, Any], node_id: str, now: float) -> dict[str, Any]:
    """The ``system_info`` frame; ``nodeId`` is always present."""
    data = dict(info)
    data.setdefault("nodeId", node_id)
    return {"type": "system_info", "timestamp": iso_timestamp(now), "data": data}


def event(name: str, data: Mapping[str, Any], now: float) -> dict[str, Any]:
    """An "Issue #27" event frame (no id)."""
    return {"type": "event", "timestamp": iso_timestamp(now), "event": name, "data": dict(data)}


def legacy(frame_type: str, data: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A legacy typed frame ``{type, data}`` for older consumers."""
    return {"type": frame_type, "timestamp": iso_timestamp(now), "data": dict(data)}


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
    stamp = iso_timestamp(timestamp)
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
    metrics = ev.metrics
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


def events_dropped(node_id: str, dropped: int, now: float) -> dict[str, Any]:
    """Tells the Panel that ``dropped`` older frames were lost while the link was down."""
    return event("events_dropped", {"nodeId": node_id, "dropped": dropped}, now)


__all__ = [
    "LEGACY_ACTIONS",
    "POWER_ACTIONS",
    "CommandFrame",
    "Ignored",
    "Incoming",
    "InvalidCommand",
    "PingFrame",
    "SystemInfoRequest",
    "classify",
    "console_frames",
    "encode",
    "event",
    "events_dropped",
    "frames_for_status",
    "heartbeat",
    "iso_timestamp",
    "legacy",
    "parse_frame",
    "parse_timestamp",
    "pong",
    "resource_frames",
    "response_failure",
    "response_for_error",
    "response_success",
    "status_changed_frames",
    "system_info",
]
