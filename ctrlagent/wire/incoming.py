"""
Frames the Panel sends on the WebSocket link (PROTOCOL.md section 3), decoded
and classified.  The frames the agent sends are built in ``wire.frames``.

Incoming frames are classified into a small set of typed messages:

- ``CommandFrame``: an "Issue #27" command, flat or with its fields nested in
  ``data``, or a legacy typed frame (``server_start``, ``file_read``, ...)
  mapped onto a section 2 action (see ``wire.tables.LEGACY_FRAME_TYPES``);
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

Pure: no reactor, no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from ctrlagent.errors import CtrlAgentError, InvalidInput, ParseError
from ctrlagent.wire.command import (
    Command,
    UnrepresentableNumber,
    check_payload,
    parse_command,
)
from ctrlagent.wire.json import MAX_FRAME_DEPTH, decode_frame, decode_outline
from ctrlagent.wire.tables import LEGACY_FRAME_TYPES, POWER_WORDS

# Frame types the Panel (or a browser sharing its socket) may send that carry
# nothing for the agent.  Listed only so that the log says "ignored" rather
# than "unknown".
KNOWN_IGNORED_TYPES = frozenset(
    {"console", "stats", "response", "event", "heartbeat", "pong", "system_info", "welcome",
     "connected", "ack", "error"}
)

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
        if word not in POWER_WORDS:
            raise InvalidInput(
                "server_power action must be start, stop, restart or kill", field="data.action"
            )
        action = POWER_WORDS[word]
    else:
        action = LEGACY_FRAME_TYPES[frame_type]
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
    is_legacy = frame_type in LEGACY_FRAME_TYPES or frame_type == "server_power"
    if frame_type is not None and is_legacy:
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
        outline = classify(decode_outline(text))
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
    try:
        value = decode_frame(text)
    except ParseError as e:
        return _undecodable(e.message, text)
    return classify(value)


__all__ = [
    "KNOWN_IGNORED_TYPES",
    "LEGACY_ID_FIELDS",
    "MAX_FRAME_DEPTH",
    "CommandFrame",
    "Ignored",
    "Incoming",
    "InvalidCommand",
    "PingFrame",
    "SystemInfoRequest",
    "classify",
    "id_error",
    "id_key",
    "parse_frame",
]
