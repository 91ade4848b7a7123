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
  action, a bad field or id, an out-of-range number), or a frame that cannot be
  decoded at all (not UTF-8, not JSON, nested deeper than ``MAX_FRAME_DEPTH``);
  the link answers it with a failure response carrying its id, or with an
  ``error`` frame when no id can be read;
- ``SystemInfoRequest`` and ``PingFrame``;
- ``Ignored``: valid JSON the agent does not act on (non-object frames, a
  browser's ``console``/``stats`` frames, unknown types).  The link never closes
  the connection because of a frame it does not understand.

Command ids.  An id is echoed exactly as sent, with its JSON type: a string
(lone surrogates included, written back as ``\\uXXXX`` escapes) or a number.
``null`` or no id means "no reply wanted" (legacy frames come this way): the
command runs and only a failure is reported, by an ``error`` frame.  Any other
id (``true``, an object, an array) or a number outside +/-2**53 is refused
with ``INVALID_PAYLOAD`` in a response that still carries it as sent.  Legacy
typed frames may name their id ``requestId`` or ``messageId``; the response
carries it under that name too.

Numbers.  ``1e999``, ``NaN``, ``Infinity`` and integers too long to convert
decode to an ``UnrepresentableNumber`` marker rather than failing the frame
(so its id can still be answered) and make the command ``INVALID_PAYLOAD``,
naming the field.

Outgoing frames are plain dicts built here and encoded with ``encode``, which
never fails: see its docstring.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Union

from ctrlagent.errors import CtrlAgentError, InvalidInput, ParseError
from ctrlagent.events import ResourceUpdate, StatusChanged
from ctrlagent.wire.command import (
    PAYLOAD_DECODER,
    ActionResult,
    Command,
    UnrepresentableNumber,
    check_payload,
    parse_command,
    printable,
)
from ctrlagent.wire.json import to_json

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


# Deepest nesting of a frame that is decoded at all; deeper ones are refused
# before the decoder sees them (it recurses), as PARSE_ERROR.
MAX_FRAME_DEPTH = 64

# Where legacy typed frames may carry their id, in order of preference.
LEGACY_ID_FIELDS = ("id", "requestId", "messageId")


@dataclass(frozen=True)
class CommandFrame:
    """
    A command to dispatch. ``legacy`` names the legacy frame type it came as;
    ``id_field`` is where its id came (``id``, or a legacy ``requestId``/``messageId``).
    """

    command: Command
    legacy: str | None = None
    id_field: str = "id"


@dataclass(frozen=True)
class InvalidCommand:
    """
    A frame meant as a command that cannot be run, or that could not be decoded.

    ``command_id`` is the id as sent (None when there is none or it could not
    be read): answered with a failure response when present, else with an
    ``error`` frame.
    """

    command_id: Any
    error: CtrlAgentError
    id_field: str = "id"
    legacy: str | None = None


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


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "a " + type(value).__name__


def id_error(value: Any, field: str = "id") -> InvalidInput | None:
    """Why ``value`` cannot be a command id (see the module docstring), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float, UnrepresentableNumber)):
        return InvalidInput(
            "{} must be a string or a number, not {}".format(field, _json_type(value)), field=field
        )
    try:
        check_payload(value, path=field, text=False)
    except InvalidInput as e:
        return e
    return None


def id_key(value: Any) -> tuple[str, Any]:
    """A hashable key telling ids apart by JSON type and value (``1``, ``1.0``, ``"1"`` differ)."""
    if isinstance(value, UnrepresentableNumber):
        return ("literal", value.text)
    return (type(value).__name__, value)


def _legacy_id(frame: Mapping[str, Any]) -> tuple[Any, str]:
    """The id of a legacy typed frame and the field it came in."""
    for name in LEGACY_ID_FIELDS:
        if frame.get(name) is not None:
            return frame[name], name
    return None, "id"


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
    body: dict[str, Any] = {"action": action, "id": _legacy_id(frame)[0], "data": params}
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
    id_field = "id"
    if frame_type is not None and (frame_type in LEGACY_ACTIONS or frame_type == "server_power"):
        legacy = frame_type
        command_id, id_field = _legacy_id(frame)
        try:
            body = _legacy_body(frame_type, frame)
        except CtrlAgentError as e:
            return InvalidCommand(command_id, e, id_field, legacy)
    elif frame_type == "command" or (frame_type is None and ("action" in frame or "data" in frame)):
        body = _lift_nested(frame)
        if frame_type is None and "action" not in body:
            return Ignored("no type and no action")
        command_id = body.get("id")
    elif frame_type in KNOWN_IGNORED_TYPES:
        return Ignored("not for the agent", frame_type)
    else:
        return Ignored("unknown frame type", frame_type)

    error = id_error(command_id, id_field)
    if error is not None:
        return InvalidCommand(command_id, error, id_field, legacy)
    try:
        # Numbers and nesting of everything that becomes the command, named as
        # the dispatcher names params (``limits.cpu``); the envelope's own
        # timestamp and extras are never used, so never judged.
        for name in ("action", "serverId"):
            check_payload(body.get(name), path=name, text=False)
        for name in ("data", "payload"):
            if isinstance(body.get(name), Mapping):
                check_payload(body[name], text=False)
        return CommandFrame(parse_command(body), legacy, id_field)
    except CtrlAgentError as e:
        return InvalidCommand(command_id, e, id_field, legacy)


_DECODER = PAYLOAD_DECODER

# A JSON string (skipped whole) or a bracket; enough to measure nesting without
# decoding.  The unrolled form stays linear on long strings.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def nested_deeper_than(text: str, limit: int) -> bool:
    """
    Whether ``text``'s arrays and objects nest more than ``limit`` levels deep;
    brackets inside strings do not count.  Iterative, stops at ``limit + 1``,
    and only scans when the text holds more brackets than ``limit`` at all.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _STRUCTURE.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _shallow(text: str, keep: int) -> str:
    """
    ``text`` with every array or object nested deeper than ``keep`` replaced by
    ``null`` (and the outer ones closed, should the text end inside one).
    """
    pieces: list[str] = []
    openers: list[str] = []  # the open containers up to depth ``keep``
    depth = 0
    copied_to = 0
    for match in _STRUCTURE.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth <= keep:
                openers.append(char)
            elif depth == keep + 1:
                pieces.append(text[copied_to : match.start()])
                pieces.append("null")
        elif char in "]}":
            if depth == keep + 1:
                copied_to = match.end()
            elif 0 < depth <= keep and openers:
                openers.pop()
            depth -= 1
    if depth <= keep:
        pieces.append(text[copied_to:])
    else:
        pieces.extend("]" if opener == "[" else "}" for opener in reversed(openers))
    return "".join(pieces)


def _undecodable(reason: str, text: str) -> Incoming:
    """
    What to do with a frame that cannot be decoded whole, judged (best effort)
    from its outer two levels: a command is refused with ``PARSE_ERROR``
    carrying its id when one can be read (else answered by an ``error``
    frame), a ping is still answered, a frame the agent would ignore anyway
    is ignored.
    """
    error = ParseError(reason)
    try:
        outline = classify(_DECODER.decode(_shallow(text, 2)))
    except (ValueError, RecursionError):
        return InvalidCommand(None, error)
    if isinstance(outline, CommandFrame):
        return InvalidCommand(outline.command.command_id, error, outline.id_field, outline.legacy)
    if isinstance(outline, InvalidCommand):
        return InvalidCommand(outline.command_id, error, outline.id_field, outline.legacy)
    if isinstance(outline, Ignored) and outline.reason != "frame is not a JSON object":
        return Ignored("{}; {}".format(reason, outline.reason), outline.frame_type)
    if isinstance(outline, Ignored):
        return InvalidCommand(None, error)
    return outline


def parse_frame(payload: bytes | str) -> Incoming:
    """
    Decode and classify one WebSocket message (text or binary: both are read as
    UTF-8 JSON); never raises.  A frame that cannot be decoded is an
    ``InvalidCommand`` with a ``PARSE_ERROR``, carrying its id when one can be
    read from it.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        raw = bytes(payload)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return _undecodable(
                "frame is not valid UTF-8 (byte {})".format(e.start),
                raw.decode("utf-8", "surrogateescape"),
            )
    else:
        text = payload
    if nested_deeper_than(text, MAX_FRAME_DEPTH):
        return _undecodable(
            "frame is nested deeper than {} levels".format(MAX_FRAME_DEPTH), text
        )
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        return _undecodable("frame is not JSON ({} at char {})".format(e.msg, e.pos), text)
    except (ValueError, RecursionError) as e:
        return _undecodable("frame is not JSON ({})".format(printable(str(e), 100)), text)
    return classify(value)


# --- outgoing -------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    """What the encoder writes for values JSON has no type for."""
    if isinstance(value, UnrepresentableNumber):
        # Only an echoed id can hold one: at the top level it is written as
        # sent (see encode); nested inside an (invalid) object id, as null.
        return None
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)  # datetimes, paths


# Built once: ``json.dumps`` with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
)
_ASCII_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_default
)
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
# Beyond this an int cannot be written in decimal (sys.get_int_max_str_digits).
_LARGEST_WRITABLE = 10**4000
_SANITISE_DEPTH = 100


def _sanitise(value: Any, depth: int = 0) -> Any:
    """
    ``value`` reduced to what JSON can hold: non-finite floats, unwritable
    numbers, circular or runaway nesting become null; other odd values strings.
    Only used when a frame would not encode as it is.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value if -_LARGEST_WRITABLE < value < _LARGEST_WRITABLE else None
    if depth >= _SANITISE_DEPTH:
        return None
    if isinstance(value, Mapping):
        return {
            key if isinstance(key, str) else printable(key): _sanitise(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_sanitise(item, depth + 1) for item in value]
    if isinstance(value, UnrepresentableNumber):
        return None
    try:
        return str(value)
    except Exception:
        return None


def _encode_value(value: Any) -> bytes:
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError):
        # NaN/Infinity, a circular or overly deep structure, an odd key.
        value = _sanitise(value)
        text = _ENCODER.encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (echoed from the Panel, or a file name that is not
        # UTF-8) cannot be UTF-8: write the whole frame with \\uXXXX escapes,
        # which the Panel's JSON.parse reads back as the very same string.
        return _ASCII_ENCODER.encode(value).encode("ascii")


def encode(frame: Mapping[str, Any]) -> bytes:
    """
    One frame as compact UTF-8 JSON.  Never fails: odd values (datetimes,
    paths) become strings, NaN/Infinity null (strict JSON for the Panel's
    ``JSON.parse``), lone surrogates ``\\uXXXX`` escapes, and an ``id`` that
    came as an out-of-range literal (``1e999``) is written back as that literal.
    """
    literals = [key for key, value in frame.items() if isinstance(value, UnrepresentableNumber)]
    if not literals:
        return _encode_value(frame)
    # An echoed id (``id``, a legacy ``requestId``) that came as an
    # out-of-range literal: spliced in as that literal, which json cannot write.
    pairs = []
    for key in literals:
        text = frame[key].text
        literal = text if _JSON_NUMBER.fullmatch(text) else "null"
        pairs.append(_encode_value(key) + b":" + literal.encode("ascii"))
    rest = _encode_value({key: value for key, value in frame.items() if key not in literals})
    return b"{" + b",".join(pairs) + (b"," + rest[1:] if rest != b"{}" else b"}")


def _response(command_id: Any, id_field: str, now: float, success: bool) -> dict[str, Any]:
    frame: dict[str, Any] = {"id": command_id}
    if id_field != "id":
        # A legacy frame's requestId/messageId goes back under its own name too.
        frame[id_field] = command_id
    frame.update(type="response", timestamp=iso_timestamp(now), success=success)
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
        "timestamp": iso_timestamp(now),
        "error": {"code": error.code, "message": error.message},
        "data": data,
    }


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


__all__ = [
    "LEGACY_ACTIONS",
    "LEGACY_ID_FIELDS",
    "MAX_FRAME_DEPTH",
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
    "error_frame",
    "event",
    "events_dropped",
    "frames_for_status",
    "heartbeat",
    "id_error",
    "id_key",
    "iso_timestamp",
    "legacy",
    "nested_deeper_than",
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
