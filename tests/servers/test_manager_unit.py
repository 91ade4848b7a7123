"""
Unit tests of the ServerManager on the in-memory engine, with a ``Clock``.

Store and filesystem work use real threads (the real reactor runs under
pytest-twisted); time (stop timeouts, the crash-loop window, throttling,
stats) is the ``Clock``.
"""

from __future__ import annotations

import calendar
import os
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from ctrlagent.config import ServersConfig
from ctrlagent.engine.interface import EngineEvent, IContainerEngine, LogLine
from ctrlagent.errors import Conflict, InsufficientResources, InvalidInput, ServerNotFound
from ctrlagent.events import ConsoleOutput, ResourceUpdate, ServerRemoved, StatusChanged
from ctrlagent.interfaces import IServerManager
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.testing.engine import DEFAULT_STARTUP_LINE as STARTUP_LINE
from ctrlagent.wire.json import to_json
from tests.servers.conftest import Unit, sleep, until

S = ServerState


# The scripted game's first line (``ctrlagent.testing.engine``).
STARTING = "Starting scripted game server (pid 1)"
PARAMS = {"image": "img", "startup": "/game", "stop": "stop", "startupDone": "Done ("}


async def running(unit: Unit, sid: str = "s1", **extra: Any) -> ServerManager:
    m = unit.manager()
    await m.create_server(sid, {**PARAMS, **extra})
    await m.start(sid)
    await until(lambda: m.get(sid).state is S.RUNNING, 2, "running")
    return m


def test_manager_provides_the_interface() -> None:
    assert IServerManager.implementedBy(ServerManager)


@pytest_twisted.ensureDeferred
async def test_a_stopped_manager_then_closes_the_engine_as_its_owner_asked(unit: Unit) -> None:
    from twisted.internet import reactor

    from ctrlagent.servers.store import open_store

    seen: list[bool] = []

    async def close() -> None:
        seen.append(m.running)

    m = ServerManager(reactor, unit.config, unit.engine, open_store(reactor, unit.config.state_dir),
                      clock=unit.clock, close_engine=close)
    m.startService()
    await m.stopService()
    assert seen == [False]  # once, after the manager stopped


@pytest_twisted.ensureDeferred
async def test_a_manager_on_an_engine_has_every_method_of_the_interface(unit: Unit) -> None:
    m = unit.manager()
    assert verifyObject(IServerManager, m)
    assert verifyObject(IContainerEngine, m.engine)


@pytest_twisted.ensureDeferred
async def test_every_change_emits_one_event_with_the_real_previous_state(unit: Unit) -> None:
    m = await running(unit)
    await m.stop("s1")
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    assert unit.statuses("s1") == [
        ("offline", "installing"), ("installing", "offline"), ("offline", "starting"),
        ("starting", "running"), ("running", "stopping"), ("stopping", "offline"),
    ]
    assert unit.engine.kills == []  # the console "stop" command was used, not a signal
    assert "> stop" in m.console_history("s1", 5)


@pytest_twisted.ensureDeferred
async def test_unknown_ids_and_bad_payloads(unit: Unit) -> None:
    m = unit.manager()
    with pytest.raises(ServerNotFound):
        m.resolve("nope")
    with pytest.raises(InvalidInput):
        await m.create_server("s1", {"startup": "x"})
    await m.create_server("s1", {**PARAMS, "panelId": "cuid-1"})
    assert m.resolve("cuid-1") == "s1"
    with pytest.raises(Conflict):
        await m.create_server("s1", PARAMS)
    with pytest.raises(Conflict):
        await m.create_server("s2", {**PARAMS, "aliases": ["cuid-1"]})


@pytest_twisted.ensureDeferred
async def test_stop_timeout_escalates_to_kill_on_the_clock(unit: Unit) -> None:
    m = await running(unit, environment={"IGNORE_SIGTERM": 1}, stop="SIGTERM")
    await m.stop("s1", timeout=3)
    assert m.get("s1").state is S.STOPPING
    unit.clock.advance(2.9)
    await sleep(0)
    assert m.get("s1").state is S.STOPPING
    with pytest.raises(Conflict):
        await m.restart("s1")
    unit.clock.advance(0.2)
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "killed")
    cid = m.get("s1").container_id
    assert unit.engine.kills == [(cid, "SIGTERM"), (cid, "SIGKILL")]
    assert m.get("s1").power is None


@pytest_twisted.ensureDeferred
async def test_crash_loop_guard_uses_the_configured_window(unit: Unit) -> None:
    m = await running(unit)
    await m.send_command("s1", "crash 2")
    await until(lambda: unit.statuses("s1")[-1] == ("starting", "running"), 2, "restart")
    assert ("running", "crashed") in unit.statuses("s1")
    unit.clock.advance(31)  # outside the window: restarted again
    await m.send_command("s1", "crash 3")
    await until(lambda: unit.statuses("s1").count(("starting", "running")) == 3, 2, "again")
    unit.clock.advance(10)  # inside the window: stays crashed
    await m.send_command("s1", "crash 4")
    await until(lambda: unit.statuses("s1")[-1] == ("running", "crashed"), 2, "crashed")
    await sleep(0.05)
    server = m.get("s1")
    assert server.state is S.CRASHED and server.desired == "offline"
    crashes = [e for e in unit.events if isinstance(e, StatusChanged) and e.current == "crashed"]
    assert [e.exit_code for e in crashes] == [2, 3, 4]
    assert server.crash_report is not None and "> crash 4" in server.crash_report.lines


@pytest_twisted.ensureDeferred
async def test_stop_outside_the_agent_is_not_a_crash(unit: Unit) -> None:
    m = await running(unit)
    unit.engine.die(m.get("s1").container_id or "", 0, external_kill=True)
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    assert ("running", "crashed") not in unit.statuses("s1")
    assert m.get("s1").desired == "running"  # the next reconcile brings it back


@pytest_twisted.ensureDeferred
async def test_a_typed_stop_command_is_the_stop_action_not_a_crash(unit: Unit) -> None:
    m = await running(unit)
    await m.send_command("s1", " stop ")
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    await sleep(0.05)
    assert unit.statuses("s1")[-2:] == [("running", "stopping"), ("stopping", "offline")]
    assert ("running", "crashed") not in unit.statuses("s1")
    server = m.get("s1")
    assert server.desired == "offline" and server.crash_report is None
    assert server.power is None
    assert unit.engine.kills == []
    history = m.console_history("s1", 20)
    assert history.count("> stop") == 1  # the stop action wrote the line, once
    assert any("stop command was typed" in line for line in history)


@pytest_twisted.ensureDeferred
async def test_a_typed_stop_while_the_server_starts_stops_it(unit: Unit) -> None:
    m = unit.manager()
    await m.create_server("s1", {**PARAMS, "startupDone": "a line never printed"})
    await m.start("s1")
    assert m.get("s1").state is S.STARTING and m.get("s1").power is None
    await m.send_command("s1", "stop")
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    assert unit.statuses("s1")[-2:] == [("starting", "stopping"), ("stopping", "offline")]
    assert m.get("s1").desired == "offline" and m.get("s1").crash_report is None


@pytest_twisted.ensureDeferred
async def test_a_typed_stop_the_game_ignores_is_killed_after_the_stop_timeout(unit: Unit) -> None:
    m = await running(unit, environment={"STOP_COMMAND": "quit"})
    await m.send_command("s1", "stop")
    assert m.get("s1").state is S.STOPPING
    assert m.get("s1").power == "stop"
    with pytest.raises(Conflict):
        await m.start("s1")
    unit.clock.advance(5.1)  # the unit's stop_timeout
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "killed")
    cid = m.get("s1").container_id
    assert unit.engine.kills == [(cid, "SIGKILL")]
    assert ("stopping", "crashed") not in unit.statuses("s1")


@pytest_twisted.ensureDeferred
async def test_the_stop_word_is_a_plain_line_when_the_stop_is_a_signal_or_a_power_action_runs(
    unit: Unit,
) -> None:
    # With a signal as the stop method, "stop" is just a line: the game
    # exiting 0 by itself is a crash (clean_exit_is_crash, the default).
    m = await running(unit, stop="SIGTERM", crashRestart=False)
    await m.send_command("s1", "stop")
    await until(lambda: m.get("s1").state is S.CRASHED, 2, "crashed")
    assert m.get("s1").crash_report is not None
    assert m.get("s1").crash_report.exit_code == 0  # type: ignore[union-attr]
    # While a power action runs, the typed line goes to the game as it is.
    m2 = await running(unit, "s2", environment={"STOP_COMMAND": "quit", "IGNORE_SIGTERM": 1})
    await m2.restart("s2")
    await until(lambda: m2.get("s2").state is S.STOPPING, 2, "stopping")
    assert m2.console_history("s2", 5).count("> stop") == 1  # the restart's own stop
    await m2.send_command("s2", "stop")
    assert m2.get("s2").power == "restart"
    assert m2.console_history("s2", 5).count("> stop") == 2


@pytest_twisted.ensureDeferred
async def test_a_clean_exit_is_offline_when_clean_exit_is_crash_is_off(unit: Unit) -> None:
    unit.config = replace(unit.config, servers=replace(unit.config.servers,
                                                       clean_exit_is_crash=False))
    m = await running(unit, stop="SIGTERM")
    cid = m.get("s1").container_id or ""
    unit.engine.die(cid, 0)
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    await sleep(0.05)
    server = m.get("s1")
    assert ("running", "crashed") not in unit.statuses("s1")
    assert server.desired == "offline" and server.crash_report is None
    assert any("clean_exit_is_crash is off" in line for line in m.console_history("s1", 5))
    # Any other code is still a crash, restarted by the policy.
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    unit.engine.die(m.get("s1").container_id or "", 1)
    await until(lambda: ("running", "crashed") in unit.statuses("s1"), 2, "crashed")


@pytest_twisted.ensureDeferred
async def test_oom_is_reported_as_crash_with_flag(unit: Unit) -> None:
    m = await running(unit, crashRestart=False)
    unit.engine.die(m.get("s1").container_id or "", 137, oom=True)
    await until(lambda: m.get("s1").state is S.CRASHED, 2, "crashed")
    crash = [e for e in unit.events if isinstance(e, StatusChanged) and e.current == "crashed"][0]
    assert crash.oom_killed and crash.exit_code == 137


@pytest_twisted.ensureDeferred
async def test_engine_loss_reports_unknown_and_return_reconciles(unit: Unit) -> None:
    m = await running(unit)
    unit.engine.break_engine()
    assert m.get("s1").state is S.UNKNOWN
    assert to_json(m.status("s1"))["panelStatus"] == "RUNNING"
    assert to_json(m.list_servers())[0]["status"] == "unknown"
    unit.engine.restore_engine()
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running again")
    await m.send_command("s1", "say hi")
    await until(lambda: "[Server] hi" in unit.lines("s1"), 2, "console")
    assert unit.lines("s1").count(STARTUP_LINE) == 1  # re-attached, nothing duplicated


@pytest_twisted.ensureDeferred
async def test_a_disk_figure_missing_a_part_the_tree_hid_counts_as_over_the_limit(
    unit: Unit,
) -> None:
    m = await running(unit, limits={"disk": 100})
    server = m.get("s1")
    await server.enforce_disk(1024)  # well under the limit: nothing happens
    assert server.state is S.RUNNING
    await server.enforce_disk(1024, uncounted="more than 1024 subvolumes nested in it")
    await until(lambda: server.state is S.OFFLINE, 2, "stopped")
    notices = [line for e in unit.events
               if isinstance(e, ConsoleOutput) and e.stream == "agent" for line in e.lines]
    assert any("cannot be measured whole (more than 1024 subvolumes nested in it)" in n
               and "stopping" in n for n in notices), notices


@pytest_twisted.ensureDeferred
async def test_disk_over_limit_refuses_start_and_stops_a_running_server(unit: Unit) -> None:
    m = await running(unit, limits={"disk": 1})
    with open(os.path.join(unit.config.data_dir, "s1", "big"), "wb") as f:
        f.write(b"x" * (2 * 1024 * 1024))
    await m.check_disk(m.get("s1"))
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "stopped")
    with pytest.raises(InsufficientResources):
        await m.start("s1")
    def notices() -> list[str]:
        return [line for e in unit.events
                if isinstance(e, ConsoleOutput) and e.stream == "agent" for line in e.lines]

    await until(lambda: any("start refused" in n for n in notices()), 2, "refusal notice")
    assert any("over the limit" in n and "stopping" in n for n in notices())


@pytest_twisted.ensureDeferred
async def test_stats_sampled_on_the_interval_and_metrics_shape(unit: Unit) -> None:
    m = await running(unit)
    unit.clock.advance(2.1)
    await until(lambda: any(isinstance(e, ResourceUpdate) for e in unit.events), 2, "sample")
    metrics = to_json(m.server_metrics("s1"))
    assert metrics["cpu"] == 12.5 and metrics["memory"] == 50.0
    assert metrics["network"] == {"in": 100, "out": 200} and metrics["players"] == 0
    await m.kill("s1")
    assert to_json(m.server_metrics("s1"))["cpu"] == 0.0


@pytest_twisted.ensureDeferred
async def test_suspend_refuses_start_until_unsuspended(unit: Unit) -> None:
    m = await running(unit)
    await m.suspend("s1")
    await until(lambda: m.get("s1").state is S.SUSPENDED, 2, "suspended")
    with pytest.raises(Conflict):
        await m.start("s1")
    assert to_json(m.status("s1"))["panelStatus"] == "SUSPENDED"
    await m.unsuspend("s1")
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")


@pytest_twisted.ensureDeferred
async def test_install_failure_and_reinstall(unit: Unit) -> None:
    m = unit.manager()
    m.network_mode = "ctrl-alt-play"
    bad = {**PARAMS, "install": {"script": "exit 3"}, "environment": {"INSTALL_EXIT": 3}}
    result = to_json(await m.create_server("s1", bad))
    assert result["status"] == "install_failed"
    # The install container joins the servers' network, as the server's own does.
    installs = [spec for spec in unit.engine.created if spec.name.endswith("-install")]
    assert installs and installs[0].network == "ctrl-alt-play"
    await m.update("s1", {"environment": {"INSTALL_EXIT": 0}})
    result = to_json(await m.reinstall("s1"))
    assert result["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_update_applies_limits_live(unit: Unit) -> None:
    m = await running(unit, limits={"memory": 100})
    result = to_json(await m.update("s1", {"limits": {"memory": 200}}))
    assert result["limitsAppliedLive"] is True
    cid = m.get("s1").container_id or ""
    assert unit.engine.containers[cid].limits.memory_bytes == 200 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_delete_removes_container_and_optionally_files(unit: Unit) -> None:
    m = await running(unit)
    path = m.server_root("s1").path
    assert os.path.isdir(path)
    await m.delete("s1", purge_files=True)
    assert unit.engine.containers == {}
    assert not os.path.exists(path)
    with pytest.raises(ServerNotFound):
        m.status("s1")
    # Told once, last: whatever else keeps something for the server drops it.
    assert [e for e in unit.events if isinstance(e, ServerRemoved)] == [ServerRemoved("s1")]
    assert unit.events[-1] == ServerRemoved("s1")


@pytest_twisted.ensureDeferred
async def test_new_manager_recovers_lines_once_from_the_mark(unit: Unit) -> None:
    first = await running(unit)
    await first.send_command("s1", "say a")
    await until(lambda: "[Server] a" in unit.lines("s1"), 2, "a")
    await sleep(0.05)  # the mark commit
    first.simulate_crash()
    cid = first.get("s1").container_id or ""
    unit.engine.stdin(cid, "say b")
    second = unit.manager()
    await until(lambda: "[Server] b" in unit.lines("s1"), 2, "b recovered")
    assert unit.lines("s1") == [STARTING, STARTUP_LINE, "> say a", "[Server] a",
                                "> say b", "[Server] b"]
    assert second.console_history("s1", 10) == unit.lines("s1")
    assert second.get("s1").state is S.RUNNING


@pytest_twisted.ensureDeferred
async def test_one_read_goes_out_as_one_event_per_stream_run_within_the_throttle(
    unit: Unit,
) -> None:
    m = await running(unit)
    server = m.get("s1")
    await until(lambda: len(unit.lines("s1")) == 2, 2, "the startup lines")
    server.console.throttle.limit = 4
    unit.clock.advance(1.0)  # a fresh throttle interval
    before = len(unit.events)
    base = 1_795_000_000
    assert calendar.timegm((2026, 11, 18, 11, 6, 40, 0, 0, 0)) == base
    texts = [("stdout", "a"), ("stdout", "b"), ("stderr", "oops"), ("stdout", "c"),
             ("stdout", "d"), ("stdout", "e")]
    server.console.take([LogLine(base * 10**9 + i + 1, stream, text)
                         for i, (stream, text) in enumerate(texts)], None)

    def console() -> list[tuple[str, list[str], float]]:
        return [(e.stream, e.lines, e.timestamp) for e in unit.events[before:]
                if isinstance(e, ConsoleOutput)]

    await until(lambda: console(), 2, "the events, after the mark is stored")
    # Every line is in the buffer and the mark; only the throttle's share goes out,
    # as runs of one stream in their order, each stamped with its first line.
    def at(nanos: int) -> float:
        return (base * 10**9 + nanos) / 1e9

    assert console() == [("stdout", ["a", "b"], at(1)), ("stderr", ["oops"], at(3)),
                         ("stdout", ["c"], at(4))]
    assert m.console_history("s1", 6) == [text for _, text in texts]
    assert (server.console.mark, server.console.mark_count) == (base * 10**9 + 6, 1)
    assert server.console.lines_total >= 6
    unit.clock.advance(1.0)
    await until(lambda: any(e.stream == "agent" for e in unit.events[before:]
                            if isinstance(e, ConsoleOutput)), 2, "the throttle notice")
    notice = [e.lines for e in unit.events[before:]
              if isinstance(e, ConsoleOutput) and e.stream == "agent"]
    assert notice == [["[ctrlagent] console throttled: 2 lines not forwarded in the last 1 s"]]


@pytest_twisted.ensureDeferred
async def test_console_status_and_clear(unit: Unit) -> None:
    m = await running(unit)
    status = to_json(m.console_status("s1"))
    assert status["connected"] is True and status["bufferSize"] == 2
    assert status["lastActivity"].endswith("Z")
    m.console_clear("s1")
    assert m.console_history("s1", 10) == []


def test_config_replace_helper_is_frozen() -> None:
    config = ServersConfig()
    assert replace(config, stop_timeout=1.0).stop_timeout == 1.0


@pytest_twisted.ensureDeferred
async def test_stop_interrupted_by_an_agent_crash_is_finished_after_restart(unit: Unit) -> None:
    first = await running(unit, environment={"IGNORE_SIGTERM": 1}, stop="SIGTERM")
    await first.stop("s1", timeout=100)
    await sleep(0.05)  # state and desired state committed
    first.simulate_crash()
    await first.crashed
    second = unit.manager()
    await until(lambda: second.get("s1").power == "stop", 2, "stop resumed")
    unit.clock.advance(31)  # the default stop timeout of the spec/config
    await until(lambda: second.get("s1").state is S.OFFLINE, 2, "stopped")


@pytest_twisted.ensureDeferred
async def test_replayed_events_of_a_previous_run_are_ignored(unit: Unit) -> None:
    m = await running(unit)
    server = m.get("s1")
    cid = server.container_id or ""
    assert server.run_since_ns is not None  # the engine's start of this run
    old = server.run_since_ns - 5 * 10**9
    assert server.on_event(EngineEvent("die", cid, {}, 1, old)) is None
    assert server.on_event(EngineEvent("kill", cid, {}, None, old)) is None
    await sleep(0.05)
    assert server.state is S.RUNNING
    unit.engine.die(server.container_id or "", 1)  # a real death still counts
    await until(lambda: ("running", "crashed") in unit.statuses("s1"), 2, "crash")


@pytest_twisted.ensureDeferred
async def test_power_actions_on_different_servers_run_concurrently(unit: Unit) -> None:
    m = await running(unit, "a", environment={"IGNORE_SIGTERM": 1}, stop="SIGTERM")
    await m.create_server("b", PARAMS)
    await m.stop("a", timeout=60)  # a slow stop holds a's slot only
    assert m.get("a").power == "stop"
    with pytest.raises(Conflict):
        await m.start("a")
    await m.start("b")
    await until(lambda: m.get("b").state is S.RUNNING, 2, "b running")
    # the Panel's old kill form: stop_server with SIGKILL
    result = to_json(await m.stop("a", signal="SIGKILL"))
    assert result["status"] == "offline"
    cid = m.get("a").container_id
    assert unit.engine.kills[-1] == (cid, "SIGKILL")
    assert cid in unit.engine.containers  # killed, never removed


@pytest_twisted.ensureDeferred
async def test_kill_during_a_restart_cancels_the_restart(unit: Unit) -> None:
    # The server ignores SIGTERM, so the restart's stop phase waits out its timeout.
    m = await running(unit, environment={"IGNORE_SIGTERM": 1}, stop="SIGTERM")
    await m.restart("s1")
    assert m.get("s1").state is S.STOPPING
    await m.kill("s1")
    await until(lambda: m.get("s1").power is None, 2, "restart work finished")
    unit.clock.advance(10)
    await sleep(0)
    assert m.get("s1").state is S.OFFLINE
    assert to_json(m.status("s1"))["desiredState"] == "offline"
    assert "[ctrlagent] restart cancelled: the server was killed" in m.console_history("s1", 10)


@pytest_twisted.ensureDeferred
async def test_a_kill_that_cuts_a_stop_short_answers_with_the_slot_free(unit: Unit) -> None:
    # The kill's answer comes after the stop it ended has settled: a start
    # sent right after it is not refused as "stop in progress".
    m = await running(unit, environment={"IGNORE_SIGTERM": 1}, stop="SIGTERM")
    server = m.get("s1")
    graceful_stop = server.graceful_stop

    async def slow_to_wake(*args: Any) -> None:
        # The stop's own wake-up after the exit comes a moment later (a busy
        # reactor), as it does on a real engine.
        await graceful_stop(*args)
        await deferLater(unit.clock, 0.5, lambda: None)

    server.graceful_stop = slow_to_wake  # type: ignore[method-assign]
    await m.stop("s1", timeout=30)
    assert server.power == "stop"
    killing = ensureDeferred(m.kill("s1"))
    held_at_answer: list[str | None] = []
    killing.addCallback(lambda brief: held_at_answer.append(server.power) or brief)
    unit.clock.advance(0.5)
    await killing
    assert held_at_answer == [None]
    await m.start("s1")
    assert m.get("s1").state in (S.STARTING, S.RUNNING)


@pytest_twisted.ensureDeferred
async def test_a_console_command_waits_the_configured_reply_time(unit: Unit) -> None:
    unit.config = replace(
        unit.config, timeouts=replace(unit.config.timeouts, console_reply_wait=0.3)
    )
    m = await running(unit)
    replying = ensureDeferred(m.console_command("s1", "say hi"))
    unit.clock.advance(0.29)
    assert not replying.called
    unit.clock.advance(0.02)
    assert "hi" in await replying


@pytest_twisted.ensureDeferred
async def test_update_and_delete_change_nothing_when_the_store_cannot_write(unit: Unit) -> None:
    # A full state disk: the store refuses the write.  Neither memory nor disk
    # may then disagree, and the action can simply be tried again.
    m = await running(unit)
    before = m.get("s1").spec

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise InsufficientResources("the agent's state disk is full")

    real_update, real_delete = m.store.update, m.store.delete
    m.store.update = refuse  # type: ignore[method-assign]
    m.store.delete = refuse  # type: ignore[method-assign]
    with pytest.raises(InsufficientResources):
        await m.update("s1", {"name": "renamed", "aliases": ["other-name"]})
    assert m.get("s1").spec == before
    with pytest.raises(ServerNotFound):
        m.get("other-name")
    with pytest.raises(InsufficientResources):
        await m.delete("s1")
    assert m.get("s1").server_id == "s1"  # still known: the delete can be retried
    m.store.update, m.store.delete = real_update, real_delete  # type: ignore[method-assign]
    await m.delete("s1")
    with pytest.raises(ServerNotFound):
        m.get("s1")
    assert [r.server_id for r in m.store.load()] == []


@pytest_twisted.ensureDeferred
async def test_a_kill_whose_death_no_event_reports_settles_after_the_configured_grace(
    unit: Unit,
) -> None:
    unit.config = replace(unit.config, timeouts=replace(unit.config.timeouts, kill_grace=4.0))
    m = await running(unit)
    unit.engine.event_streams.clear()  # the engine's events are lost: no "die" comes
    killed = m.kill("s1")
    await sleep(0.05)
    assert not killed.called and m.get("s1").state is S.RUNNING
    unit.clock.advance(3.9)
    await sleep(0.05)
    assert not killed.called  # still within timeouts.kill_grace
    unit.clock.advance(0.2)
    await until(lambda: killed.called, 2, "the kill settled after the grace")
    result = to_json(await killed)
    assert result["status"] == "offline"  # settled from inspect, as expected
    assert ("running", "crashed") not in unit.statuses("s1")


@pytest_twisted.ensureDeferred
async def test_unfollowed_figures_are_read_seldom_and_when_asked_for(unit: Unit) -> None:
    # Kernel stats (the fake engine offers a reader), 30 s apart while nothing
    # follows the figures live; a read of them takes a sample if the latest
    # is older than stats_interval (2 s).
    unit.config = replace(unit.config, servers=replace(
        unit.config.servers, stats_mode="stream", stats_idle_interval=30.0))
    m = unit.manager()
    m.follow_figures(lambda: following[0])
    following = [False]
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    await until(lambda: m.get("s1").state is S.RUNNING, 2, "running")
    await until(lambda: len(unit.engine.stats_readers) == 1, 2, "a kernel reader")
    (reader,) = unit.engine.stats_readers
    updates = lambda: [e for e in unit.events if isinstance(e, ResourceUpdate)]  # noqa: E731
    first = reader.reads
    ticks = lambda seconds: [unit.clock.advance(0.05) for _ in range(round(seconds / 0.05))]  # noqa: E731
    ticks(10)  # the hub's timer: 40 visits per 2 s
    assert reader.reads == first
    # Asked for: read now, published as any sample.
    published = len(updates())
    figures = m.server_metrics("s1")
    assert reader.reads == first + 1 and figures.at == unit.clock.seconds()
    assert len(updates()) == published + 1
    assert m.status("s1").resources is not None and reader.reads == first + 1
    # The Panel link connects: every 2 s.
    following[0] = True
    ticks(10)
    assert reader.reads == first + 1 + 5


@pytest.mark.parametrize("stop", [
    "stop", "SIGTERM", "^C", "SIGINT ", {"type": "command", "value": "quit"},
    {"type": "signal", "value": "SIGTERM"}, {"type": "command", "value": "SIGTERM"}, "", None,
])
def test_the_fake_manager_reads_a_stop_command_as_the_spec_does(stop: Any) -> None:
    from ctrlagent.servers.spec import parse_spec
    from ctrlagent.testing.servers import _stop_command

    params = {**PARAMS, "stop": stop}
    method = parse_spec("s1", params, ServersConfig()).stop
    want = method.value if method.kind == "command" else None
    assert _stop_command(params) == want


@pytest_twisted.ensureDeferred
async def test_the_fake_manager_plays_a_typed_stop_as_the_stop_action() -> None:
    from ctrlagent.testing.servers import FakeServerManager

    fake = FakeServerManager()
    await fake.create_server("s1", {**PARAMS, "stop": {"type": "command", "value": "end"}})
    await fake.start("s1")
    await fake.send_command("s1", "stop")  # not its stop command: a plain line
    assert fake.servers["s1"].status == "running"
    gate = fake.hold("stop")
    answered = fake.send_command("s1", "end")
    assert answered.called  # once the stop has begun, as the real manager answers
    assert fake.servers["s1"].status == "stopping"
    gate.callback(None)
    assert fake.servers["s1"].status == "offline"
    assert [c for c in fake.calls if c[0] == "stop"] == [("stop", "s1")]
    assert fake.console_history("s1", 3)[-2:] == [
        "[ctrlagent] the stop command was typed: stopping the server", "> end"]


@pytest_twisted.ensureDeferred
async def test_a_crash_judged_after_a_kill_settled_the_death_fires_nothing(unit: Unit) -> None:
    # The game dies by itself; while the crash's inspect is under way, the
    # operator's kill looks at the container, finds it down and settles the
    # server offline.  The crash judgement then has nothing left to judge.
    from twisted.internet.defer import Deferred

    m = await running(unit)
    server = m.get("s1")
    cid = server.container_id or ""
    held: Deferred[None] = Deferred()
    inspect = unit.engine.inspect
    calls: list[str] = []

    async def first_inspect_held(container_id: str) -> Any:
        calls.append(container_id)
        if len(calls) == 1:
            await held  # the crash's look, held until the kill has settled
        return await inspect(container_id)

    unit.engine.inspect = first_inspect_held  # type: ignore[method-assign]
    unit.engine.die(cid, 1)
    await until(lambda: len(calls) == 1, 2, "the crash's inspect")
    await m.kill("s1")
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline by the kill")
    held.callback(None)
    await sleep(0.05)
    assert m.get("s1").state is S.OFFLINE
    assert ("offline", "crashed") not in unit.statuses("s1")
    assert server.crash_report is None and server.desired == "offline"


@pytest_twisted.ensureDeferred
async def test_a_server_that_starts_or_stops_takes_console_lines(unit: Unit) -> None:
    # The real manager: its container runs, so its stdin takes lines.
    m = unit.manager()
    await m.create_server("s1", {**PARAMS, "startupDone": "a line never printed",
                                 "environment": {"STOP_COMMAND": "quit"}})
    await m.start("s1")
    assert m.get("s1").state is S.STARTING
    await m.send_command("s1", "say early")
    await until(lambda: "[Server] early" in unit.lines("s1"), 2, "the line while starting")
    await m.send_command("s1", "stop")  # the stop, which this game ignores
    assert m.get("s1").state is S.STOPPING
    await m.send_command("s1", "say late")
    await until(lambda: "[Server] late" in unit.lines("s1"), 2, "the line while stopping")
    unit.clock.advance(5.1)  # killed after the stop timeout
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    with pytest.raises(Conflict):
        await m.send_command("s1", "say gone")


@pytest_twisted.ensureDeferred
async def test_the_fake_manager_takes_console_lines_in_the_same_states() -> None:
    from ctrlagent.testing.servers import FakeServerManager

    fake = FakeServerManager()
    await fake.create_server("s1", {**PARAMS, "stop": {"type": "command", "value": "end"}})
    starting = fake.hold("start")
    begun = fake.start("s1")
    assert fake.servers["s1"].status == "starting"
    await fake.send_command("s1", "say early")
    await fake.console_input("s1", "raw early\n")
    # Its stop command while the start action runs: a plain line, as the
    # real manager's while its start holds the power slot.
    await fake.send_command("s1", "end")
    assert fake.servers["s1"].status == "starting"
    starting.callback(None)
    await begun
    stopping = fake.hold("stop")
    ended = fake.stop("s1")
    assert fake.servers["s1"].status == "stopping"
    await fake.send_command("s1", "say late")
    stopping.callback(None)
    await ended
    assert fake.console_history("s1", 10)[:3] == ["> say early", "> raw early", "> end"]
    assert "> say late" in fake.console_history("s1", 10)
    with pytest.raises(Conflict):
        await fake.send_command("s1", "say gone")
    with pytest.raises(Conflict):
        await fake.console_input("s1", "gone\n")
