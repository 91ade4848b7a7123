"""
One-shot containers (a server's install script, a steamcmd download): wait
for the container's exit within a deadline, kill it past it.

Shared by ``installer.Installer`` and ``workshop.SteamCmdDownloader``; each
creates, starts and removes its own container, reads its own output and
says what the exit means.  Through the engine seam only.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred

from ctrlagent.engine.interface import IContainerEngine
from ctrlagent.errors import Conflict, EngineError, NotFound
from ctrlagent.work import Deadlines


@dataclass(frozen=True)
class Exit:
    """
    How a one-shot container ended: its exit ``code`` (-1 when unknown),
    ``timed_out`` (killed at the deadline), ``gone`` (the engine's words when
    the container was removed behind the agent's back).
    """

    code: int
    timed_out: bool = False
    gone: str | None = None


async def wait_for_exit(
    engine: IContainerEngine, deadlines: Deadlines, cid: str, timeout: float
) -> Exit:
    """
    Wait for the started container ``cid`` to exit, at most ``timeout``
    seconds; past it, kill it (``SIGKILL``) and say so.  An engine failure
    while waiting is exit code -1.
    """
    gone: list[str] = []

    async def wait() -> int:
        try:
            return await engine.wait(cid)
        except NotFound as e:
            gone.append(e.message)
        except EngineError:
            pass
        return -1

    waiting: Deferred[int] = Deferred.fromCoroutine(wait())
    if not await deadlines.within(waiting, timeout):
        waiting.cancel()
        waiting.addErrback(lambda _: None)  # the cancellation is ours
        try:
            await engine.kill(cid, "SIGKILL")
        except (NotFound, Conflict):
            pass
        return Exit(-1, timed_out=True)
    code = await waiting
    return Exit(code, gone=gone[0] if gone else None)
