"""
Console input survives its pipe being closed and reopened, on every engine:
the agent reopens stdin within one run (a new attach, concurrent commands),
and Podman closes a container's stdin at the end of any attach
(``PodmanEngine`` shares one attach per run; docs/RUNTIMES.md).
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet.defer import ensureDeferred, gatherResults

from tests.engine.test_behaviour import Harness, engine, lines_until  # noqa: F401 - a fixture


@pytest_twisted.ensureDeferred
async def test_a_pipe_opened_after_another_was_closed_still_reaches_the_game(
    engine: Harness,  # noqa: F811
) -> None:
    e = engine.engine
    cid = await engine.started()
    first = await e.open_stdin(cid)
    first.write_line("say one")
    await lines_until(e, cid, "[Server] one")
    await first.close()
    assert not first.connected
    second = await e.open_stdin(cid)
    assert second.connected
    second.write_line("say two")
    await lines_until(e, cid, "[Server] two")
    await second.close()


@pytest_twisted.ensureDeferred
async def test_pipes_opened_at_once_and_closed_in_turn_all_reach_the_game(
    engine: Harness,  # noqa: F811
) -> None:
    e = engine.engine
    cid = await engine.started()
    pipes = await gatherResults([ensureDeferred(e.open_stdin(cid)) for _ in range(5)])
    for i, pipe in enumerate(pipes):
        pipe.write_line("say p{}".format(i))
        await lines_until(e, cid, "[Server] p{}".format(i))
        await pipe.close()
    last = await e.open_stdin(cid)
    last.write_line("say last")
    await lines_until(e, cid, "[Server] last")
    await last.close()
