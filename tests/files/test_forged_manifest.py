"""
A mods manifest forged by the game server is input from the internet.

The game server writes ``mods/.ctrlagent-mods.json`` itself.  Each case below
forges it (or the mods folder) to point at something outside the mods folder:
the canary tree beside the server (by absolute path too: it stands for any
host file, never a real one), a neighbour server's directory, the server's
own files, or to break the reader (wrong types,
huge, nested, duplicate ids, lone surrogates).  Every mod action runs against
every case, with both resolvers: whatever it answers, it is a protocol error
or a success, nothing outside the mods folder changes, and no forged entry is
ever listed or acted on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.errors import CtrlAgentError
from ctrlagent.files.manager import FileManager
from ctrlagent.files.mods import MANIFEST, MAX_MANIFEST_BYTES, MAX_MODS
from ctrlagent.wire.json import to_json
from tests.files.conftest import Tree, snapshot

VICTIM = "victim"


def _manifest(*entries: Any) -> bytes:
    return json.dumps({"version": 1, "mods": list(entries)}).encode()


def _entry(file_name: Any, mod_id: Any = VICTIM) -> dict[str, Any]:
    return {"id": mod_id, "name": "forged", "fileName": file_name, "enabled": True}


Setup = Callable[[Tree, Path], bytes | None]


def forged(file_name: Any) -> Setup:
    return lambda tree, neighbour: _manifest(_entry(file_name))


def absolute_canary(tree: Tree, neighbour: Path) -> bytes:
    return _manifest(_entry(str(tree.outside / "secret.txt")))


def absolute_neighbour(tree: Tree, neighbour: Path) -> bytes:
    return _manifest(_entry(str(neighbour)))


def duplicate_ids(tree: Tree, neighbour: Path) -> bytes:
    return _manifest(_entry("good.jar"), _entry("../../outside/secret.txt"))


def duplicate_names(tree: Tree, neighbour: Path) -> bytes:
    return _manifest(_entry("config.jar", "other"), _entry("config.jar"))


def huge(tree: Tree, neighbour: Path) -> bytes:
    pad = {"id": "pad", "description": "x" * (MAX_MANIFEST_BYTES + 10)}
    return _manifest(_entry("../../outside/secret.txt"), pad)


def too_many(tree: Tree, neighbour: Path) -> bytes:
    fill = [{"id": "m{}".format(i)} for i in range(MAX_MODS)]
    return _manifest(*fill, _entry("../../outside/secret.txt"))


def nested(tree: Tree, neighbour: Path) -> bytes:
    return b'{"mods": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def surrogate(tree: Tree, neighbour: Path) -> bytes:
    return b'{"mods": [{"id": "victim", "name": "\\ud800", "fileName": "a.jar"}]}'


def not_json(tree: Tree, neighbour: Path) -> bytes:
    return b"\xff\xfe not json"


def manifest_links_out(tree: Tree, neighbour: Path) -> None:
    (tree.outside / "manifest.json").write_bytes(_manifest(_entry("secret.txt")))
    os.symlink("../../outside/manifest.json", tree.root_path / "mods" / MANIFEST)


def manifest_is_fifo(tree: Tree, neighbour: Path) -> None:
    os.mkfifo(tree.root_path / "mods" / MANIFEST)


def mods_dir_links_out(tree: Tree, neighbour: Path) -> bytes:
    os.rename(tree.root_path / "mods", tree.root_path / "mods.real")
    os.symlink(str(tree.outside), tree.root_path / "mods")
    (tree.outside / MANIFEST).write_bytes(_manifest(_entry("secret.txt")))
    return b""


def mods_dir_links_to_neighbour(tree: Tree, neighbour: Path) -> bytes:
    os.rename(tree.root_path / "mods", tree.root_path / "mods.real")
    os.symlink("../neighbour", tree.root_path / "mods")
    (neighbour / MANIFEST).write_bytes(_manifest(_entry("world.dat")))
    return b""


def mod_file_links_out(tree: Tree, neighbour: Path) -> bytes:
    os.symlink("../../outside/secret.txt", tree.root_path / "mods" / "evil.jar")
    return _manifest(_entry("evil.jar"))


def mod_file_links_to_neighbour_dir(tree: Tree, neighbour: Path) -> bytes:
    os.symlink(str(neighbour), tree.root_path / "mods" / "evil.jar")
    return _manifest(_entry("evil.jar"))


def mod_file_is_a_directory(tree: Tree, neighbour: Path) -> bytes:
    (tree.root_path / "mods" / "world").mkdir()
    (tree.root_path / "mods" / "world" / "level.dat").write_text("keep me\n")
    return _manifest(_entry("world"))


CASES: dict[str, Setup | Callable[[Tree, Path], None]] = {
    "dotdot to canary": forged("../../outside/secret.txt"),
    "dotdot to canary dir": forged("../../outside/dir"),
    "dotdot to neighbour file": forged("../../neighbour/world.dat"),
    "dotdot to neighbour dir": forged("../../neighbour"),
    "dotdot to own root": forged(".."),
    "dot": forged("."),
    "slash inside root": forged("../config.txt"),
    "nested name": forged("sub/inner.txt"),
    "absolute canary": absolute_canary,
    "absolute neighbour": absolute_neighbour,
    "empty name": forged(""),
    "nul in name": forged("a\x00b"),
    "agent work name": forged(".ctrlagent-mods.json"),
    "name is a number": forged(42),
    "name is a list": forged(["..", "..", "outside"]),
    "name is an object": forged({"path": "../../outside"}),
    "name is true": forged(True),
    "id is a number": lambda t, n: _manifest(_entry("a.jar", 7)),
    "id is traversal": lambda t, n: _manifest(_entry("a.jar", "../../outside")),
    "id missing": lambda t, n: _manifest({"fileName": "../../outside/secret.txt"}),
    "entry is a string": lambda t, n: _manifest("../../outside/secret.txt"),
    "mods is an object": lambda t, n: json.dumps({"mods": {"victim": "../.."}}).encode(),
    "duplicate ids": duplicate_ids,
    "duplicate file names": duplicate_names,
    "huge": huge,
    "too many entries": too_many,
    "nested beyond the parser": nested,
    "lone surrogate": surrogate,
    "not json": not_json,
    "manifest is a symlink out": manifest_links_out,
    "manifest is a fifo": manifest_is_fifo,
    "mods folder links out": mods_dir_links_out,
    "mods folder links to neighbour": mods_dir_links_to_neighbour,
    "mod file is a link out": mod_file_links_out,
    "mod file is a link to neighbour": mod_file_links_to_neighbour_dir,
    "mod file is a directory": mod_file_is_a_directory,
}


@pytest.fixture
def neighbour(tree: Tree) -> Path:
    """Another server's directory beside this one."""
    n = tree.base / "neighbour"
    (n / "world").mkdir(parents=True)
    (n / "world.dat").write_text("the neighbour's world\n")
    (n / "world" / "region.mca").write_bytes(os.urandom(1000))
    return n


def _forge(tree: Tree, neighbour: Path, case: str) -> None:
    mods = tree.root_path / "mods"
    mods.mkdir()
    (mods / "good.jar").write_text("a good mod\n")
    (mods / "config.jar").write_text("another mod\n")
    (tree.root_path / "uploads").mkdir()
    (tree.root_path / "uploads" / "new.jar").write_text("the new mod\n")
    data = CASES[case](tree, neighbour)
    if data:
        (mods / MANIFEST).write_bytes(data)


async def _act(fm: FileManager, tree: Tree, action: str) -> Any:
    if action == "install_mod":
        return to_json(await fm.install_mod(tree.root,
                                            {"modId": VICTIM, "path": "uploads/new.jar"}))
    if action == "uninstall_mod":
        return to_json(await fm.uninstall_mod(tree.root, VICTIM))
    return to_json(await fm.list_mods(tree.root))


def _protected(tree: Tree, neighbour: Path) -> dict[str, Any]:
    """Everything but the mods folder: canary, neighbour, host file, the server's own files."""
    root = tree.root_path
    own = [p for p in root.iterdir() if p.name != "mods"]
    return snapshot(tree.outside, neighbour, "/etc/passwd", *own)


@pytest.mark.parametrize("action", ["install_mod", "uninstall_mod", "list_mods"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest_twisted.ensureDeferred
async def test_a_forged_manifest_never_reaches_outside_the_mods_folder(
    tree: Tree, neighbour: Path, fm: FileManager, warnings: list[dict[str, Any]],
    case: str, action: str,
) -> None:
    _forge(tree, neighbour, case)
    mods = tree.root_path / "mods"
    world = mods / "world"
    world_before = snapshot(world) if world.exists() else None
    before = _protected(tree, neighbour)
    try:
        result = await _act(fm, tree, action)
    except CtrlAgentError:
        result = None
    assert _protected(tree, neighbour) == before
    if world_before is not None:
        assert snapshot(world) == world_before
    if result is not None and "mods" in result:
        for mod in result["mods"]:
            name = mod.get("fileName")
            assert name is None or ("/" not in name and name not in (".", "..", "")), mod
    if action != "install_mod" or result is None:
        return
    # An install replaces the forged entry: the manifest holds what we wrote.
    assert (mods / "new.jar").read_text() == "the new mod\n"
    listed = to_json(await fm.list_mods(tree.root))
    assert VICTIM in [m["id"] for m in listed["mods"]]
    assert all(m["fileName"] in ("good.jar", "config.jar", "new.jar")
               for m in listed["mods"] if "fileName" in m)
    assert not (mods / MANIFEST).is_symlink()


@pytest_twisted.ensureDeferred
async def test_ignored_entries_are_reported_in_one_warning(
    tree: Tree, neighbour: Path, fm: FileManager, warnings: list[dict[str, Any]]
) -> None:
    _forge(tree, neighbour, "duplicate ids")
    (tree.root_path / "mods" / MANIFEST).write_bytes(_manifest(
        _entry("good.jar"), _entry("../../outside/secret.txt", "b"), _entry(7, "c")))
    listed = to_json(await fm.list_mods(tree.root))
    assert [m["id"] for m in listed["mods"]] == [VICTIM]
    reports = [w for w in warnings if "mods manifest" in w.get("log_format", "")]
    assert len(reports) == 1 and reports[0]["count"] == 2


@pytest_twisted.ensureDeferred
async def test_a_valid_manifest_entry_still_installs_and_uninstalls(
    tree: Tree, neighbour: Path, fm: FileManager
) -> None:
    _forge(tree, neighbour, "duplicate ids")
    (tree.root_path / "mods" / MANIFEST).write_bytes(_manifest(_entry("good.jar")))
    # Same id, another file: the old file goes, inside the mods folder.
    await fm.install_mod(tree.root, {"modId": VICTIM, "path": "uploads/new.jar"})
    assert not (tree.root_path / "mods" / "good.jar").exists()
    left = to_json(await fm.uninstall_mod(tree.root, VICTIM))
    assert left["count"] == 0
    assert not (tree.root_path / "mods" / "new.jar").exists()
    assert (tree.root_path / "mods" / "config.jar").exists()
