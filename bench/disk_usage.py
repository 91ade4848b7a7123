"""
Benchmark of a server's disk-usage figure with many small files: plain walk vs
cached walk vs btrfs qgroup (``ctrlagent.files.usage``, docs/DISK.md).

One server directory holding ``--files`` small files (100,000 by default;
``--files 1000000`` for the issue's figure), ``--per-dir`` to a directory, on a
loop-mounted btrfs image with quotas enabled (root and btrfs-progs needed;
``--no-btrfs`` measures the walks on ``--workdir``'s own filesystem).  For each
way of measuring:

- ``cpu_s`` / ``wall_s`` per refresh (the thread's CPU time, and elapsed);
- ``cpu_s_per_hour`` at one refresh per ``--interval`` seconds (the server
  manager's ``disk_check_interval``, 60);
- ``staleness_s``: how old the figure can be when read: the refresh interval
  plus the time one refresh takes (the walk's figure is as old as its start);
  for the cached walk, also how late a file rewritten in place shows
  (``walk_full_interval``); for the qgroup, how long a write took to show in
  ``referenced`` (the filesystem's transaction commit, measured).

Also the plain walk under the default budget (``walk_share`` 0.25): its
elapsed time per refresh grows, its CPU share does not.

Run: ``python bench/disk_usage.py [--files N] [--per-dir N] [--workdir DIR]
[--no-btrfs] [--commit-wait S]``.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctrlagent.files import btrfs  # noqa: E402
from ctrlagent.files.usage import Budget, Meter, Usage, plain_usage  # noqa: E402


def timed(fn: Callable[[], Usage]) -> tuple[Usage, float, float]:
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    result = fn()
    return result, time.thread_time() - cpu0, time.perf_counter() - wall0


def make_tree(top: str, files: int, per_dir: int) -> None:
    """``files`` files of 100-400 bytes, ``per_dir`` to a directory, two levels deep."""
    made = 0
    d = 0
    while made < files:
        sub = os.path.join(top, "r{:03d}".format(d // 100), "d{:05d}".format(d))
        os.makedirs(sub)
        for i in range(min(per_dir, files - made)):
            fd = os.open(os.path.join(sub, "f{:04d}".format(i)), os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"x" * (100 + (i * 37) % 300))
            os.close(fd)
        made += per_dir
        d += 1


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=120).stdout.decode()


def mount_btrfs(base: str, size: int) -> tuple[str, str]:
    image = os.path.join(base, "image")
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(size)
    run(["mkfs.btrfs", "-q", "-f", image])
    device = run(["losetup", "--find", "--show", image]).strip()
    try:
        run(["mount", "-t", "btrfs", device, mnt])
    except BaseException:
        run(["losetup", "-d", device])
        raise
    return mnt, device


def bench(top: str, args: argparse.Namespace, qgroup: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Plain walk (today's trees.Walk), unbudgeted then budgeted.
        plain, cpu, wall = timed(lambda: plain_usage(fd))
        out["plain_walk"] = {
            "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "cpu_s_per_hour": round(cpu * 3600 / args.interval, 1),
            "staleness_s": round(args.interval + wall, 1),
        }
        _, cpu, wall = timed(lambda: plain_usage(fd, Budget(0.25, 2000)))
        out["plain_walk_budget_0.25"] = {
            "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "busy_share": round(cpu / wall, 3) if wall else None,
            "staleness_s": round(args.interval + wall, 1),
        }
        # Cached walk: a cold first refresh, then refreshes after a few changes.
        meter = Meter(mode="walk", share=1.0, full_interval=300.0)
        cold, cpu, wall = timed(lambda: meter.measure(fd))
        assert (cold.apparent, cold.allocated) == (plain.apparent, plain.allocated)
        out["cached_walk_cold"] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}
        samples = []
        for k in range(5):
            # A few new files here and there, as a running game does.
            for j in range(10):
                ndirs = min(100, -(-args.files // args.per_dir))
                sub = os.path.join(top, "r000", "d{:05d}".format(j * 7 % ndirs))
                with open(os.path.join(sub, "new{}_{}".format(k, j)), "wb") as f:
                    f.write(b"n" * 1000)
            warm, cpu, wall = timed(lambda: meter.measure(fd))
            samples.append((cpu, wall))
        check = plain_usage(fd)
        assert (warm.apparent, warm.allocated) == (check.apparent, check.allocated)
        cpu = sum(c for c, _ in samples) / len(samples)
        wall = sum(w for _, w in samples) / len(samples)
        out["cached_walk"] = {
            "cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
            "cpu_s_per_hour": round(cpu * 3600 / args.interval, 1),
            # Every directory is looked at in full once per walk_full_interval
            # (300 s) at most: the cold refresh's CPU, 12 times an hour.
            "cpu_s_per_hour_with_full_looks": round(
                cpu * 3600 / args.interval + out["cached_walk_cold"]["cpu_s"] * 3600 / 300, 1),
            "staleness_s": round(args.interval + wall, 1),
            "staleness_in_place_rewrite_s": 300.0,
        }
        if qgroup:
            meter = Meter(mode="btrfs")
            reads = []
            for _ in range(20):
                got, cpu, wall = timed(lambda: meter.measure(fd))
                assert got.source == "qgroup"
                reads.append((cpu, wall))
            cpu = sum(c for c, _ in reads) / len(reads)
            wall = sum(w for _, w in reads) / len(reads)
            before = got.allocated
            # How long a write takes to show in the qgroup (the commit interval).
            with open(os.path.join(top, "probe.bin"), "wb") as f:
                f.write(os.urandom(1024 * 1024))
            t0 = time.monotonic()
            seen = None
            while time.monotonic() - t0 < args.commit_wait:
                if meter.measure(fd).allocated >= before + 1024 * 1024:
                    seen = time.monotonic() - t0
                    break
                time.sleep(0.2)
            out["btrfs_qgroup"] = {
                "cpu_s": round(cpu, 6), "wall_s": round(wall, 6),
                "cpu_s_per_hour": round(cpu * 3600 / args.interval, 4),
                "referenced": before, "walk_allocated": plain.allocated,
                "write_visible_after_s": None if seen is None else round(seen, 1),
                "staleness_s": round(args.interval + (seen if seen is not None
                                                      else args.commit_wait), 1),
            }
    finally:
        os.close(fd)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--per-dir", type=int, default=100)
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-btrfs", action="store_true")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between refreshes")
    p.add_argument("--commit-wait", type=float, default=40.0,
                   help="seconds to wait for a write to show in the qgroup")
    args = p.parse_args()
    base = tempfile.mkdtemp(prefix="ctrlagent-bench-disk-", dir=args.workdir)
    mnt = device = None
    result: dict[str, Any] = {"files": args.files, "per_dir": args.per_dir,
                              "interval_s": args.interval}
    try:
        if args.no_btrfs:
            top = os.path.join(base, "srv")
            os.mkdir(top)
        else:
            size = max(1 << 30, args.files * 8192)
            mnt, device = mount_btrfs(base, size)
            btrfs.enable_quotas(mnt)
            top = os.path.join(mnt, "srv")
            btrfs.create_subvolume(top)
        t0 = time.perf_counter()
        make_tree(top, args.files, args.per_dir)
        os.sync()
        result["make_tree_s"] = round(time.perf_counter() - t0, 1)
        # Cold caches are not what the agent meets every minute: one warm-up walk.
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        plain_usage(fd)
        os.close(fd)
        result.update(bench(top, args, qgroup=not args.no_btrfs))
    finally:
        if mnt is not None:
            subprocess.run(["umount", mnt], capture_output=True, timeout=120, check=False)
        if device is not None:
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60,
                           check=False)
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
