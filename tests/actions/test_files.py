"""
The file actions against the in-memory file manager, through any id of the server.
"""

from __future__ import annotations

import base64

from tests.actions.rig import PANEL_ID, UUID, Rig


def test_file_round_trip_through_the_panel_id(rig: Rig) -> None:
    rig.created()
    rig.ok("create_directory", PANEL_ID, path="/config")
    written = rig.ok("write_file", PANEL_ID, path="/config/server.properties", content="motd=hi\n")
    assert written["size"] == 8
    read = rig.ok("read_file", PANEL_ID, path="config/server.properties")
    assert read["content"] == "motd=hi\n" and read["encoding"] == "utf8"
    listing = rig.ok("list_files", PANEL_ID, path="/config")
    (entry,) = listing["files"]
    assert entry["name"] == "server.properties" and entry["type"] == "file"
    assert entry["extension"] == "properties" and entry["permissions"] == "644"
    assert rig.ok("list_files", PANEL_ID)["files"][0]["type"] == "directory"
    found = rig.ok("search_files", PANEL_ID, path="/", query="PROPERTIES")["files"]
    assert [f["path"] for f in found] == ["/config/server.properties"]
    assert rig.ok("search_files", PANEL_ID, query="config", fileType="file")["files"] == []
    rig.ok("rename_file", PANEL_ID, oldPath="/config", newPath="/cfg")
    info = rig.ok("get_file_info", PANEL_ID, path="/cfg/server.properties")
    assert info["mode"] == "0644"
    rig.ok("set_file_permissions", PANEL_ID, path="/cfg/server.properties", mode="600")
    assert rig.ok("get_file_info", PANEL_ID, path="/cfg/server.properties")["permissions"] == "600"
    down = rig.ok("download_file", PANEL_ID, path="/cfg/server.properties")
    assert base64.b64decode(down["content"]) == b"motd=hi\n"
    rig.ok("delete_file", PANEL_ID, path="/cfg")
    assert rig.ok("list_files", PANEL_ID)["files"] == []
    # the files live under the canonical id's directory
    assert "/srv/ctrlagent/servers/" + UUID in rig.files.trees


def test_upload_encodings(rig: Rig) -> None:
    rig.created()
    blob = bytes(range(256))
    up = rig.ok("upload_file", PANEL_ID, path="/world.bin", content=base64.b64encode(blob).decode())
    assert up["size"] == 256
    rig.ok("upload_file", PANEL_ID, path="/a.txt", content="héllo", encoding="utf8")
    assert rig.ok("read_file", PANEL_ID, path="a.txt")["content"] == "héllo"
    err = rig.error("upload_file", PANEL_ID, path="/b", content="!!!not base64")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "content")
    err = rig.error("upload_file", PANEL_ID, path="/b", content="", encoding="rot13")
    assert err.details["field"] == "encoding"
    # a binary file cannot be read as text
    assert rig.error("read_file", PANEL_ID, path="/world.bin").code == "NOT_TEXT"


def test_file_payload_errors_name_the_field(rig: Rig) -> None:
    rig.created()
    cases = [
        ("read_file", {}, "path"),
        ("read_file", {"path": 7}, "path"),
        ("write_file", {"path": "a"}, "content"),
        ("write_file", {"path": "a", "content": {"x": 1}}, "content"),
        ("rename_file", {"oldPath": "a"}, "newPath"),
        ("set_file_permissions", {"path": "a", "mode": "rwxr-xr-x"}, "mode"),
        ("set_file_permissions", {"path": "a", "mode": "99999"}, "mode"),
        ("set_file_permissions", {"path": "a", "mode": "755\n"}, "mode"),
        ("create_archive", {"archivePath": "a.zip"}, "files"),
        ("create_archive", {"files": ["a"], "archivePath": "a.rar", "format": "rar"}, "format"),
        ("extract_archive", {}, "archivePath"),
        ("search_files", {"path": "/"}, "query"),
        ("search_files", {"query": "x", "fileType": "socket"}, "fileType"),
        ("list_files", {"path": ["/"]}, "path"),
    ]
    for action, params, field in cases:
        err = rig.error(action, UUID, **params)
        assert (action, err.code, err.details.get("field")) == (action, "INVALID_PAYLOAD", field)


def test_paths_cannot_leave_the_server_directory(rig: Rig) -> None:
    rig.created()
    assert rig.error("read_file", UUID, path="../../etc/passwd").code == "PERMISSION_DENIED"
    assert rig.error("list_files", UUID, path="/..").code == "PERMISSION_DENIED"
    assert rig.error("read_file", UUID, path="/missing.txt").code == "FILE_NOT_FOUND"


def test_disk_limit_is_enforced(rig: Rig) -> None:
    rig.created(limits={"disk": 1})
    big = base64.b64encode(b"x" * (1024 * 1024 + 1)).decode()
    assert rig.error("upload_file", UUID, path="/big", content=big).code == "INSUFFICIENT_RESOURCES"


def test_archive_round_trip(rig: Rig) -> None:
    rig.created()
    rig.ok("create_directory", UUID, path="/world/region")
    rig.ok("write_file", UUID, path="/world/region/r.0.0", content="blocks")
    rig.ok("create_archive", UUID, files=["/world"], archivePath="/backup.zip", format="zip")
    rig.ok("create_directory", UUID, path="/restore")
    rig.ok("extract_archive", UUID, archivePath="/backup.zip", extractPath="/restore")
    assert rig.ok("read_file", UUID, path="/restore/world/region/r.0.0")["content"] == "blocks"


def test_upload_chunk_fields_are_checked_and_passed_on(rig: Rig) -> None:
    rig.created()
    piece = base64.b64encode(b"abc").decode()
    rig.ok("upload_file", UUID, path="/big.zip", content=piece, chunkIndex=0, totalChunks=2)
    assert [f["name"] for f in rig.ok("list_files", UUID)["files"]] == ["big.zip.chunk0"]
    err = rig.error("upload_file", UUID, path="/big.zip", content=piece, chunkIndex="first")
    assert err.details["field"] == "chunkIndex"
    err = rig.error(
        "upload_file", UUID, path="/big.zip", content=piece, chunkIndex=2, totalChunks=2
    )
    assert err.details["field"] == "chunkIndex"


def test_copy_move_and_permissions_with_the_panels_payloads(rig: Rig) -> None:
    rig.created()
    rig.ok("create_directory", PANEL_ID, path="/world/region")
    rig.ok("write_file", PANEL_ID, path="/world/level.dat", content="seed=1\n")
    rig.ok("write_file", PANEL_ID, path="/world/region/r.0.0.mca", content="blocks")
    # externalAgentService: copyFile / moveFile / getFilePermissions.
    copied = rig.ok("copy_file", PANEL_ID, sourcePath="/world", destinationPath="/world-backup")
    assert (copied["sourcePath"], copied["destinationPath"]) == ("/world", "/world-backup")
    assert (copied["files"], copied["size"]) == (2, 13)
    read = rig.ok("read_file", PANEL_ID, path="/world-backup/region/r.0.0.mca")
    assert read["content"] == "blocks"
    assert rig.ok("read_file", PANEL_ID, path="/world/level.dat")["content"] == "seed=1\n"
    err = rig.error("copy_file", PANEL_ID, sourcePath="/world", destinationPath="/world-backup")
    assert err.code == "CONFLICT"
    err = rig.error("copy_file", PANEL_ID, sourcePath="/world", destinationPath="/world/inner")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "destinationPath")
    moved = rig.ok("move_file", PANEL_ID, sourcePath="/world-backup/level.dat",
                   destinationPath="/level.dat")
    assert moved == {"sourcePath": "/world-backup/level.dat", "destinationPath": "/level.dat"}
    assert rig.error("read_file", PANEL_ID, path="/world-backup/level.dat").code == \
        "FILE_NOT_FOUND"
    rig.ok("set_file_permissions", PANEL_ID, path="/level.dat", mode="640")
    perms = rig.ok("get_file_permissions", PANEL_ID, path="/level.dat")
    assert set(perms) == {"path", "permissions", "mode", "owner", "group"}
    assert (perms["path"], perms["permissions"], perms["mode"]) == ("/level.dat", "640", "0640")
    for action, params, field in (
        ("copy_file", {"sourcePath": "/level.dat"}, "destinationPath"),
        ("copy_file", {"destinationPath": "/x"}, "sourcePath"),
        ("move_file", {"sourcePath": 7, "destinationPath": "/x"}, "sourcePath"),
        ("get_file_permissions", {}, "path"),
    ):
        err = rig.error(action, UUID, **params)
        assert (action, err.code, err.details.get("field")) == (action, "INVALID_PAYLOAD", field)
    assert rig.error("copy_file", UUID, sourcePath="../../etc",
                     destinationPath="/etc").code == "PERMISSION_DENIED"


def test_copy_beyond_the_disk_limit_is_refused_and_leaves_nothing(rig: Rig) -> None:
    rig.created(limits={"memory": 512, "disk": 1, "cpu": 100})
    blob = base64.b64encode(b"x" * 600_000).decode()
    rig.ok("upload_file", PANEL_ID, path="/big.bin", content=blob)
    err = rig.error("copy_file", PANEL_ID, sourcePath="/big.bin", destinationPath="/big2.bin")
    assert err.code == "INSUFFICIENT_RESOURCES"
    names = [f["name"] for f in rig.ok("list_files", PANEL_ID)["files"]]
    assert names == ["big.bin"]


def test_read_file_refuses_a_binary_file_unless_lossy_is_asked(rig: Rig) -> None:
    rig.created()
    blob = bytes((i * 7 + 128) % 256 for i in range(3000))
    rig.ok("upload_file", PANEL_ID, path="/map.bin", content=base64.b64encode(blob).decode())
    err = rig.error("read_file", PANEL_ID, path="/map.bin")
    assert err.code == "NOT_TEXT" and "download_file" in err.message
    for params in ({"lossy": True}, {"encoding": "lossy"}):
        lossy = rig.ok("read_file", PANEL_ID, path="/map.bin", **params)
        assert lossy["lossy"] is True and lossy["size"] == 3000
    err = rig.error("read_file", PANEL_ID, path="/map.bin", encoding="latin1")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "encoding")
    # The legacy frame's name reaches the same refusal.
    assert rig.error("file_read", PANEL_ID, path="/map.bin").code == "NOT_TEXT"
    down = rig.ok("download_file", PANEL_ID, path="/map.bin")
    assert base64.b64decode(down["content"]) == blob
