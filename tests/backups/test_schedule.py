"""
Backup schedules on a fake clock: due runs start a backup, a run missed
while the agent was down runs once (not once per missed time), schedules
survive a restart, and retention removes only scheduled backups beyond
``last`` / older than ``days``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from ctrlagent.backups.manager import BackupManager
from ctrlagent.errors import InvalidInput
from tests.backups.rig import Rig, make_rig
from tests.backups.test_manager import backup, started, until

HOUR = 3600.0


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    (r.root() / "world").write_text("data")
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


async def run_due(m: BackupManager) -> list[str]:
    """
    Look at the schedules (the clock's own tick may have looked already)
    and wait for every backup and retention started; the new backups' ids.
    """
    before = {b["id"] for b in await scheduled(m)}
    await m.tick()
    await until(lambda: not m._work and not m._ticking and not m.tracker._pending, "the runs")
    rows = (await m.store.find("srv1"))
    return [r.id for r in rows if r.scheduled and r.id not in before and r.status == "completed"]


async def scheduled(m: BackupManager) -> list[dict]:
    return [b for b in (await m.list_backups("srv1"))["backups"] if b["name"] == "scheduled"]


@pytest_twisted.ensureDeferred
async def test_a_due_schedule_runs_once_per_due_time(rig: Rig) -> None:
    m = await started(rig)
    await m.set_backup_schedule("srv1", "0 * * * *", 10, "local")
    assert await run_due(m) == []
    rig.clock.advance(HOUR)
    assert len(await run_due(m)) == 1
    assert await run_due(m) == []
    assert [b["status"] for b in await scheduled(m)] == ["completed"]


@pytest_twisted.ensureDeferred
async def test_a_run_missed_during_downtime_runs_once_after_restart(rig: Rig) -> None:
    m = await started(rig)
    await m.set_backup_schedule("srv1", "*/5 * * * *", None, None)
    await m.stopService()
    rig.clock.advance(10 * HOUR)  # 120 runs missed
    m2 = rig.manager()
    m2.startService()  # the first tick runs at start
    await m2.ready
    assert len(await run_due(m2)) == 1
    assert len(await scheduled(m2)) == 1
    assert await run_due(m2) == []
    rig.clock.advance(5 * 60)
    assert len(await run_due(m2)) == 1


@pytest_twisted.ensureDeferred
async def test_retention_keeps_the_newest_scheduled_backups_only(rig: Rig) -> None:
    m = await started(rig)
    manual = await backup(m, name="manual")
    await m.set_backup_schedule("srv1", "0 * * * *", {"last": 2}, "local")
    made = []
    for _ in range(4):
        rig.clock.advance(HOUR)
        made += await run_due(m)
    left = await scheduled(m)
    assert [b["id"] for b in left] == made[:1:-1]
    ids = [b["id"] for b in (await m.list_backups("srv1"))["backups"]]
    assert manual.id in ids


@pytest_twisted.ensureDeferred
async def test_retention_by_days_removes_older_scheduled_backups(rig: Rig) -> None:
    m = await started(rig)
    await m.set_backup_schedule("srv1", "0 0 * * *", {"days": 2}, "local")
    made = []
    for _ in range(4):
        rig.clock.advance(24 * HOUR)
        made += await run_due(m)
    left = [b["id"] for b in await scheduled(m)]
    # At the last run (day 4) the ones made on days 2, 3 and 4 are within two days.
    assert set(left) == set(made[-3:])


@pytest_twisted.ensureDeferred
async def test_schedule_payloads_are_validated_and_an_empty_cron_removes_it(rig: Rig) -> None:
    m = await started(rig)
    for cron, retain, field in (("61 * * * *", 1, "cron"), ("* * *", 1, "cron"),
                                ("0 * * * *", -1, "retain"), ("0 * * * *", "x", "retain"),
                                (5, 1, "cron")):
        with pytest.raises(InvalidInput) as e:
            await m.set_backup_schedule("srv1", cron, retain, "local")
        assert e.value.field == field
    with pytest.raises(InvalidInput):
        await m.set_backup_schedule("srv1", "0 * * * *", 1, "tape")
    await m.set_backup_schedule("srv1", "0 * * * *", 1, "local")
    assert len(await m.store.schedules()) == 1
    await m.set_backup_schedule("srv1", "", None, None)
    assert await m.store.schedules() == []


@pytest_twisted.ensureDeferred
async def test_the_node_default_schedule_applies_unless_a_server_opts_out(
        tmp_path: Path) -> None:
    r = make_rig(tmp_path / "n", schedule={"cron": "0 * * * *", "retain": 2})
    try:
        (r.add_server("srv2") / "f").write_text("x")
        (r.root() / "f").write_text("x")
        m = await started(r)
        await m.set_backup_schedule("srv2", "", None, None)
        await until(lambda: not m._ticking, "the first tick")
        r.clock.advance(HOUR)
        await run_due(m)
        rows = await m.store.find()
        assert [row.server_id for row in rows if row.scheduled] == ["srv1"]
    finally:
        for manager in r.managers:
            if manager.running:
                await manager.stopService()
        r.pool.stop()
