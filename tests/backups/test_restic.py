"""
The restic driver with Debian's restic on a repository on local disk: a
backup and restore round trip through the manager, deletion by
``forget --prune``, the password kept off every command line, and a wrong
password as a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.backups.config import ResticConfig
from ctrlagent.backups.restic import ResticDriver, ResticError
from tests.backups.conftest import populate, require_tool, tree
from tests.backups.rig import Rig, make_rig
from tests.backups.s3rig import MotoServer, moto_server  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def restic_installed() -> None:
    """Outside CI, a machine without restic skips these; under CI=true they fail."""
    require_tool(shutil.which("restic") is not None, "restic (apt-get install restic)")

PASSWORD = "correct horse battery staple"


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


def restic_driver(tmp_path: Path, **kw: Any) -> ResticDriver:
    config = ResticConfig(repository=str(tmp_path / "repo"), **kw)
    return ResticDriver(config, cache_dir=str(tmp_path / "restic-cache"))


def snapshots(driver: ResticDriver) -> list[str]:
    out, _ = driver.run(["snapshots", "--json"])
    return [s["id"] for s in json.loads(out)]


@pytest_twisted.ensureDeferred
async def test_backup_and_restore_through_restic(rig: Rig, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    populate(rig.root())
    before = tree(rig.root())
    driver = restic_driver(tmp_path, password=PASSWORD)
    argv: list[list[str]] = []
    real = subprocess.Popen

    def recording(args: list[str], **kw: Any) -> Any:
        argv.append(list(args))
        return real(args, **kw)

    monkeypatch.setattr(subprocess, "Popen", recording)
    m = rig.manager({"restic": driver})
    m.startService()
    await m.ready
    answer = await m.create_backup("srv1", driver="restic", ignore=["logs/"])
    record = await m.finished(answer["backupId"])
    assert record.status == "completed", record.error
    assert [s for s in snapshots(driver) if s.startswith(record.location or "-")]
    (rig.root() / "server.properties").write_text("changed")
    (rig.root() / "world" / "level.dat").unlink()
    await m.restore_backup("srv1", record.id, truncate=False)
    assert tree(rig.root()) == before  # logs/ was not in the backup, and was kept
    dl = await m.open_download("srv1", record.id, "bytes=0-99")
    head = await dl.read()
    dl.close()
    assert len(head) == 100
    await m.delete_backup("srv1", record.id)
    assert snapshots(driver) == []
    assert argv and not any(PASSWORD in a for args in argv for a in args)


def test_a_password_file_is_handed_over_by_name(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    os.chmod(secret, 0o600)
    driver = restic_driver(tmp_path, password_file=str(secret))
    driver.ensure_repository()
    w = driver.open_writer("srv1", "b1")
    w.write(b"\x00" * 1024)  # not even a tar: restic stores the stream as given
    snap = w.commit()
    with driver.open_reader(snap) as r:  # type: ignore[attr-defined]
        assert r.read(4096) == b"\x00" * 1024
    assert [s[:len(snap)] for s in snapshots(driver)] == [snap]


def test_a_wrong_password_is_a_clear_error(tmp_path: Path) -> None:
    restic_driver(tmp_path, password=PASSWORD).ensure_repository()
    wrong = restic_driver(tmp_path, password="nope")
    with pytest.raises(ResticError, match="wrong repository password"):
        wrong.open_writer("srv1", "b1")
    with pytest.raises(ResticError, match="wrong repository password"):
        wrong.run(["snapshots"])


def test_an_aborted_backup_makes_no_snapshot(tmp_path: Path) -> None:
    driver = restic_driver(tmp_path, password=PASSWORD)
    w = driver.open_writer("srv1", "b1")
    w.write(os.urandom(100_000))
    w.abort()
    assert snapshots(driver) == []


def test_a_restic_repository_on_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   moto_server: MotoServer) -> None:  # noqa: F811
    """restic's own S3 backend against moto (credentials from the agent's environment)."""
    bucket = "restic-" + os.urandom(4).hex()
    moto_server.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    driver = ResticDriver(ResticConfig(repository="s3:{}/{}/repo".format(
        moto_server.endpoint, bucket), password=PASSWORD),
        cache_dir=str(tmp_path / "restic-cache"))
    data = os.urandom(300_000)
    w = driver.open_writer("srv1", "b1")
    w.write(data)
    snap = w.commit()
    with driver.open_reader(snap) as r:  # type: ignore[attr-defined]
        got = b""
        while chunk := r.read(65536):
            got += chunk
    assert got == data
    driver.delete(snap)
    assert snapshots(driver) == []
