"""
The console actions: write a line, read and export the history, the
attachment's status (PROTOCOL.md section 2).  ``send_server_command`` and
``get_server_logs`` are the server-family names of the same console.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import cast

from ctrlagent.interfaces import IServerManager

from .payload import Choice, Integer, Payload, Text
from .registry import ActionSpec, Call, json_object, now_iso

# The most console lines one answer carries.
MAX_LINES = 100_000


def _lines() -> Integer:
    return Integer(default=100, minimum=1, maximum=MAX_LINES, description="how many lines")


def console_actions(servers: IServerManager) -> list[ActionSpec]:
    """The console family."""

    def history(server_id: str, lines: int) -> list[str]:
        return [str(x) for x in cast(list[object], servers.console_history(server_id, lines))]

    async def send(call: Call) -> object:
        line = call.params["command"]
        data = json_object(await cast(Awaitable[object], servers.send_command(call.server, line)))
        data.setdefault("command", line)
        return data

    async def logs(call: Call) -> object:
        lines = history(call.server, call.params["lines"])
        return {"serverId": call.server, "logs": lines, "lines": len(lines)}

    async def command(call: Call) -> object:
        line = call.params["command"]
        response = await cast(Awaitable[object], servers.console_command(call.server, line))
        if isinstance(response, (list, tuple)):
            response = "\n".join(str(x) for x in response)
        return {
            "serverId": call.server,
            "command": line,
            "response": "" if response is None else str(response),
        }

    async def read_history(call: Call) -> object:
        lines = history(call.server, call.params["lines"])
        return {"serverId": call.server, "history": lines, "lines": len(lines)}

    async def status(call: Call) -> object:
        data = json_object(servers.console_status(call.server))
        data.setdefault("connected", False)
        data.setdefault("lastActivity", None)
        data.setdefault("bufferSize", 0)
        return data

    async def disconnect(call: Call) -> object:
        # The agent's console attachment belongs to the server, not to one
        # viewer, so "disconnect" only acknowledges (the Panel reads success).
        return {"serverId": call.server}

    async def clear(call: Call) -> object:
        servers.console_clear(call.server)
        return {"serverId": call.server}

    async def download(call: Call) -> object:
        fmt = call.params["format"]
        lines = history(call.server, MAX_LINES)
        if fmt == "json":
            content = json.dumps(
                {"serverId": call.server, "exportedAt": now_iso(), "lines": lines}
            )
        else:
            content = "\n".join(lines) + ("\n" if lines else "")
        return {"serverId": call.server, "format": fmt, "content": content, "lines": len(lines)}

    line = Payload({"command": Text(required=True, description="one console line")})
    return [
        ActionSpec(
            "send_server_command", "console", "Write one line to a server's console", line, send,
            message="command sent", names_server=True,
        ),
        ActionSpec(
            "get_server_logs", "console", "The last console lines",
            Payload({"lines": _lines()}), logs,
        ),
        ActionSpec(
            "console:command", "console", "Write a line and answer what the console printed",
            line, command,
        ),
        ActionSpec(
            "console:history", "console", "The last console lines",
            Payload({"lines": _lines()}), read_history,
        ),
        ActionSpec(
            "console:status", "console", "Whether the console is attached",
            Payload(), status, ),
        ActionSpec(
            "console:disconnect", "console", "Acknowledge a viewer leaving", Payload(),
            disconnect,
        ),
        ActionSpec(
            "console:clear", "console", "Empty a server's console buffer", Payload(), clear,
            message="console cleared",
        ),
        ActionSpec(
            "console:download", "console", "The console history as one text or JSON document",
            Payload({"format": Choice("txt", "json", default="txt")}), download,
        ),
    ]
