"""
The alias action: record that a server is also known by another id.

The Panel names one game server by two ids (PROTOCOL.md section 2): power
actions and ``create_server`` use its ``server.uuid``, console, files and
metrics its ``server.id``, and a create tells only one.  The agent cannot
guess the mapping, so an operator (or a Panel) records it once:
``add_server_alias {serverId, alias}`` (also ``add_alias``; over HTTP
``POST /api/servers/{serverId}/aliases {"alias": ..}``).  It is kept with the
server's definition in the store, so it survives restarts, and goes with the
server when it is deleted.

An alias that already names another server (its id, one of its aliases, its
container name or id) is refused with ``CONFLICT``; one that already names
this server changes nothing and answers success, so a script may run twice.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

from ctrlagent.errors import Conflict, CtrlAgentError, InvalidInput
from ctrlagent.interfaces import IServerManager
from ctrlagent.servers import spec as specs
from ctrlagent.wire.json import to_json

from .payload import Payload, Text
from .registry import ActionSpec, Call


def _aliases_of(servers: IServerManager, server_id: str) -> list[str]:
    """The server's aliases as its status lists them."""
    status = to_json(servers.status(server_id))
    listed = status.get("aliases") if isinstance(status, dict) else None
    return [str(a) for a in listed] if isinstance(listed, list) else []


def alias_actions(servers: IServerManager) -> list[ActionSpec]:
    """The alias family, over the server manager."""

    async def add_alias(call: Call) -> object:
        server_id = call.server
        alias = call.params["alias"]
        try:
            specs.validate_server_id(alias)
        except InvalidInput:
            raise InvalidInput(
                "alias must be 1-128 characters of letters, digits, '_', '.', '-', "
                "starting with a letter or digit",
                field="alias",
            ) from None
        try:
            owner: str | None = str(servers.resolve(alias))
        except CtrlAgentError:
            owner = None
        if owner is not None and owner != server_id:
            raise Conflict("{} already names server {}; not an alias of {}".format(
                alias, owner, server_id))
        added = owner is None
        if added:
            await cast(Awaitable[Any], servers.update(server_id, {"aliases": [alias]}))
        return {
            "serverId": server_id,
            "alias": alias,
            "added": added,
            "aliases": _aliases_of(servers, server_id),
        }

    return [
        ActionSpec(
            "add_server_alias", "servers",
            "Record another id the server is known by (the Panel's second id); "
            "CONFLICT when it names another server",
            Payload({"alias": Text(required=True, description="the other id (1-128 characters "
                                                              "of letters, digits, _ . -)")}),
            add_alias, aliases=("add_alias",),
            message="server {server_id} is also known by the alias", names_server=True,
            carries_aliases=True,
        ),
    ]


__all__ = ["alias_actions"]
