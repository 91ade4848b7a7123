"""
Raw console input, Ctrl+C and the per-server console settings, on the real
``ServerManager`` over the in-memory engine: what the Panel's
``console:input``, ``console:interrupt`` and ``console:settings:*`` reach.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.actions.console import SETTINGS, THROTTLE_INTERVAL_MAX
from ctrlagent.errors import Conflict, InvalidInput
from ctrlagent.events import ConsoleOutput
from ctrlagent.servers import console as consoles
from ctrlagent.servers.console import ConsoleSettings
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from tests.servers.conftest import Unit, sleep, until

S = ServerState
PARAMS = {"image": "img", "startup": "/game", "stop": "stop", "startupDone": "Done ("}


async def running(unit: Unit, sid: str = "s1", m: ServerManager | None = None) -> ServerManager:
    m = m or unit.manager()
    await m.create_server(sid, dict(PARAMS))
    await m.start(sid)
    await until(lambda: m.get(sid).state is S.RUNNING, 2, "running")
    return m


@pytest_twisted.ensureDeferred
async def test_raw_input_reaches_stdin_as_it_is_without_a_newline(unit: Unit) -> None:
    m = await running(unit)
    assert await m.console_input("s1", "say par") == {"serverId": "s1", "bytes": 7}
    await sleep(0.05)
    assert "> say par" not in unit.lines("s1")  # no newline was added: no line yet
    await m.console_input("s1", "tial\nsay é\n")
    await until(lambda: "[Server] é" in unit.lines("s1"), 2, "the second line")
    assert "> say partial" in unit.lines("s1") and "[Server] partial" in unit.lines("s1")
    # A line written by send_command still gets its newline.
    await m.send_command("s1", "say whole")
    await until(lambda: "[Server] whole" in unit.lines("s1"), 2, "send_command")


@pytest_twisted.ensureDeferred
async def test_interrupt_sends_sigint_to_the_process(unit: Unit) -> None:
    m = await running(unit)
    cid = m.get("s1").container_id
    assert await m.console_interrupt("s1") == {"serverId": "s1", "signal": "SIGINT"}
    assert (cid, "SIGINT") in unit.engine.kills
    assert "[ctrlagent] Ctrl+C (SIGINT) sent to the server's process" in m.console_history("s1", 5)
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "the game stopped on SIGINT")
    for call in (m.console_interrupt("s1"), m.console_input("s1", "x")):
        with pytest.raises(Conflict):
            await call


@pytest_twisted.ensureDeferred
async def test_settings_apply_live_and_survive_an_agent_restart(unit: Unit) -> None:
    m = await running(unit)
    assert m.console_settings("s1")["settings"] == {
        "historySize": 1000, "throttleLines": 2000, "throttleInterval": 1.0,
        "timestamps": False}
    for i in range(30):
        await m.console_input("s1", "say {}\n".format(i))
    await until(lambda: "[Server] 29" in unit.lines("s1"), 2, "30 lines")
    answer = await m.update_console_settings(
        "s1", {"historySize": 10, "throttleLines": 3, "timestamps": True})
    assert answer["settings"] == {"historySize": 10, "throttleLines": 3,
                                  "throttleInterval": 1.0, "timestamps": True}
    # The history shrank at once to the newest 10 lines, now stamped.
    history = m.console_history("s1", 100)
    assert len(history) == 10 and history[-1].endswith("[Server] 29")
    prefix = time.strftime("[%H:%M:%S] ", time.gmtime(unit.clock.seconds()))
    assert all(line.startswith(prefix) for line in history)
    # The throttle hands on 3 lines per window, every one stamped.
    unit.events.clear()
    unit.clock.advance(5)
    await m.console_input("s1", "".join("say t{}\n".format(i) for i in range(5)))
    await sleep(0.1)
    got = [line for e in unit.events if isinstance(e, ConsoleOutput) and e.stream == "stdout"
           for line in e.lines]
    assert len(got) == 3 and all(line.startswith("[") for line in got)
    assert any("[Server] t4" in line for line in m.console_history("s1", 20))
    await m.stopService()
    # A new agent on the same store: the settings are in force again.
    second = unit.manager()
    assert second.console_settings("s1")["settings"]["historySize"] == 10
    assert second.get("s1").console.throttle.limit == 3
    assert second.get("s1").console.timestamps is True


@pytest_twisted.ensureDeferred
async def test_bad_settings_are_refused_and_change_nothing(unit: Unit) -> None:
    m = await running(unit)
    before = m.console_settings("s1")
    for bad, field in (
        ({"historySize": 10, "colour": "red", "bell": True}, "settings"),
        ({"historySize": 5}, "settings.historySize"),
        ({"historySize": 10.5}, "settings.historySize"),
        ({"throttleLines": -1}, "settings.throttleLines"),
        ({"throttleInterval": 0}, "settings.throttleInterval"),
        ({"throttleInterval": float("nan")}, "settings.throttleInterval"),
        ({"timestamps": "yes"}, "settings.timestamps"),
        ([1, 2], "settings"),
    ):
        with pytest.raises(InvalidInput) as refused:
            await m.update_console_settings("s1", bad)
        assert refused.value.details["field"] == field, bad
    with pytest.raises(InvalidInput) as refused:
        await m.update_console_settings("s1", {"colour": 1, "bell": 2})
    assert refused.value.details["unknown"] == ["bell", "colour"]
    assert "bell, colour" in refused.value.message and "historySize" in refused.value.message
    assert m.console_settings("s1") == before


@pytest_twisted.ensureDeferred
async def test_stored_settings_that_cannot_be_used_leave_the_defaults(unit: Unit) -> None:
    m = await running(unit)
    await m.update_console_settings("s1", {"historySize": 50})
    await m.stopService()
    import sqlite3

    db = sqlite3.connect(m.store.path)
    db.execute("UPDATE console_settings SET settings = ? WHERE server_id = 's1'",
               ('{"historySize": 3}',))
    db.commit()
    db.close()
    warnings: list[Any] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(warnings.append)
    try:
        second = unit.manager()
    finally:
        globalLogPublisher.removeObserver(warnings.append)
    assert second.console_settings("s1")["settings"]["historySize"] == 1000
    assert any("console settings" in str(w.get("log_format", "")) for w in warnings)


@pytest_twisted.ensureDeferred
async def test_a_deleted_server_takes_its_settings_with_it(unit: Unit) -> None:
    m = await running(unit)
    await m.update_console_settings("s1", {"timestamps": True})
    await m.kill("s1")
    await m.delete("s1")
    await until(lambda: "s1" not in m.servers, 2, "deleted")
    await running(unit, "s1", m)
    assert m.console_settings("s1")["settings"]["timestamps"] is False


def test_the_actions_check_the_bounds_the_console_keeps() -> None:
    """The registry's declared settings and the domain's check agree."""
    assert set(SETTINGS) == set(consoles._SETTING_KEYS)
    assert (SETTINGS["historySize"].minimum, SETTINGS["historySize"].maximum) == (  # type: ignore[attr-defined]
        consoles.HISTORY_MIN, consoles.HISTORY_MAX)
    assert SETTINGS["throttleLines"].maximum == consoles.THROTTLE_LINES_MAX  # type: ignore[attr-defined]
    assert SETTINGS["throttleInterval"].minimum == consoles.THROTTLE_INTERVAL_MIN  # type: ignore[attr-defined]
    assert THROTTLE_INTERVAL_MAX == consoles.THROTTLE_INTERVAL_MAX
    base = ConsoleSettings(1000, 2000, 1.0)
    assert base.changed({}) == base


@pytest_twisted.ensureDeferred
async def test_the_stop_command_typed_key_by_key_is_the_stop_action(unit: Unit) -> None:
    m = await running(unit)
    for key in "stop":
        await m.console_input("s1", key)
    assert m.get("s1").state is S.RUNNING  # no line yet
    assert await m.console_input("s1", "\n") == {"serverId": "s1", "bytes": 1}
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    assert unit.statuses("s1")[-2:] == [("running", "stopping"), ("stopping", "offline")]
    server = m.get("s1")
    assert server.desired == "offline" and server.crash_report is None
    assert unit.engine.kills == []
    history = m.console_history("s1", 20)
    assert history.count("> stop") == 1  # the game read the line once
    assert any("stop command was typed" in line for line in history)


@pytest_twisted.ensureDeferred
async def test_a_stop_pasted_among_other_lines_is_the_stop_action(unit: Unit) -> None:
    m = await running(unit)
    await m.console_input("s1", "say before\nstop\nsay after\n")
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    assert unit.statuses("s1")[-2:] == [("running", "stopping"), ("stopping", "offline")]
    assert m.get("s1").crash_report is None and m.get("s1").desired == "offline"
    lines = unit.lines("s1")
    assert "[Server] before" in lines and lines.count("> stop") == 1


@pytest_twisted.ensureDeferred
async def test_a_stop_typed_with_a_carriage_return_is_ended_with_a_line_feed(unit: Unit) -> None:
    # A terminal's Enter is a CR, which a game reading a pipe (as this one,
    # a shell's read) does not take for a line end: the Stop writes a LF for
    # it, so the game reads its stop command and ends by itself.
    m = await running(unit)
    await m.console_input("s1", "sto")
    assert await m.console_input("s1", "p\rsay after") == {"serverId": "s1", "bytes": 11}
    await until(lambda: m.get("s1").state is S.OFFLINE, 2, "offline")
    assert unit.engine.kills == []
    assert ("stopping", "crashed") not in unit.statuses("s1")
    assert unit.lines("s1").count("> stop") == 1


@pytest_twisted.ensureDeferred
async def test_keys_typed_while_stdin_reopens_keep_their_order(unit: Unit) -> None:
    # The Panel's commands run side by side: "stop" and then Enter, sent
    # while the console's stdin is being opened again, are still the stop
    # command typed, in that order.
    from twisted.internet.defer import Deferred

    m = await running(unit)
    server = m.get("s1")
    pipe = server.console._stdin
    assert pipe is not None
    await pipe.close()
    opened: Deferred[None] = Deferred()
    open_stdin = unit.engine.open_stdin

    async def held_open(cid: str) -> Any:
        await opened
        return await open_stdin(cid)

    unit.engine.open_stdin = held_open  # type: ignore[method-assign]
    first = m.console_input("s1", "say one\nsto")
    second = m.console_input("s1", "p")
    third = m.console_input("s1", "\n")
    assert not first.called
    opened.callback(None)
    await first
    await second
    await third
    await until(lambda: server.state is S.OFFLINE, 2, "offline")
    assert unit.engine.kills == [] and server.crash_report is None
    lines = unit.lines("s1")
    assert lines.index("> say one") < lines.index("> stop")


@pytest_twisted.ensureDeferred
async def test_input_that_only_looks_like_the_stop_is_plain_input(unit: Unit) -> None:
    m = await running(unit)
    server = m.get("s1")
    await m.console_input("s1", "x")
    await m.console_input("s1", "stop\n")  # the game reads "xstop"
    await m.send_command("s1", "say mid")
    await m.console_input("s1", "say " + "y" * 300)
    await m.console_input("s1", "\nsay stop\n")  # a long line, then not the stop
    await until(lambda: "[Server] stop" in unit.lines("s1"), 2, "the last line")
    assert "> xstop" in unit.lines("s1")
    assert server.state is S.RUNNING and server.power is None
    # A power action under way: the stop word is a plain line.
    server.slot.claim("restart")
    await m.console_input("s1", "stop\n")
    await until(lambda: unit.lines("s1").count("> stop") == 1, 2, "the plain line")
    server.slot.release()
    # A new run's stdin starts with an empty line: what the last run had
    # typed does not count.
    await until(lambda: server.state is S.CRASHED or server.state is S.OFFLINE, 2, "it ended")
    await m.start("s1")
    await until(lambda: server.state is S.RUNNING, 2, "running again")
    await m.console_input("s1", "st")
    await m.kill("s1")
    await m.start("s1")
    await until(lambda: server.state is S.RUNNING, 2, "running a third time")
    await m.console_input("s1", "op\n")
    await until(lambda: "> op" in unit.lines("s1"), 2, "the new run's line")
    assert server.state is S.RUNNING


@pytest_twisted.ensureDeferred
async def test_the_fake_manager_plays_a_typed_stop_on_raw_input_too() -> None:
    from ctrlagent.testing.servers import FakeServerManager

    fake = FakeServerManager()
    await fake.create_server("s1", {**PARAMS, "stop": {"type": "command", "value": "end"}})
    await fake.start("s1")
    await fake.console_input("s1", "xend\n")  # not its stop command
    assert fake.servers["s1"].status == "running"
    await fake.console_input("s1", "e")
    await fake.console_input("s1", "nd\n")
    assert fake.servers["s1"].status == "offline"
    assert [c for c in fake.calls if c[0] == "stop"] == [("stop", "s1")]
    assert fake.console_history("s1", 3)[-2:] == [
        "[ctrlagent] the stop command was typed: stopping the server", "> end"]
    await fake.create_server("s2", {**PARAMS, "stop": {"type": "command", "value": "end"}})
    await fake.start("s2")
    await fake.console_input("s2", "say a\nend\n")  # pasted among other lines
    assert fake.servers["s2"].status == "offline"


def test_the_typed_line_follows_line_ends_runs_and_its_limit() -> None:
    from ctrlagent.servers.typed import TypedLine

    typed = TypedLine(limit=8)
    assert list(typed.lines(1, "sto")) == []
    typed.wrote(1, "sto")
    assert list(typed.lines(1, "p\r\nx")) == [("stop", 1), ("", 2)]
    typed.wrote(1, "p\r\nx")
    assert list(typed.lines(1, "\n")) == [("x", 0)]
    assert list(typed.lines(2, "y\n")) == [("y", 1)]  # a new run: nothing before
    typed.wrote(1, "123456789")  # longer than the limit: never a stop
    assert list(typed.lines(1, "\nstop\n")) == [(None, 0), ("stop", 5)]
    typed.wrote(1, "\nab")
    assert list(typed.lines(1, "c\n")) == [("abc", 1)]
    typed.ended(1)
    assert list(typed.lines(1, "\n")) == [("", 0)]
    assert list(typed.lines(1, "a" * 9 + "\n" + "b" * 8 + "\r")) == [(None, 9), ("b" * 8, 18)]
