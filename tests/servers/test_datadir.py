"""
The server manager's own work on a data directory the game server (and its
install script, run as root) shaped: the post-install pass that hands the
tree back to the server, the disk-usage walk, and the purge of
``delete_server {purgeFiles: true}``.

Real files throughout: device nodes made with ``mknod`` (the tests run as
root, as the agent does), setuid-root files, FIFOs, sockets, links to host
files, and trees thousands of levels deep.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.errors import Conflict, CtrlAgentError
from ctrlagent.files import trees
from ctrlagent.servers import datadir as servers_datadir
from ctrlagent.servers.datadir import _disk_usage, _prepare_dir
from tests.files.test_trees import make_chain, remove_everything
from tests.rig.sockets import bind_unix
from tests.servers.test_manager_unit import PARAMS, Unit, running

UID, GID = 1000, 1000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown)")


@pytest.fixture(autouse=True)
def deep_cleanup(tmp_path: Path) -> Iterator[None]:
    yield
    if tmp_path.exists():
        remove_everything(tmp_path)


@pytest_twisted.async_yield_fixture
async def unit(tmp_path: Path) -> AsyncIterator[Unit]:
    u = Unit(str(tmp_path))
    yield u
    for m in u.managers:
        if m.running:
            await m.stopService()


class Host:
    """Host files beside the data directory that no pass may touch."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "host"
        self.dir.mkdir()
        self.file = self.dir / "shadow"
        self.file.write_text("host secret\n")
        os.chown(self.file, 0, 0)
        os.chmod(self.file, 0o4750)  # setuid: a pass following a link would clear it

    def state(self) -> list[tuple[int, int, int]]:
        return [(st.st_uid, st.st_gid, st.st_mode)
                for st in (os.stat(self.dir), os.stat(self.file))]


def plant(data: Path, host: Host) -> None:
    """What a hostile install script leaves behind, as root."""
    data.mkdir(parents=True, exist_ok=True)
    os.mknod(data / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(data / "disk", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mkfifo(data / "pipe")
    bind_unix(data / "sock").close()
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("sgid-noexec", 0o2644)):
        (data / name).write_text("#!/bin/sh\n")
        os.chmod(data / name, mode)
    (data / "shared").mkdir()
    os.chmod(data / "shared", 0o2775)
    os.symlink(str(host.file), data / "link-host")
    os.symlink(str(host.dir), data / "link-host-dir")
    (data / "deep").mkdir()
    make_chain(data / "deep", 1500)
    bottom = (data / "deep").joinpath(*(["d"] * 1500))
    os.mknod(bottom / "hidden-null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (bottom / "hidden-suid").write_text("x")
    os.chmod(bottom / "hidden-suid", 0o4755)
    os.symlink(str(host.file), bottom / "hidden-link")


def everything(data: Path) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of every entry beneath ``data``, at any depth."""
    out = []
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with trees.Walk(fd) as walk:
            for e in walk:
                out.append((e.name, e.lstat()))
    finally:
        os.close(fd)
    return out


def test_the_post_install_pass_hands_the_whole_tree_back_to_the_server(tmp_path: Path) -> None:
    host = Host(tmp_path)
    data = tmp_path / "data" / "srv"
    plant(data, host)
    before = host.state()
    report = _prepare_dir(str(data), UID, GID, True)
    assert report is not None
    assert report.removed == {"device": 3, "fifo": 1, "socket": 1}
    # suid, sgid, sgid-noexec (which a chown alone keeps), shared/, hidden-suid
    assert report.cleared == 5 and report.failed == 0 and not report.truncated
    entries = everything(data)
    assert len(entries) > 3000
    for name, st in entries:
        kind = stat.S_IFMT(st.st_mode)
        assert kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK), name
        assert (st.st_uid, st.st_gid) == (UID, GID), name
        assert not st.st_mode & 0o6000, name
    root_st = os.stat(data)
    assert (root_st.st_uid, root_st.st_gid) == (UID, GID)
    # The links were changed themselves; the host files they point to were not.
    assert os.readlink(data / "link-host") == str(host.file)
    assert host.state() == before


def test_the_data_directory_itself_is_never_followed_as_a_link(tmp_path: Path) -> None:
    host = Host(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.symlink(str(host.dir), data_dir / "srv")
    before = host.state()
    with pytest.raises(CtrlAgentError):
        _prepare_dir(str(data_dir / "srv"), UID, GID, True)
    assert host.state() == before


def test_disk_usage_counts_files_at_any_depth(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    data.mkdir()
    make_chain(data, 2000, payload=b"x" * 5000)
    expected = 0
    for name, st in everything(data):
        if name == "f":
            expected += st.st_blocks * 512
    assert expected > 0
    assert _disk_usage(str(data)) == expected
    assert _disk_usage(str(tmp_path / "missing")) == 0


@pytest_twisted.ensureDeferred
async def test_prepare_data_dir_reports_what_it_removed_in_one_warning(
    unit: Unit, warnings: list[dict[str, Any]], tmp_path: Path
) -> None:
    m = unit.manager()
    await m.create_server("s1", PARAMS)
    server = m.get("s1")
    host = Host(tmp_path)
    plant(Path(server.data_path), host)
    warnings.clear()
    await m.data.prepare(server.server_id, server.owner, recursive=True)
    removed = [w for w in warnings if "special files" in w["log_format"]]
    assert len(removed) == 1
    assert removed[0]["count"] == 5 and removed[0]["server_id"] == "s1"
    assert removed[0]["kinds"] == "3 device, 1 fifo, 1 socket" and removed[0]["cleared"] == 5
    assert "hidden-null'" in removed[0]["examples"]
    assert len(removed[0]["examples"]) < 1000


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_delete_with_purge_removes_a_5000_deep_tree_then_the_record(unit: Unit) -> None:
    m = await running(unit)
    path = Path(m.server_root("s1").path)
    make_chain(path, 5000)
    await m.delete("s1", purge_files=True)
    assert not path.exists()
    assert _stored(m) == []


def _stored(m: Any) -> list[str]:
    with sqlite3.connect(m.store.path) as db:
        return [r[0] for r in db.execute("SELECT server_id FROM servers")]


@pytest_twisted.ensureDeferred
async def test_a_purge_that_fails_keeps_the_server_so_the_delete_can_be_retried(
    unit: Unit, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = await running(unit)
    path = Path(m.server_root("s1").path)
    (path / "world.dat").write_text("world\n")

    def refuse(parent_fd: int, name: str, **kw: Any) -> int:
        raise Conflict("busy")

    monkeypatch.setattr(servers_datadir.trees, "remove_tree", refuse)
    with pytest.raises(Conflict):
        await m.delete("s1", purge_files=True)
    assert m.get("s1").server_id == "s1"
    assert _stored(m) == ["s1"]
    assert (path / "world.dat").exists()
    monkeypatch.undo()
    await m.delete("s1", purge_files=True)
    assert not path.exists()
    assert _stored(m) == []
