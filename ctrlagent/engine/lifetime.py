"""
The end of a container engine's life in the agent: ``close_engine``.

An engine connects per call; closing it lets go of its idle connections.
Not every engine has anything to close (``IContainerEngine`` does not ask
for it), so this closes what can be closed and ignores the rest.
"""

from __future__ import annotations

from ctrlagent.engine.interface import IContainerEngine

__all__ = ["close_engine"]


async def close_engine(engine: IContainerEngine) -> None:
    """Close ``engine``'s idle connections, when it has a ``close``."""
    close = getattr(engine, "close", None)
    if close is not None:
        await close()
