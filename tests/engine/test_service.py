"""``EngineService``: stopping the agent closes the engine, after the services using it."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.application.service import MultiService, Service
from twisted.internet.task import Clock

from ctrlagent.engine.service import EngineService
from ctrlagent.testing.engine import FakeEngine


class ClosingEngine(FakeEngine):
    """A fake engine that records when it is closed."""

    def __init__(self, order: list[str]) -> None:
        super().__init__(Clock())
        self.order = order

    async def close(self) -> None:
        self.order.append("engine closed")


class User(Service):
    """A service using the engine (the server manager)."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    def stopService(self) -> Any:  # noqa: N802 (Twisted hook)
        self.order.append("user stopped")
        return super().stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_the_agent_closes_the_engine_after_its_users() -> None:
    order: list[str] = []
    top = MultiService()
    EngineService(ClosingEngine(order)).setServiceParent(top)
    User(order).setServiceParent(top)
    top.startService()
    await top.stopService()
    assert order == ["user stopped", "engine closed"]


@pytest_twisted.ensureDeferred
async def test_an_engine_without_close_stops_quietly() -> None:
    service = EngineService(FakeEngine(Clock()))
    service.startService()
    await service.stopService()
    assert not service.running
