"""
Tree walks on trees a hostile game server builds: thousands of levels deep,
changing during the walk, with mount points and links inside.

Every walk of the agent is ``trees.Walk``: these tests drive it directly
(fd bounds, moved directories, mount points, removal below the depth bound)
and through every file action that walks (delete, usage on a disk-limited
server, search, archive creation).
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from ctrlagent.errors import Conflict, PermissionDenied
from ctrlagent.files import trees
from ctrlagent.files.paths import Components
from ctrlagent.interfaces import ServerRoot
from ctrlagent.wire.json import to_json
from tests.files.conftest import SERVER_GID, SERVER_UID, Tree, make_manager

# Far beyond the interpreter's recursion limit (about 1,000).
DEEP = 2000
# What the delete of a game server's tree must cope with.
DEEPEST = 5000


def make_chain(top: Path, depth: int, payload: bytes = b"x" * 10) -> None:
    """``top/d/d/.../d`` ``depth`` levels deep, a file ``f`` at every level (by fd: no PATH_MAX)."""
    cur = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=cur)
            fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=cur)
            os.write(fd, payload)
            os.close(fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def remove_everything(path: Path) -> None:
    """Remove what a test left in ``path`` (pytest's own cleanup recurses)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            trees.remove_tree(fd, name)
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def deep_cleanup(tmp_path: Path) -> Iterator[None]:
    yield
    if tmp_path.exists():
        remove_everything(tmp_path)


@pytest.fixture
def top(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_a_walk_of_a_2000_deep_tree_holds_a_bounded_number_of_fds(tmp_path: Path,
                                                                   top: int) -> None:
    make_chain(tmp_path, DEEP)
    before = open_fds()
    most = 0
    files = 0
    deepest = 0
    with trees.Walk(top) as walk:
        for e in walk:
            if not e.is_dir:
                files += 1
            deepest = max(deepest, e.depth)
            if e.depth % 500 == 0:
                most = max(most, open_fds() - before)
    assert files == DEEP and deepest == DEEP - 1 and not walk.truncated
    assert most <= trees.FD_WINDOW + 1
    assert open_fds() == before


def test_usage_counts_files_at_any_depth(tmp_path: Path, top: int) -> None:
    make_chain(tmp_path, DEEP)
    assert trees.tree_usage(top) == (DEEP * 10, True)


def test_a_walk_left_early_releases_its_fds(tmp_path: Path, top: int) -> None:
    make_chain(tmp_path, 100)
    before = open_fds()
    with trees.Walk(top) as walk:
        for e in walk:
            if e.depth == 60:
                break
    assert open_fds() == before


def test_a_moved_subtree_is_found_again_by_name_from_an_open_ancestor(
    tmp_path: Path, top: int
) -> None:
    make_chain(tmp_path, 60)
    seen = 0
    moved = False
    with trees.Walk(top) as walk:
        for e in walk:
            if not e.is_dir:
                seen += 1
            if e.depth == 50 and not moved:
                # Level 31 moves to the top while the walk is beneath it: its
                # ".." is no longer level 30, whose fd the walk gave up.
                os.rename(tmp_path.joinpath(*(["d"] * 31)), tmp_path / "moved")
                moved = True
    # Everything above the move and beneath it (walked before the move) counted.
    assert moved and seen == 60


def test_a_renamed_ancestor_stops_the_walk_with_tree_changed(tmp_path: Path, top: int) -> None:
    make_chain(tmp_path, 60)
    moved = False
    with pytest.raises(trees.TreeChanged), trees.Walk(top) as walk:
        for e in walk:
            if e.depth == 50 and not moved:
                moved = True
                # Level 30 moves to the top, and level 5 (on the way to find
                # level 29 again by name) is renamed: nothing leads back.
                os.rename(tmp_path.joinpath(*(["d"] * 5)),
                          tmp_path.joinpath(*(["d"] * 4), "elsewhere"))
                os.rename(tmp_path.joinpath(*(["d"] * 4), "elsewhere", *(["d"] * 25)),
                          tmp_path / "away")


def test_remove_tree_goes_below_the_depth_bound_by_hoisting(tmp_path: Path) -> None:
    (tmp_path / "victim").mkdir()
    make_chain(tmp_path / "victim", 300)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        freed = trees.remove_tree(parent, "victim", max_depth=20)
    finally:
        os.close(parent)
    assert freed == 300 * 10
    assert os.listdir(tmp_path) == []


def test_remove_tree_removes_links_never_their_targets(tree: Tree) -> None:
    victim = tree.root_path / "victim"
    victim.mkdir()
    make_chain(victim, 50)
    deep = victim.joinpath(*(["d"] * 49))
    os.symlink(tree.outside, deep / "out")
    os.symlink(str(tree.outside / "secret.txt"), deep / "passwd")
    before = tree.outside_state()
    parent = os.open(tree.root_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        trees.remove_tree(parent, "victim")
    finally:
        os.close(parent)
    assert not victim.exists()
    assert tree.outside_state() == before


def _mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(where)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_walks_never_enter_another_filesystem(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    mnt = victim / "mnt"
    if not _mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "foreign.txt").write_text("not the server's\n")
        (victim / "own.txt").write_text("own\n")
        fd = os.open(victim, os.O_RDONLY | os.O_DIRECTORY)
        try:
            used, complete = trees.tree_usage(fd)
            assert (used, complete) == (4, False)
        finally:
            os.close(fd)
        parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(PermissionDenied):
                trees.remove_tree(parent, "victim")
        finally:
            os.close(parent)
        assert (mnt / "foreign.txt").read_text() == "not the server's\n"
        assert not (victim / "own.txt").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_remove_tree_refuses_to_loop_on_a_tree_that_keeps_changing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "victim").mkdir()
    make_chain(tmp_path / "victim", 5)

    def changing(top: int, max_depth: int) -> tuple[int, int]:
        raise trees.TreeChanged("moved")

    monkeypatch.setattr(trees, "_empty", changing)
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(Conflict):
            trees.remove_tree(parent, "victim")
    finally:
        os.close(parent)


# -- through the file actions ----------------------------------------------------

@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_every_file_action_copes_with_a_5000_deep_tree(tree: Tree) -> None:
    fm = make_manager()
    (tree.root_path / "deep").mkdir()
    make_chain(tree.root_path / "deep", DEEPEST)
    limited = ServerRoot("srv1", str(tree.root_path), 10**9, SERVER_UID, SERVER_GID)
    # The usage walk of a disk-limited server sees the whole tree.
    await fm.write_file(limited, "after.txt", "written")
    assert fm._usage[str(tree.root_path)][1] >= DEEPEST * 10
    # Search and archives stop at the listing depth bound: one file per
    # level down to it.
    found = to_json(await fm.search_files(tree.root, "deep", "f", "file"))
    assert len(found["files"]) == trees.MAX_LISTING_DEPTH + 1
    made = to_json(await fm.create_archive(tree.root, ["deep"], "deep.tar", "tar"))
    assert made["files"] == trees.MAX_LISTING_DEPTH + 1
    await fm.delete_file(tree.root, "deep")
    assert not (tree.root_path / "deep").exists()
    assert (tree.root_path / "after.txt").read_text() == "written"


@pytest.mark.parametrize("seed", range(6))
def test_a_walk_with_a_tiny_fd_window_meets_every_name_once_in_depth_first_order(
    tmp_path: Path, top: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    expected: set[Components] = set()

    def grow(path: Path, rel: Components, depth: int) -> None:
        for i in range(rng.randint(1 if depth < 4 else 0, 3 if depth < 12 else 0)):
            name = "n{}".format(i)
            expected.add(rel + (name,))
            if (i == 0 and depth < 8) or rng.random() < 0.5:
                (path / name).mkdir()
                grow(path / name, rel + (name,), depth + 1)
            else:
                (path / name).write_text("x")

    (tmp_path / "t").mkdir()
    expected.add(("t",))
    grow(tmp_path / "t", ("t",), 1)
    monkeypatch.setattr(trees, "FD_WINDOW", 3)
    before = open_fds()
    events: list[tuple[bool, Components]] = []
    with trees.Walk(top, post_order=True, sort=True) as walk:
        for e in walk:
            events.append((e.leaving, e.rel))
            assert open_fds() - before <= 3 + 1
    met = [rel for leaving, rel in events if not leaving]
    assert sorted(met) == sorted(expected) and len(met) == len(expected)
    assert met == sorted(met)  # sorted names, depth first: lexicographic order
    # Every directory is left once, after everything beneath it was met.
    dirs = {r for r in expected if (tmp_path.joinpath(*r)).is_dir()}
    left = {rel: i for i, (leaving, rel) in enumerate(events) if leaving}
    assert set(left) == dirs and len(left) == len([1 for leaving, _ in events if leaving])
    for i, (leaving, rel) in enumerate(events):
        if not leaving:
            for n in range(1, len(rel)):
                assert i < left[rel[:n]]
