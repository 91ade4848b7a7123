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
