"""Functional tests of every ``FileManager`` action against a real directory."""

from __future__ import annotations

import base64
import os
import re
import stat
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from ctrlagent.errors import (
    Conflict,
    FileNotFound,
    InsufficientResources,
    InvalidInput,
    NotText,
    PermissionDenied,
)
from ctrlagent.files.manager import FileManager
from ctrlagent.interfaces import IFileManager, ServerRoot
from ctrlagent.wire.json import to_json
from tests.files.conftest import SERVER_GID, SERVER_UID, Tree, make_manager

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _limited(tree: Tree, limit: int) -> ServerRoot:
    return ServerRoot("srv1", str(tree.root_path), limit, SERVER_UID, SERVER_GID)


def _no_temp_files(path: Path) -> bool:
    return not any(n.startswith(".ctrlagent-tmp") for _, _, files in os.walk(path) for n in files)


def test_provides_the_interface() -> None:
    assert verifyObject(IFileManager, make_manager())


@pytest_twisted.ensureDeferred
async def test_list_files_shape_and_order(tree: Tree, fm: FileManager) -> None:
    (tree.root_path / "B.txt").write_text("bb")
    (tree.root_path / "adir").mkdir()
    data = to_json(await fm.list_files(tree.root, "/"))
    assert data["serverId"] == "srv1"
    assert data["path"] == "/"
    files = data["files"]
    kinds = [f["type"] for f in files]
    assert kinds == sorted(kinds, key=lambda k: k != "directory"), "directories first"
    by_name = {f["name"]: f for f in files}
    b = by_name["B.txt"]
    assert set(b) >= {"name", "type", "size", "modified", "lastModified", "permissions",
                      "owner", "group", "path", "extension"}
    assert b["type"] == "file" and b["size"] == 2 and b["path"] == "/B.txt"
    assert b["extension"] == "txt" and re.match(r"^[0-7]{3}$", b["permissions"])
    assert ISO.match(b["modified"]) and b["modified"] == b["lastModified"]
    assert by_name["adir"]["type"] == "directory" and "extension" not in by_name["adir"]
    assert to_json(await fm.list_files(tree.root, "sub"))["files"][0]["path"] == "/sub/inner.txt"


@pytest_twisted.ensureDeferred
async def test_list_files_pages_with_limit_and_offset(tree: Tree, fm: FileManager) -> None:
    d = tree.root_path / "many"
    d.mkdir()
    for i in range(30):
        (d / "f{:02d}".format(i)).write_text("x")
    for i in range(3):
        (d / "z{}".format(i)).mkdir()
    first = to_json(await fm.list_files(tree.root, "many", limit=5))
    assert [f["name"] for f in first["files"]] == ["z0", "z1", "z2", "f00", "f01"]
    assert first["total"] == 33 and first["truncated"] is True
    rest = to_json(await fm.list_files(tree.root, "many", limit=100, offset=5))
    assert len(rest["files"]) == 28 and rest["truncated"] is False
    with pytest.raises(InvalidInput):
        await fm.list_files(tree.root, "many", limit=-1)
    with pytest.raises(FileNotFound):
        await fm.list_files(tree.root, "nope")


@pytest_twisted.ensureDeferred
async def test_search_files(tree: Tree, fm: FileManager) -> None:
    (tree.root_path / "sub" / "deep").mkdir()
    (tree.root_path / "sub" / "deep" / "Server.properties").write_text("x")
    found = to_json(await fm.search_files(tree.root, "/", "server"))
    assert [f["path"] for f in found["files"]] == ["/sub/deep/Server.properties"]
    dirs = to_json(await fm.search_files(tree.root, "/", "e", "directory"))
    assert {f["name"] for f in dirs["files"]} == {"deep"}
    with pytest.raises(InvalidInput):
        await fm.search_files(tree.root, "/", "")
    with pytest.raises(InvalidInput):
        await fm.search_files(tree.root, "/", "x", "socket")


@pytest_twisted.ensureDeferred
async def test_write_then_read_round_trip(tree: Tree, fm: FileManager) -> None:
    text = "motd=Hällo wörld ☃\n" * 100
    written = to_json(await fm.write_file(tree.root, "/cfg/server.properties", text))
    assert written["size"] == len(text.encode()) and ISO.match(written["modified"])
    data = to_json(await fm.read_file(tree.root, "cfg/server.properties"))
    assert data == {"serverId": "srv1", "path": "/cfg/server.properties", "content": text,
                    "size": len(text.encode()), "modified": data["modified"], "encoding": "utf8"}
    st = os.stat(tree.root_path / "cfg" / "server.properties")
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_gid) == (SERVER_UID, SERVER_GID)
    dst = os.stat(tree.root_path / "cfg")
    assert stat.S_IMODE(dst.st_mode) == 0o755 and dst.st_uid == SERVER_UID
    assert _no_temp_files(tree.root_path)


@pytest_twisted.ensureDeferred
async def test_write_keeps_mode_of_replaced_file_and_is_atomic(
    tree: Tree, fm: FileManager
) -> None:
    path = tree.root_path / "start.sh"
    path.write_text("old")
    os.chmod(path, 0o750)
    inode = os.stat(path).st_ino
    await fm.write_file(tree.root, "start.sh", "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o750
    assert os.stat(path).st_ino != inode, "replaced by rename, not rewritten in place"


@pytest_twisted.ensureDeferred
async def test_read_refusals(tree: Tree) -> None:
    fm = make_manager(max_read_bytes=100)
    (tree.root_path / "big.log").write_bytes(b"x" * 101)
    with pytest.raises(InsufficientResources):
        await fm.read_file(tree.root, "big.log")
    with pytest.raises(InsufficientResources):
        await fm.download_file(tree.root, "big.log")
    with pytest.raises(InvalidInput):
        await fm.read_file(tree.root, "sub")
    os.mkfifo(tree.root_path / "pipe")
    with pytest.raises(PermissionDenied):  # refused at once, no worker stuck on it
        await fm.read_file(tree.root, "pipe")
    with pytest.raises(FileNotFound):
        await fm.read_file(tree.root, "missing.txt")
    (tree.root_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(NotText) as refused:
        await fm.read_file(tree.root, "latin1.txt")
    assert "download_file" in refused.value.message and refused.value.code == "NOT_TEXT"
    data = to_json(await fm.read_file(tree.root, "latin1.txt", lossy=True))
    assert data["lossy"] is True and data["content"] == "caf\ufffd"


@pytest_twisted.ensureDeferred
async def test_create_directory(tree: Tree, fm: FileManager) -> None:
    await fm.create_directory(tree.root, "a/b/c")
    for p in ("a", "a/b", "a/b/c"):
        st = os.stat(tree.root_path / p)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        assert st.st_uid == SERVER_UID
    await fm.create_directory(tree.root, "a/b/c")  # idempotent
    with pytest.raises(Conflict):
        await fm.create_directory(tree.root, "config.txt")


@pytest_twisted.ensureDeferred
async def test_delete_file_and_tree(tree: Tree, fm: FileManager) -> None:
    (tree.root_path / "sub" / "d" / "e").mkdir(parents=True)
    (tree.root_path / "sub" / "d" / "e" / "f").write_text("x")
    os.symlink(str(tree.outside), tree.root_path / "sub" / "d" / "out")
    before = tree.outside_state()
    result = to_json(await fm.delete_file(tree.root, "sub"))
    assert "message" in result
    assert not (tree.root_path / "sub").exists()
    assert tree.outside_state() == before
    await fm.delete_file(tree.root, "config.txt")
    assert not (tree.root_path / "config.txt").exists()
    with pytest.raises(FileNotFound):
        await fm.delete_file(tree.root, "config.txt")


@pytest_twisted.ensureDeferred
async def test_rename_file(tree: Tree, fm: FileManager) -> None:
    await fm.rename_file(tree.root, "config.txt", "moved/deeper/config.txt")
    assert (tree.root_path / "moved" / "deeper" / "config.txt").read_text() == "hello\n"
    await fm.rename_file(tree.root, "sub", "sub2")
    assert (tree.root_path / "sub2" / "inner.txt").exists()
    (tree.root_path / "other.txt").write_text("o")
    with pytest.raises(Conflict):
        await fm.rename_file(tree.root, "other.txt", "sub2/inner.txt")
    assert (tree.root_path / "sub2" / "inner.txt").read_text() == "inner\n"
    with pytest.raises(InvalidInput):
        await fm.rename_file(tree.root, "sub2", "sub2/x")
    with pytest.raises(FileNotFound):
        await fm.rename_file(tree.root, "nope", "x")


@pytest_twisted.ensureDeferred
async def test_binary_upload_download_round_trip(tree: Tree, fm: FileManager) -> None:
    blob = bytes(range(256)) * 1000 + os.urandom(4096)
    result = to_json(await fm.upload_file(tree.root, "world/region.mca",
                                          base64.b64encode(blob).decode()))
    assert result["size"] == len(blob)
    down = to_json(await fm.download_file(tree.root, "/world/region.mca"))
    assert down["encoding"] == "base64" and down["size"] == len(blob)
    assert base64.b64decode(down["content"]) == blob
    assert set(down) >= {"serverId", "path", "content", "encoding", "size", "modified"}
    await fm.upload_file(tree.root, "notes.txt", "plain ☃", encoding="utf8")
    assert (tree.root_path / "notes.txt").read_text() == "plain ☃"
    with pytest.raises(InvalidInput):
        await fm.upload_file(tree.root, "bad.bin", "not base64!!")
    with pytest.raises(InvalidInput):
        await fm.upload_file(tree.root, "bad.bin", "aGk=", encoding="rot13")


@pytest_twisted.ensureDeferred
async def test_chunked_upload_assembled_by_empty_final_upload(tree: Tree, fm: FileManager) -> None:
    blob = os.urandom(300_000)
    parts = [blob[i:i + 65536] for i in range(0, len(blob), 65536)]
    # Out of order on purpose: the index decides the position.
    for i in reversed(range(len(parts))):
        r = to_json(await fm.upload_file(tree.root, "mods/pack.zip.chunk{}".format(i),
                                         base64.b64encode(parts[i]).decode()))
        assert r["assembled"] is False and r["chunk"] == i
    done = to_json(await fm.upload_file(tree.root, "mods/pack.zip", ""))
    assert done["assembled"] is True and done["size"] == len(blob)
    down = to_json(await fm.download_file(tree.root, "mods/pack.zip"))
    assert base64.b64decode(down["content"]) == blob
    assert sorted(os.listdir(tree.root_path / "mods")) == ["pack.zip"]


@pytest_twisted.ensureDeferred
async def test_chunked_upload_assembled_when_total_known(tree: Tree, fm: FileManager) -> None:
    blob = os.urandom(10_000)
    parts = [blob[:4000], blob[4000:8000], blob[8000:]]
    for i, part in enumerate(parts):
        r = to_json(await fm.upload_file(tree.root, "w.bin", base64.b64encode(part).decode(),
                                         chunk_index=i, total_chunks=3))
    assert r["assembled"] is True and r["targetSize"] == len(blob)
    assert (tree.root_path / "w.bin").read_bytes() == blob
    assert os.listdir(tree.root_path).count("w.bin.chunk0") == 0


@pytest_twisted.ensureDeferred
async def test_chunked_upload_with_gap_is_refused(tree: Tree, fm: FileManager) -> None:
    await fm.upload_file(tree.root, "g.bin.chunk0", "YQ==")
    await fm.upload_file(tree.root, "g.bin.chunk2", "Yw==")
    with pytest.raises(InvalidInput):
        await fm.upload_file(tree.root, "g.bin", "")
    assert not (tree.root_path / "g.bin").exists()


@pytest_twisted.ensureDeferred
async def test_chunk_files_planted_with_odd_names_are_not_assembled(
    tree: Tree, fm: FileManager
) -> None:
    # The game server can name files like chunks: a second name for index 1,
    # a directory and a FIFO where chunks would be.  None of them is taken.
    await fm.upload_file(tree.root, "p.bin.chunk0", "YQ==")
    await fm.upload_file(tree.root, "p.bin.chunk1", "Yg==")
    (tree.root_path / "p.bin.chunk01").write_bytes(b"planted")
    (tree.root_path / "p.bin.chunk2").mkdir()
    (tree.root_path / "p.bin.chunk2" / "keep.txt").write_text("keep\n")
    os.mkfifo(tree.root_path / "p.bin.chunk3")
    done = to_json(await fm.upload_file(tree.root, "p.bin", ""))
    assert done["assembled"] is True and done["chunks"] == 2
    assert (tree.root_path / "p.bin").read_bytes() == b"ab"
    assert (tree.root_path / "p.bin.chunk01").read_bytes() == b"planted"
    assert (tree.root_path / "p.bin.chunk2" / "keep.txt").read_text() == "keep\n"


@pytest_twisted.ensureDeferred
async def test_get_file_info(tree: Tree, fm: FileManager) -> None:
    os.chmod(tree.root_path / "config.txt", 0o640)
    info = to_json(await fm.get_file_info(tree.root, "config.txt"))
    assert info["name"] == "config.txt" and info["type"] == "file" and info["size"] == 6
    assert info["permissions"] == "640" and info["mode"] == "0640"
    assert set(info) >= {"name", "path", "type", "size", "modified", "permissions", "mode",
                         "owner", "group"}
    assert to_json(await fm.get_file_info(tree.root, "sub"))["type"] == "directory"
    link = to_json(await fm.get_file_info(tree.root, "link_passwd"))
    assert link["symlink"] is True and link["broken"] is True


@pytest_twisted.ensureDeferred
async def test_set_file_permissions(tree: Tree, fm: FileManager) -> None:
    await fm.set_file_permissions(tree.root, "config.txt", "0600")
    assert stat.S_IMODE(os.stat(tree.root_path / "config.txt").st_mode) == 0o600
    await fm.set_file_permissions(tree.root, "sub", "750")
    assert stat.S_IMODE(os.stat(tree.root_path / "sub").st_mode) == 0o750
    with pytest.raises(InvalidInput):
        await fm.set_file_permissions(tree.root, "config.txt", "u+x")


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
@pytest_twisted.ensureDeferred
async def test_archive_round_trip(tree: Tree, fm: FileManager, fmt: str) -> None:
    (tree.root_path / "world" / "region").mkdir(parents=True)
    blob = os.urandom(200_000)
    (tree.root_path / "world" / "region" / "r.0.0.mca").write_bytes(blob)
    (tree.root_path / "world" / "level.dat").write_text("level")
    os.chmod(tree.root_path / "world" / "level.dat", 0o755)
    made = to_json(await fm.create_archive(tree.root, ["world", "config.txt", "link_passwd"],
                                           "backups/b." + fmt, fmt))
    assert made["archivePath"] == "/backups/b." + fmt and made["size"] > 0
    assert made["size"] == os.path.getsize(tree.root_path / "backups" / ("b." + fmt))
    out = to_json(await fm.extract_archive(tree.root, "backups/b." + fmt, "restore"))
    assert out["extracted"] == 3
    r = tree.root_path / "restore"
    assert (r / "world" / "region" / "r.0.0.mca").read_bytes() == blob
    assert (r / "config.txt").read_text() == "hello\n"
    assert stat.S_IMODE(os.stat(r / "world" / "level.dat").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(r / "config.txt").st_mode) == 0o644
    assert os.stat(r / "world").st_uid == SERVER_UID
    assert not (r / "link_passwd").exists()
    assert _no_temp_files(tree.root_path)


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
@pytest_twisted.ensureDeferred
async def test_archive_written_inside_the_archived_directory_does_not_swallow_itself(
    tree: Tree, fm: FileManager, fmt: str
) -> None:
    # Incompressible data: an archive that read its own growing output would
    # never reach the end of it.
    (tree.root_path / "world").mkdir()
    (tree.root_path / "world" / "noise.bin").write_bytes(os.urandom(1_000_000))
    made = to_json(await fm.create_archive(tree.root, ["world"], "world/backup." + fmt, fmt))
    assert made["files"] == 1
    assert made["size"] < 1_200_000
    restored = to_json(await fm.extract_archive(tree.root, "world/backup." + fmt, "restore"))
    assert restored["extracted"] == 1


@pytest_twisted.ensureDeferred
async def test_archive_refusals(tree: Tree, fm: FileManager) -> None:
    with pytest.raises(InvalidInput):
        await fm.create_archive(tree.root, ["config.txt"], "a.rar", "rar")
    with pytest.raises(InvalidInput):
        await fm.create_archive(tree.root, [], "a.zip", "zip")
    with pytest.raises(FileNotFound):
        await fm.create_archive(tree.root, ["nope"], "a.zip", "zip")
    (tree.root_path / "junk.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InvalidInput):
        await fm.extract_archive(tree.root, "junk.zip", "/")
    (tree.root_path / "junk.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InvalidInput):
        await fm.extract_archive(tree.root, "junk.tar.gz", "/")


@pytest_twisted.ensureDeferred
async def test_writes_refused_beyond_disk_limit(tree: Tree, fm: FileManager) -> None:
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tree.root_path)
               for f in fs if not os.path.islink(os.path.join(d, f)))
    root = _limited(tree, used + 1000)
    await fm.write_file(root, "a.txt", "x" * 600)
    before = tree.all_state()
    with pytest.raises(InsufficientResources):
        await fm.write_file(root, "b.txt", "x" * 600)
    with pytest.raises(InsufficientResources):
        await fm.upload_file(root, "c.bin", base64.b64encode(b"x" * 600).decode())
    assert tree.all_state() == before
    # Replacing a file only needs room for the difference.
    await fm.write_file(root, "a.txt", "y" * 900)
    await fm.delete_file(root, "a.txt")
    await fm.write_file(root, "b.txt", "x" * 900)


@pytest_twisted.ensureDeferred
async def test_extraction_stops_at_disk_limit_and_rolls_back(tree: Tree, fm: FileManager) -> None:
    (tree.root_path / "src").mkdir()
    for i in range(5):
        (tree.root_path / "src" / "f{}".format(i)).write_bytes(os.urandom(50_000))
    await fm.create_archive(tree.root, ["src"], "a.tar", "tar")
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tree.root_path)
               for f in fs if not os.path.islink(os.path.join(d, f)))
    root = _limited(tree, used + 120_000)
    before = tree.rolled_back_state()
    with pytest.raises(InsufficientResources):
        await fm.extract_archive(root, "a.tar", "restore")
    assert tree.rolled_back_state() == before
    assert not (tree.root_path / "restore").exists()


@pytest_twisted.ensureDeferred
async def test_work_runs_off_the_reactor_thread(tree: Tree, fm: FileManager,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from ctrlagent.files import fsops

    seen: list[str] = []
    real = fsops.read_bytes

    def spy(*a: object, **kw: object) -> object:
        seen.append(threading.current_thread().name)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fsops, "read_bytes", spy)
    await fm.read_file(tree.root, "config.txt")
    assert seen and seen[0] != threading.main_thread().name


@pytest.mark.parametrize("mode", ["w:bz2", "w:xz"])
@pytest_twisted.ensureDeferred
async def test_extract_bz2_and_xz(tree: Tree, fm: FileManager, mode: str) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        info = tarfile.TarInfo("plugins/p.jar")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"jar"))
    (tree.root_path / "a.tar.x").write_bytes(buf.getvalue())
    result = to_json(await fm.extract_archive(tree.root, "a.tar.x", "/"))
    assert result["extracted"] == 1
    assert (tree.root_path / "plugins" / "p.jar").read_bytes() == b"jar"


@pytest_twisted.ensureDeferred
async def test_listing_hides_in_flight_temp_files(tree: Tree, fm: FileManager) -> None:
    (tree.root_path / ".ctrlagent-tmp-0123").write_text("partial")
    names = [f["name"] for f in to_json(await fm.list_files(tree.root, "/"))["files"]]
    assert ".ctrlagent-tmp-0123" not in names and "config.txt" in names


@pytest_twisted.ensureDeferred
async def test_search_stops_after_scanning_its_bound(tree: Tree) -> None:
    fm = make_manager(search_max_scanned=50)
    d = tree.root_path / "lots"
    d.mkdir()
    for i in range(100):
        (d / "match{:03d}".format(i)).write_text("")
    found = to_json(await fm.search_files(tree.root, "lots", "match"))
    assert found["truncated"] is True and len(found["files"]) == 0
    everything = to_json(await make_manager().search_files(tree.root, "lots", "match"))
    assert everything["truncated"] is False and len(everything["files"]) == 100


@pytest_twisted.ensureDeferred
async def test_missing_server_directory_is_created_but_not_its_parents(
    tmp_path: Path, fm: FileManager
) -> None:
    fresh = ServerRoot("srv2", str(tmp_path / "servers" / "srv2"), None, SERVER_UID, SERVER_GID)
    with pytest.raises(FileNotFound):
        await fm.list_files(fresh, "/")
    assert not (tmp_path / "servers").exists()
    (tmp_path / "servers").mkdir()
    assert to_json(await fm.list_files(fresh, "/"))["files"] == []
    st = os.stat(tmp_path / "servers" / "srv2")
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == SERVER_UID


@pytest_twisted.ensureDeferred
async def test_listing_never_opens_entries(tree: Tree, fm: FileManager) -> None:
    # Opening a FIFO for reading would block until a writer came: a listing
    # that guessed types by opening files would hang here.
    os.mkfifo(tree.root_path / "sub" / "console.pipe")
    files = to_json(await fm.list_files(tree.root, "sub"))["files"]
    assert {f["name"]: f["type"] for f in files} == {"console.pipe": "file", "inner.txt": "file"}


@pytest_twisted.ensureDeferred
async def test_write_refuses_text_that_is_not_unicode(tree: Tree, fm: FileManager) -> None:
    with pytest.raises(InvalidInput):
        await fm.write_file(tree.root, "bad.txt", "half a surrogate \ud800")
    assert not (tree.root_path / "bad.txt").exists()
    with pytest.raises(InvalidInput):
        await fm.write_file(tree.root, "bad.txt", 42)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_usage_walk_removes_stale_temp_files_of_a_crash(tree: Tree, fm: FileManager) -> None:
    stale = tree.root_path / "sub" / ".ctrlagent-tmp-dead"
    fresh = tree.root_path / "sub" / ".ctrlagent-tmp-live"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y")
    os.utime(stale, (0, 1))
    # The original an extraction in progress keeps: an old file (old mtime),
    # linked just now (fresh ctime), so it stays.
    kept = tree.root_path / "sub" / ".ctrlagent-keep-live"
    os.link(tree.root_path / "config.txt", kept)
    os.utime(kept, (0, 1))
    await fm.write_file(_limited(tree, 10**9), "a.txt", "a")
    assert not stale.exists() and fresh.exists() and kept.exists()
    listing = to_json(await fm.list_files(tree.root, "sub"))
    assert all(not f["name"].startswith(".ctrlagent-") for f in listing["files"])


@pytest_twisted.ensureDeferred
async def test_a_zip_holds_files_named_with_bytes_that_are_not_utf8(
    tree: Tree, fm: FileManager
) -> None:
    # The game server names files with any bytes; zip names are UTF-8.
    with open(os.path.join(os.fsencode(tree.root_path), b"sub", b"bad\xff.txt"), "wb") as f:
        f.write(b"data")
    made = to_json(await fm.create_archive(tree.root, ["sub"], "out.zip", "zip"))
    assert made["files"] == 2
    with zipfile.ZipFile(tree.root_path / "out.zip") as zf:
        assert sorted(zf.namelist()) == ["sub/", "sub/bad\ufffd.txt", "sub/inner.txt"]
