"""
What only the fake engine does: play the scripted game on a test clock, run
install scripts by their environment, break and come back on request.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from ctrlagent.engine.interface import ContainerSpec, EngineEvent, LogLine
from ctrlagent.errors import EngineError, EngineUnavailable, NotFound
from ctrlagent.testing.engine import FakeEngine

LABELS = {"test": "fake"}


def game(env: dict[str, str] | None = None, name: str = "game", **kw: Any) -> ContainerSpec:
    return ContainerSpec(name=name, image="img", labels=LABELS, env=env or {}, interactive=True,
                         **kw)


def script(env: dict[str, str] | None = None) -> ContainerSpec:
    return ContainerSpec(name="install", image="img", labels={**LABELS, "role": "install"},
                         env=env or {}, command=("/mnt/install/install.sh",))


def texts(engine: FakeEngine, cid: str) -> list[str]:
    return [line.text for line in engine.get(cid).log]


@pytest_twisted.ensureDeferred
async def test_the_game_starts_after_its_delay_ticks_and_crashes_on_the_clock() -> None:
    clock = Clock()
    engine = FakeEngine(clock)
    cid = await engine.create(game({"STARTUP_DELAY": "2", "TICK_INTERVAL": "1",
                                    "CRASH_AFTER": "5", "CRASH_CODE": "3"}))
    await engine.start(cid)
    assert texts(engine, cid) == ["Starting scripted game server (pid 1)"]
    clock.advance(2)
    assert texts(engine, cid)[-1] == "Done (0.1s)! For help, type help"
    clock.advance(1)
    clock.advance(1)
    assert texts(engine, cid)[-2:] == ["tick 1", "tick 2"]
    clock.advance(1)
    assert texts(engine, cid)[-1] == "Crashing with exit code 3"
    state = await engine.inspect(cid)
    assert (state.running, state.exit_code) == (False, 3)
    assert [e.action for e in engine.history] == ["start", "die"]
    assert engine.history[-1].exit_code == 3
    clock.advance(10)
    assert texts(engine, cid)[-1] == "Crashing with exit code 3"  # no tick after death


@pytest_twisted.ensureDeferred
async def test_every_line_and_event_has_a_strictly_increasing_nanosecond() -> None:
    clock = Clock()  # time stands still: the engine still never repeats a nanosecond
    engine = FakeEngine(clock)
    cid = await engine.create(game({"FLOOD_LINES": "50"}))
    await engine.start(cid)
    stamps = [line.ns for line in engine.get(cid).log]
    assert len(stamps) == 53
    events = [e.at_ns for e in engine.history]
    merged = sorted(stamps + events)
    assert len(set(merged)) == len(merged)
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False))


@pytest.mark.parametrize(("env", "code"), [({}, 0), ({"INSTALL_EXIT": "3"}, 3)])
@pytest_twisted.ensureDeferred
async def test_an_install_script_runs_to_its_exit_code(env: dict[str, str], code: int) -> None:
    engine = FakeEngine(Clock())
    cid = await engine.create(script(env))
    await engine.start(cid)
    assert await engine.wait(cid) == code
    assert texts(engine, cid) == ["installing"]


@pytest_twisted.ensureDeferred
async def test_install_scripts_that_hang_vanish_or_are_refused() -> None:
    engine = FakeEngine(Clock())
    hang = await engine.create(script({"INSTALL_HANG": "1"}))
    await engine.start(hang)
    assert (await engine.inspect(hang)).running
    await engine.remove(hang)
    vanish = await engine.create(script({"INSTALL_VANISH": "1"}))
    await engine.start(vanish)
    with pytest.raises(NotFound):
        await engine.inspect(vanish)
    with pytest.raises(EngineError):
        await engine.create(script({"INSTALL_CREATE_FAILS": "1"}))


@pytest_twisted.ensureDeferred
async def test_created_specs_and_kills_are_recorded() -> None:
    engine = FakeEngine(Clock())
    spec = game()
    cid = await engine.create(spec)
    await engine.start(cid)
    await engine.kill(cid, "SIGTERM")
    assert engine.created == [spec]
    assert engine.kills == [(cid, "SIGTERM")]
    assert await engine.wait(cid) == 0


@pytest_twisted.ensureDeferred
async def test_a_stdin_pipe_is_bound_to_the_run_it_was_opened_for() -> None:
    engine = FakeEngine(Clock())
    early = await engine.create(game(name="early"))
    before_start = await engine.open_stdin(early)
    assert before_start.connected
    await engine.start(early)
    before_start.write_line("say early")
    assert texts(engine, early)[-1] == "[Server] early"

    engine = FakeEngine(Clock())
    cid = await engine.create(game())
    await engine.start(cid)
    pipe = await engine.open_stdin(cid)
    pipe.write_line("stop")
    assert not pipe.connected
    await engine.start(cid)
    assert not pipe.connected
    with pytest.raises(EngineUnavailable):
        pipe.write_line("say late")
    await engine.kill(cid)
    after_exit = await engine.open_stdin(cid)
    assert after_exit.connected  # waiting for the next start
    await engine.start(cid)
    assert after_exit.connected and not pipe.connected


@pytest_twisted.ensureDeferred
async def test_a_container_on_a_missing_network_or_image_is_not_created() -> None:
    engine = FakeEngine(Clock(), images=("img",))
    with pytest.raises(NotFound):
        await engine.create(game(network="ctrl-alt-play"))
    with pytest.raises(NotFound):
        await engine.create(ContainerSpec(name="x", image="other", labels={}, env={}))
    await engine.ensure_network("ctrl-alt-play", None, {})
    await engine.create(game(network="ctrl-alt-play"))


@pytest_twisted.ensureDeferred
async def test_a_broken_engine_fails_calls_ends_streams_and_resumes_events_once() -> None:
    engine = FakeEngine(Clock())
    cid = await engine.create(game())
    await engine.start(cid)
    breaks: list[EngineError] = []
    resumes: list[None] = []
    events = engine.events(LABELS, since_ns=0, on_break=breaks.append,
                           on_resume=lambda: resumes.append(None))
    got: list[EngineEvent] = []

    async def consume() -> None:
        async for event in events:
            got.append(event)

    done = ensureDeferred(consume())
    assert [e.action for e in got] == ["start"]
    output = engine.output(cid, follow=True)
    engine.break_engine()
    assert len(breaks) == 1 and isinstance(breaks[0], EngineUnavailable)
    with pytest.raises(EngineUnavailable):
        await engine.inspect(cid)
    assert not await engine.ping() and await engine.version() is None
    with pytest.raises(EngineUnavailable):
        async for _ in output.batches():
            pass
    engine.die(cid, 1)  # happens while the engine is away
    assert [e.action for e in got] == ["start"]
    engine.restore_engine()
    assert resumes == [None]
    assert [e.action for e in got] == ["start", "die"]
    await engine.start(cid)
    assert [e.action for e in got] == ["start", "die", "start"]
    events.close()
    await done
    lines = engine.output(cid, follow=False, since_ns=got[-1].at_ns)
    after: list[LogLine] = []
    async for batch in lines.batches():
        after.extend(batch)
    assert after and all(line.ns > got[-1].at_ns for line in after)


@pytest_twisted.ensureDeferred
async def test_warnings_it_is_told_to_give_come_with_create_and_update_until_removed() -> None:
    engine = FakeEngine(Clock())
    quiet = await engine.create(game(name="quiet"))
    engine.warns = ("Block I/O weight discarded",)
    loud = await engine.create(game(name="loud"))
    assert (engine.last_warnings(quiet), engine.last_warnings(loud)) == (
        (), ("Block I/O weight discarded",))
    await engine.update_limits(quiet, engine.get(quiet).limits)
    assert engine.last_warnings(quiet) == ("Block I/O weight discarded",)
    engine.warns = ()
    await engine.update_limits(loud, engine.get(loud).limits)
    assert engine.last_warnings(loud) == ()
    await engine.remove(quiet)
    assert engine.last_warnings(quiet) == ()
