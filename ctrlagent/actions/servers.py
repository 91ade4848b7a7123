"""
The server actions: define, power, suspend, reinstall, update and read a game
server (PROTOCOL.md section 2), plus the legacy names of older Panels.

A server's definition (create/update) is parsed by ``ctrlagent.servers.spec``,
the same parser the server manager applies, and described for OpenAPI from
the same module's bounds: one declaration, nothing re-checked here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from ctrlagent.config import ServersConfig
from ctrlagent.errors import CtrlAgentError
from ctrlagent.interfaces import IServerManager
from ctrlagent.servers import spec as specs
from ctrlagent.wire.json import to_json
from ctrlagent.wire.servers import Metrics, coerce_metrics, coerced_as_is
from ctrlagent.wire.tables import POWER_WORDS

from .payload import Boolean, Choice, Definition, Number, Payload, Signal, whole
from .registry import ActionSpec, Call, json_object

_POWER_ACTIONS = tuple(POWER_WORDS)


def _number(minimum: float, maximum: float, description: str, *, integer: bool = True
            ) -> dict[str, Any]:
    return {
        "type": "integer" if integer else "number",
        "minimum": minimum,
        "maximum": maximum,
        "description": description,
    }


_ID_TEXT = {"type": "string", "pattern": whole("[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")}
_ID = {"oneOf": [_ID_TEXT, {"type": "integer", "minimum": 0, "maximum": specs.MAX_ID}]}
_TIMEOUT = _number(-1, specs.MAX_TIMEOUT, "seconds; negative: the agent's default",
                   integer=False)
_PORT = _number(1, 65535, "port")


def definition_schema(*, required: tuple[str, ...] = ("image",)) -> dict[str, Any]:
    """The OpenAPI schema of a server definition, from ``servers/spec.py``'s bounds."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {
            "name": {"type": "string", "description": "display name (default: the id)"},
            "image": {"type": "string", "minLength": 1, "pattern": whole(r"[^\s\x00]+")},
            "startup": {"type": "string", "description": "startup line; {{VAR}} is filled"},
            "environment": {
                "type": "object",
                "additionalProperties": {
                    "oneOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}],
                    "nullable": True,
                },
            },
            "limits": {
                "type": "object",
                "properties": {
                    "memory": _number(0, specs.MAX_MEMORY_MB, "MB; 0: unlimited"),
                    "swap": _number(-1, specs.MAX_MEMORY_MB, "MB; -1: unlimited, 0: none"),
                    "disk": _number(0, specs.MAX_DISK_MB, "MB; 0: unlimited"),
                    "cpu": _number(0, specs.MAX_CPU_PERCENT, "percent (100 = one core)",
                                   integer=False),
                    "io": _number(0, specs.MAX_IO_WEIGHT, "I/O weight"),
                    "pids": _number(-specs.MAX_PIDS, specs.MAX_PIDS,
                                    "process limit; 0 or less: the agent's default"),
                },
            },
            "ports": {
                "type": "array",
                "maxItems": specs.MAX_PORTS,
                "items": {
                    "oneOf": [
                        {
                            "type": "object",
                            "properties": {
                                "internal": _PORT,
                                "external": _PORT,
                                "protocol": {
                                    "type": "string",
                                    "enum": ["tcp", "udp", "tcp/udp", "both"],
                                },
                                "ip": {"type": "string", "description": "bind address"},
                            },
                        },
                        _PORT,
                        {"type": "string"},
                    ]
                },
            },
            "aliases": {"type": "array", "maxItems": specs.MAX_ALIASES, "items": _ID},
            "panelId": _ID,
            "stop": {
                "oneOf": [
                    {"type": "string", "example": "SIGTERM"},
                    {
                        "type": "object",
                        "required": ["value"],
                        "properties": {
                            "type": {"type": "string", "enum": ["signal", "command"]},
                            "value": {"type": "string", "minLength": 1},
                            "timeout": _TIMEOUT,
                        },
                    },
                ]
            },
            "startupDone": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "required": ["pattern"],
                        "properties": {
                            "pattern": {"type": "string"},
                            "regex": {"type": "boolean"},
                        },
                    },
                ]
            },
            "install": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "required": ["script"],
                        "properties": {
                            "script": {"type": "string", "minLength": 1},
                            "image": {"type": "string"},
                            "entrypoint": {"type": "string"},
                            "timeout": _TIMEOUT,
                        },
                    },
                ]
            },
            "skipScripts": {"type": "boolean"},
            "crashRestart": {"type": "boolean"},
            "user": {
                "type": "string",
                "pattern": whole("image|[0-9]{1,10}(:[0-9]{1,10})?"),
                "description": '"uid:gid", or "image" for the image\'s own user',
            },
        },
    }


# The agent's defaults shape a parsed definition's values, never whether it is
# valid, so the declaration checks with the built-in defaults; the manager
# parses again with the configured ones.
_DEFAULTS = ServersConfig()


def _parse_create(server_id: str, params: Mapping[str, Any]) -> specs.ServerSpec:
    return specs.parse_spec(server_id, params, _DEFAULTS)


def _parse_update(server_id: str, params: Mapping[str, Any]) -> specs.ServerSpec:
    # An update is merged into the server's definition; checked against a
    # definition that is valid in every field, an error can only come from
    # the update itself, with the name merge_update gives it.
    blank = specs.parse_spec(server_id, {"image": "image"}, _DEFAULTS)
    return specs.merge_update(blank, params, _DEFAULTS)


CREATE = Definition(parse=_parse_create, schema=definition_schema())
UPDATE = Definition(parse=_parse_update, schema=definition_schema(required=()))


def _awaited(result: object) -> Awaitable[object]:
    """The domain's asynchronous answer (``IServerManager``'s I/O methods return Deferreds)."""
    return cast(Awaitable[object], result)


def server_actions(servers: IServerManager) -> list[ActionSpec]:
    """The server family."""

    def status_now(default: str) -> Callable[[Call], object]:
        """The server's status as it is now, marked pending (a long action's early answer)."""

        def pending(call: Call) -> object:
            try:
                status = json_object(servers.status(call.server))
            except CtrlAgentError:
                status = {"serverId": call.server, "status": default}
            status["pending"] = True
            return status

        return pending

    def pending_as(status: str) -> Callable[[Call], object]:
        return lambda call: {"serverId": call.server, "status": status, "pending": True}

    async def create(call: Call) -> object:
        return await _awaited(servers.create_server(call.server, dict(call.command.params)))

    async def start(call: Call) -> object:
        return await _awaited(servers.start(call.server))

    async def stop(call: Call) -> object:
        return await _awaited(
            servers.stop(call.server, signal=call.params["signal"], timeout=call.params["timeout"])
        )

    async def restart(call: Call) -> object:
        return await _awaited(servers.restart(call.server))

    async def kill(call: Call) -> object:
        return await _awaited(servers.kill(call.server))

    async def delete(call: Call) -> object:
        return await _awaited(servers.delete(call.server, purge_files=call.params["purgeFiles"]))

    async def update(call: Call) -> object:
        return await _awaited(servers.update(call.server, dict(call.command.params)))

    async def suspend(call: Call) -> object:
        return await _awaited(servers.suspend(call.server))

    async def unsuspend(call: Call) -> object:
        return await _awaited(servers.unsuspend(call.server))

    async def reinstall(call: Call) -> object:
        return await _awaited(servers.reinstall(call.server))

    async def power(call: Call) -> object:
        raise AssertionError("power_server forwards to its action")  # pragma: no cover

    async def status(call: Call) -> object:
        return servers.status(call.server)

    async def list_servers(call: Call) -> object:
        listed = list(cast(list[object], servers.list_servers()) or [])
        return {"servers": listed, "count": len(listed)}

    async def metrics(call: Call) -> object:
        # A record (or a mapping from another provider) in the Panel's exact shape.
        figures = servers.server_metrics(call.server)
        if isinstance(figures, Metrics) and coerced_as_is(figures):
            # The agent's own servers' record: already that shape.
            return to_json(figures)
        return to_json(coerce_metrics(json_object(figures), time.time()))

    server = Payload()
    return [
        ActionSpec(
            "create_server", "servers", "Define and create a server",
            Payload(server="new", definition=CREATE), create,
            message="server {server_id} created",
            pending=pending_as("installing"), names_server=True, carries_aliases=True,
        ),
        ActionSpec(
            "start_server", "servers", "Start a server", server, start,
            message="server {server_id} starting",
            pending=status_now("starting"), names_server=True,
        ),
        ActionSpec(
            "stop_server", "servers", "Stop a server (a signal, then a kill after the timeout)",
            Payload({
                "signal": Signal(description="SIGKILL kills at once"),
                "timeout": Number(minimum=0, description="seconds before a kill"),
            }),
            stop, message="server {server_id} stopping",
            pending=status_now("stopping"), names_server=True,
        ),
        ActionSpec(
            "restart_server", "servers", "Stop a server, then start it", server, restart,
            message="server {server_id} restarting",
            pending=status_now("stopping"), names_server=True,
        ),
        ActionSpec(
            "kill_server", "servers", "Kill a server's process (never removes it)", server, kill,
            message="server {server_id} killed", names_server=True,
        ),
        ActionSpec(
            "delete_server", "servers", "Remove a server (and its files with purgeFiles)",
            Payload({"purgeFiles": Boolean()}), delete,
            message="server {server_id} deleted", pending=pending_as("deleting"), names_server=True,
        ),
        ActionSpec(
            "power_server", "servers", "Start, stop, restart or kill a server",
            Payload({"action": Choice(*_POWER_ACTIONS)}, before_server=True), power,
            forward=lambda params: "{}_server".format(params["action"]),
        ),
        ActionSpec(
            "update_server", "servers", "Change a server's definition",
            Payload(definition=UPDATE), update,
            message="server {server_id} updated", names_server=True, carries_aliases=True,
        ),
        ActionSpec(
            "suspend_server", "servers", "Stop a server and refuse starts", server, suspend,
            message="server {server_id} suspended",
            pending=status_now("stopping"), names_server=True,
        ),
        ActionSpec(
            "unsuspend_server", "servers", "Allow a suspended server to start again", server,
            unsuspend, message="server {server_id} unsuspended", names_server=True,
        ),
        ActionSpec(
            "reinstall_server", "servers", "Run a server's install step again", server,
            reinstall, message="server {server_id} reinstalling",
            pending=pending_as("installing"), names_server=True,
        ),
        ActionSpec(
            "get_server_status", "servers", "A server's status", server, status,
            names_server=True,
        ),
        ActionSpec(
            "list_servers", "servers", "Every managed server", Payload(server="none"),
            list_servers,
        ),
        ActionSpec(
            "get_server_metrics", "servers", "A server's latest resource sample", server,
            metrics, names_server=True,
        ),
    ]

