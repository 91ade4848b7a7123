"""
A real btrfs filesystem for the disk-limit tests: a 512 MiB image file,
formatted with ``mkfs.btrfs``, attached to a loop device and mounted under
the session's temporary directory; unmounted and detached at the end of the
session, whatever happened (every step bounded by a timeout).

The tests skip only when btrfs cannot be mounted here (not root, no
btrfs-progs, no loop device); under ``CI=true`` that is a failure instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrlagent.files import btrfs
from tests.conftest import _ci

IMAGE_BYTES = 512 * 1024 * 1024
STEP_TIMEOUT = 60


def _run(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, timeout=STEP_TIMEOUT, check=False,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError("{}: {}".format(" ".join(args[:2]),
                                           done.stderr.decode(errors="replace").strip()))
    return done.stdout.decode(errors="replace").strip()


def _unavailable(why: str) -> None:
    if _ci():
        pytest.fail("btrfs tests cannot run in CI: {}".format(why))
    pytest.skip("no btrfs here: {}".format(why))


@pytest.fixture(scope="session")
def btrfs_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The mount point of a fresh btrfs filesystem (quotas not yet enabled)."""
    if os.geteuid() != 0:
        _unavailable("not root")
    for tool in ("mkfs.btrfs", "btrfs", "losetup"):
        if shutil.which(tool) is None:
            _unavailable("{} is not installed (apt-get install btrfs-progs)".format(tool))
    base = tmp_path_factory.mktemp("btrfs")
    image = base / "image"
    mnt = base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    device = None
    mounted = False
    try:
        try:
            _run("mkfs.btrfs", "-q", "-f", str(image))
            device = _run("losetup", "--find", "--show", str(image))
            _run("mount", "-t", "btrfs", device, str(mnt))
            mounted = True
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            _unavailable(str(e))
        yield mnt
    finally:
        if mounted:
            try:
                _run("umount", str(mnt))
            except (RuntimeError, subprocess.TimeoutExpired):
                # Busy (a test left a process in it): detach it lazily.
                subprocess.run(["umount", "-l", str(mnt)], timeout=STEP_TIMEOUT, check=False)
        if device is not None:
            subprocess.run(["losetup", "-d", device], timeout=STEP_TIMEOUT, check=False,
                           capture_output=True)
        image.unlink(missing_ok=True)


@pytest.fixture
def data_root(btrfs_mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh data root on the btrfs filesystem, emptied afterwards."""
    root = btrfs_mount / request.node.name[:60]
    root.mkdir()
    yield root
    for entry in list(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and os.stat(entry).st_ino == 256:
            try:
                btrfs.delete_subvolume(str(entry))  # and those nested in it
            except btrfs.BtrfsError:
                pass
    shutil.rmtree(root, ignore_errors=True)
