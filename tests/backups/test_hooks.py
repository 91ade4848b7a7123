"""
Console hooks around a backup of a running server (against the fake server
manager): ``before`` commands, a wait for a console pattern (bounded), and
``after`` commands whatever the outcome; none for a stopped server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from ctrlagent.servers.console import stamp
from tests.backups.rig import Rig, make_rig
from tests.backups.test_manager import until

HOOKS = {"before": ["save-off", "save-all"], "wait_for": r"Saved the (game|world)",
         "wait_timeout": 30, "after": ["save-on"]}


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path, hooks=HOOKS)
    (r.root() / "world").write_text("data")
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


async def start(rig: Rig) -> object:
    m = rig.manager()
    m.startService()
    await m.ready
    return m


@pytest_twisted.ensureDeferred
async def test_hooks_wait_for_the_pattern_before_the_archive_is_written(rig: Rig) -> None:
    m = await start(rig)
    await rig.servers.start("srv1")
    rig.driver.gate.clear()
    answer = await m.create_backup("srv1")  # type: ignore[attr-defined]
    server = rig.servers.servers["srv1"]
    await until(lambda: server.stdin == ["save-off", "save-all"], "the before commands")
    assert rig.driver.active == 0  # no archive before the pattern
    rig.servers.emit_console("srv1", "[Server] Saved the game")
    rig.driver.gate.set()
    record = await m.finished(answer["backupId"])  # type: ignore[attr-defined]
    assert record.status == "completed" and not record.notes
    assert server.stdin == ["save-off", "save-all", "save-on"]
    assert rig.driver.most == 1


@pytest_twisted.ensureDeferred
async def test_a_pattern_never_seen_times_out_with_a_note_and_still_runs_after(
        rig: Rig) -> None:
    m = await start(rig)
    await rig.servers.start("srv1")
    answer = await m.create_backup("srv1")  # type: ignore[attr-defined]
    server = rig.servers.servers["srv1"]
    await until(lambda: server.stdin == ["save-off", "save-all"], "the before commands")
    rig.clock.advance(31)
    record = await m.finished(answer["backupId"])  # type: ignore[attr-defined]
    assert record.status == "completed"
    assert "never printed" in record.notes[0]
    assert server.stdin[-1] == "save-on"


@pytest_twisted.ensureDeferred
async def test_a_failed_backup_still_runs_the_after_commands(rig: Rig) -> None:
    m = await start(rig)
    await rig.servers.start("srv1")
    rig.driver.free = 0
    (rig.root() / "more").write_bytes(b"x" * 1000)
    answer = await m.create_backup("srv1")  # type: ignore[attr-defined]
    server = rig.servers.servers["srv1"]
    await until(lambda: len(server.stdin) == 2, "the before commands")
    rig.servers.emit_console("srv1", "Saved the world")
    record = await m.finished(answer["backupId"])  # type: ignore[attr-defined]
    assert record.status == "failed"
    assert server.stdin == ["save-off", "save-all", "save-on"]


@pytest_twisted.ensureDeferred
async def test_no_hooks_for_a_stopped_server(rig: Rig) -> None:
    m = await start(rig)
    answer = await m.create_backup("srv1")  # type: ignore[attr-defined]
    record = await m.finished(answer["backupId"])  # type: ignore[attr-defined]
    assert record.status == "completed"
    assert rig.servers.servers["srv1"].stdin == []


@pytest_twisted.ensureDeferred
async def test_an_anchored_pattern_matches_the_games_line_while_console_timestamps_are_on(
        tmp_path: Path) -> None:
    r = make_rig(tmp_path, hooks={**HOOKS, "wait_for": r"^Saved the game$"})
    (r.root() / "world").write_text("data")
    m = r.manager()
    m.startService()
    await m.ready
    try:
        await r.servers.start("srv1")
        await r.servers.update_console_settings("srv1", {"timestamps": True})
        answer = await m.create_backup("srv1")  # type: ignore[attr-defined]
        server = r.servers.servers["srv1"]
        await until(lambda: server.stdin == ["save-off", "save-all"], "the before commands")
        # What listeners get while timestamps are on: the console's stamp,
        # then the game's line (a stamp-like start of the game's own stays).
        r.servers.emit_console("srv1", stamp(r.clock.seconds()) + "[12:00:00] Saved the game")
        r.servers.emit_console("srv1", stamp(r.clock.seconds()) + "Saved the game")
        r.clock.advance(31)  # past wait_timeout: unseen, the backup would note it
        record = await m.finished(answer["backupId"])  # type: ignore[attr-defined]
        assert record.status == "completed" and not record.notes  # no timeout note
        assert server.stdin == ["save-off", "save-all", "save-on"]
    finally:
        await m.stopService()
        r.pool.stop()
