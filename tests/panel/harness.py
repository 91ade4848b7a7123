"""
An in-memory rig for the Panel link: a ``PanelLink`` on a ``Clock``, connected
through ``iosim`` to a ``FakePanel``, with the real ``Dispatcher`` over the fake
server and file managers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from ctrlagent.actions import Dispatcher
from ctrlagent.config import AgentConfig, PanelConfig
from ctrlagent.panel.link import PanelLink
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.panel import FakePanel, MemoryPanelEndpoint
from ctrlagent.testing.servers import FakeServerManager

SECRET = "correct horse battery staple"


class FakeHost:
    """The host view the dispatcher asks for ``system.*`` actions."""

    async def snapshot(self) -> dict[str, Any]:
        return {"cpu": 12.5, "memory": 40.0, "disk": 55.0}

    async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
        return {"nodeId": node_id, "os": "linux", "arch": "x64", "cpuCount": 2}


def panel_config(**overrides: Any) -> PanelConfig:
    """Unit-test defaults: Autobahn's own timers off (they run on the global reactor)."""
    base = PanelConfig(
        url="ws://panel.test:8080/ws",
        open_handshake_timeout=0,
        auto_ping_interval=0,
        auto_ping_timeout=0,
    )
    return replace(base, **overrides)


class Harness:
    """One link, one fake Panel, one clock."""

    def __init__(
        self,
        *,
        agent_secret: str = SECRET,
        panel_secret: str = SECRET,
        node_ids: set[str] | None = None,
        backups: Any = None,
        **panel: Any,
    ) -> None:
        self.clock = Clock()
        self.config = AgentConfig(
            node_id="node-1", secret=agent_secret, development=True, panel=panel_config(**panel)
        )
        self.panel = FakePanel(self.clock, panel_secret, node_ids=node_ids)
        self.endpoint = MemoryPanelEndpoint(self.panel)
        self.servers = FakeServerManager(self.clock)
        self.dispatcher = Dispatcher(
            servers=self.servers, files=FakeFileManager(self.clock), system=FakeHost(),
            clock=self.clock,
        )
        self.load_calls = 0
        self.link = PanelLink(
            self.clock,
            self.config,
            self.dispatcher,
            self.servers,
            self._system_info,
            self._load,
            endpoint=self.endpoint,
            random=lambda: 0.0,
            backups=backups,
        )
        # Autobahn's close timers use the global reactor; the clock drives everything here.
        self.link.factory.setProtocolOptions(closeHandshakeTimeout=0, serverConnectionDropTimeout=0)

    def _system_info(self) -> Deferred[dict[str, Any]]:
        return succeed({"os": "linux", "cpuCount": 2})

    def _load(self) -> Deferred[dict[str, Any]]:
        self.load_calls += 1
        return succeed({"cpu": 7.0, "memory": 30.0, "disk": 20.0})

    def start(self) -> None:
        self.link.startService()
        self.flush()

    def flush(self) -> None:
        self.endpoint.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

    def next_retry_delay(self) -> float:
        """The delay of the one pending reconnect call."""
        calls = [c for c in self.clock.getDelayedCalls() if "reconnect" in repr(c)]
        assert len(calls) == 1, calls
        return calls[0].getTime() - self.clock.seconds()

    def create_server(self, server_id: str) -> None:
        d = self.servers.create_server(server_id, {"image": "busybox", "name": server_id})
        assert d.called
