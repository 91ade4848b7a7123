"""
Console delivery across agent deaths, on the real engine: the manager is
killed (``simulate_crash``: nothing more is written, the last issued store
write completes) at random moments under a numbered-line load, and every line
must reach the listeners exactly once, in order.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from ctrlagent.servers.lifecycle import ServerState
from tests.servers.conftest import Rig, scripted, sleep, until, until_state

pytestmark = pytest.mark.docker
S = ServerState
TICK = re.compile(r"tick (\d+)")


def engine_ticks(host: str, cid: str) -> list[int]:
    """The tick numbers in Docker's own log of the container (the truth)."""
    out = subprocess.run(
        ["docker", "logs", cid], capture_output=True, text=True, check=True,
        env=dict(os.environ, DOCKER_HOST=host),
    ).stdout
    return [int(m.group(1)) for m in map(TICK.fullmatch, out.splitlines()) if m]


def delivered_ticks(rig: Rig, sid: str) -> list[int]:
    return [int(m.group(1)) for m in map(TICK.fullmatch, rig.recorder.lines(sid)) if m]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_every_console_line_is_delivered_exactly_once_across_agent_kills_at_random_moments(
    rig: Rig, scripted_image: str
) -> None:
    seed = int(os.environ.get("CTRLAGENT_KILL_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    note = "seed {} (CTRLAGENT_KILL_SEED reruns it)".format(seed)
    manager = rig.manager()
    sids = [rig.new_id(), rig.new_id()]
    params = scripted(scripted_image)
    # About 100 numbered lines a second per server ("tick 1", "tick 2", ...),
    # in bursts of five printed microseconds apart: lines that share a read,
    # a write of the mark, a boundary of the replay.
    params["startup"] = ('n=0; while :; do for i in 1 2 3 4 5; do n=$((n+1)); echo "tick $n";'
                         " done; sleep 0.05; done")
    params["startupDone"] = None
    for sid in sids:
        await manager.create_server(sid, params)
        await manager.start(sid)
    for sid in sids:
        await until_state(manager, sid, S.RUNNING)
    cids = {sid: manager.get(sid).container_id or "" for sid in sids}

    kills = 0
    deadline = time.monotonic() + 25.0
    while kills < 8 and time.monotonic() < deadline:
        # Random moments: mid-stream, mid-write, or while the previous
        # agent's successor is still re-attaching and replaying.
        await sleep(rng.choice([rng.uniform(0.0, 0.15), rng.uniform(0.2, 1.5)]))
        manager.simulate_crash()
        kills += 1
        assert manager.crashed is not None
        await manager.crashed
        if rng.random() < 0.5:
            await sleep(rng.uniform(0.0, 0.6))  # the game prints while no agent runs
        manager = rig.manager()
    assert kills >= 5, note

    last = manager
    for sid in sids:
        await until_state(last, sid, S.RUNNING, timeout=10)
        # Its console follows again (Podman's history read takes longer than
        # Docker's: a kill before it would test a death during the re-attach,
        # RUNTIMES.md "Known gap").
        console = last.get(sid).console
        await until(lambda: console.attached, 15, "console re-attached")  # noqa: B023
    await sleep(0.5)
    for sid in sids:
        await last.kill(sid)  # the ticks end; the console drains before "offline"
    for sid in sids:
        await until_state(last, sid, S.OFFLINE, timeout=10)
        truth = await deferToThread(engine_ticks, rig.host, cids[sid])
        assert len(truth) > 200, note
        assert truth == list(range(1, len(truth) + 1)), "the engine's own log has gaps"
        for _ in range(100):  # bounded: the drain is already done when "offline"
            if len(delivered_ticks(rig, sid)) >= len(truth):
                break
            await sleep(0.05)
        got = delivered_ticks(rig, sid)
        missing = sorted(set(truth) - set(got))
        twice = sorted({n for n in got if got.count(n) > 1})
        assert (missing, twice) == ([], []), note
        assert got == truth, note
        # the last agent's buffer holds them once too (history, then live)
        history = [int(m.group(1)) for m in map(TICK.fullmatch, last.console_history(sid, 200))
                   if m]
        assert history == truth[-len(history):], note
