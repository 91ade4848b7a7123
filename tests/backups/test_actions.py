"""
The backup action family through the real action registry (the pipeline
both transports use), over a real ``BackupManager``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from ctrlagent.actions.backups import backup_actions
from ctrlagent.actions.registry import ActionRegistry
from ctrlagent.config import TimeoutsConfig
from ctrlagent.errors import InvalidInput, NotFound
from ctrlagent.wire.command import Command
from ctrlagent.work import Deadlines, Tracker
from tests.backups.rig import Rig, make_rig


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    (r.root() / "world").write_text("data")
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


@pytest_twisted.ensureDeferred
async def test_every_backup_action_through_the_registry(rig: Rig) -> None:
    m = rig.manager()
    m.startService()
    await m.ready
    registry = ActionRegistry(servers=rig.servers,
                              deadlines=Deadlines(reactor, Tracker(), TimeoutsConfig()))
    for spec in backup_actions(m):
        registry.register(spec)
    assert {"create_backup", "list_backups", "restore_backup", "delete_backup",
            "set_backup_schedule"} <= set(registry.names())
    assert "CreateBackupPayload" in registry.openapi_schemas()

    async def run(action: str, **params: object) -> dict:
        result = await registry.dispatch(Command(action, "srv1", dict(params)))
        return result.data

    created = await run("create_backup", name="nightly", ignore=["*.log"])
    assert created["status"] == "running"
    await m.finished(created["backupId"])
    listed = await run("list_backups")
    assert listed["count"] == 1 and listed["backups"][0]["name"] == "nightly"
    (rig.root() / "world").write_text("changed")
    await run("restore_backup", backupId=created["backupId"], truncate=True)
    assert (rig.root() / "world").read_text() == "data"
    await run("set_backup_schedule", cron="0 3 * * *", retain={"last": 7}, driver="local")
    assert (await m.store.schedules())[0].retain_last == 7
    with pytest.raises(InvalidInput) as e:
        await run("set_backup_schedule", cron="0 3 * *", retain=7)
    assert e.value.field == "cron"
    with pytest.raises(InvalidInput):
        await run("restore_backup")
    with pytest.raises(InvalidInput):
        await run("create_backup", ignore="*.log")
    await run("delete_backup", backupId=created["backupId"])
    with pytest.raises(NotFound):
        await run("delete_backup", backupId=created["backupId"])
