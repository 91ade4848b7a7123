"""
The rig of the action tests: the registry (as ``Dispatcher``, the way the
agent builds it) over the in-memory fakes, with a ``Clock`` for time.

The fakes answer synchronously unless a test holds a gate, so most tests read
the outcome straight off the Deferred.  ``ok`` answers what the Panel reads:
the data through ``ctrlagent.wire.json.to_json``, as both transports send it.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ctrlagent.actions import Dispatcher
from ctrlagent.errors import CtrlAgentError
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.wire.command import ActionResult, Command
from ctrlagent.wire.json import to_json
from ctrlagent.work import Tracker

UUID = "3f2b8c1e9d4a4b7f8e6c5d4b3a291807"
PANEL_ID = "clx9k2m4p0000abcd1234efgh"


class FakeHost:
    """A host view with fixed figures."""

    async def snapshot(self) -> dict[str, Any]:
        return {
            "cpu": 12.5,
            "memory": {"total": 8 << 30, "used": 2 << 30},
            "disk": {"total": 100 << 30, "used": 10 << 30},
            "uptime": 3600,
        }

    async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
        return {"nodeId": node_id or "node-1", "os": "linux", "capabilities": ["docker"]}


class Rig:
    """A dispatcher over fakes, with helpers that run one action synchronously."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.servers = FakeServerManager(self.clock)
        self.files = FakeFileManager(self.clock)
        self.tracker = Tracker()
        self.dispatcher = Dispatcher(
            servers=self.servers,
            files=self.files,
            system=FakeHost(),
            clock=self.clock,
            tracker=self.tracker,
        )

    def start(self, action: str, server_id: str | None = None, /, **params: Any) -> Deferred[Any]:
        return self.dispatcher.dispatch(Command(action, server_id, params))

    def ok(self, action: str, server_id: str | None = None, /, **params: Any) -> dict[str, Any]:
        d = self.start(action, server_id, **params)
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "{} did not answer".format(action)
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        assert isinstance(result, ActionResult)
        data = to_json(result.data)
        json.dumps(data)  # every answer must be JSON
        assert isinstance(data, dict)
        return data

    def error(self, action: str, server_id: str | None = None, /, **params: Any) -> CtrlAgentError:
        d = self.start(action, server_id, **params)
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "{} did not answer".format(action)
        failure = results[0]
        assert isinstance(failure, Failure), "expected a failure, got {!r}".format(failure)
        assert isinstance(failure.value, CtrlAgentError), failure.getTraceback()
        return failure.value

    def created(self, server_id: str = UUID, **extra: Any) -> dict[str, Any]:
        params = {
            "name": "Survival",
            "image": "ctrlagent-test/scripted:1",
            "startup": "./run.sh",
            "environment": {"MAX_PLAYERS": 20},
            "limits": {"memory": 512, "disk": 1, "cpu": 100},
            "panelId": PANEL_ID,
        }
        params.update(extra)
        return self.ok("create_server", server_id, **params)
