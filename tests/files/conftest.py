"""
Fixtures for the file manager tests: a real server directory beside a canary
tree outside it, and snapshots that prove nothing outside changed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ctrlagent.config import FilesConfig
from ctrlagent.files.confined import OPENAT2_AVAILABLE
from ctrlagent.files.manager import FileManager
from ctrlagent.interfaces import ServerRoot

SERVER_UID = 1000
SERVER_GID = 1000


def snapshot(*paths: str | Path, dir_mtimes: bool = True) -> dict[str, Any]:
    """
    Everything observable about ``paths`` (recursively, never following
    links): type, mode, owner, size, mtime, content hash, link target.
    ``dir_mtimes=False`` leaves out directories' mtimes, which a rolled-back
    operation cannot restore (it created and removed entries).
    """
    out: dict[str, Any] = {}

    def one(p: str) -> None:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[p] = None
            return
        rec: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                               "mtime": st.st_mtime_ns}
        if stat.S_ISLNK(st.st_mode):
            rec["link"] = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            rec["size"] = st.st_size
            with open(p, "rb") as f:
                rec["sha"] = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISDIR(st.st_mode):
            if not dir_mtimes:
                del rec["mtime"]
            names = sorted(os.listdir(p))
            rec["names"] = names
            for n in names:
                one(os.path.join(p, n))
        out[p] = rec

    for p in paths:
        one(str(p))
    return out


@dataclass
class Tree:
    """A server root and the canary tree beside it."""

    base: Path
    root_path: Path
    outside: Path
    root: ServerRoot

    def outside_state(self) -> dict[str, Any]:
        return snapshot(self.outside, "/etc/passwd")

    def all_state(self) -> dict[str, Any]:
        return snapshot(self.outside, "/etc/passwd", self.root_path)

    def rolled_back_state(self) -> dict[str, Any]:
        """Outside exactly; inside everything but directory mtimes."""
        return {**snapshot(self.outside, "/etc/passwd"),
                **snapshot(self.root_path, dir_mtimes=False)}


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    base = tmp_path
    root = base / "root"
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("top secret\n")
    (outside / "dir" / "x.txt").write_text("x\n")
    os.chmod(outside / "secret.txt", 0o600)
    (root / "sub").mkdir(parents=True)
    (root / "config.txt").write_text("hello\n")
    (root / "sub" / "inner.txt").write_text("inner\n")
    # An absolute link out of the root.  Its target is a canary with the
    # shape of /etc/passwd, never the host's own file: a regression in the
    # confinement must fail a test, not damage the machine running it.
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.symlink(str(outside / "passwd"), root / "link_passwd")
    os.symlink(str(outside), root / "link_out_dir")
    os.symlink("../outside", root / "link_rel_out")
    os.symlink("../outside/secret.txt", root / "link_rel_secret")
    os.symlink("config.txt", root / "link_in")
    os.symlink("sub", root / "link_in_dir")
    os.symlink("sub/../config.txt", root / "link_in_dotdot")
    passwd = Path("/etc/passwd")
    before = (passwd.read_bytes(), os.stat(passwd).st_mode)
    yield Tree(base, root, outside,
               ServerRoot("srv1", str(root), None, SERVER_UID, SERVER_GID))
    # Belt and braces: had a bug touched the host's /etc/passwd, put it back
    # (the test itself fails on its snapshot comparison).
    if (passwd.read_bytes(), os.stat(passwd).st_mode) != before:
        passwd.write_bytes(before[0])
        os.chmod(passwd, before[1])


RESOLVERS = ["walk"] + (["openat2"] if OPENAT2_AVAILABLE else [])


@pytest.fixture(params=RESOLVERS)
def resolver(request: pytest.FixtureRequest) -> bool:
    """Each security test runs with the manual walk and with openat2."""
    return bool(request.param == "openat2")


def make_manager(use_openat2: bool | None = None, fetcher: Any = None,
                 **config: Any) -> FileManager:
    from twisted.internet import reactor

    return FileManager(reactor, FilesConfig(**config), fetcher=fetcher, use_openat2=use_openat2)


@pytest.fixture
def fm(resolver: bool) -> FileManager:
    return make_manager(use_openat2=resolver)
