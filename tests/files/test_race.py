"""
Check-then-use races: a thread swaps a directory (and a file) with a symlink
out of the root, atomically and in a loop, while every action runs against
paths through it.  Whatever interleaving happens, each action acts inside the
root or is refused, and nothing outside changes.
"""

from __future__ import annotations

import ctypes
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import DeferredList

from ctrlagent.errors import CtrlAgentError
from ctrlagent.files.manager import FileManager
from tests.files.conftest import Tree

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
MAX_SWAPS = 2000
ROUNDS = 60


def _exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Swapper(threading.Thread):
    """Exchanges ``a`` and ``b`` until stopped, at most ``MAX_SWAPS`` times."""

    def __init__(self, pairs: list[tuple[Path, Path]]) -> None:
        super().__init__(daemon=True)
        self.pairs = pairs
        self.stop = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stop.is_set() and self.swaps < MAX_SWAPS:
            for a, b in self.pairs:
                _exchange(a, b)
            self.swaps += 1


@pytest_twisted.ensureDeferred
async def test_symlink_swapped_between_check_and_use_never_escapes(
    tree: Tree, fm: FileManager
) -> None:
    root = tree.root_path
    # "swap" flips between a real directory and a link to the canary tree;
    # "swapfile" between a real file and a link to a canary file.
    (root / "swap" / "dir").mkdir(parents=True)
    (root / "swap" / "secret.txt").write_text("inside\n")
    (root / "swap" / "dir" / "x.txt").write_text("inside\n")
    os.symlink(str(tree.outside), root / "swaplink")
    (root / "swapfile").write_text("inside\n")
    os.symlink("../outside/secret.txt", root / "swapfilelink")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("secret.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"pwned"))
    (root / "a.tar").write_bytes(buf.getvalue())

    before = tree.outside_state()
    swapper = Swapper([(root / "swap", root / "swaplink"),
                       (root / "swapfile", root / "swapfilelink")])
    unexpected: list[BaseException] = []
    refused = succeeded = 0
    swapper.start()
    try:
        r = tree.root
        for i in range(ROUNDS):
            ops = [
                fm.write_file(r, "swap/secret.txt", "pwned"),
                fm.write_file(r, "swapfile", "pwned"),
                fm.read_file(r, "swap/secret.txt"),
                fm.read_file(r, "swapfile"),
                fm.set_file_permissions(r, "swap/secret.txt", "777"),
                fm.set_file_permissions(r, "swapfile", "777"),
                fm.set_file_permissions(r, "swap", "777"),
                fm.list_files(r, "swap"),
                fm.get_file_info(r, "swap/secret.txt"),
                fm.create_directory(r, "swap/new{}".format(i)),
                fm.upload_file(r, "swap/up{}.bin".format(i), "cHduZWQ="),
                fm.delete_file(r, "swap/dir/x.txt"),
                fm.rename_file(r, "swap/secret.txt", "stolen{}.txt".format(i)),
                fm.rename_file(r, "config.txt", "swap/moved{}.txt".format(i)),
                fm.extract_archive(r, "a.tar", "swap"),
                fm.create_archive(r, ["swap/dir"], "swap/arch.tar", "tar"),
                fm.download_file(r, "swapfile"),
            ]
            results = await DeferredList(ops, consumeErrors=True)
            for ok, value in results:
                if ok:
                    succeeded += 1
                elif value.check(CtrlAgentError):
                    refused += 1
                else:
                    unexpected.append(value.value)
            # Keep the inside file around so that moves keep trying.
            if not (root / "config.txt").exists():
                (root / "config.txt").write_text("hello\n")
    finally:
        swapper.stop.set()
        swapper.join()
    assert not unexpected, unexpected[:3]
    assert swapper.swaps > 10
    assert refused > 0 and succeeded > 0
    assert tree.outside_state() == before
