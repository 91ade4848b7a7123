"""
The link reads every domain result through ``wire.to_json``: host figures,
system information and server listings may be typed records (frozen
dataclasses registering their shape) as well as plain mappings, and the
Panel gets the same frames either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import succeed

from ctrlagent.events import ResourceUpdate
from ctrlagent.wire.json import to_json
from tests.panel.harness import Harness


@dataclass(frozen=True)
class _Load:
    cpu: float
    memory: float
    disk: float


@dataclass(frozen=True)
class _Info:
    os: str
    cpu_count: int


@dataclass(frozen=True)
class _Status:
    server_id: str
    state: str
    container_id: str | None


@dataclass(frozen=True)
class _Metrics:
    cpu: float
    players: int


@to_json.register
def _load_json(load: _Load) -> dict[str, Any]:
    return {"cpu": load.cpu, "memory": load.memory, "disk": load.disk}


@to_json.register
def _info_json(info: _Info) -> dict[str, Any]:
    return {"os": info.os, "cpuCount": info.cpu_count}


@to_json.register
def _status_json(status: _Status) -> dict[str, Any]:
    return {
        "serverId": status.server_id, "status": status.state, "containerId": status.container_id
    }


@to_json.register
def _metrics_json(metrics: _Metrics) -> dict[str, Any]:
    return {"cpu": metrics.cpu, "players": metrics.players}


def test_records_from_the_domain_become_the_same_frames_as_mappings() -> None:
    rig = Harness()
    rig.link._load = lambda: succeed(_Load(7.0, 30.0, 20.0))
    rig.link._system_info = lambda: succeed(_Info("linux", 2))
    listing = [_Status("s1", "running", "c0ffee"), _Status("s2", "offline", None)]
    rig.servers.list_servers = lambda: listing  # type: ignore[method-assign]
    rig.start()
    rig.panel.send({"type": "ping", "id": "p"})
    rig.flush()

    infos = rig.panel.frames("system_info")  # on connect, and for the fake's request
    assert infos and all(
        info["data"] == {"os": "linux", "cpuCount": 2, "nodeId": "node-1"} for info in infos
    )
    snapshot = {f["data"]["serverId"]: f["data"] for f in rig.panel.frames("server_status_changed")}
    assert snapshot["s1"]["currentStatus"] == "running"
    assert snapshot["s1"]["containerId"] == "c0ffee"
    assert snapshot["s2"]["currentStatus"] == "offline" and "containerId" not in snapshot["s2"]
    (pong,) = rig.panel.frames("pong")
    assert pong["data"] == {"agentStatus": "online", "activeServers": 1,
                            "systemLoad": {"cpu": 7.0, "memory": 30.0, "disk": 20.0}}

    rig.link._on_event(ResourceUpdate("s1", _Metrics(12.5, 3)))  # type: ignore[arg-type]
    rig.flush()
    (update,) = rig.panel.frames("resource_update")
    assert update["data"]["cpu"] == 12.5 and update["data"]["players"] == 3
    assert update["data"]["network"] == {"in": 0, "out": 0}


def test_figures_are_not_queued_while_the_link_is_down() -> None:
    # Stale when the link is back (the servers are sampled at the live rate
    # then), and in the outbox they would push console lines out.
    rig = Harness()
    rig.endpoint.refuse = True
    rig.start()
    rig.link._on_event(ResourceUpdate("s1", _Metrics(12.5, 3)))  # type: ignore[arg-type]
    assert rig.link.outbox.events == 0
    rig.endpoint.refuse = False
    rig.advance(rig.next_retry_delay())
    assert rig.link.connected
    assert rig.panel.frames("resource_update") == []
    rig.link._on_event(ResourceUpdate("s1", _Metrics(13.0, 4)))  # type: ignore[arg-type]
    rig.flush()
    (update,) = rig.panel.frames("resource_update")
    assert update["data"]["cpu"] == 13.0
