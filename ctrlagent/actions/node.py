"""
The node actions: ping, the host's figures and status, its description
(PROTOCOL.md sections 2 and 3).  None of them names a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctrlagent.interfaces import IHost, IServerManager
from ctrlagent.wire.json import to_json

from .payload import Payload
from .registry import ActionSpec, Call, json_object, now_iso


def node_actions(host: IHost, servers: IServerManager) -> list[ActionSpec]:
    """The node family."""

    def listed() -> list[Any]:
        return list(servers.list_servers() or [])

    async def ping(call: Call) -> object:
        return {"message": "pong", "timestamp": now_iso()}

    async def metrics(call: Call) -> object:
        data = json_object(await host.snapshot())
        data["serverCount"] = len(listed())
        data.setdefault("timestamp", now_iso())
        return data

    async def status(call: Call) -> object:
        data = json_object(await host.snapshot())
        every = [to_json(server) for server in listed()]
        running = sum(
            1 for s in every if isinstance(s, Mapping) and s.get("status") == "running"
        )
        data.update(
            status="online",
            serverCount=len(every),
            runningServers=running,
            timestamp=now_iso(),
        )
        return data

    async def info(call: Call) -> object:
        return await host.system_info()

    none = Payload(server="none")
    return [
        ActionSpec("system.ping", "node", "Is the agent there", none, ping, message="pong"),
        ActionSpec("get_system_metrics", "node", "The host's figures", none, metrics),
        ActionSpec("system.status", "node", "The host's figures and its servers", none, status),
        ActionSpec("system.info", "node", "What the host is", none, info),
    ]
