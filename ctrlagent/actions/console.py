"""
The console actions: write a line or raw input, Ctrl+C, read and export the
history, the attachment's status, the per-server console settings
(PROTOCOL.md section 2).  ``send_server_command`` and ``get_server_logs`` are
the server-family names of the same console.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Mapping
from typing import Any, cast

from ctrlagent.errors import InvalidInput
from ctrlagent.interfaces import IServerManager

from .payload import MISSING, Boolean, Choice, Field, Integer, Number, Payload, Text
from .registry import ActionSpec, Call, json_object, now_iso

# The most console lines one answer carries.
MAX_LINES = 100_000


def _lines() -> Integer:
    return Integer(default=100, minimum=1, maximum=MAX_LINES, description="how many lines")


# The console settings a server keeps (``servers.console.ConsoleSettings``
# checks the same bounds again, for stored rows too; a test holds them equal).
THROTTLE_INTERVAL_MAX = 60.0
SETTINGS: dict[str, Field] = {
    "historySize": Integer(minimum=10, maximum=100_000,
                           description="lines the console history keeps"),
    "throttleLines": Integer(minimum=0, maximum=1_000_000,
                             description="lines handed on per throttleInterval at most"
                                         " (0: no throttle; the history keeps every line)"),
    "throttleInterval": Number(minimum=0.1, description="seconds of one throttle window"
                                                        " (at most 60)"),
    "timestamps": Boolean(description="each console line starts with its time,"
                                      " [HH:MM:SS] UTC"),
}


class ConsoleSettingsField(Field):
    """
    The ``settings`` object of ``console:settings:update``: some of
    ``SETTINGS``, each checked; an unknown key is refused, every one named.
    """

    description = "the console settings to change (the others keep their values)"

    @property
    def required(self) -> bool:
        return True

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            raise InvalidInput("{} is required".format(where), field=where)
        if not isinstance(value, Mapping):
            raise InvalidInput("{} must be an object".format(where), field=where)
        unknown = sorted(str(k) for k in value if k not in SETTINGS)
        if unknown:
            raise InvalidInput(
                "{}: unknown console settings: {} (known: {})".format(
                    where, ", ".join(unknown) or repr(""), ", ".join(SETTINGS)),
                field=where, details={"unknown": unknown, "known": list(SETTINGS)})
        out: dict[str, Any] = {}
        for key, declared in SETTINGS.items():
            if key not in value:
                continue
            name = "{}.{}".format(where, key)
            if value[key] is None:
                raise InvalidInput("{} must not be null".format(name), field=name)
            parsed = declared.parse(value[key], name)
            if key == "throttleInterval" and parsed > THROTTLE_INTERVAL_MAX:
                raise InvalidInput("{} must be at most {:g}".format(name, THROTTLE_INTERVAL_MAX),
                                   field=name)
            out[key] = parsed
        return out

    def schema(self) -> dict[str, Any]:
        properties = {key: declared.schema() for key, declared in SETTINGS.items()}
        properties["throttleInterval"]["maximum"] = THROTTLE_INTERVAL_MAX
        return self._described({"type": "object", "properties": properties,
                                "additionalProperties": False})


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

    async def raw_input(call: Call) -> object:
        return json_object(await cast(Awaitable[object],
                                      servers.console_input(call.server, call.params["input"])))

    async def interrupt(call: Call) -> object:
        return json_object(await cast(Awaitable[object], servers.console_interrupt(call.server)))

    async def settings(call: Call) -> object:
        return json_object(servers.console_settings(call.server))

    async def update_settings(call: Call) -> object:
        return json_object(await cast(Awaitable[object], servers.update_console_settings(
            call.server, call.params["settings"])))

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
            "console:input", "console",
            "Write raw input to a server's stdin, exactly as given (no newline added)",
            Payload({"input": Text(required=True, allow_empty=True,
                                   description="the characters to write, as they are")}),
            raw_input, message="input sent",
        ),
        ActionSpec(
            "console:interrupt", "console", "Ctrl+C: SIGINT to the server's process",
            Payload(), interrupt, message="interrupt sent",
        ),
        ActionSpec(
            "console:settings:get", "console",
            "The server's console settings (history size, throttle, timestamps)",
            Payload(), settings,
        ),
        ActionSpec(
            "console:settings:update", "console",
            "Change console settings: stored, applied at once; unknown keys are refused",
            Payload({"settings": ConsoleSettingsField()}), update_settings,
            message="console settings updated",
        ),
        ActionSpec(
            "console:download", "console", "The console history as one text or JSON document",
            Payload({"format": Choice("txt", "json", default="txt")}), download,
        ),
    ]
