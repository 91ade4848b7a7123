"""Bounded waiting for tests that run on the real reactor."""

from __future__ import annotations

import time
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
    """
    Poll ``predicate`` until it is truthy; its value.  Bounded in tries and in
    time: a predicate that blocks (a socket's timeout) cannot stretch the wait.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        await sleep(interval)
    raise AssertionError("timed out after {}s waiting for {}".format(timeout, what))
