"""
The records of ``ctrlagent.wire.files`` and their shapes: every key the
Panel reads (PROTOCOL.md section 2, parsed from ``docs/PROTOCOL.md``), in
today's order, with today's spelling of times, permissions and modes.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.wire.files import (
    ArchiveCreated,
    ArchiveExtracted,
    Done,
    FileBytes,
    FileEntry,
    FileInfo,
    FileListing,
    FileSearch,
    FileText,
    FileWritten,
    Mod,
    ModInstalled,
    ModList,
    PermissionsSet,
    Renamed,
    iso_ms,
)
from ctrlagent.wire.json import to_json

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
STAMP = 1_700_000_000.25
STAMP_ISO = "2023-11-14T22:13:20.250Z"
ENTRY_KEYS = ["name", "type", "size", "modified", "lastModified", "permissions", "owner",
              "group", "path"]


def _file(name: str = "server.properties", **kw: Any) -> FileEntry:
    fields: dict[str, Any] = dict(name=name, kind="file", size=8, modified=STAMP, mode=0o644,
                                  owner="container", group="container", path="/" + name)
    fields.update(kw)
    return FileEntry(**fields)


MOD = Mod("42", "Cool Mod", "1.0", "a mod", True, "cool.jar", 50_000, "https://x/cool.jar",
          "steam_workshop", STAMP_ISO)

# One record per file or mod action, as FileManager answers it.
SAMPLES: dict[str, Any] = {
    "list_files": FileListing("srv", "/", (_file(),), 1, 0, 100, False),
    "search_files": FileSearch("srv", "/", "server", (_file(),), False),
    "read_file": FileText("srv", "/a.txt", "hi", 2, STAMP),
    "write_file": FileWritten("/a.txt", 2, STAMP),
    "create_directory": Done("/d"),
    "delete_file": Done("/d", "deleted /d"),
    "rename_file": Renamed("/a", "/b"),
    "download_file": FileBytes("srv", "/a.bin", "aGk=", 2, STAMP),
    "upload_file": FileWritten("/a.bin", 2, STAMP),
    "get_file_info": FileInfo(_file()),
    "set_file_permissions": PermissionsSet("/a", 0o600),
    "create_archive": ArchiveCreated("/b.zip", 100, 1),
    "extract_archive": ArchiveExtracted("/b.zip", "/", 1, 0),
    "install_mod": ModInstalled(MOD),
    "uninstall_mod": ModList((MOD,)),
    "list_mods": ModList((MOD,)),
}


# -- what PROTOCOL.md section 2 documents ------------------------------------------


def _skip_value(text: str, i: int) -> int:
    """Index of the ``,`` or closing bracket that ends the value starting at ``i``."""
    depth = 0
    quoted = False
    while i < len(text):
        ch = text[i]
        if quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return i
            depth -= 1
        elif ch == "," and depth == 0:
            return i
        i += 1
    raise ValueError("unterminated value in {!r}".format(text))


def _parse_object(text: str, i: int) -> tuple[dict[str, Any], int]:
    """
    ``{a, b?, c:[{d}], e:"x"|"y"}`` at ``i`` -> ``{"a": None, "b?": None,
    "c": {"d": None}, "e": None}`` and the index after it.
    """
    assert text[i] == "{"
    i += 1
    out: dict[str, Any] = {}
    while True:
        while text[i] in " ,":
            i += 1
        if text[i] == "}":
            return out, i + 1
        m = re.compile(r"[A-Za-z]+\??").match(text, i)
        assert m, text[i:]
        key = m.group()
        i = m.end()
        nested = None
        if text.startswith(":[{", i) or text.startswith(":{", i):
            nested, i = _parse_object(text, text.index("{", i))
            if text[i] == "]":
                i += 1
        else:
            i = _skip_value(text, i)
        out[key] = nested


def _cells(line: str) -> list[str]:
    """A table row's cells; a ``|`` inside backticks (``"file"|"directory"``) is text."""
    return [c.strip() for c in re.findall(r"(?:`[^`]*`|[^|`])+", line.strip().strip("|"))]


def documented() -> dict[str, dict[str, Any]]:
    """Action -> the ``data`` keys section 2 says the Panel reads (``key?`` optional)."""
    section = PROTOCOL.read_text().split("## 2. Actions", 1)[1].split("\n## ", 1)[0]
    out: dict[str, dict[str, Any]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = _cells(line)
        names = re.findall(r"`([a-z_:.]+)`", cells[0])
        reads = cells[-1]
        keys = _parse_object(reads, reads.index("data:{") + 5)[0] if "data:{" in reads else {}
        for name in names:
            out[name] = keys
    # ``search_files``: ``files:[..same..]``, the entries of ``list_files``.
    out["search_files"]["files"] = out["list_files"]["files"]
    return out


def _assert_documented(shape: dict[str, Any], keys: dict[str, Any], where: str) -> None:
    for key, nested in keys.items():
        optional = key.endswith("?")
        key = key.rstrip("?")
        if key not in shape:
            assert optional, "{}: documented key {} is missing".format(where, key)
            continue
        if nested is not None:
            value = shape[key]
            for item in value if isinstance(value, list) else [value]:
                _assert_documented(item, nested, "{}.{}".format(where, key))


def test_the_protocol_table_is_read() -> None:
    table = documented()
    assert set(SAMPLES) <= set(table)
    assert table["list_files"]["files"]["lastModified"] is None
    assert "extension?" in table["list_files"]["files"]
    assert set(table["list_mods"]) == {"mods", "count"}


@pytest.mark.parametrize("action", sorted(SAMPLES))
def test_each_answer_carries_every_key_the_protocol_documents(action: str) -> None:
    shape = to_json(SAMPLES[action])
    json.dumps(shape)  # plain JSON values only
    _assert_documented(shape, documented()[action], action)


# -- entries ---------------------------------------------------------------------


def test_a_file_entry_in_the_panels_order_and_spelling() -> None:
    assert json.dumps(to_json(_file("World.MCA", mode=0o100640 & 0o7777))) == json.dumps({
        "name": "World.MCA", "type": "file", "size": 8, "modified": STAMP_ISO,
        "lastModified": STAMP_ISO, "permissions": "640", "owner": "container",
        "group": "container", "path": "/World.MCA", "extension": "mca"})


@pytest.mark.parametrize("name", [".hidden", "noext", "trailing."])
def test_extension_only_after_a_dot_inside_the_name(name: str) -> None:
    shape = to_json(_file(name))
    assert ("extension" in shape) == (name == "trailing.")
    if name == "trailing.":
        assert shape["extension"] == ""


def test_a_directory_has_no_extension_and_the_directory_type() -> None:
    shape = to_json(_file("world.d", kind="directory", size=0, mode=0o755))
    assert list(shape) == ENTRY_KEYS
    assert (shape["type"], shape["size"], shape["permissions"]) == ("directory", 0, "755")


def test_links_in_listings_end_with_broken_then_symlink() -> None:
    inside = to_json(_file("l.txt", symlink=True))
    assert list(inside) == [*ENTRY_KEYS, "extension", "symlink"] and inside["symlink"] is True
    broken = to_json(_file("l", symlink=True, broken=True, mode=0o777))
    assert list(broken) == [*ENTRY_KEYS, "broken", "symlink"]
    assert (broken["type"], broken["permissions"]) == ("file", "777")


def test_file_info_ends_with_symlink_then_broken_then_mode() -> None:
    assert list(to_json(FileInfo(_file("a.txt")))) == [*ENTRY_KEYS, "extension", "mode"]
    info = to_json(FileInfo(_file("l", symlink=True, broken=True, mode=0o777)))
    assert list(info) == [*ENTRY_KEYS, "symlink", "broken", "mode"]
    # Bits the agent never sets may be there all the same (the game server's chmod).
    setuid = to_json(FileInfo(_file("run.sh", mode=0o4755)))
    assert (setuid["permissions"], setuid["mode"]) == ("755", "4755")


def test_listing_and_search_wrap_their_entries() -> None:
    entries = (_file("a"), _file("b", kind="directory", size=0))
    listing = to_json(FileListing("srv", "/w", entries, 12, 2, 2, True))
    assert json.dumps(listing) == json.dumps({
        "serverId": "srv", "path": "/w", "files": [to_json(e) for e in entries], "total": 12,
        "offset": 2, "limit": 2, "truncated": True})
    search = to_json(FileSearch("srv", "/", "a", entries[:1], True))
    assert list(search) == ["serverId", "path", "query", "files", "truncated"]
    assert search["files"] == [to_json(entries[0])]


# -- contents and changes -----------------------------------------------------------


def test_text_says_lossy_only_when_bytes_were_replaced() -> None:
    assert list(to_json(FileText("s", "/a", "x", 1, STAMP))) == [
        "serverId", "path", "content", "size", "modified", "encoding"]
    lossy = to_json(FileText("s", "/a", "\ufffd", 1, STAMP, lossy=True))
    assert (list(lossy)[-1], lossy["lossy"], lossy["encoding"]) == ("lossy", True, "utf8")


def test_bytes_are_base64_text() -> None:
    assert json.dumps(to_json(FileBytes("s", "/a", "aGk=", 2, STAMP))) == json.dumps({
        "serverId": "s", "path": "/a", "content": "aGk=", "encoding": "base64", "size": 2,
        "modified": STAMP_ISO})


@pytest.mark.parametrize(("record", "expected"), [
    (FileWritten("/a", 3, STAMP), {"path": "/a", "size": 3, "modified": STAMP_ISO}),
    (FileWritten("/a.chunk0", 3, chunk=0, assembled=False),
     {"path": "/a.chunk0", "size": 3, "chunk": 0, "assembled": False}),
    (FileWritten("/a.chunk1", 3, chunk=1, assembled=True, target="/a", target_size=6),
     {"path": "/a.chunk1", "size": 3, "chunk": 1, "assembled": True, "target": "/a",
      "targetSize": 6}),
    (FileWritten("/a", 6, STAMP, assembled=True, chunks=2),
     {"path": "/a", "size": 6, "modified": STAMP_ISO, "assembled": True, "chunks": 2}),
    (Done("/d"), {"path": "/d"}),
    (Done("/d", "deleted /d"), {"message": "deleted /d", "path": "/d"}),
    (Renamed("/a", "/b"), {"oldPath": "/a", "newPath": "/b"}),
    (PermissionsSet("/a", 0o755), {"path": "/a", "mode": "0755"}),
    (ArchiveCreated("/b.tar", 10, 3), {"archivePath": "/b.tar", "size": 10, "files": 3}),
    (ArchiveExtracted("/b.tar", "/x", 3, 1),
     {"archivePath": "/b.tar", "extractPath": "/x", "extracted": 3, "skipped": 1}),
])
def test_change_answers_keep_their_keys_and_order(record: Any, expected: dict[str, Any]) -> None:
    assert json.dumps(to_json(record)) == json.dumps(expected)


# -- mods ---------------------------------------------------------------------------


def test_a_listed_mod_in_the_manifests_order() -> None:
    assert list(to_json(MOD)) == ["id", "fileName", "name", "version", "description", "source",
                                  "type", "installedAt", "enabled", "size"]


def test_an_installed_mod_in_the_order_the_install_records_it() -> None:
    assert list(to_json(ModInstalled(MOD))["mod"]) == [
        "id", "name", "version", "description", "enabled", "fileName", "size", "source",
        "type", "installedAt"]
    assert to_json(ModInstalled(MOD))["mod"] == to_json(MOD)


def test_unknown_mod_facts_are_left_out() -> None:
    bare = Mod("7", "7")
    assert json.dumps(to_json(bare)) == json.dumps(
        {"id": "7", "name": "7", "version": "", "description": "", "enabled": True})
    assert to_json(ModInstalled(bare)) == {"mod": to_json(bare)}


def test_a_mod_list_counts_its_mods() -> None:
    mods = ModList((MOD, Mod("7", "Seven", enabled=False)))
    assert mods.count == 2
    shape = to_json(mods)
    assert list(shape) == ["mods", "count"] and shape["count"] == 2
    assert [m["id"] for m in shape["mods"]] == ["42", "7"] and shape["mods"][1]["enabled"] is False
    assert to_json(ModList(())) == {"mods": [], "count": 0}


# -- times ----------------------------------------------------------------------------


@given(st.integers(-62_135_596_800, 253_402_300_799), st.integers(0, 7))
def test_iso_ms_is_javascripts_to_iso_string(seconds: int, eighths: int) -> None:
    # Eighths of a second are exact in binary: the milliseconds are certain.
    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    expected = "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}.{:03d}Z".format(
        at.year, at.month, at.day, at.hour, at.minute, at.second, eighths * 125)
    assert iso_ms(seconds + eighths / 8) == expected


@pytest.mark.parametrize(("seconds", "expected"), [
    (0, "1970-01-01T00:00:00.000Z"),
    (-1.5, "1969-12-31T23:59:58.500Z"),
    (STAMP, STAMP_ISO),
    (1e18, "9999-12-31T23:59:59.999Z"),
    (253_402_300_800, "9999-12-31T23:59:59.999Z"),
    (-1e18, "0001-01-01T00:00:00.000Z"),
    (float("inf"), "9999-12-31T23:59:59.999Z"),
    (float("-inf"), "0001-01-01T00:00:00.000Z"),
    (float("nan"), "0001-01-01T00:00:00.000Z"),
])
def test_iso_ms_of_any_time_a_file_can_carry(seconds: float, expected: str) -> None:
    # A game server sets its files' times; none of them may fail an answer.
    assert iso_ms(seconds) == expected


def test_records_are_frozen_and_slotted() -> None:
    # Slots: a 10k-entry listing must not pay a dict per entry on top of its shape.
    for record in [*SAMPLES.values(), _file()]:
        assert not hasattr(record, "__dict__"), type(record).__name__
    with pytest.raises(AttributeError):
        _file().size = 1  # type: ignore[misc]
