"""
Console delivery across agent deaths, on the real engine: the manager is
killed (``simulate_crash``: nothing more is written, the last issued store
write completes) at random moments under a numbered-line load, and every line
must reach the listeners exactly once, in order; and the game killed while no
agent runs or at a chosen step of the next agent's re-attach has its last
lines delivered once, before its death is reported.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from ctrlagent.engine import engine_client_config, make_engine
from ctrlagent.engine.docker.client import DockerClient
from ctrlagent.engine.interface import IContainerEngine
from ctrlagent.events import ConsoleOutput, StatusChanged
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
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


def patient(rig: Rig) -> None:
    """
    Engine calls wait 30 s, not 10: under load Podman's answer to a SIGKILL
    (it waits for conmon to exit) and even ``GET /version`` took longer than
    10 s on this shared 2-core machine, and a kill that the engine answers
    late is not what these tests are about.
    """
    rig.config = replace(rig.config, docker=replace(rig.config.docker, call_timeout=30.0))


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
    patient(rig)
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
    await sleep(0.5)
    for sid in sids:
        # The ticks end, maybe while the last agent still re-attaches (its
        # state is "running" from the store at once): the console drains
        # before "offline" all the same (test_a_game_killed_at_the_moment_...).
        await last.kill(sid)
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


# -- a death at the moment of the re-attach ----------------------------------------------------

RUN_TICK = re.compile(r"tick (\w+) (\d+)")
# Numbered lines tagged by run (a restart prints "tick <other run> 1" again).
RUN_TICKS = ('r=$(head -c 8 /proc/sys/kernel/random/uuid); n=0; while :; do'
             ' for i in 1 2 3 4 5; do n=$((n+1)); echo "tick $r $n"; done; sleep 0.05; done')


def runs_of(lines: list[str]) -> dict[str, list[int]]:
    """The tick numbers of each run, in the order the lines came."""
    runs: dict[str, list[int]] = {}
    for m in map(RUN_TICK.fullmatch, lines):
        if m:
            runs.setdefault(m.group(1), []).append(int(m.group(2)))
    return runs


def engine_lines(host: str, cid: str) -> list[str]:
    """The container's output as the engine kept it (the truth)."""
    return subprocess.run(
        ["docker", "logs", cid], capture_output=True, text=True, check=True,
        env=dict(os.environ, DOCKER_HOST=host),
    ).stdout.splitlines()


def container_running(host: str, cid: str) -> bool:
    out = subprocess.run(
        ["docker", "inspect", "--format", "{{.State.Running}}", cid], capture_output=True,
        text=True, check=True, env=dict(os.environ, DOCKER_HOST=host),
    ).stdout
    return out.strip() == "true"


@implementer(IContainerEngine)
class HeldEngine:
    """
    The runtime's engine, with one step of the console's re-attach held until
    the test lets it go (the first call of it only):

    - ``inspect``: the reconcile has listed the containers and not looked at
      this one yet (nothing of the re-attach has begun);
    - ``history``: the re-attach reads the history up to the mark (behind the
      followed output);
    - ``stdin``: the console follows the output again, stdin is being opened.
    """

    def __init__(self, engine: Any, moment: str) -> None:
        self._engine = engine
        self.moment = moment
        self.reached: Deferred[None] = Deferred()
        self.gate: Deferred[None] = Deferred()
        self._armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _take(self, moment: str) -> bool:
        if self._armed and self.moment == moment:
            self._armed = False
            self.reached.callback(None)
            return True
        return False

    async def inspect(self, cid: str) -> Any:
        if self._take("inspect"):
            await self.gate
        return await self._engine.inspect(cid)

    async def open_stdin(self, cid: str) -> Any:
        if self._take("stdin"):
            await self.gate
        return await self._engine.open_stdin(cid)

    def output(self, cid: str, *, follow: bool, since_ns: int | None = None,
               tail: int | None = None) -> Any:
        stream = self._engine.output(cid, follow=follow, since_ns=since_ns, tail=tail)
        if not follow and tail is not None and self._take("history"):
            return HeldStream(stream, self.gate)
        return stream


class HeldStream:
    """An output stream whose first batch waits for ``gate``."""

    def __init__(self, stream: Any, gate: Deferred[None]) -> None:
        self._stream = stream
        self._gate = gate

    async def batches(self, max_items: int = 1000) -> AsyncIterator[list[Any]]:
        await self._gate
        async for batch in self._stream.batches(max_items):
            yield batch

    def close(self) -> None:
        self._stream.close()


def held_manager(rig: Rig, moment: str) -> tuple[ServerManager, HeldEngine | None]:
    """A started manager of the rig whose engine holds ``moment`` (None: holds nothing)."""
    config = rig.config
    client = DockerClient.from_config(global_reactor, engine_client_config(config))
    rig.clients.append(client)
    engine: Any = make_engine(global_reactor, config, client)
    held = HeldEngine(engine, moment) if moment != "agent down" else None
    manager = ServerManager(global_reactor, config, held or engine,
                            open_store(global_reactor, config.state_dir))
    manager.add_listener(rig.recorder)
    manager.startService()
    rig.managers.append(manager)
    return manager, held


@pytest.mark.parametrize("moment", ["agent down", "inspect", "history", "stdin"])
@pytest_twisted.ensureDeferred
async def test_a_game_killed_at_the_moment_of_the_reattach_has_every_line_delivered_once_first(
    rig: Rig, scripted_image: str, moment: str
) -> None:
    """
    The game dies while no agent runs, or at a chosen step of a restarted
    agent's re-attach: every line it printed since the last agent's mark is
    delivered exactly once, and before the new agent reports anything of it
    (its death, or the restart of a server that should run).
    """
    patient(rig)
    first = rig.manager()
    # (its first reconcile, with a list from before the create, would forget
    # the container the start makes: a race of its own, not this test's)
    await until(lambda: first.reconciled > 0, 15, "the first reconcile")
    sid = rig.new_id()
    params = scripted(scripted_image)
    params["startup"] = RUN_TICKS
    params["startupDone"] = None
    await first.create_server(sid, params)
    await first.start(sid)
    await until_state(first, sid, S.RUNNING)
    cid = first.get(sid).container_id or ""
    await until(lambda: len(rig.recorder.lines(sid)) > 50, 10, "ticks delivered")
    first.simulate_crash()
    assert first.crashed is not None
    await first.crashed
    await sleep(0.3)  # the game prints while no agent runs: after the mark

    def kill_outside() -> None:
        subprocess.run(["docker", "kill", cid], capture_output=True, check=True,
                       env=dict(os.environ, DOCKER_HOST=rig.host))

    if moment == "agent down":
        await deferToThread(kill_outside)
    seen = len(rig.recorder.events)
    second, held = held_manager(rig, moment)
    killed = None
    if held is not None:
        reached = held.reached
        await until(lambda: reached.called, 15, "the re-attach reaching " + moment)
        # The Panel's kill comes while the re-attach is held there.
        killed = ensureDeferred(second.kill(sid))
        await until(lambda: not container_running(rig.host, cid), 10, "the game dead")
        await sleep(0.2)  # its die event reaches the agent meanwhile
        held.gate.callback(None)
        await killed
        await until_state(second, sid, S.OFFLINE, timeout=15)
    else:
        # It should run: the new agent starts it again, after the old lines.
        await until_state(second, sid, S.RUNNING, timeout=15)
        await until(lambda: len(runs_of(rig.recorder.lines(sid))) == 2, 10, "the new run's ticks")
        await second.kill(sid)
        await until_state(second, sid, S.OFFLINE, timeout=15)
    await sleep(1.0)  # a late re-attach would report "running" again, or deliver late

    truth = runs_of(await deferToThread(engine_lines, rig.host, cid))
    got = runs_of(rig.recorder.lines(sid))
    assert set(got) == set(truth)
    for run, ticks in truth.items():
        assert ticks == list(range(1, len(ticks) + 1)), "the engine's own log has gaps"
        assert got[run] == ticks, "run {}: lines lost or repeated".format(run)
    assert second.get(sid).state is S.OFFLINE
    # The first run's last line came before the new agent reported anything of the server.
    (old_run,) = runs_of([line for e in rig.recorder.events[:seen] if isinstance(e, ConsoleOutput)
                          and e.server_id == sid for line in e.lines])
    last_line = "tick {} {}".format(old_run, truth[old_run][-1])
    delivered_at = next(i for i, e in enumerate(rig.recorder.events)
                        if isinstance(e, ConsoleOutput) and last_line in e.lines)
    first_status = next(i for i, e in enumerate(rig.recorder.events)
                        if i >= seen and isinstance(e, StatusChanged) and e.server_id == sid)
    assert delivered_at < first_status, rig.recorder.statuses(sid)
    if held is not None:
        # ... and it did not report the dead game running again afterwards.
        assert [(e.previous, e.current) for e in rig.recorder.events[first_status:]
                if isinstance(e, StatusChanged) and e.server_id == sid] == [("running", "offline")]
