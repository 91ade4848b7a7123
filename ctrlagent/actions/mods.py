"""
The mod actions: install (from the Steam workshop through steamcmd, a URL or
an uploaded file), uninstall and list the mods of one server (PROTOCOL.md
section 2).  Their fields are
checked before the server is resolved, like the file actions'.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

from ctrlagent.interfaces import IFileManager, IServerManager, ServerRoot

from .payload import Identifier, Payload, Text
from .registry import ActionSpec, Call, json_object


def mod_actions(files: IFileManager, servers: IServerManager) -> list[ActionSpec]:
    """The mod family."""

    def root(call: Call) -> ServerRoot:
        return servers.server_root(call.server)

    async def awaited(result: object) -> object:
        return await cast(Awaitable[object], result)

    async def install(call: Call) -> object:
        params = dict(call.command.params)
        if call.params["modId"] is not None:
            params["modId"] = call.params["modId"]
        return await awaited(files.install_mod(root(call), params))

    async def uninstall(call: Call) -> object:
        where = root(call)
        data = json_object(await awaited(files.uninstall_mod(where, call.params["modId"])))
        # The Panel refreshes its list from this answer: hand back what is left.
        data.update(json_object(await awaited(files.list_mods(where))))
        return data

    async def list_mods(call: Call) -> object:
        data = json_object(await awaited(files.list_mods(root(call))))
        mods = list(data.get("mods") or [])
        data["mods"] = mods
        data.setdefault("count", len(mods))
        return data

    return [
        ActionSpec(
            "install_mod", "mods",
            "Fetch or copy a mod into the server's mods folder; a Steam Workshop item"
            " (steam://workshop/download/<id>) is downloaded with steamcmd",
            Payload(
                {
                    "type": Text(description="steam_workshop, url, ..."),
                    "workshopId": Text(description="Steam published file id (digits)"),
                    "appId": Identifier(
                        description="Steam app id of the game (steam_workshop; default:"
                                    " the node's workshop.app_id)"),
                    "name": Text(),
                    "downloadUrl": Text(
                        description="http(s) URL, or steam://workshop/download/<workshopId>"),
                    "modUrl": Text(),
                    "version": Text(),
                    "modId": Identifier(),
                },
                before_server=True,
                needs_one_of=("modId", "workshopId", "downloadUrl", "modUrl"),
            ),
            install, message="mod installed",
        ),
        ActionSpec(
            "uninstall_mod", "mods", "Remove a mod; answers the mods that are left",
            Payload({"modId": Identifier(required=True)}, before_server=True),
            uninstall, message="mod uninstalled",
        ),
        ActionSpec("list_mods", "mods", "The server's mods", Payload(), list_mods),
    ]
