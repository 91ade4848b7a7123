"""
A restore locks the server's files, and every writer reads that one state
(``IServerManager.lock_files`` / ``files_locked``): an SFTP client (paramiko,
over the real SFTP service) is refused while the restore runs and the
restore is byte-exact; the real server manager neither starts nor
auto-restarts after a crash a server whose files are locked; once the lock
is released everything works again.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ctrlagent.backups.manager import BackupManager
from ctrlagent.errors import Conflict
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.sftp.config import SftpConfig
from ctrlagent.sftp.service import SftpService
from ctrlagent.wire.json import to_json
from tests.backups.conftest import populate, tree
from tests.backups.rig import Rig, make_rig
from tests.servers.conftest import Unit, sleep
from tests.servers.conftest import until as until_for
from tests.sftp.clients import connect

PASSWORD = "correct horse battery"


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.driver.gate.set()
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


@pytest_twisted.async_yield_fixture
async def unit(tmp_path: Any) -> AsyncIterator[Unit]:
    u = Unit(str(tmp_path))
    yield u
    for m in u.managers:
        if m.running:
            await m.stopService()


async def wait_for(check: Callable[[], bool]) -> None:
    """Wait (real time, bounded) until ``check()``."""
    for _ in range(500):
        if check():
            return
        await sleep(0.01)
    raise AssertionError("timed out")


async def started(rig: Rig) -> BackupManager:
    m = rig.manager()
    m.startService()
    await m.ready
    return m


def gate_restores(rig: Rig) -> tuple[threading.Event, threading.Semaphore]:
    """Make the driver's reads (the restore) wait for the returned gate; ``entered`` counts them."""
    gate = threading.Event()
    entered = threading.Semaphore(0)
    inner = rig.driver.open_reader

    def open_reader(location: str, start: int = 0, length: int | None = None) -> Any:
        entered.release()
        gate.wait(30)
        return inner(location, start, length)

    rig.driver.open_reader = open_reader  # type: ignore[method-assign]
    return gate, entered


def refused(fn: Callable[[], object]) -> OSError:
    """The error a refused SFTP request raises (paramiko's mapping of the status)."""
    try:
        fn()
    except OSError as e:
        return e
    raise AssertionError("the SFTP request was not refused")


def is_permission_failure(e: OSError) -> bool:
    return isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM) \
        or "Permission denied" in str(e) or "being restored" in str(e)


@pytest_twisted.ensureDeferred
async def test_sftp_writes_are_refused_during_a_restore_which_stays_byte_exact(
    rig: Rig, tmp_path: Path
) -> None:
    root = rig.root()
    populate(root)
    before = tree(root)
    m = await started(rig)
    answer = await m.create_backup("srv1")
    await m.finished(answer["backupId"])
    (root / "server.properties").write_text("changed after the backup")

    pool = ThreadPool(minthreads=1, maxthreads=4, name="sftp-restore-files")
    clients = ThreadPool(minthreads=1, maxthreads=2, name="sftp-restore-clients")
    pool.start()
    clients.start()
    state = tmp_path / "sftp-state"
    state.mkdir()
    service = SftpService(reactor, SftpConfig(endpoint="tcp:0:interface=127.0.0.1",
                                              bcrypt_rounds=4, login_timeout=30.0),
                          str(state), servers=rig.servers, threadpool=pool)
    service.startService()

    def blocking(fn: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(reactor, clients, fn, *args)

    gate, entered = gate_restores(rig)
    try:
        await service.set_credentials("srv1", {"password": PASSWORD})
        transport, sftp = await blocking(connect, service.listening_port(), "srv1", PASSWORD)
        try:
            # A handle opened for writing before the restore.
            early = await blocking(sftp.open, "early.txt", "w")
            await blocking(early.write, b"before the restore")
            await blocking(early.flush)

            restoring = m.restore_backup("srv1", answer["backupId"], truncate=True)
            await blocking(entered.acquire)
            assert rig.servers.files_locked("srv1") == "restored"

            def writes() -> list[OSError]:
                def put() -> None:
                    with sftp.open("new.txt", "w") as f:
                        f.write(b"during the restore")

                def late_write() -> None:
                    early.write(b"x")
                    early.flush()

                return [
                    refused(put),
                    refused(late_write),
                    refused(lambda: sftp.mkdir("newdir")),
                    refused(lambda: sftp.remove("server.properties")),
                    refused(lambda: sftp.rename("server.properties", "moved")),
                    refused(lambda: sftp.chmod("start.sh", 0o700)),
                    refused(lambda: sftp.rmdir("empty")),
                    refused(lambda: sftp.symlink("start.sh", "link2")),
                ]

            errors = await blocking(writes)
            assert all(is_permission_failure(e) for e in errors), errors
            # Reading is no write: it still works.
            assert "server.properties" in await blocking(sftp.listdir, ".")

            gate.set()
            result = await restoring
            assert result["backupId"] == answer["backupId"]
            assert rig.servers.files_locked("srv1") is None
            # Byte-exact: the tree the backup held, nothing the client wrote.
            assert tree(root) == before

            # Afterwards every writer works again.
            def after() -> bytes:
                with sftp.open("after.txt", "w") as f:
                    f.write(b"after the restore")
                sftp.mkdir("afterdir")
                with sftp.open("after.txt", "r") as f:
                    return f.read()

            assert await blocking(after) == b"after the restore"
            await rig.servers.start("srv1")
        finally:
            await blocking(sftp.close)
            await blocking(transport.close)
    finally:
        gate.set()
        await service.stopService()
        clients.stop()
        pool.stop()
    assert (root / "afterdir").is_dir() and stat.S_ISDIR(os.lstat(root / "afterdir").st_mode)


@pytest_twisted.ensureDeferred
async def test_a_restore_holds_the_lock_from_before_its_stop_to_its_end_even_when_it_fails(
    rig: Rig,
) -> None:
    (rig.root() / "a").write_text("x")
    m = await started(rig)
    answer = await m.create_backup("srv1")
    record = await m.finished(answer["backupId"])
    await rig.servers.start("srv1")
    gate = rig.servers.hold("stop")
    restoring = m.restore_backup("srv1", record.id, stop=True)
    await wait_for(lambda: to_json(rig.servers.status("srv1"))["status"] == "stopping")
    # Locked while the stop is still under way: nothing can slip in between.
    assert rig.servers.files_locked("srv1") == "restored"
    with pytest.raises(Conflict, match="being restored"):
        await m.create_backup("srv1")
    gate.callback(None)
    for _ in range(4):
        rig.clock.advance(1)
    await restoring
    assert rig.servers.files_locked("srv1") is None
    # A failed restore (a damaged archive) releases it too.
    path = os.path.join(rig.config.directory, record.location or "")
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff\xff")
    with pytest.raises(Exception, match="corrupt|checksum|damaged"):
        await m.restore_backup("srv1", record.id)
    assert rig.servers.files_locked("srv1") is None


PARAMS = {"image": "img", "startup": "/game", "stop": "stop", "startupDone": "Done ("}


@pytest_twisted.ensureDeferred
async def test_a_crash_while_the_files_are_locked_is_not_auto_restarted(unit: Unit) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    await m.start("s1")
    await until_for(lambda: m.get("s1").state is ServerState.RUNNING, 2, "running")
    release = m.lock_files("s1", "restored")
    assert m.files_locked("s1") == "restored"
    with pytest.raises(Conflict, match="being restored"):
        m.lock_files("s1", "restored")

    await m.send_command("s1", "crash 3")
    await until_for(lambda: m.get("s1").state is ServerState.CRASHED, 2, "crashed")
    await sleep(0.1)
    server = m.get("s1")
    assert server.state is ServerState.CRASHED and server.desired == "offline"
    assert ("crashed", "starting") not in unit.statuses("s1")
    assert server.crash_report is not None and not server.crash_report.restarted
    # Every start is refused meanwhile, and so is a deletion.
    for attempt in (lambda: m.start("s1"), lambda: m.restart("s1"),
                    lambda: m.reinstall("s1"), lambda: m.delete("s1")):
        with pytest.raises(Conflict, match="being restored"):
            await attempt()
    assert server.state is ServerState.CRASHED

    release()
    release()  # idempotent: releases only its own lock
    assert m.files_locked("s1") is None
    await m.start("s1")
    await until_for(lambda: m.get("s1").state is ServerState.RUNNING, 2, "running again")
