"""
``EngineService``: the container engine's place in the agent's service tree.

It starts nothing (the engine connects per call); stopping it closes the
engine's idle connections.  Added to the tree before the services that use
the engine, so that it stops after them.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, succeed

from ctrlagent.engine.interface import IContainerEngine

__all__ = ["EngineService"]


class EngineService(service.Service):
    """Closes ``engine`` (when it can be closed) as the agent stops."""

    name = "engine"

    def __init__(self, engine: IContainerEngine) -> None:
        self.engine = engine

    def stopService(self) -> Deferred[Any]:  # noqa: N802 (Twisted hook)
        super().stopService()
        close = getattr(self.engine, "close", None)
        if close is None:
            return succeed(None)
        return Deferred.fromCoroutine(close())
