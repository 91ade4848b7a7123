"""Bounded waiting for tests that run on the real reactor."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet import reactor
from twisted.internet.task import deferLater

T = TypeVar("T")


async def sleep(seconds: float) -> None:
    """Let the real reactor run for ``seconds``."""
    await deferLater(reactor, max(0.0, seconds), lambda: None)


async def until(
    predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` (a bounded number of times) until it is truthy; its value."""
    for _ in range(int(timeout / interval) + 1):
        value = predicate()
        if value:
            return value
        await sleep(interval)
    raise AssertionError("timed out after {}s waiting for {}".format(timeout, what))
