"""
The usage walk where the filesystem cannot count for us: cached by
directory, budgeted, coalesced (``ctrlagent.files.usage``).  Real trees on
the test's own filesystem; the full-look interval runs on an injected clock.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from ctrlagent.files import trees, usage
from ctrlagent.files.usage import Budget, Meter, Usage, plain_usage
from tests.files.test_trees import make_chain, remove_everything


def full(path: Path) -> Usage:
    """Today's plain walk: the reference figures."""
    fd = os.open(path, trees.DIR_FLAGS)
    try:
        apparent, _ = trees.tree_usage(fd)
        allocated, _ = trees.tree_usage(fd, allocated=True)
    finally:
        os.close(fd)
    return Usage(apparent, allocated)


def figures(u: Usage) -> tuple[int, int]:
    return u.apparent, u.allocated


def build(top: Path, dirs: int = 20, files: int = 30) -> None:
    for d in range(dirs):
        sub = top / "d{}".format(d) / "inner"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub.parent / "f{}".format(f)).write_bytes(b"a" * (f * 97 + d))
        (sub / "x").write_bytes(b"b" * 5000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_cached_walk_gives_the_full_walks_totals_after_every_kind_of_change(
    tmp_path: Path,
) -> None:
    top = tmp_path / "srv"
    build(top)
    meter = Meter(full_interval=3600)
    assert figures(meter.measure_path(str(top))) == figures(full(top))
    # Entries added, removed, renamed, a subtree moved, a link to outside,
    # a new deep directory: each changes some directory's mtime.
    (top / "d1" / "new").write_bytes(b"n" * 12345)
    os.unlink(top / "d2" / "f3")
    os.rename(top / "d3" / "f4", top / "d3" / "renamed")
    os.rename(top / "d4" / "inner", top / "d5" / "moved")
    os.symlink("/usr", top / "d6" / "usr_link")
    deep = top / "d7" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "z").write_bytes(b"z" * 777)
    (top / "d8" / "f1").rename(top / "f1_up")
    after = meter.measure_path(str(top))
    assert figures(after) == figures(full(top))
    assert after.complete and after.source == "cached"


def test_a_file_rewritten_in_place_is_seen_at_the_next_full_look(tmp_path: Path) -> None:
    top = tmp_path / "srv"
    build(top, dirs=3, files=3)
    clock = Clock()
    meter = Meter(full_interval=300, clock=clock)
    meter.measure_path(str(top))
    # d1 changes (an entry added and removed): looked at in full now, so its
    # next full look is a whole interval away.
    (top / "d1" / "tmp").write_bytes(b"")
    os.unlink(top / "d1" / "tmp")
    first = meter.measure_path(str(top))
    with open(top / "d1" / "f2", "ab") as f:  # grows; its directory's mtime does not change
        f.write(b"g" * 50_000)
    clock.now += 10
    # Documented: within walk_full_interval, an unchanged directory is not looked into.
    assert figures(meter.measure_path(str(top))) == figures(first)
    clock.now += 300
    assert figures(meter.measure_path(str(top))) == figures(full(top))
    # With no interval, every file is looked at every time.
    exact = Meter(full_interval=0)
    exact.measure_path(str(top))
    with open(top / "d2" / "f1", "ab") as f:
        f.write(b"h" * 7000)
    assert figures(exact.measure_path(str(top))) == figures(full(top))


def test_each_directory_is_looked_at_in_full_once_an_interval_spread_over_the_measures(
    tmp_path: Path,
) -> None:
    # The agent's schedule: a measure every 60 s, walk_full_interval 300 s.
    # Each unchanged directory's files are looked at once per interval (12
    # times an hour, not more), a fifth of them at each measure rather than
    # all at once, and a file rewritten in place anywhere shows within the
    # interval.
    top = tmp_path / "srv"
    build(top, dirs=100, files=2)
    clock = Clock()
    meter = Meter(full_interval=300, clock=clock)
    looks: dict[int, int] = {}
    real_look = usage._look

    def counted(fd: int, st: os.stat_result, *args: Any) -> Any:
        looks[st.st_ino] = looks.get(st.st_ino, 0) + 1
        return real_look(fd, st, *args)

    usage._look = counted
    try:
        meter.measure_path(str(top))  # the first: every directory
        ndirs = len(looks)
        assert ndirs == 201
        looks.clear()
        per_measure = []
        late = []
        rewritten: dict[str, float] = {}
        for minute in range(1, 61):
            before = sum(looks.values())
            clock.now += 60
            u = meter.measure_path(str(top))
            per_measure.append(sum(looks.values()) - before)
            # Rewritten in place since the last measure: seen within 300 s.
            for name, when in list(rewritten.items()):
                if figures(u) == figures(full(top)):
                    del rewritten[name]
                elif clock.now - when >= 300:
                    late.append(name)
            if minute % 7 == 0 and not rewritten:
                name = "d{}/f1".format(minute % 100)
                with open(top / name, "ab") as f:
                    f.write(b"r" * 3000)
                rewritten[name] = clock.now
        assert not late
        assert sorted(set(looks.values())) == [12], looks
        # A fifth of the tree at each measure, give or take the spread.
        assert max(per_measure) <= ndirs * 0.35, per_measure
        assert min(per_measure[5:]) >= ndirs * 0.1, per_measure
    finally:
        usage._look = real_look


def test_the_walk_never_follows_links_nor_counts_what_they_point_at(tmp_path: Path) -> None:
    top = tmp_path / "srv"
    top.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"o" * 1_000_000)
    os.symlink(str(outside), top / "out_dir")
    os.symlink(str(outside / "big"), top / "out_file")
    (top / "own").write_bytes(b"k" * 100)
    u = Meter().measure_path(str(top))
    assert u.apparent == 100
    assert figures(u) == figures(full(top))


def test_a_tree_deeper_than_one_path_is_still_counted_exactly(tmp_path: Path) -> None:
    top = tmp_path / "srv"
    top.mkdir()
    try:
        make_chain(top, 800, payload=b"d" * 10)  # past MAX_CACHED_DEPTH: walked by fd
        meter = Meter()
        first = meter.measure_path(str(top))
        assert figures(first) == figures(full(top))
        assert first.apparent == 8_000
        os.unlink(top / "d" / "f")
        assert figures(meter.measure_path(str(top))) == figures(full(top))
    finally:
        remove_everything(tmp_path)


def test_concurrent_requests_for_one_directory_share_one_walk(tmp_path: Path) -> None:
    top = tmp_path / "srv"
    build(top, dirs=20, files=50)
    # A slow walk (a small share, small batches) so that the others arrive during it.
    meter = Meter(share=0.05, batch=50)
    results: list[Usage] = []
    started = threading.Event()

    def one() -> None:
        started.set()
        results.append(meter.measure_path(str(top)))

    first = threading.Thread(target=one)
    first.start()
    started.wait(5)
    deadline = time.monotonic() + 5
    while not meter._flights and time.monotonic() < deadline:
        time.sleep(0.001)
    others = [threading.Thread(target=one) for _ in range(3)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(60)
    assert len(results) == 4
    assert meter.walks == 1 and meter.joins == 3
    assert len({figures(r) for r in results}) == 1
    assert figures(results[0]) == figures(full(top))
    # Once it is done, the next request walks again.
    meter.measure_path(str(top))
    assert meter.walks == 2


def test_a_budgeted_walk_is_busy_at_most_its_share_of_the_time(tmp_path: Path) -> None:
    top = tmp_path / "srv"
    build(top, dirs=15, files=60)
    fd = os.open(top, trees.DIR_FLAGS)
    try:
        cpu0, wall0 = time.thread_time(), time.monotonic()
        budget = Budget(share=0.2, batch=100)
        u = plain_usage(fd, budget)
        cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
    finally:
        os.close(fd)
    assert figures(u) == figures(full(top))
    assert budget.paused > 0
    # Busy (CPU and waits) at most a fifth of the time, give or take the last batch.
    assert cpu <= 0.2 * wall + 0.05, (cpu, wall)
    unbudgeted = Budget(share=1.0, batch=200)
    fd = os.open(top, trees.DIR_FLAGS)
    try:
        plain_usage(fd, unbudgeted)
    finally:
        os.close(fd)
    assert unbudgeted.paused == 0


def test_a_stopping_agent_ends_the_budget_pauses_of_a_walk(tmp_path: Path) -> None:
    top = tmp_path / "srv"
    build(top, dirs=15, files=60)
    stop = threading.Event()
    meter = Meter(share=0.01, batch=50)
    done: list[float] = []

    def walk() -> None:
        t0 = time.monotonic()
        meter.measure_path(str(top), stop=stop)
        done.append(time.monotonic() - t0)

    t = threading.Thread(target=walk)
    t.start()
    time.sleep(0.3)
    assert not done  # 1 % of the time: it would take a hundred times its work
    stop.set()
    t.join(10)
    assert done and done[0] < 10


def test_another_device_below_the_walks_depth_is_a_figure_that_says_what_it_missed(
    tmp_path: Path,
) -> None:
    """
    A nested subvolume (any user may make one on btrfs) or a mount deeper than
    the cached walk goes is not walked: its bytes would go uncounted, so the
    figure says so and why (the server manager then stops the server).
    """
    top = tmp_path / "srv"
    top.mkdir()
    make_chain(top, usage.MAX_CACHED_DEPTH + 3)
    deep = top.joinpath(*["d"] * (usage.MAX_CACHED_DEPTH + 2))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(deep)], check=True,
                   timeout=30)
    try:
        (deep / "hidden").write_bytes(b"h" * 100_000)
        used = Meter().measure_path(str(top))
        assert not used.complete
        assert "another device" in used.uncounted
        assert used.apparent < 100_000
    finally:
        subprocess.run(["umount", str(deep)], check=True, timeout=30)
        remove_everything(tmp_path)
    # A tree of one device has nothing uncounted.
    top.mkdir()
    make_chain(top, usage.MAX_CACHED_DEPTH + 3)
    assert Meter().measure_path(str(top)).uncounted == ""
    remove_everything(tmp_path)
