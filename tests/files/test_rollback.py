"""
A failed extraction undoes its own changes and nothing else.

The extraction is interleaved deterministically with ``write_file`` calls
(through the real ``FileManager``, from the extraction's ``on_member`` hook
between two members): on a path the extraction created, on one it replaced,
and a new file inside a directory it created.  A later member makes the
extraction fail; its rollback must leave every one of those writes as
written, byte for byte, and still undo what only the extraction touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from ctrlagent.errors import PermissionDenied
from ctrlagent.files import archives, fsops
from ctrlagent.files.confined import Confined
from ctrlagent.files.manager import FileManager
from ctrlagent.files.paths import Components
from tests.files.conftest import SERVER_GID, SERVER_UID, Tree
from tests.files.test_security import _file, _tar

LIMITS = archives.ExtractLimits(max_bytes=10**8, max_ratio=1000.0, max_entries=1000)


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".ctrlagent-")]


async def _extract_interleaved(tree: Tree, fm: FileManager, members: list[Any],
                               after: Components, writes: dict[str, str]) -> list[Components]:
    """Extract ``members`` from a tar, running ``writes`` once ``after`` is written."""
    (tree.root_path / "update.tar").write_bytes(_tar(members))
    seen: list[Components] = []

    def interleave(rel: Components) -> None:
        seen.append(rel)
        if rel == after:
            for path, content in writes.items():
                # The real action, on the reactor, while this extraction waits.
                threads.blockingCallFromThread(reactor, fm.write_file, tree.root, path, content)

    def extract() -> Any:
        with Confined(str(tree.root_path), SERVER_UID, SERVER_GID, fm.use_openat2) as c:
            return archives.extract(c, ("update.tar",), (), fsops.Quota(None), LIMITS,
                                    on_member=interleave)

    with pytest.raises(PermissionDenied):
        await threads.deferToThread(extract)
    return seen


@pytest_twisted.ensureDeferred
async def test_a_failed_extraction_never_undoes_writes_made_during_it(
    tree: Tree, fm: FileManager
) -> None:
    root = tree.root_path
    inner_inode = (root / "sub" / "inner.txt").stat().st_ino
    outside = tree.outside_state()
    writes = {
        "fresh.txt": "the user's fresh.txt\n",       # a path the extraction created
        "config.txt": "the user's config\n",          # a path the extraction replaced
        "made/user.txt": "the user's file in made\n",  # in a directory it created
    }
    seen = await _extract_interleaved(tree, fm, [
        (_file("made/ours.txt"), b"extracted into made\n"),
        (_file("config.txt"), b"config from the archive\n"),
        (_file("sub/inner.txt"), b"inner from the archive\n"),
        (_file("fresh.txt"), b"fresh from the archive\n"),
        (_file("../evil.txt"), b"the failure"),
    ], after=("fresh.txt",), writes=writes)
    assert seen[-1] == ("fresh.txt",)
    for path, content in writes.items():
        assert (root / path).read_text() == content, path
    # What only the extraction touched is undone: its file in the directory
    # it made (the directory stays: it holds the user's file now), and the
    # file it replaced that nobody wrote since, the very same inode back.
    assert not (root / "made" / "ours.txt").exists()
    assert (root / "sub" / "inner.txt").read_text() == "inner\n"
    assert (root / "sub" / "inner.txt").stat().st_ino == inner_inode
    assert _leftovers(root) == []
    assert tree.outside_state() == outside


@pytest_twisted.ensureDeferred
async def test_a_failed_extraction_keeps_a_directory_it_created_once_others_wrote_into_it(
    tree: Tree, fm: FileManager
) -> None:
    root = tree.root_path
    await _extract_interleaved(tree, fm, [
        (_file("a/b/c/ours.txt"), b"ours\n"),
        (_file("later/x.txt"), b"x\n"),
        (_file("../evil.txt"), b"the failure"),
    ], after=("a", "b", "c", "ours.txt"), writes={"a/b/theirs.txt": "theirs\n"})
    assert (root / "a" / "b" / "theirs.txt").read_text() == "theirs\n"
    # The directories the extraction made and nobody used are gone again.
    assert sorted(os.listdir(root / "a" / "b")) == ["theirs.txt"]
    assert not (root / "later").exists()
    assert _leftovers(root) == []


@pytest_twisted.ensureDeferred
async def test_a_failed_extraction_still_undoes_everything_when_nobody_else_wrote(
    tree: Tree, fm: FileManager
) -> None:
    before = tree.rolled_back_state()
    await _extract_interleaved(tree, fm, [
        (_file("made/ours.txt"), b"extracted\n"),
        (_file("config.txt"), b"replaced\n"),
        (_file("config.txt"), b"replaced twice\n"),
        (_file("../evil.txt"), b"the failure"),
    ], after=("nothing",), writes={})
    (tree.root_path / "update.tar").unlink()
    assert tree.rolled_back_state() == before
