"""
An ``AgentApi`` over the in-memory fakes, driven by ``StubTreq``.

``ApiRig`` holds every moving part a test may poke: the clock, the fakes, the
Docker and link states, and a client that sends the Panel's headers.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from ctrlagent import __version__
from ctrlagent.actions import Dispatcher
from ctrlagent.api import AgentApi
from ctrlagent.config import AgentConfig, HttpConfig, TimeoutsConfig
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.work import Deadlines, Tracker

SECRET = "s3cr3t-daemon-token"
UUID = "3f2b8c1e9d4a4b7f8e6c5d4b3a291807"
PANEL_ID = "clx9k2m4p0000abcd1234efgh"


class StaticHost:
    """Host figures for system actions."""

    async def snapshot(self) -> dict[str, Any]:
        return {"cpu": 1.0, "memory": {"total": 2, "used": 1}, "disk": {"total": 2, "used": 1}}

    async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
        return {"nodeId": node_id or "node-test"}


class DockerState:
    """A controllable ``docker_ping``: ``ok`` True/False, an exception, or hanging."""

    def __init__(self) -> None:
        self.ok: bool | Exception | None = True
        self.pings = 0

    def ping(self) -> Deferred[bool]:
        self.pings += 1
        if isinstance(self.ok, Exception):
            return fail(self.ok)
        if self.ok is None:
            return Deferred()
        return succeed(self.ok)


def panel_headers(secret: str = SECRET) -> dict[str, str]:
    """What the Panel sends with every request."""
    return {
        "Content-Type": "application/json",
        "Accept": "application/json, text/plain, */*",
        "Authorization": "Bearer " + secret,
    }


class ApiRig:
    """The API and its fakes."""

    def __init__(
        self,
        secret: str = SECRET,
        development: bool = False,
        timeouts: TimeoutsConfig | None = None,
        **http: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = AgentConfig(
            node_id="node-test",
            secret=secret,
            development=development,
            http=replace(HttpConfig(), **http),
            timeouts=timeouts or TimeoutsConfig(),
        )
        # One tracker and one deadline helper, shared as tap.py shares them.
        self.tracker = Tracker("agent")
        self.deadlines = Deadlines(
            self.clock, self.tracker.scope("late answers"), self.config.timeouts
        )
        self.servers = FakeServerManager(self.clock)
        self.files = FakeFileManager(self.clock)
        self.dispatcher = Dispatcher(
            servers=self.servers, files=self.files, system=StaticHost(), deadlines=self.deadlines
        )
        self.docker = DockerState()
        self.link_up = True
        self.api = AgentApi(
            config=self.config,
            dispatcher=self.dispatcher,
            servers=self.servers,
            link_connected=lambda: self.link_up,
            docker_ping=self.docker.ping,
            clock=self.clock,
            version=__version__,
            tracker=self.tracker.scope("http"),
            deadlines=self.deadlines,
        )
        self.http = StubTreq(self.api.app.resource())

    async def command(self, body: Any, secret: str = SECRET) -> tuple[int, Any]:
        """POST /api/command as the Panel does; ``(status, decoded body)``."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.http.post(
            "http://node.test:8081/api/command", data=data, headers=panel_headers(secret)
        )
        return response.code, json.loads(await response.content())

    async def get(self, path: str, **headers: str) -> tuple[int, Any, Any]:
        """GET ``path``; ``(status, decoded JSON or raw bytes, headers)``."""
        response = await self.http.get("http://node.test:8081" + path, headers=headers or None)
        raw = await response.content()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        return response.code, body, response.headers


@pytest.fixture
def rig() -> ApiRig:
    return ApiRig()
