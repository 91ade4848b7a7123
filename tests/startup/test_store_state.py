"""
The state store against bad state: every store it cannot use is refused with
one line naming the problem, a bad row is quarantined (kept verbatim) while
the others load, a store from an older agent is migrated, and a write on a
full disk fails with ``INSUFFICIENT_RESOURCES`` and changes nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from ctrlagent.config import ServersConfig
from ctrlagent.errors import InsufficientResources
from ctrlagent.servers import spec as specs
from ctrlagent.servers.store import ServerStore, StoreUnusable, open_store

PARAMS = {"image": "img", "startup": "/game"}


def spec_json(server_id: str) -> str:
    return specs.parse_spec(server_id, PARAMS, ServersConfig()).to_json()


async def stored(state_dir: Path, *ids: str) -> None:
    store = open_store(reactor, str(state_dir))
    for sid in ids:
        await store.insert(sid, spec_json(sid), extra={"markCount": 1})
    await store.close()


def raw_rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(str(path))
    db.text_factory = bytes
    try:
        return db.execute(
            "SELECT server_id, spec, desired, state, container_id, console_mark, last_crash,"
            " extra FROM {} ORDER BY server_id".format(table)
        ).fetchall()
    finally:
        db.close()


def corrupt(path: Path, sql: str, *args: Any) -> None:
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute(sql, args)
    finally:
        db.close()


# -- unusable stores: one clear line ------------------------------------------------


def refusal(state_dir: Path) -> str:
    with pytest.raises(StoreUnusable) as refused:
        open_store(reactor, str(state_dir))
    line = str(refused.value)
    assert "\n" not in line and "Traceback" not in line
    return line


def test_random_bytes_are_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "servers.sqlite3").write_bytes(os.urandom(16384))
    line = refusal(tmp_path)
    assert "is not a SQLite database" in line and "servers.sqlite3" in line


@pytest_twisted.ensureDeferred
async def test_a_truncated_store_is_damaged(tmp_path: Path) -> None:
    await stored(tmp_path, *("srv-{}".format(i) for i in range(200)))
    db = tmp_path / "servers.sqlite3"
    data = db.read_bytes()
    assert len(data) > 8192
    db.write_bytes(data[: len(data) // 2])
    assert "is damaged" in refusal(tmp_path)


def test_a_state_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")
    line = refusal(state)
    assert "state directory {} is not a directory".format(state) in line


def test_a_state_path_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "part of its path is a file" in refusal(tmp_path / "file" / "state")


def test_a_store_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "servers.sqlite3").mkdir()
    assert "is a directory, not a database file" in refusal(tmp_path)


@pytest_twisted.ensureDeferred
async def test_a_servers_table_without_the_definitions_is_refused(tmp_path: Path) -> None:
    corrupt(tmp_path / "servers.sqlite3", "CREATE TABLE servers (server_id TEXT, name TEXT)")
    line = refusal(tmp_path)
    assert "without the column(s) spec" in line


def test_a_view_named_servers_is_refused(tmp_path: Path) -> None:
    corrupt(tmp_path / "servers.sqlite3", "CREATE VIEW servers AS SELECT 1 AS server_id")
    assert "has a view named 'servers'" in refusal(tmp_path)


def test_an_unknown_required_column_is_refused(tmp_path: Path) -> None:
    corrupt(
        tmp_path / "servers.sqlite3",
        "CREATE TABLE servers (server_id TEXT PRIMARY KEY, spec TEXT, owner TEXT NOT NULL)",
    )
    assert "unknown required column 'owner'" in refusal(tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of our own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest_twisted.ensureDeferred
async def test_a_store_on_a_read_only_filesystem_is_refused(small_tmpfs: Path) -> None:
    await stored(small_tmpfs, "a")
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    line = refusal(small_tmpfs)
    assert "read-only filesystem" in line


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue
    return filler


@pytest_twisted.ensureDeferred
async def test_a_write_on_a_full_state_disk_is_insufficient_resources(
    small_tmpfs: Path,
) -> None:
    await stored(small_tmpfs, "kept")
    store = open_store(reactor, str(small_tmpfs))
    try:
        filler = fill(small_tmpfs)
        failures = []
        for i in range(50):  # the WAL may still hold a few free frames
            try:
                await store.insert("new-{}".format(i), spec_json("new-{}".format(i)))
            except InsufficientResources as e:
                failures.append(e)
                break
        assert failures, "the full disk never refused a write"
        assert "state disk is full" in failures[0].message
        assert failures[0].code == "INSUFFICIENT_RESOURCES"
        written = i
        filler.unlink()
        # The store works again, and nothing was half-written.
        await store.insert("after", spec_json("after"))
    finally:
        await store.close()
    again = open_store(reactor, str(small_tmpfs))
    try:
        ids = [r.server_id for r in again.load()]
    finally:
        await again.close()
    assert ids == sorted(["after", "kept", *("new-{}".format(n) for n in range(written))])


# -- bad rows: quarantined, the others load ------------------------------------------


@pytest.mark.parametrize(
    "sql,reason",
    [
        ("UPDATE servers SET extra = '{\"markCount\": ' WHERE server_id = 'bad'", "extra is not"),
        ("UPDATE servers SET extra = '[1, 2]' WHERE server_id = 'bad'", "extra is not a JSON"),
        ("UPDATE servers SET spec = CAST(x'ff00fe' AS TEXT) WHERE server_id = 'bad'", "UTF-8"),
        ("UPDATE servers SET console_mark = 'lots' WHERE server_id = 'bad'", "console_mark"),
        ("UPDATE servers SET last_crash = 'yesterday' WHERE server_id = 'bad'", "last_crash"),
        ("UPDATE servers SET extra = x'c328' WHERE server_id = 'bad'", "extra is not valid UTF-8"),
        (
            "UPDATE servers SET extra = '{\"x\": ' || replace(hex(zeroblob(5000)), '00', '[')"
            " || '}' WHERE server_id = 'bad'",
            "extra is not valid JSON",
        ),
    ],
    ids=["truncated-json", "json-array", "invalid-utf8", "text-mark", "text-crash",
         "blob-extra", "deep-json"],
)
@pytest_twisted.ensureDeferred
async def test_a_row_that_cannot_be_read_is_quarantined_verbatim(
    tmp_path: Path, sql: str, reason: str
) -> None:
    await stored(tmp_path, "a", "bad", "z")
    path = tmp_path / "servers.sqlite3"
    corrupt(path, sql)
    before = [r for r in raw_rows(path, "servers") if r[0] == b"bad"]
    store = open_store(reactor, str(tmp_path))
    try:
        records = store.load()
    finally:
        await store.close()
    assert [r.server_id for r in records] == ["a", "z"]
    assert [(q.server_id, reason in q.reason) for q in store.quarantined] == [("bad", True)]
    # Moved, not deleted, not changed: exactly the bytes that were stored.
    assert raw_rows(path, "quarantine") == before
    assert [r[0] for r in raw_rows(path, "servers")] == [b"a", b"z"]
    # The next start does not see it again.
    again = open_store(reactor, str(tmp_path))
    try:
        assert [r.server_id for r in again.load()] == ["a", "z"]
        assert again.quarantined == []
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_a_row_without_an_id_is_quarantined(tmp_path: Path) -> None:
    await stored(tmp_path, "a")
    corrupt(
        tmp_path / "servers.sqlite3",
        "INSERT INTO servers (server_id, spec, updated) VALUES (NULL, ?, 0)",
        spec_json("x"),
    )
    store = open_store(reactor, str(tmp_path))
    try:
        assert [r.server_id for r in store.load()] == ["a"]
        assert [q.server_id for q in store.quarantined] == ["<no id>"]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_store_from_an_older_agent_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "servers.sqlite3"
    corrupt(path, "CREATE TABLE servers (server_id TEXT PRIMARY KEY, spec TEXT NOT NULL)")
    corrupt(path, "INSERT INTO servers VALUES ('old', ?)", spec_json("old"))
    store = open_store(reactor, str(tmp_path))
    try:
        assert set(store.migrated) == {
            "desired", "state", "container_id", "console_mark", "last_crash", "extra", "updated"
        }
        [record] = store.load()
        assert (record.server_id, record.desired, record.console_mark, record.extra) == (
            "old", "offline", 0, {})
        await store.update("old", desired="running", extra={"markCount": 3})
    finally:
        await store.close()
    again = open_store(reactor, str(tmp_path))
    try:
        assert again.migrated == []
        [record] = again.load()
        assert (record.desired, record.extra) == ("running", {"markCount": 3})
    finally:
        await again.close()


def test_a_store_that_failed_to_start_leaves_no_thread(tmp_path: Path) -> None:
    import threading

    before = set(threading.enumerate())
    store = ServerStore(reactor, str(tmp_path / "servers.sqlite3"))
    store.load()
    store.close_now()
    assert set(threading.enumerate()) == before


def test_spec_json_round_trip_is_what_the_store_keeps() -> None:
    # The fixtures above store real definitions.
    assert json.loads(spec_json("a"))["server_id"] == "a"
