"""``close_engine``: the agent's stop closes an engine's idle connections, if it has any."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from ctrlagent.engine.lifetime import close_engine
from ctrlagent.testing.engine import FakeEngine


class ClosingEngine(FakeEngine):
    """A fake engine that counts its closes."""

    def __init__(self) -> None:
        super().__init__(Clock())
        self.closed = 0

    async def close(self) -> None:
        self.closed += 1


@pytest_twisted.ensureDeferred
async def test_an_engine_with_close_is_closed() -> None:
    engine = ClosingEngine()
    await close_engine(engine)
    assert engine.closed == 1


@pytest_twisted.ensureDeferred
async def test_an_engine_without_close_is_left_alone() -> None:
    engine = FakeEngine(Clock())
    await close_engine(engine)
    assert engine.up  # still usable: nothing was closed
