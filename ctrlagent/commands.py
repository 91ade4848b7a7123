"""
Commands as both transports receive them, normalised into one shape.

PROTOCOL.md allows two body shapes on HTTP (the Panel's ``{action, serverId,
payload}`` and the Go agent's ``{action, data: {serverId, ...}}``) and the same
fields flat or nested in ``data`` on the WebSocket link.  ``parse_command``
merges them as ``params = {**data, **payload}`` with ``serverId`` taken from the
top level, else ``data``, else ``payload``.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zope.interface import Interface

from ctrlagent.errors import InvalidInput, ParseError


@dataclass(frozen=True)
class Command:
    """One normalised command: an action, an optional server id and its params."""

    action: str
    server_id: str | None
    params: dict[str, Any] = field(default_factory=dict)
    # The WebSocket command id, when the command came with one.
    command_id: str | None = None


@dataclass(frozen=True)
class ActionResult:
    """What an action answers on success: the ``data`` object and an optional message."""

    data: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


def _server_id(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInput("serverId must be a string", field=where)
    return str(value)


def parse_command(body: Any) -> Command:
    """
    Normalise one decoded JSON command.

    Raises ``ParseError`` when ``body`` is not an object and ``InvalidInput``
    naming the field when ``action`` is missing or a field has the wrong type.
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
    command_id = body.get("id")
    if command_id is not None and not isinstance(command_id, (str, int)):
        command_id = None
    return Command(
        action=action.strip(),
        server_id=server_id,
        params=dict(params),
        command_id=None if command_id is None else str(command_id),
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
