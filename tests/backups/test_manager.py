"""
``BackupManager`` over a fake server manager, a real thread pool, a real
SQLite store and the local driver: the actions' answers, the per-server
and node-wide limits, restores guarded by the server's state, downloads
with ranges, and recovery after an agent died mid-backup.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from ctrlagent.backups.events import BackupProgress, BackupStatusChanged
from ctrlagent.backups.manager import BackupManager, RangeNotSatisfiable, parse_range
from ctrlagent.backups.store import BackupRecord
from ctrlagent.errors import Conflict, InvalidInput, NotFound, ServerNotFound
from ctrlagent.wire.json import to_json
from tests.backups.conftest import populate, tree
from tests.backups.rig import Rig, make_rig, partials


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.driver.gate.set()
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


async def started(rig: Rig) -> BackupManager:
    m = rig.manager()
    m.startService()
    await m.ready
    return m


async def backup(m: BackupManager, server_id: str = "srv1", **kw: object) -> BackupRecord:
    answer = await m.create_backup(server_id, **kw)
    assert answer["status"] == "running"
    return await m.finished(answer["backupId"])


async def until(check: object, what: str) -> None:
    """Wait (real time, bounded) until ``check()`` is true."""
    for _ in range(500):
        if check():  # type: ignore[operator]
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("timed out waiting for " + what)


async def in_thread(fn: object, *args: object) -> object:
    return await threads.deferToThread(fn, *args)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_backup_completes_and_is_listed_with_every_field(rig: Rig) -> None:
    populate(rig.root())
    m = await started(rig)
    record = await backup(m, name="before update")
    assert record.status == "completed", record.error
    listed = await m.list_backups("srv1")
    assert listed["count"] == 1
    item = listed["backups"][0]
    assert set(item) >= {"id", "name", "driver", "status", "size", "files", "checksum",
                         "createdAt", "completedAt"}
    assert (item["name"], item["driver"], item["status"], item["files"]) == (
        "before update", "local", "completed", 7)
    path = os.path.join(rig.config.directory, record.location or "")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == item["checksum"]
    assert os.path.getsize(path) == item["size"]
    assert item["createdAt"].endswith("Z") and "error" not in item
    assert not partials(rig.config.directory)
    kinds = [(type(e).__name__, getattr(e, "status", None)) for e in rig.events]
    assert kinds[0] == ("BackupStatusChanged", "running")
    assert kinds[-1] == ("BackupStatusChanged", "completed")
    progress = [e for e in rig.events if isinstance(e, BackupProgress)]
    assert progress and progress[-1].percent == 100.0 and progress[-1].files == 7


@pytest_twisted.ensureDeferred
async def test_a_second_backup_of_the_same_server_is_refused_while_one_runs(rig: Rig) -> None:
    (rig.root() / "a").write_text("x")
    m = await started(rig)
    rig.driver.gate.clear()
    first = await m.create_backup("srv1")
    with pytest.raises(Conflict):
        await m.create_backup("srv1")
    with pytest.raises(Conflict):
        await m.restore_backup("srv1", first["backupId"])
    rig.driver.gate.set()
    assert (await m.finished(first["backupId"])).status == "completed"
    assert (await backup(m)).status == "completed"


@pytest_twisted.ensureDeferred
async def test_node_wide_concurrency_limit_holds_other_servers_back(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, concurrency=1)
    try:
        for sid in ("srv2", "srv3"):
            (rig.add_server(sid) / "f").write_text(sid)
        m = await started(rig)
        rig.driver.gate.clear()
        ids = [(await m.create_backup(sid))["backupId"] for sid in ("srv1", "srv2", "srv3")]
        await in_thread(rig.driver.started.acquire)
        rig.driver.gate.set()
        records = [await m.finished(i) for i in ids]
        assert [r.status for r in records] == ["completed"] * 3
        assert rig.driver.most == 1
    finally:
        for manager in rig.managers:
            if manager.running:
                await manager.stopService()
        rig.pool.stop()


@pytest_twisted.ensureDeferred
async def test_backup_ids_of_another_server_are_not_found(rig: Rig) -> None:
    (rig.add_server("other") / "f").write_text("theirs")
    m = await started(rig)
    theirs = await backup(m, "other")
    for call in (m.restore_backup("srv1", theirs.id), m.delete_backup("srv1", theirs.id),
                 m.open_download("srv1", theirs.id), m.delete_backup("srv1", "nope"),
                 m.restore_backup("srv1", "../../etc")):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(InvalidInput):
        await m.delete_backup("srv1", 12)
    with pytest.raises(ServerNotFound):
        await m.list_backups("ghost")
    assert (await m.list_backups("other"))["count"] == 1


@pytest_twisted.ensureDeferred
async def test_restore_is_refused_while_the_server_runs(rig: Rig) -> None:
    (rig.root() / "a").write_text("backed up")
    m = await started(rig)
    record = await backup(m)
    await rig.servers.start("srv1")
    (rig.root() / "a").write_text("live")
    with pytest.raises(Conflict, match="stop"):
        await m.restore_backup("srv1", record.id)
    assert (rig.root() / "a").read_text() == "live"
    assert m.busy("srv1") is None


@pytest_twisted.ensureDeferred
async def test_restore_with_stop_stops_the_server_first_then_restores(rig: Rig) -> None:
    populate(rig.root())
    before = tree(rig.root())
    m = await started(rig)
    record = await backup(m)
    await rig.servers.start("srv1")
    (rig.root() / "server.properties").write_text("changed")
    gate = rig.servers.hold("stop")
    restoring = m.restore_backup("srv1", record.id, truncate=True, stop=True)
    await until(lambda: to_json(rig.servers.status("srv1"))["status"] == "stopping", "the stop")
    rig.clock.advance(1)
    assert not restoring.called and m.busy("srv1") == "restore"
    assert (rig.root() / "server.properties").read_text() == "changed"
    gate.callback(None)
    rig.clock.advance(1)
    answer = await restoring
    assert answer["files"] == 7
    restored = [e for e in rig.events if isinstance(e, BackupProgress)
                and e.operation == "restore"]
    assert restored and restored[-1].files == 7 and restored[-1].percent == 100.0
    assert ("stop", "srv1") in rig.servers.calls
    assert tree(rig.root()) == before


@pytest_twisted.ensureDeferred
async def test_restore_gives_up_when_the_server_does_not_stop(rig: Rig) -> None:
    (rig.root() / "a").write_text("x")
    m = await started(rig)
    record = await backup(m)
    await rig.servers.start("srv1")
    rig.servers.hold("stop")
    restoring = m.restore_backup("srv1", record.id, stop=True)
    await until(lambda: to_json(rig.servers.status("srv1"))["status"] == "stopping", "the stop")
    for _ in range(int(rig.config.stop_timeout * 2) + 2):
        rig.clock.advance(0.5)
    with pytest.raises(Conflict, match="did not stop"):
        await restoring
    assert m.busy("srv1") is None


@pytest_twisted.ensureDeferred
async def test_a_damaged_archive_fails_the_restore_and_touches_nothing(rig: Rig) -> None:
    populate(rig.root())
    m = await started(rig)
    record = await backup(m)
    path = os.path.join(rig.config.directory, record.location or "")
    with open(path, "r+b") as f:
        f.seek(record.size // 2)
        byte = f.read(1)
        f.seek(record.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    (rig.root() / "new").write_text("live")
    before = tree(rig.root(), mtimes=True)
    with pytest.raises(Exception, match="corrupt|checksum|damaged"):
        await m.restore_backup("srv1", record.id, truncate=True)
    assert tree(rig.root(), mtimes=True) == before
    failed = [e for e in rig.events if isinstance(e, BackupStatusChanged)
              and e.operation == "restore"]
    assert failed[-1].status == "failed"


@pytest_twisted.ensureDeferred
async def test_delete_removes_the_archive_and_the_record(rig: Rig) -> None:
    (rig.root() / "a").write_text("x")
    m = await started(rig)
    record = await backup(m)
    path = os.path.join(rig.config.directory, record.location or "")
    assert os.path.exists(path)
    assert await m.delete_backup("srv1", record.id) == {}
    assert not os.path.exists(path)
    assert (await m.list_backups("srv1"))["count"] == 0
    with pytest.raises(NotFound):
        await m.delete_backup("srv1", record.id)


@pytest_twisted.ensureDeferred
async def test_download_whole_and_by_range(rig: Rig) -> None:
    populate(rig.root())
    m = await started(rig)
    record = await backup(m)
    with open(os.path.join(rig.config.directory, record.location or ""), "rb") as f:
        whole = f.read()

    async def fetch(header: str | None) -> tuple[bytes, object]:
        dl = await m.open_download("srv1", record.id, header)
        out = b""
        try:
            while chunk := await dl.read(4096):
                out += chunk
        finally:
            dl.close()
        return out, dl

    data, dl = await fetch(None)
    assert data == whole and not dl.partial  # type: ignore[attr-defined]
    data, dl = await fetch("bytes=10-99")
    assert data == whole[10:100] and dl.partial  # type: ignore[attr-defined]
    assert dl.content_range() == "bytes 10-99/{}".format(len(whole))  # type: ignore[attr-defined]
    data, _ = await fetch("bytes=-50")
    assert data == whole[-50:]
    data, _ = await fetch("bytes={}-".format(len(whole) - 3))
    assert data == whole[-3:]
    with pytest.raises(RangeNotSatisfiable):
        await m.open_download("srv1", record.id, "bytes={}-".format(len(whole)))


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 100, None),
    ("bytes=0-0", 100, (0, 0)),
    ("bytes=5-", 100, (5, 99)),
    ("bytes=90-200", 100, (90, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-500", 100, (0, 99)),
    ("bytes=1-2,5-6", 100, None),
    ("items=1-2", 100, None),
    ("bytes=a-b", 100, None),
])
def test_parse_range(header: str | None, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=5-4", 100),
                                              ("bytes=-0", 100), ("bytes=0-", 0)])
def test_parse_range_refuses_ranges_selecting_nothing(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


@pytest_twisted.ensureDeferred
async def test_a_killed_agent_leaves_a_failed_backup_and_no_partial_files(rig: Rig) -> None:
    """
    What a SIGKILL mid-backup leaves: a ``running`` row and a partial
    archive.  Made here by hand (the store written, the partial file half
    written); the next agent's manager must mark it failed and remove it.
    """
    (rig.root() / "a").write_text("x")
    m = rig.manager()
    now = rig.clock.seconds()
    await m.store.insert(BackupRecord(id="dead-1", server_id="srv1", name="n", driver="local",
                                      status="running", created=now))
    writer = rig.driver.open_writer("srv1", "dead-1")
    writer.write(b"half an archive")
    os.close(writer.fd)  # the process died: nothing else happens to it
    assert partials(rig.config.directory)
    leftover = rig.data_dir / ".ctrlagent-restore-srv1-0123456789ab"
    (leftover / "x").mkdir(parents=True)
    m.startService()
    await m.ready
    (row,) = (await m.list_backups("srv1"))["backups"]
    assert row["status"] == "failed" and "stopped during the backup" in row["error"]
    assert not partials(rig.config.directory)
    assert not leftover.exists()
    assert (await backup(m)).status == "completed"


@pytest_twisted.ensureDeferred
async def test_stopping_the_agent_mid_backup_fails_it_and_removes_the_partial(
        rig: Rig) -> None:
    (rig.root() / "big").write_bytes(os.urandom(4 * 1024 * 1024))
    m = await started(rig)
    rig.driver.gate.clear()
    answer = await m.create_backup("srv1")
    await in_thread(rig.driver.started.acquire)
    done = m.finished(answer["backupId"])
    stopping = m.stopService()
    rig.driver.gate.set()
    record = await done
    await stopping
    assert record.status == "failed" and "stopping" in (record.error or "")
    assert not partials(rig.config.directory)


@pytest_twisted.ensureDeferred
async def test_no_room_for_the_archive_fails_before_writing(rig: Rig) -> None:
    (rig.root() / "a").write_bytes(os.urandom(100_000))
    m = await started(rig)
    rig.driver.free = 10_000
    record = await backup(m)
    assert record.status == "failed" and "not enough room" in (record.error or "")
    assert not partials(rig.config.directory)


@pytest.fixture
def small_disk(tmp_path: Path) -> object:
    """A 2 MiB tmpfs mounted for the archives (root only; skipped otherwise)."""
    mnt = tmp_path / "archives"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_mid_write_fails_the_backup_and_leaves_nothing(
        tmp_path: Path, small_disk: Path) -> None:
    rig = make_rig(tmp_path)
    try:
        (rig.root() / "noise").write_bytes(os.urandom(3 * 1024 * 1024))
        m = await started(rig)
        # The room check passes (as if another writer filled the disk after it).
        rig.driver.free = 1 << 40
        record = await backup(m)
        assert record.status == "failed"
        assert "No space left" in (record.error or "") or "room" in (record.error or "")
        assert not partials(str(small_disk)) and not os.listdir(small_disk / "srv1")
    finally:
        for manager in rig.managers:
            if manager.running:
                await manager.stopService()
        rig.pool.stop()
