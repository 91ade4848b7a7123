"""
Every way out of a server directory over SFTP, tried with a real client
against a real tree with a canary directory beside it: links (absolute,
relative, to files and to directories) placed by the game server, links made
over SFTP, ``..``, absolute host paths, renames out, and a link swapped in
while writes run.  Nothing outside is read, written, listed, changed or
revealed.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import pytest_twisted

from tests.sftp.clients import connect
from tests.sftp.conftest import PASSWORD


def _snapshot(path):
    """Everything about a directory tree that an escape could change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_uid, st.st_mtime_ns, content)
    return out


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def use_openat2(request):
    """Every escape against both resolvers of ``Confined``."""
    from ctrlagent.files.confined import OPENAT2_AVAILABLE

    if request.param and not OPENAT2_AVAILABLE:
        pytest.skip("openat2 is not available here")
    return request.param


@pytest.fixture
def hostile_tree(rig):
    """Links a hostile game server could have made inside its directory."""
    root = rig.root()
    canary = rig.outside / "canary.txt"
    (root / "sub").mkdir()
    (root / "f.txt").write_text("mine")
    os.symlink(str(canary), root / "abs-link")  # absolute, to the canary
    os.symlink("../outside/canary.txt", root / "rel-link")  # climbs out
    os.symlink("../../outside/canary.txt", root / "sub" / "deep-link")
    os.symlink(str(rig.outside), root / "out")  # a directory outside
    os.symlink("..", root / "up")  # the parent of the root
    os.symlink("/etc", root / "etc")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    return root


def _run(rig, fn):
    def run():
        t, s = connect(rig.port, "srv1", PASSWORD)
        try:
            return fn(s)
        finally:
            t.close()

    return rig.in_thread(run)


ESCAPES = [
    ("read abs link", lambda s: s.open("/abs-link").read()),
    ("read rel link", lambda s: s.open("/rel-link").read()),
    ("read deep link", lambda s: s.open("/sub/deep-link").read()),
    ("read through dir link", lambda s: s.open("/out/canary.txt").read()),
    ("read through ..-link", lambda s: s.open("/up/outside/canary.txt").read()),
    ("read /etc via link", lambda s: s.open("/etc/hostname").read()),
    ("read a link loop", lambda s: s.open("/loop1").read()),
    ("stat abs link", lambda s: s.stat("/abs-link")),
    ("stat through dir link", lambda s: s.stat("/out/canary.txt")),
    ("list dir link", lambda s: s.listdir("/out")),
    ("list ..-link", lambda s: s.listdir("/up")),
    ("list /etc link", lambda s: s.listdir("/etc")),
    ("write through abs link", lambda s: s.open("/abs-link", "w").write(b"pwned")),
    ("append through rel link", lambda s: s.open("/rel-link", "a").write(b"pwned")),
    ("create in dir link", lambda s: s.open("/out/new.txt", "w").write(b"pwned")),
    ("overwrite through dir link", lambda s: s.open("/out/canary.txt", "w").write(b"x")),
    ("mkdir in dir link", lambda s: s.mkdir("/out/newdir")),
    ("remove through dir link", lambda s: s.remove("/out/canary.txt")),
    ("rmdir outside", lambda s: s.rmdir("/up/outside")),
    ("chmod through link", lambda s: s.chmod("/abs-link", 0o777)),
    ("chmod through dir link", lambda s: s.chmod("/out/canary.txt", 0o777)),
    ("utime through link", lambda s: s.utime("/rel-link", (1, 1))),
    ("truncate through link", lambda s: s.truncate("/abs-link", 0)),
    ("rename into dir link", lambda s: s.rename("/f.txt", "/out/f.txt")),
    ("rename out of dir link", lambda s: s.rename("/out/canary.txt", "/stolen.txt")),
    ("posix-rename over link target", lambda s: s.posix_rename("/f.txt", "/out/canary.txt")),
    ("symlink climbing out", lambda s: s.symlink("../outside/canary.txt", "/made-link")),
    ("symlink climbing out of a subdir", lambda s: s.symlink("../../x", "/sub/made-link")),
    ("symlink inside dir link", lambda s: s.symlink("canary.txt", "/out/l2")),
    ("readlink through dir link", lambda s: s.readlink("/out/anything")),
]


@pytest_twisted.ensureDeferred
async def test_every_escape_is_refused_and_nothing_outside_changes(rig, hostile_tree):
    await rig.set_login()
    before = _snapshot(rig.outside)
    inside_before = _snapshot(rig.root())

    def work(s):
        leaked = []
        for name, op in ESCAPES:
            try:
                result = op(s)
            except PermissionError:
                continue  # refused for the right reason ("leads outside", link loops)
            except OSError as e:
                result = e
            leaked.append((name, result))
        return leaked

    leaked = await _run(rig, work)
    assert leaked == []
    assert _snapshot(rig.outside) == before
    assert _snapshot(rig.root()) == inside_before


@pytest_twisted.ensureDeferred
async def test_dot_dot_and_absolute_host_paths_stay_inside(rig, hostile_tree):
    """``..`` at the top stays at the top; a host path is a path inside the root."""
    await rig.set_login()
    before = _snapshot(rig.outside)
    host_path = str(rig.outside / "canary.txt")

    def work(s):
        seen = {
            "..": sorted(s.listdir("..")),
            "/../..": sorted(s.listdir("/../..")),
            "normalize": s.normalize("../../.."),
            "cwd": s.normalize("."),
        }
        for path in ("../outside/canary.txt", "/../outside/canary.txt",
                     "sub/../../outside/canary.txt", host_path):
            with pytest.raises(FileNotFoundError):
                s.open(path).read()
        # Writes with .. land inside the root (or nowhere), never beside it.
        with pytest.raises(FileNotFoundError):
            s.open("../outside/new.txt", "w").write(b"x")
        s.open("../../written-at-top.txt", "w").write(b"top")
        s.rename("/f.txt", "../../../moved.txt")
        return seen

    seen = await _run(rig, work)
    names = sorted(p.name for p in rig.root().iterdir())
    assert seen["normalize"] == "/" and seen["cwd"] == "/"
    assert seen[".."] == seen["/../.."] and "canary.txt" not in seen[".."]
    assert "written-at-top.txt" in names and "moved.txt" in names
    assert _snapshot(rig.outside) == before


@pytest_twisted.ensureDeferred
async def test_links_made_over_sftp_never_point_outside(rig):
    await rig.set_login()
    (rig.root() / "a" / "b").mkdir(parents=True)
    (rig.root() / "target.txt").write_text("t")

    def work(s):
        made = []
        for target, link in [("/target.txt", "/a/b/l1"), ("../../target.txt", "/a/b/l2"),
                             ("/../../../target.txt", "/a/l3"), ("b/../../target.txt", "/a/l4"),
                             ("/", "/a/root-link"), ("nonexistent", "/a/dangling")]:
            s.symlink(target, link)
            made.append(link)
        return made

    made = await _run(rig, work)
    root = os.path.realpath(rig.root())
    for link in made:
        path = os.path.join(rig.root(), link.lstrip("/"))
        text = os.readlink(path)
        assert not text.startswith("/"), text
        assert os.path.realpath(path).startswith(root), (link, text)


@pytest_twisted.ensureDeferred
async def test_a_link_swapped_in_during_writes_never_redirects_them(rig):
    """
    A thread (the game server) keeps replacing ``/sub`` with a link to the
    outside directory and back while the client keeps writing files into
    ``/sub``: every write lands inside the root or fails; the outside stays
    exactly as it was.
    """
    await rig.set_login()
    root = rig.root()
    (root / "sub").mkdir()
    before = _snapshot(rig.outside)
    stop = threading.Event()

    def swapper():
        real, tmp = str(root / "sub"), str(root / "sub.real")
        for _ in range(200_000):
            if stop.is_set():
                break
            try:
                os.rename(real, tmp)
                os.symlink(str(rig.outside), real)
                os.unlink(real)
                os.rename(tmp, real)
            except OSError:
                pass
            # /sub is a real directory for a moment of each cycle, so that
            # some writes can land however the threads are scheduled.
            time.sleep(0.0002)

    def work(s):
        ok = failed = 0
        for i in range(150):
            try:
                with s.open("/sub/f{}.txt".format(i), "w") as f:
                    f.write(b"data")
                ok += 1
            except OSError:
                failed += 1
        return ok, failed

    t = threading.Thread(target=swapper)
    t.start()
    try:
        ok, failed = await _run(rig, work)
    finally:
        stop.set()
        t.join()
    assert ok + failed == 150
    assert ok > 0  # the swapper did not simply block every write
    assert _snapshot(rig.outside) == before
    if not (root / "sub").is_symlink() and (root / "sub").is_dir():
        assert len(list((root / "sub").iterdir())) <= ok


@pytest_twisted.ensureDeferred
async def test_a_hard_linked_file_keeps_its_permissions(rig):
    """chmod of a file with other hard links is refused, as in the file manager."""
    await rig.set_login()
    (rig.outside / "shared.txt").write_text("x")
    os.chmod(rig.outside / "shared.txt", 0o600)
    os.link(rig.outside / "shared.txt", rig.root() / "hard.txt")

    def work(s):
        with pytest.raises(PermissionError):
            s.chmod("/hard.txt", 0o777)

    await _run(rig, work)
    assert stat.S_IMODE(os.stat(rig.outside / "shared.txt").st_mode) == 0o600
