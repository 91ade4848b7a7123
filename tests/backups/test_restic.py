"""
The restic driver with Debian's restic on a repository on local disk: a
backup and restore round trip through the manager, deletion by
``forget --prune``, the password kept off every command line, and a wrong
password as a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.backups.config import ResticConfig
from ctrlagent.backups.restic import ResticDriver, ResticError
from tests.backups.conftest import populate, require_tool, tree
from tests.backups.rig import Rig, make_rig
from tests.backups.s3rig import MotoServer, moto_server  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def restic_installed() -> None:
    """Outside CI, a machine without restic skips these; under CI=true they fail."""
    require_tool(shutil.which("restic") is not None, "restic (apt-get install restic)")

PASSWORD = "correct horse battery staple"


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


def restic_driver(tmp_path: Path, **kw: Any) -> ResticDriver:
    config = ResticConfig(repository=str(tmp_path / "repo"), **kw)
    return ResticDriver(config, cache_dir=str(tmp_path / "restic-cache"))


def recorded_commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every command line started from now on (still run for real), in order."""
    argv: list[list[str]] = []
    real = subprocess.Popen

    def recording(args: list[str], **kw: Any) -> Any:
        argv.append(list(args))
        return real(args, **kw)

    monkeypatch.setattr(subprocess, "Popen", recording)
    return argv


def snapshots(driver: ResticDriver) -> list[str]:
    out, _ = driver.run(["snapshots", "--json"])
    return [s["id"] for s in json.loads(out)]


@pytest_twisted.ensureDeferred
async def test_backup_and_restore_through_restic(rig: Rig, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    populate(rig.root())
    before = tree(rig.root())
    driver = restic_driver(tmp_path, password=PASSWORD)
    argv = recorded_commands(monkeypatch)
    m = rig.manager({"restic": driver})
    m.startService()
    await m.ready
    answer = await m.create_backup("srv1", driver="restic", ignore=["logs/"])
    record = await m.finished(answer["backupId"])
    assert record.status == "completed", record.error
    assert [s for s in snapshots(driver) if s.startswith(record.location or "-")]
    (rig.root() / "server.properties").write_text("changed")
    (rig.root() / "world" / "level.dat").unlink()
    await m.restore_backup("srv1", record.id, truncate=False)
    assert tree(rig.root()) == before  # logs/ was not in the backup, and was kept
    dl = await m.open_download("srv1", record.id, "bytes=0-99")
    head = await dl.read()
    dl.close()
    assert len(head) == 100
    await m.delete_backup("srv1", record.id)
    assert snapshots(driver) == []
    assert argv and not any(PASSWORD in a for args in argv for a in args)


@pytest_twisted.ensureDeferred
async def test_retention_forgets_every_snapshot_it_removes_in_one_restic_run(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(rig.root())
    driver = restic_driver(tmp_path, password=PASSWORD)
    m = rig.manager({"restic": driver})
    m.startService()
    await m.ready
    made = []
    for n in range(4):
        (rig.root() / "server.properties").write_text("motd=run {}".format(n))
        answer = await m.create_backup("srv1", name="scheduled", driver="restic",
                                       scheduled=True)
        record = await m.finished(answer["backupId"])
        assert record.status == "completed", record.error
        made.append(record)
        rig.clock.advance(60)
    # One of the snapshots retention will remove is gone already.
    driver.delete(made[0].location or "")
    argv = recorded_commands(monkeypatch)
    removed = await m.apply_retention("srv1", 1, None)
    assert sorted(removed) == sorted(r.id for r in made[:3])
    forgets = [args for args in argv if "forget" in args]
    assert len(forgets) == 1  # one forget, one prune, for all three
    assert "--prune" in forgets[0]
    assert sum(1 for a in forgets[0] for r in made[:3] if a == r.location) == 3
    left = snapshots(driver)
    assert len(left) == 1 and left[0].startswith(made[3].location or "-")
    assert [r.id for r in await m.store.find("srv1")] == [made[3].id]


def test_a_password_file_is_handed_over_by_name(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    os.chmod(secret, 0o600)
    driver = restic_driver(tmp_path, password_file=str(secret))
    driver.ensure_repository()
    w = driver.open_writer("srv1", "b1")
    w.write(b"\x00" * 1024)  # not even a tar: restic stores the stream as given
    snap = w.commit()
    with driver.open_reader(snap) as r:  # type: ignore[attr-defined]
        assert r.read(4096) == b"\x00" * 1024
    assert [s[:len(snap)] for s in snapshots(driver)] == [snap]


def test_a_wrong_password_is_a_clear_error(tmp_path: Path) -> None:
    restic_driver(tmp_path, password=PASSWORD).ensure_repository()
    wrong = restic_driver(tmp_path, password="nope")
    with pytest.raises(ResticError, match="wrong repository password"):
        wrong.open_writer("srv1", "b1")
    with pytest.raises(ResticError, match="wrong repository password"):
        wrong.run(["snapshots"])


def test_an_aborted_backup_makes_no_snapshot(tmp_path: Path) -> None:
    driver = restic_driver(tmp_path, password=PASSWORD)
    w = driver.open_writer("srv1", "b1")
    w.write(os.urandom(100_000))
    w.abort()
    assert snapshots(driver) == []


def test_a_restic_repository_on_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   moto_server: MotoServer) -> None:  # noqa: F811
    """restic's own S3 backend against moto (credentials from the agent's environment)."""
    bucket = "restic-" + os.urandom(4).hex()
    moto_server.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    driver = ResticDriver(ResticConfig(repository="s3:{}/{}/repo".format(
        moto_server.endpoint, bucket), password=PASSWORD),
        cache_dir=str(tmp_path / "restic-cache"))
    data = os.urandom(300_000)
    w = driver.open_writer("srv1", "b1")
    w.write(data)
    snap = w.commit()
    with driver.open_reader(snap) as r:  # type: ignore[attr-defined]
        got = b""
        while chunk := r.read(65536):
            got += chunk
    assert got == data
    driver.delete(snap)
    assert snapshots(driver) == []


def tree_driver(tmp_path: Path) -> ResticDriver:
    config = ResticConfig(repository=str(tmp_path / "repo"), password=PASSWORD)
    driver = ResticDriver(config, cache_dir=str(tmp_path / "restic-cache"),
                          source_dir=str(tmp_path / "restic-source"))
    if not driver.tree_available():
        pytest.skip("no private mount namespace here (needs CAP_SYS_ADMIN)")
    return driver


def backup_dir(driver: ResticDriver, root: Path, patterns: list[str] | None = None) -> Any:
    """``backup_tree`` of ``root`` through an O_PATH descriptor of it, as the agent calls it."""
    from ctrlagent.backups.ignore import IgnoreRules

    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        return driver.backup_tree("srv1", "b1", str(root), fd, IgnoreRules(patterns or []))
    finally:
        os.close(fd)


@pytest_twisted.ensureDeferred
async def test_a_directory_snapshot_is_incremental_and_round_trips(rig: Rig,
                                                                   tmp_path: Path) -> None:
    populate(rig.root())
    (rig.root() / "cache").mkdir()
    (rig.root() / "cache" / "junk.bin").write_bytes(b"j" * 1000)
    os.mkfifo(rig.root() / "pipe")
    os.symlink(str(tmp_path / "outside"), rig.root() / "escape")
    (tmp_path / "outside").mkdir(exist_ok=True)
    (tmp_path / "outside" / "secret.txt").write_text("not yours")
    driver = tree_driver(tmp_path)
    m = rig.manager({"restic": driver})
    m.startService()
    await m.ready
    answer = await m.create_backup("srv1", driver="restic", ignore=["cache/"])
    first = await m.finished(answer["backupId"])
    assert first.status == "completed", first.error
    assert (first.location or "").startswith("tree:")
    assert first.files == 7  # the regular files, not the ignored, not the FIFO
    before = tree(rig.root())
    # Left out: the ignored, the FIFO, and (at restore, as for every
    # driver) the link leading outside.
    del before["cache"], before["cache/junk.bin"], before["pipe"], before["escape"]

    (rig.root() / "server.properties").write_text("changed")
    answer = await m.create_backup("srv1", driver="restic", ignore=["cache/"])
    second = await m.finished(answer["backupId"])
    assert second.status == "completed", second.error
    out, _ = driver.run(["snapshots", "--json"])
    shots = {s["short_id"]: s for s in json.loads(out)}
    snap1 = (first.location or "").split(":")[1]
    snap2 = (second.location or "").split(":")[1]
    # The second found the first as its parent: unchanged files were not read again.
    assert shots[snap2]["parent"].startswith(snap1)

    (rig.root() / "world" / "level.dat").unlink()
    restored = await m.restore_backup("srv1", first.id, truncate=True)
    assert tree(rig.root()) == before
    assert any("escape" in note for note in restored["notes"])

    dl = await m.open_download("srv1", first.id, "bytes=0-99")
    head = await dl.read()
    dl.close()
    assert not dl.sized and not dl.partial and dl.length == -1
    assert head[257:262] == b"ustar"
    await m.delete_backup("srv1", first.id)
    assert snap1 not in " ".join(snapshots(driver))


def test_restic_sees_the_server_directory_through_a_view_that_follows_no_link(
    tmp_path: Path,
) -> None:
    driver = tree_driver(tmp_path)
    source = tmp_path / "srv"
    (source / "dir").mkdir(parents=True)
    (source / "dir" / "f").write_text("mine")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("not yours")
    # A directory swapped for a link to the host's files mid-walk: an
    # intermediate component restic would resolve by path.
    os.symlink(str(tmp_path / "outside"), source / "swapped")
    target = tmp_path / "restic-source" / "view"
    target.mkdir(parents=True)
    script = 'cat "$0/dir/f"; cat "$0/swapped/secret.txt"; touch "$0/new"; true'
    done = subprocess.run(driver._private_view(str(source), str(target),
                                               ["sh", "-c", script, str(target)]),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "mine"
    assert "Too many levels of symbolic links" in done.stderr
    assert "Read-only file system" in done.stderr
    assert not (source / "new").exists()
    assert os.listdir(target) == []  # the view ended with the child


@pytest_twisted.ensureDeferred
async def test_a_later_directory_snapshot_costs_one_restic_process_and_one_walk_of_ours(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrlagent.backups.events import BackupProgress
    from ctrlagent.files import trees

    populate(rig.root())
    driver = tree_driver(tmp_path)
    started: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.Popen

    def recording(args: list[str], **kw: Any) -> Any:
        started.append((list(args), dict(kw.get("env") or {})))
        return real(args, **kw)

    walks: list[int] = []

    class CountedWalk(trees.Walk):
        def __init__(self, *a: Any, **kw: Any) -> None:
            walks.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(subprocess, "Popen", recording)
    monkeypatch.setattr(trees, "Walk", CountedWalk)
    m = rig.manager({"restic": driver})
    m.startService()
    await m.ready
    first = await m.finished((await m.create_backup("srv1", driver="restic"))["backupId"])
    assert first.status == "completed", first.error
    started.clear()
    walks.clear()
    rig.events.clear()
    (rig.root() / "server.properties").write_text("changed")
    second = await m.finished((await m.create_backup("srv1", driver="restic"))["backupId"])
    assert second.status == "completed", second.error
    # The repository was opened (the key derived) once, by the first backup;
    # each later one is one restic process (each pays restic's key
    # derivation), and one walk of ours (the plan), not a measuring walk too.
    restics = [(args, env) for args, env in started if "restic" in args]
    assert len(restics) == 1 and "backup" in restics[0][0]
    assert len(walks) == 1
    # restic prints a status line a second (progress_interval), not 60.
    assert restics[0][1]["RESTIC_PROGRESS_FPS"] == "1"
    # The progress total is the plan's: the last event says 100 % of it.
    progress = [e for e in rig.events if isinstance(e, BackupProgress)]
    assert {e.total_bytes for e in progress} == {second.bytes} and second.bytes > 0
    assert progress[-1].percent == 100.0


@pytest.mark.parametrize("where", ["top\x01name", "d/inner\nname", "d/e\x1f/f"])
def test_a_name_with_a_control_character_anywhere_falls_back_to_the_tar_stream(
        tmp_path: Path, where: str) -> None:
    from ctrlagent.backups.ignore import IgnoreRules
    from ctrlagent.backups.restic import plan_tree

    root = tmp_path / "srv"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "plain").write_text("x")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert plan_tree(fd, IgnoreRules([])) is not None
        (root / where).parent.mkdir(parents=True, exist_ok=True)
        (root / where).write_text("x")
        assert plan_tree(fd, IgnoreRules([])) is None
    finally:
        os.close(fd)


def _snapshot_names(driver: ResticDriver, location: str) -> set[str]:
    """The paths (relative to the snapshot's root) a directory snapshot holds."""
    snapshot, _, path = location[len("tree:"):].partition(":")
    out, _ = driver.run(["ls", "--json", snapshot])
    names = set()
    for line in out.splitlines():
        item = json.loads(line)
        if item.get("struct_type") == "node" and item["path"].startswith(path + "/"):
            names.add(item["path"][len(path) + 1:])
    return names


def test_names_restic_would_read_otherwise_are_left_out_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    # restic's exclude file trims white space, skips "#" lines, expands
    # "$NAME" and reads globs: each name the plan leaves out (FIFOs here)
    # leaves out itself only, and its plain twins stay.
    monkeypatch.setenv("CTRL_EXPANDED", "pand")
    driver = tree_driver(tmp_path)
    root = tmp_path / "srv"
    root.mkdir()
    hostile = ["cost$CTRL_EXPANDED", "$", "trail ", "nbsp\xa0", "#hash", "star*", "[ab]",
               "back\\", "d i r", "q?"]
    kept = ["cost", "costpand", "cost$CTRL", "trail", "nbsp", "hash", "stars", "a",
            "back", "d", "qq"]
    for name in hostile:
        os.mkfifo(root / name)
    for name in kept:
        (root / name).write_text("x")
    done = backup_dir(driver, root)
    assert done is not None
    stats, location = done
    assert _snapshot_names(driver, location) == set(kept)
    assert stats.files == len(kept) and stats.skipped == len(hostile)


def test_the_planning_walk_runs_while_restic_starts(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrlagent.backups import restic

    driver = tree_driver(tmp_path)
    driver.ensure_repository()
    root = tmp_path / "srv"
    root.mkdir()
    (root / "f").write_text("x")
    seen: list[list[str]] = []
    real_plan = restic.plan_tree

    def plan(fd: int, rules: Any) -> Any:
        # restic is running (deriving its key) while we walk.  Its child may
        # not have exec'd yet (its command line is still this process's):
        # wait for it a little, bounded.
        seen.append(_restic_children_within(5.0))
        return real_plan(fd, rules)

    monkeypatch.setattr(restic, "plan_tree", plan)
    done = backup_dir(driver, root)
    assert done is not None and done[0].files == 1
    assert seen and seen[0], "no restic process while the plan was walked"


def _restic_children_within(seconds: float) -> list[str]:
    """``_restic_children()`` once there are any, or ``[]`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        found = _restic_children()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.01)


def _restic_children() -> list[str]:
    """Command lines of this process's descendants that run restic (or will: unshare)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/{}/cmdline".format(pid), "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open("/proc/{}/stat".format(pid)) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and "backup" in cmd and "restic" in cmd:
            found.append(cmd)
    return found


def assert_nothing_left(driver: Any) -> None:
    """No restic process, no lock and no snapshot left in the repository."""
    assert _restic_children() == []
    out, _ = driver.run(["list", "locks", "--no-lock"])
    assert out.strip() == ""
    assert snapshots(driver) == []


def test_a_plan_that_falls_back_ends_the_started_restic_without_a_lock(
        tmp_path: Path) -> None:

    driver = tree_driver(tmp_path)
    driver.ensure_repository()
    root = tmp_path / "srv"
    root.mkdir()
    (root / "bad\x01name").write_text("x")
    assert backup_dir(driver, root) is None
    assert_nothing_left(driver)


def test_an_exclude_list_the_pipe_cannot_hold_whole_falls_back_without_waiting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrlagent.backups import restic

    driver = tree_driver(tmp_path)
    driver.ensure_repository()
    root = tmp_path / "srv"
    root.mkdir()
    for n in range(20):
        (root / "skip-{:02d}.log".format(n)).write_text("x")
    (root / "kept").write_text("y")
    # A pipe of 64 bytes: the list of 20 excluded paths does not fit, and
    # writing it would wait for a restic that reads it only after its lock.
    monkeypatch.setattr(restic, "widen_pipe", lambda fd: 64)
    assert backup_dir(driver, root, ["*.log"]) is None
    assert_nothing_left(driver)


def test_a_planning_walk_that_fails_ends_restic_before_it_reads_an_unfinished_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrlagent.backups import restic

    driver = tree_driver(tmp_path)
    driver.ensure_repository()
    root = tmp_path / "srv"
    root.mkdir()
    (root / "f").write_text("x")

    def plan(fd: int, rules: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(restic, "plan_tree", plan)
    with pytest.raises(OSError, match="Input/output"):
        backup_dir(driver, root)
    assert_nothing_left(driver)
