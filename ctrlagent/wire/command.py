"""
Commands as both transports receive them, normalised into one shape, and the
one check every payload passes before an action sees it.

PROTOCOL.md allows two body shapes on HTTP (the Panel's ``{action, serverId,
payload}`` and the Go agent's ``{action, data: {serverId, ...}}``) and the same
fields flat or nested in ``data`` on the WebSocket link.  ``parse_command``
merges them as ``params = {**data, **payload}`` with ``serverId`` taken from the
top level, else ``data``, else ``payload``.

``check_payload`` walks a decoded payload once, iteratively and to a bounded
depth, and refuses what no action can use, naming the field (``limits.cpu``,
``ports[0].external``): numbers that are not finite (``1e999`` and
``Infinity`` decode to ``inf`` in Python), numbers beyond +/-2**53 (the
Panel's JavaScript cannot even hold them exactly, and they overflow engine
fields later), nesting deeper than ``MAX_PAYLOAD_DEPTH``, and text holding a
lone surrogate that no file name, container name or console line can carry.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zope.interface import Interface

from ctrlagent.errors import InvalidInput, ParseError
from ctrlagent.records import record

# Largest magnitude a payload number may have: JavaScript's exact integer range,
# far beyond any real limit, port, size or count the Panel sends.
MAX_SAFE_NUMBER = 2**53
# Deepest nesting of objects/arrays in a payload (create_server's ``ports``
# list of objects is three levels deep).
MAX_PAYLOAD_DEPTH = 32

# Lone surrogates other than U+DC80..U+DCFF.  Those 128 are how Python spells
# the bytes of a non-UTF-8 file name (``surrogateescape``), so a name listed by
# ``list_files`` comes back intact in ``delete_file``; every other lone
# surrogate can be neither encoded for the filesystem nor written to a console.
_UNUSABLE_SURROGATE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


@dataclass(frozen=True)
class UnrepresentableNumber:
    """
    A number literal the decoder could not turn into a usable value: one out of
    float range (``1e999``), a ``NaN``/``Infinity`` constant, or an integer
    too long to convert (Python refuses more than 4,300 digits).

    The WebSocket parser decodes such literals into this marker instead of
    failing the whole frame, so the frame's id can still be answered; the
    marker keeps the literal as sent so that an id can be echoed exactly.
    ``check_payload`` refuses it wherever it appears, so no action ever sees one.
    """

    text: str

    @property
    def is_json(self) -> bool:
        """True when the literal is valid JSON number syntax (not NaN/Infinity)."""
        return self.text not in ("NaN", "Infinity", "-Infinity")


@record
class Command:
    """One normalised command: an action, an optional server id and its params."""

    action: str
    server_id: str | None
    params: dict[str, Any] = field(default_factory=dict)
    # The WebSocket command id exactly as decoded (a string or a number, kept
    # with its JSON type so the response echoes it as sent), or None.
    command_id: Any = None


@record
class ActionResult:
    """What an action answers on success: the ``data`` object and an optional message."""

    data: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


def printable(value: Any, limit: int = 200) -> str:
    """
    ``value`` as text that any log observer can write: lone surrogates become
    ``\\udXXX`` escapes and the length is bounded.  For log lines carrying
    untrusted text (a text log file refuses to encode a lone surrogate).
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def unusable_text(text: str) -> bool:
    """True when ``text`` holds a lone surrogate nothing on the host can carry."""
    return not text.isascii() and _UNUSABLE_SURROGATE.search(text) is not None


def _member(where: str, key: str) -> str:
    name = printable(key, 64)
    return "{}.{}".format(where, name) if where else name


def _refuse(where: str, problem: str) -> InvalidInput:
    """The error for the field at ``where`` (its path bounded, for replies and logs)."""
    name = printable(where, 120) if where else ""
    return InvalidInput("{} {}".format(name or "payload", problem), field=name or None)


def _number_problem(value: Any) -> str | None:
    """Why a number is refused, or None (``value`` is an int or float, not a bool)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if value > MAX_SAFE_NUMBER or value < -MAX_SAFE_NUMBER:
        return "is out of range (beyond +/-2^53)"
    return None


def check_payload(
    value: Any, *, path: str = "", max_depth: int = MAX_PAYLOAD_DEPTH, text: bool = True
) -> None:
    """
    Refuse anything in ``value`` no action can use (see the module docstring).

    One iterative walk, never deeper than ``max_depth`` containers, so a
    hostile payload cannot exhaust the stack.  ``path`` names ``value`` itself
    in the error (empty for a params object); ``text=False`` skips the
    lone-surrogate check (the link echoes such ids and reports such actions).
    Raises ``InvalidInput`` whose ``field`` is the offending path.
    """
    stack: list[tuple[Any, str, int]] = [(value, path, 1)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, Mapping):
            items: Any = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            _check_scalar(node, where or "value", text)
            continue
        if depth > max_depth:
            raise _refuse(where, "is nested deeper than {} levels".format(max_depth))
        for key, child in items:
            if isinstance(key, int):
                child_path = "{}[{}]".format(where, key)
            else:
                if text and isinstance(key, str) and unusable_text(key):
                    raise _refuse(where, "has a field name holding a lone surrogate")
                child_path = _member(where, str(key))
            if isinstance(child, (Mapping, list, tuple)):
                stack.append((child, child_path, depth + 1))
            else:
                _check_scalar(child, child_path, text)


def _check_scalar(value: Any, where: str, text: bool) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if text and unusable_text(value):
            raise _refuse(where, "holds a lone surrogate, which is not text")
        return
    if isinstance(value, (int, float)):
        problem = _number_problem(value)
        if problem is not None:
            raise _refuse(where, problem)
        return
    if isinstance(value, UnrepresentableNumber):
        raise _refuse(where, "is not a usable number ({})".format(printable(value.text, 40)))


def _server_id(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInput("serverId must be a string", field=where)
    if isinstance(value, int) and (value > MAX_SAFE_NUMBER or value < -MAX_SAFE_NUMBER):
        raise InvalidInput("serverId is out of range", field=where)
    return str(value)


def parse_command(body: Any) -> Command:
    """
    Normalise one decoded JSON command.

    Raises ``ParseError`` when ``body`` is not an object and ``InvalidInput``
    naming the field when ``action`` is missing or a field has the wrong type.
    The ``id`` is carried as decoded; the WebSocket parser checks it.
    """
    if not isinstance(body, Mapping):
        raise ParseError("command must be a JSON object")
    action = body.get("action")
    if not isinstance(action, str) or not action.strip():
        raise InvalidInput("action is required and must be a non-empty string", field="action")
    data = body.get("data")
    payload = body.get("payload")
    if data is None:
        data = {}
    if payload is None:
        payload = {}
    if not isinstance(data, Mapping):
        raise InvalidInput("data must be an object", field="data")
    if not isinstance(payload, Mapping):
        raise InvalidInput("payload must be an object", field="payload")
    server_id = None
    for where, source in (
        ("serverId", body),
        ("data.serverId", data),
        ("payload.serverId", payload),
    ):
        server_id = _server_id(source.get("serverId"), where)
        if server_id is not None:
            break
    params = {**data, **payload}
    params.pop("serverId", None)
    return Command(
        action=action.strip(),
        server_id=server_id,
        params=dict(params),
        command_id=body.get("id"),
    )


class IDispatcher(Interface):
    """The one table of actions behind both transports."""

    def dispatch(command: Command) -> object:
        """
        Run ``command`` and return a Deferred firing with an ``ActionResult``,
        or failing with a ``ctrlagent.errors.CtrlAgentError`` whose ``code`` is
        the protocol error code (``UNKNOWN_ACTION``, ``INVALID_PAYLOAD``, ...).
        Any other exception is a bug, reported as ``EXECUTION_ERROR``.
        """
