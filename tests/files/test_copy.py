"""
``copy_file``, ``move_file`` and ``get_file_permissions`` against a real tree
with a canary outside it, for both resolvers; and ``read_file`` refusing a
binary file instead of answering it as corrupted text.

A copy is all or nothing: every refused or failed copy below leaves the tree
exactly as it was (``rolled_back_state``), and nothing outside ever changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.errors import (
    Conflict,
    InsufficientResources,
    InvalidInput,
    NotText,
    PermissionDenied,
)
from ctrlagent.files import fsops
from ctrlagent.files.manager import FileManager
from ctrlagent.files.paths import TMP_PREFIX
from ctrlagent.wire.json import to_json
from tests.files.conftest import SERVER_GID, SERVER_UID, Tree, make_manager


def _names(root: Path) -> list[str]:
    """Every path beneath ``root``, agent work files included, never following links."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


@pytest_twisted.ensureDeferred
async def test_a_file_is_copied_with_its_bytes_and_mode(tree: Tree, fm: FileManager) -> None:
    blob = bytes(range(256)) * 12
    (tree.root_path / "world.bin").write_bytes(blob)
    os.chmod(tree.root_path / "world.bin", 0o640)
    answer = to_json(await fm.copy_file(tree.root, "/world.bin", "/backup/world.bin"))
    assert answer == {"sourcePath": "/world.bin", "destinationPath": "/backup/world.bin",
                      "files": 1, "directories": 0, "symlinks": 0, "size": len(blob)}
    copy = tree.root_path / "backup" / "world.bin"
    assert copy.read_bytes() == blob
    st = os.stat(copy)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, SERVER_UID, SERVER_GID)
    assert (tree.root_path / "world.bin").read_bytes() == blob


@pytest_twisted.ensureDeferred
async def test_an_existing_destination_is_a_conflict_and_nothing_changes(
        tree: Tree, fm: FileManager) -> None:
    (tree.root_path / "copy").mkdir()
    (tree.root_path / "copy" / "keep.txt").write_text("mine\n")
    before = tree.all_state()
    for src, dst in (("/config.txt", "/sub/inner.txt"), ("/sub", "/copy")):
        with pytest.raises(Conflict):
            await fm.copy_file(tree.root, src, dst)
    assert tree.all_state() == before


@pytest_twisted.ensureDeferred
async def test_a_tree_is_copied_with_its_links_as_links_never_followed(
        tree: Tree, fm: FileManager) -> None:
    sub = tree.root_path / "sub"
    (sub / "deeper" / "deepest").mkdir(parents=True)
    (sub / "deeper" / "deepest" / "level.dat").write_bytes(b"\x00\x01level")
    os.chmod(sub / "deeper", 0o750)
    # Links a hostile game planted inside the tree: out of the root (absolute
    # and relative), to a directory outside, and an honest one inside.
    os.symlink(str(tree.outside / "secret.txt"), sub / "abs_out")
    os.symlink("../../outside/secret.txt", sub / "rel_out")
    os.symlink(str(tree.outside), sub / "dir_out")
    os.symlink("inner.txt", sub / "inner_link")
    outside = tree.outside_state()
    answer = to_json(await fm.copy_file(tree.root, "sub", "sub-copy"))
    assert (answer["files"], answer["directories"], answer["symlinks"]) == (2, 3, 4)
    copy = tree.root_path / "sub-copy"
    for name in ("abs_out", "rel_out", "dir_out", "inner_link"):
        assert os.path.islink(copy / name)
        assert os.readlink(copy / name) == os.readlink(sub / name)
    assert (copy / "inner.txt").read_text() == "inner\n"
    assert (copy / "deeper" / "deepest" / "level.dat").read_bytes() == b"\x00\x01level"
    assert os.stat(copy / "deeper").st_mode & 0o777 == 0o750
    # Nothing of the outside was read into the copy, nothing outside changed.
    assert answer["size"] == len("inner\n") + len(b"\x00\x01level")
    assert tree.outside_state() == outside
    assert not [n for n in _names(tree.root_path) if TMP_PREFIX in n]


@pytest_twisted.ensureDeferred
async def test_a_link_escaping_the_root_is_copied_as_the_link(
        tree: Tree, fm: FileManager) -> None:
    outside = tree.outside_state()
    for src in ("link_out_dir", "link_rel_secret", "link_passwd"):
        await fm.copy_file(tree.root, src, "copies/" + src)
        assert os.readlink(tree.root_path / "copies" / src) == os.readlink(tree.root_path / src)
    assert tree.outside_state() == outside


@pytest_twisted.ensureDeferred
async def test_a_directory_is_never_copied_into_itself(tree: Tree, fm: FileManager) -> None:
    # By name, and through a link to the directory itself or to its parent
    # (link_in_dir -> sub): the names say nothing, the identities do.
    os.symlink("..", tree.root_path / "sub" / "up")
    before = tree.rolled_back_state()
    for dst in ("sub/copy", "sub", "link_in_dir/copy", "link_in_dir/new/dirs/copy",
                "sub/up/sub/copy"):
        with pytest.raises(InvalidInput) as refused:
            await fm.copy_file(tree.root, "sub", dst)
        assert refused.value.details["field"] == "destinationPath", dst
        assert tree.rolled_back_state() == before, dst


@pytest_twisted.ensureDeferred
async def test_a_deep_tree_is_copied_and_one_too_deep_is_refused_whole(
        tree: Tree, fm: FileManager) -> None:
    def build(top: Path, depth: int) -> None:
        p = top
        for i in range(depth):
            p = p / "d{}".format(i)
        p.mkdir(parents=True)
        (p / "bottom.txt").write_text("deep\n")

    build(tree.root_path / "ok", fsops.MAX_DEPTH - 1)
    answer = to_json(await fm.copy_file(tree.root, "ok", "ok-copy"))
    assert answer["directories"] == fsops.MAX_DEPTH and answer["files"] == 1
    bottom = Path(tree.root_path / "ok-copy", *["d{}".format(i)
                                                for i in range(fsops.MAX_DEPTH - 1)])
    assert (bottom / "bottom.txt").read_text() == "deep\n"

    build(tree.root_path / "deep", fsops.MAX_DEPTH + 5)
    before = tree.rolled_back_state()
    with pytest.raises(InsufficientResources, match="levels deep"):
        await fm.copy_file(tree.root, "deep", "deep-copy")
    assert tree.rolled_back_state() == before


@pytest_twisted.ensureDeferred
async def test_a_copy_beyond_the_disk_limit_is_refused_before_writing(
        tree: Tree, resolver: bool) -> None:
    (tree.root_path / "big").mkdir()
    for i in range(4):
        (tree.root_path / "big" / "part{}".format(i)).write_bytes(b"x" * 4000)
    fm = make_manager(use_openat2=resolver)
    # In use: the 16,000 bytes of big/, config.txt and sub/inner.txt; room for 4,000 more.
    root = replace(tree.root, disk_limit_bytes=16_000 + 6 + 6 + 4000)
    before = tree.rolled_back_state()
    with pytest.raises(InsufficientResources, match="disk limit"):
        await fm.copy_file(root, "big", "big-copy")
    assert tree.rolled_back_state() == before
    # One part fits.
    await fm.copy_file(root, "big/part0", "part0-copy")
    assert (tree.root_path / "part0-copy").stat().st_size == 4000


@pytest_twisted.ensureDeferred
async def test_a_source_that_grows_after_it_was_measured_is_stopped_at_the_limit(
        tree: Tree, resolver: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    (tree.root_path / "big").mkdir()
    for i in range(4):
        (tree.root_path / "big" / "part{}".format(i)).write_bytes(b"x" * 4000)
    # The measure says the tree is empty (it grew right after): the bytes
    # charged while copying still stop it, and the partial copy goes.
    monkeypatch.setattr(fsops.trees, "tree_usage", lambda fd, **kw: (0, True))
    fm = make_manager(use_openat2=resolver)
    root = replace(tree.root, disk_limit_bytes=10_000)
    monkeypatch.setattr(fm, "_room", lambda c, r: 9_000)
    before = tree.rolled_back_state()
    with pytest.raises(InsufficientResources, match="disk limit"):
        await fm.copy_file(root, "big", "big-copy")
    assert tree.rolled_back_state() == before


@pytest_twisted.ensureDeferred
async def test_a_file_swapped_for_a_link_mid_copy_is_copied_as_the_link(
        tree: Tree, fm: FileManager, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tree.root_path / "sub"
    (sub / "victim.txt").write_text("harmless\n")
    real = fsops._copy_file

    def swap_then_copy(c: Any, quota: Any, count: Any, src_dir: int, src_name: str,
                       *rest: Any) -> None:
        if src_name == "victim.txt":
            # The game swaps the file for a link to a secret outside, after
            # the walk listed it and before the copy opens it.
            os.unlink(sub / "victim.txt")
            os.symlink(str(tree.outside / "secret.txt"), sub / "victim.txt")
        real(c, quota, count, src_dir, src_name, *rest)

    monkeypatch.setattr(fsops, "_copy_file", swap_then_copy)
    outside = tree.outside_state()
    answer = to_json(await fm.copy_file(tree.root, "sub", "sub-copy"))
    victim = tree.root_path / "sub-copy" / "victim.txt"
    assert os.path.islink(victim)
    assert os.readlink(victim) == str(tree.outside / "secret.txt")
    assert answer["symlinks"] == 1 and answer["size"] == len("inner\n")
    for path in _names(tree.root_path / "sub-copy"):
        full = tree.root_path / "sub-copy" / path
        if full.is_file() and not full.is_symlink():
            assert b"top secret" not in full.read_bytes()
    assert tree.outside_state() == outside


@pytest_twisted.ensureDeferred
async def test_move_file_moves_across_directories_and_never_into_itself(
        tree: Tree, fm: FileManager) -> None:
    answer = to_json(await fm.move_file(tree.root, "/config.txt", "/cfg/new/config.txt"))
    assert answer == {"sourcePath": "/config.txt", "destinationPath": "/cfg/new/config.txt"}
    assert (tree.root_path / "cfg" / "new" / "config.txt").read_text() == "hello\n"
    assert not (tree.root_path / "config.txt").exists()
    before = tree.rolled_back_state()
    for dst in ("sub/inside", "link_in_dir/inside"):
        with pytest.raises(InvalidInput) as refused:
            await fm.move_file(tree.root, "sub", dst)
        assert refused.value.details["field"] == "destinationPath"
    with pytest.raises(Conflict):
        await fm.move_file(tree.root, "sub", "cfg")
    assert tree.rolled_back_state() == before
    # A link moves as the link.
    await fm.move_file(tree.root, "link_out_dir", "sub/link_out_dir")
    assert os.readlink(tree.root_path / "sub" / "link_out_dir") == str(tree.outside)


@pytest_twisted.ensureDeferred
async def test_get_file_permissions_answers_mode_and_owner_names_or_ids(
        tree: Tree, fm: FileManager) -> None:
    path = tree.root_path / "config.txt"
    os.chmod(path, 0o640)
    os.chown(path, 0, 0)
    assert to_json(await fm.get_file_permissions(tree.root, "/config.txt")) == {
        "path": "/config.txt", "permissions": "640", "mode": "0640",
        "owner": "root", "group": "root"}
    os.chown(path, 54321, 54322)  # no such user or group on this host
    data = to_json(await fm.get_file_permissions(tree.root, "config.txt"))
    assert (data["owner"], data["group"]) == ("54321", "54322")
    os.chmod(tree.root_path / "sub", 0o1750)
    data = to_json(await fm.get_file_permissions(tree.root, "sub"))
    assert (data["permissions"], data["mode"]) == ("750", "1750")


@pytest_twisted.ensureDeferred
async def test_a_binary_file_is_refused_as_text_never_answered_corrupted(
        tree: Tree, fm: FileManager) -> None:
    # The Panel's batch copy read a 3000-byte binary as text and wrote the
    # U+FFFD-laden answer back: 5343 bytes, "success".
    blob = bytes((i * 7 + 128) % 256 for i in range(3000))
    (tree.root_path / "map.bin").write_bytes(blob)
    with pytest.raises(NotText) as refused:
        await fm.read_file(tree.root, "/map.bin")
    assert refused.value.code == "NOT_TEXT"
    assert "download_file" in refused.value.message and "/map.bin" in refused.value.message
    assert (tree.root_path / "map.bin").read_bytes() == blob
    lossy = to_json(await fm.read_file(tree.root, "/map.bin", lossy=True))
    assert lossy["lossy"] is True and "\ufffd" in lossy["content"] and lossy["size"] == 3000
    # Valid UTF-8 of any script is text.
    (tree.root_path / "motd.txt").write_text("héllo ✓ 世界\n", encoding="utf-8")
    text = to_json(await fm.read_file(tree.root, "/motd.txt"))
    assert text["content"] == "héllo ✓ 世界\n" and "lossy" not in text


@pytest_twisted.ensureDeferred
async def test_a_destination_through_a_link_out_of_the_root_is_refused(
        tree: Tree, fm: FileManager) -> None:
    before = tree.all_state()
    for dst in ("link_out_dir/copied", "link_rel_out/copied", "link_out_dir/a/b/copied"):
        with pytest.raises(PermissionDenied):
            await fm.copy_file(tree.root, "sub", dst)
        with pytest.raises(PermissionDenied):
            await fm.move_file(tree.root, "config.txt", dst)
    assert tree.all_state() == before


def test_the_tree_of_a_copy_the_agent_died_in_is_swept_by_the_usage_walk(tree: Tree) -> None:
    left = tree.root_path / (TMP_PREFIX + "copy-0123456789abcdef")
    (left / "a" / "b").mkdir(parents=True)
    (left / "a" / "b" / "part").write_bytes(b"x" * 1000)
    old = time.time() - fsops.STALE_TMP_SECONDS - 60
    os.utime(left, (old, old))
    fresh = tree.root_path / (TMP_PREFIX + "copy-fedcba9876543210")
    fresh.mkdir()
    (fresh / "part").write_bytes(b"y" * 10)
    from ctrlagent.files.confined import Confined

    with Confined(str(tree.root_path)) as c:
        used = fsops.disk_usage(c)
    assert not left.exists() and fresh.exists()  # a copy in progress stays
    assert used == 6 + 6 + 10
