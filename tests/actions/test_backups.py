"""
The backup actions through the registry, over a fake ``IBackupManager``:
their payloads, what a node without backups answers, and the guard that
refuses starts and file writes while a server's restore runs.
(tests/backups/test_actions.py drives them over the real manager.)
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ctrlagent.actions import Dispatcher
from ctrlagent.actions.backups import GUARDED_DURING_RESTORE, UNAVAILABLE
from ctrlagent.interfaces import IBackupManager
from tests.actions.rig import UUID, FakeHost, Rig


@implementer(IBackupManager)
class FakeBackups:
    """Records the calls; ``holding`` maps a server to the work that holds it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.holding: dict[str, str] = {}

    def create_backup(self, server_id: str, name: object = None, driver: object = None,
                      ignore: object = None) -> Any:
        self.calls.append(("create", server_id, name, driver, ignore))
        return succeed({"backupId": "b1", "status": "running"})

    def list_backups(self, server_id: str) -> Any:
        self.calls.append(("list", server_id))
        return succeed({"backups": [], "count": 0})

    def restore_backup(self, server_id: str, backup_id: object, truncate: object = False,
                       stop: object = False) -> Any:
        self.calls.append(("restore", server_id, backup_id, truncate, stop))
        return succeed({"backupId": backup_id, "files": 1})

    def delete_backup(self, server_id: str, backup_id: object) -> Any:
        self.calls.append(("delete", server_id, backup_id))
        return succeed({})

    def set_backup_schedule(self, server_id: str, cron: object, retain: object = None,
                            driver: object = None) -> Any:
        self.calls.append(("schedule", server_id, cron, retain, driver))
        return succeed({})

    def busy(self, server_id: str) -> str | None:
        return self.holding.get(server_id)

    def add_listener(self, listener: object) -> None:
        pass

    def remove_listener(self, listener: object) -> None:
        pass


@pytest.fixture
def backups() -> FakeBackups:
    return FakeBackups()


@pytest.fixture
def brig(backups: FakeBackups) -> Rig:
    r = Rig()
    r.dispatcher = Dispatcher(servers=r.servers, files=r.files, system=FakeHost(),
                              clock=r.clock, tracker=r.tracker, backups=backups)
    r.created(UUID)
    return r


def test_the_fake_provides_the_interface(backups: FakeBackups) -> None:
    assert verifyObject(IBackupManager, backups)


def test_each_action_passes_its_parsed_payload_to_the_manager(
    brig: Rig, backups: FakeBackups
) -> None:
    assert brig.ok("create_backup", UUID, name="n", driver="local", ignore=["*.log"]) == {
        "backupId": "b1", "status": "running"}
    assert brig.ok("list_backups", UUID) == {"backups": [], "count": 0}
    brig.ok("restore_backup", UUID, backupId="b1", stop=True)
    brig.ok("delete_backup", UUID, backupId="b1")
    brig.ok("set_backup_schedule", UUID, cron="0 4 * * *", retain={"last": 3}, driver="local")
    assert backups.calls == [
        ("create", UUID, "n", "local", ["*.log"]),
        ("list", UUID),
        ("restore", UUID, "b1", False, True),
        ("delete", UUID, "b1"),
        ("schedule", UUID, "0 4 * * *", {"last": 3}, "local"),
    ]


def test_a_missing_backup_id_is_invalid_payload_before_the_manager_is_asked(
    brig: Rig, backups: FakeBackups
) -> None:
    for action in ("restore_backup", "delete_backup"):
        error = brig.error(action, UUID)
        assert (error.code, error.details.get("field")) == ("INVALID_PAYLOAD", "backupId")
    assert brig.error("create_backup", UUID, ignore="*.log").code == "INVALID_PAYLOAD"
    assert brig.error("list_backups", "no-such-server").code == "SERVER_NOT_FOUND"
    assert backups.calls == []


def test_the_openapi_document_declares_the_backup_payloads(brig: Rig) -> None:
    schemas = brig.dispatcher.openapi_schemas()
    assert set(schemas["CreateBackupPayload"]["properties"]) == {"name", "driver", "ignore"}
    assert set(schemas["RestoreBackupPayload"]["properties"]) == {"backupId", "truncate", "stop"}
    assert schemas["RestoreBackupPayload"]["required"] == ["backupId"]
    assert set(schemas["DeleteBackupPayload"]["properties"]) == {"backupId"}
    assert set(schemas["SetBackupSchedulePayload"]["properties"]) == {"cron", "retain", "driver"}
    assert "ListBackupsPayload" in schemas


@pytest.mark.parametrize("action", [
    "create_backup", "list_backups", "restore_backup", "delete_backup", "set_backup_schedule"])
def test_without_backups_the_actions_answer_conflict_not_unknown_action(
    rig: Rig, action: str
) -> None:
    rig.created(UUID)
    for server_id, params in ((UUID, {}), ("nope", {"backupId": 5}), (None, {})):
        error = rig.error(action, server_id, **params)
        assert (error.code, error.message) == ("CONFLICT", UNAVAILABLE)


def _payload_for(action: str) -> dict[str, Any]:
    return {
        "write_file": {"path": "a.txt", "content": "x"},
        "create_directory": {"path": "d"},
        "delete_file": {"path": "a.txt"},
        "rename_file": {"oldPath": "a.txt", "newPath": "b.txt"},
        "upload_file": {"path": "a.bin", "content": "eA=="},
        "set_file_permissions": {"path": "a.txt", "mode": "644"},
        "create_archive": {"files": ["a.txt"], "archivePath": "a.zip", "format": "zip"},
        "extract_archive": {"archivePath": "a.zip", "extractPath": "/"},
        "install_mod": {"modId": "m1", "modUrl": "https://example.com/m.jar"},
        "uninstall_mod": {"modId": "m1"},
    }.get(action, {})


@pytest.mark.parametrize("action", sorted(GUARDED_DURING_RESTORE))
def test_starts_and_file_writes_are_refused_with_conflict_while_a_restore_runs(
    brig: Rig, backups: FakeBackups, action: str
) -> None:
    assert action in brig.dispatcher.names()
    brig.servers.lock_files(UUID, "restored")
    error = brig.error(action, UUID, **_payload_for(action))
    assert error.code == "CONFLICT"
    assert "being restored" in error.message


def test_the_guard_also_holds_through_power_server_and_the_panels_second_id(
    brig: Rig, backups: FakeBackups
) -> None:
    brig.servers.lock_files(UUID, "restored")
    from tests.actions.rig import PANEL_ID

    assert brig.error("power_server", PANEL_ID, action="start").code == "CONFLICT"
    assert brig.error("start_server", PANEL_ID).code == "CONFLICT"


def test_reads_stops_and_a_running_backup_do_not_trip_the_guard(
    brig: Rig, backups: FakeBackups
) -> None:
    release = brig.servers.lock_files(UUID, "restored")
    brig.ok("list_files", UUID, path="/")
    brig.ok("stop_server", UUID)
    release()
    backups.holding[UUID] = "backup"
    brig.ok("start_server", UUID)
    brig.ok("write_file", UUID, path="a.txt", content="x")
    del backups.holding[UUID]
    brig.ok("restart_server", UUID)
