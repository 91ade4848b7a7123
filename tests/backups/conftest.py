"""
Fixtures of the backup tests: a server directory inside a data directory
(so a restore can stage beside it), a canary tree outside both, and a
snapshot of a whole tree that round trips compare.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def tree(top: str | Path, *, mtimes: bool = False) -> dict[str, Any]:
    """
    Everything a restore must bring back beneath ``top`` (never following
    links): path -> (kind, permission bits, sha256 of content or link target).
    """
    top = str(top)
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, top)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), digest,
                            int(st.st_mtime) if mtimes else None)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
        # os.walk lists symlinks to directories in dirnames: never descend them.
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return out


@dataclass
class Layout:
    """A data directory holding one server directory, and a canary outside."""

    data_dir: Path
    root: Path
    outside: Path
    archives: Path


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    data_dir = tmp_path / "servers"
    root = data_dir / "srv1"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    archives = tmp_path / "archives"
    return Layout(data_dir, root, outside, archives)


def populate(root: Path) -> None:
    """A small game-server tree of every kind a backup must keep."""
    (root / "world" / "region").mkdir(parents=True)
    (root / "world" / "region" / "r.0.0.mca").write_bytes(os.urandom(200_000))
    (root / "world" / "level.dat").write_bytes(b"\x00level" * 1000)
    (root / "server.properties").write_text("motd=hello\n")
    (root / "start.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "start.sh", 0o755)
    (root / "private.key").write_text("k")
    os.chmod(root / "private.key", 0o600)
    (root / "empty").mkdir()
    os.chmod(root / "empty", 0o750)
    (root / "logs").mkdir()
    (root / "logs" / "latest.log").write_text("log line\n" * 100)
    os.symlink("world/level.dat", root / "level-link")
    os.symlink("../server.properties", root / "world" / "props")
    os.symlink("region", root / "world" / "region-dir-link")
    (root / "zero").write_bytes(b"")


def in_ci() -> bool:
    """True under ``CI=true``: there, a missing tool fails the backup tests instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(present: bool, what: str) -> None:
    """Skip the test without ``what`` on a developer's machine; fail it in CI."""
    if present:
        return
    if in_ci():
        pytest.fail("{} is missing, and CI=true needs every such test to run".format(what))
    pytest.skip("{} is not installed".format(what))
