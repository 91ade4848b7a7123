"""
Benchmark of a server's disk-usage figure with many small files: plain walk vs
the agent's cached walk vs btrfs qgroup (``ctrlagent.files.usage``, docs/DISK.md).

One server directory holding ``--files`` small files (1,000,000 by default,
the issue's figure), ``--per-dir`` to a directory, made by ``--jobs``
processes (``os.open``/``os.write`` loops), on a loop-mounted btrfs image with
quotas enabled (root and btrfs-progs needed; the image is sparse, sized for
the tree, and unmounted, detached and removed at the end, on SIGTERM too);
``--no-btrfs`` measures the walks on ``--workdir``'s own filesystem.

What it measures, every CPU figure that of the thread doing the walk (the
agent walks in its disk thread), beside ``/proc/loadavg`` at that moment:

- ``plain_walk``: one ``trees.Walk`` of the whole tree (what a walk costs
  without the cache), unbudgeted and under the default budget (``[disk]
  walk_share``: its elapsed time grows, its busy share does not);
- ``agent_hour``: an hour of the agent's own schedule on a simulated clock:
  one ``Meter`` with ``[disk]``'s defaults (``walk_share``, ``walk_batch``,
  ``walk_full_interval``), measured every ``servers.disk_check_interval``
  (60 s), while a game adds ``--adds`` files and appends to ``--rewrites``
  files in place per minute, at random times.  The CPU is real (the walks
  really run, ``--sim-share`` sets their budget); the clock only decides
  which directories are due for a full look.  Staleness of each change:
  from the change to the end of the first refresh whose figure holds it (the
  simulated wait plus that refresh's real elapsed time), worst and median,
  for added files and for in-place rewrites apart;
- ``btrfs_qgroup``: reading the qgroup (CPU per read, per hour at the same
  schedule) and how long a 1 MiB write took to show in ``referenced``
  (``--probes`` times; the transaction commit), then the staleness of an
  added file at the same schedule (uniform arrival, the measured lags).

Run: ``python bench/disk_usage.py [--files N] [--per-dir N] [--jobs N]
[--workdir DIR] [--no-btrfs] [--minutes N] [--sim-share S]``.  Prints one
JSON object (and progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctrlagent.config import DiskConfig, ServersConfig  # noqa: E402
from ctrlagent.files import btrfs  # noqa: E402
from ctrlagent.files.usage import Budget, Meter, Usage, plain_usage  # noqa: E402

DISK = DiskConfig()
INTERVAL = ServersConfig().disk_check_interval


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def say(what: str) -> None:
    print("{} [{}] {}".format(time.strftime("%H:%M:%S"), loadavg(), what), file=sys.stderr,
          flush=True)


def timed(fn: Callable[[], Usage]) -> tuple[Usage, float, float]:
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    result = fn()
    return result, time.thread_time() - cpu0, time.perf_counter() - wall0


def dir_path(top: str, d: int) -> str:
    return os.path.join(top, "r{:03d}".format(d // 100), "d{:05d}".format(d))


def make_dirs(top: str, dirs: range, files: int, per_dir: int) -> None:
    """The files of the directories ``dirs`` (one worker's share)."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    payloads = [b"x" * (100 + (i * 37) % 300) for i in range(per_dir)]
    for d in dirs:
        sub = dir_path(top, d)
        os.makedirs(sub, exist_ok=True)
        dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(min(per_dir, files - d * per_dir)):
                fd = os.open("f{:04d}".format(i), flags, 0o644, dir_fd=dfd)
                os.write(fd, payloads[i])
                os.close(fd)
        finally:
            os.close(dfd)


def make_tree(top: str, files: int, per_dir: int, jobs: int) -> None:
    """``files`` files of 100-400 bytes, ``per_dir`` to a directory, two levels deep."""
    ndirs = -(-files // per_dir)
    for r in range(-(-ndirs // 100)):
        os.mkdir(os.path.join(top, "r{:03d}".format(r)))
    children = []
    for k in range(jobs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                make_dirs(top, range(k, ndirs, jobs), files, per_dir)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    if failed:
        raise RuntimeError("{} tree makers failed".format(failed))


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=300).stdout.decode()


def mount_btrfs(base: str, size: int, held: dict[str, str]) -> str:
    """A fresh btrfs on a loop device; ``held`` learns the device and mount to undo."""
    image = os.path.join(base, "image")
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(size)
    run(["mkfs.btrfs", "-q", "-f", image])
    held["device"] = run(["losetup", "--find", "--show", image]).strip()
    run(["mount", "-t", "btrfs", held["device"], mnt])
    held["mnt"] = mnt
    return mnt


def plain(fd: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _, cpu, wall = timed(lambda: plain_usage(fd))
    out["unbudgeted"] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                         "cpu_s_per_hour_if_every_refresh": round(cpu * 3600 / INTERVAL),
                         "loadavg": loadavg()}
    say("plain walk {:.1f} s CPU, {:.1f} s elapsed".format(cpu, wall))
    _, cpu, wall = timed(lambda: plain_usage(fd, Budget(DISK.walk_share, DISK.walk_batch)))
    out["budget_{}".format(DISK.walk_share)] = {
        "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
        "busy_share": round(cpu / wall, 3) if wall else None, "loadavg": loadavg()}
    say("plain walk, budgeted: {:.1f} s CPU, {:.1f} s elapsed".format(cpu, wall))
    return out


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def agent_hour(top: str, fd: int, args: argparse.Namespace, ndirs: int) -> dict[str, Any]:
    """The agent's schedule for ``--minutes`` simulated minutes (see the module's docstring)."""
    clock = SimClock()
    meter = Meter(mode="walk", share=args.sim_share, batch=DISK.walk_batch,
                  full_interval=DISK.walk_full_interval, clock=clock)
    key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    rng = random.Random(16)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    _, cold_cpu, cold_wall = timed(lambda: meter.measure(fd))
    say("cached walk, cold: {:.1f} s CPU, {:.1f} s elapsed".format(cold_cpu, cold_wall))
    load_cold = loadavg()
    # (kind, directory (device, inode), simulated time of the change)
    pending: list[tuple[str, tuple[int, int], float]] = []
    stale: dict[str, list[float]] = {"add": [], "rewrite": []}
    refreshes: list[tuple[float, float, str]] = []
    hour_cpu = 0.0
    made = 0
    for minute in range(args.minutes):
        start = minute * INTERVAL
        for kind, count in (("add", args.adds), ("rewrite", args.rewrites)):
            for _ in range(count):
                d = rng.randrange(ndirs)
                path = dir_path(top, d)
                if kind == "add":
                    name = os.path.join(path, "new{}".format(made))
                    made += 1
                    size = 1000
                else:
                    name = os.path.join(path, "f{:04d}".format(rng.randrange(args.per_dir)))
                    size = 4096
                with open(name, "ab") as f:
                    f.write(b"n" * size)
                st = os.stat(path)
                pending.append((kind, (st.st_dev, st.st_ino), start + rng.uniform(0, INTERVAL)))
        clock.now = start + INTERVAL
        _, cpu, wall = timed(lambda: meter.measure(fd))
        hour_cpu += cpu
        refreshes.append((cpu, wall, loadavg()))
        cache = meter._caches[key]
        left = []
        for kind, ino, when in pending:
            entry = cache.get(ino)
            if entry is not None and entry.looked_at >= when:
                stale[kind].append(clock.now - when + wall)
            else:
                left.append((kind, ino, when))
        pending = left
        if minute % 10 == 9:
            say("simulated minute {}: {:.1f} s CPU so far".format(minute + 1, hour_cpu))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    process_cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    check = plain_usage(fd)
    final = meter.measure(fd)
    per_hour = 60.0 / args.minutes
    cpus = [c for c, _, _ in refreshes]
    walls = [w for _, w, _ in refreshes]
    return {
        "settings": {"walk_share": args.sim_share, "walk_batch": DISK.walk_batch,
                     "walk_full_interval": DISK.walk_full_interval,
                     "disk_check_interval": INTERVAL, "simulated_minutes": args.minutes,
                     "adds_per_minute": args.adds, "rewrites_per_minute": args.rewrites},
        "cold": {"cpu_s": round(cold_cpu, 2), "wall_s": round(cold_wall, 2),
                 "loadavg": load_cold},
        "cpu_s_per_hour": round(hour_cpu * per_hour, 1),
        "process_cpu_s_per_hour": round((process_cpu - cold_cpu) * per_hour, 1),
        "share_of_one_core": round(hour_cpu * per_hour / 3600, 4),
        "refresh_cpu_s": {"median": round(statistics.median(cpus), 3),
                          "max": round(max(cpus), 3)},
        "refresh_wall_s": {"median": round(statistics.median(walls), 3),
                           "max": round(max(walls), 3)},
        "refresh_max_busy_share": round(max(c / w for c, w, _ in refreshes if w), 3),
        "loadavg": {"first": refreshes[0][2], "last": refreshes[-1][2]},
        "staleness_added_s": {"median": round(statistics.median(stale["add"]), 1),
                              "worst": round(max(stale["add"]), 1), "n": len(stale["add"])},
        "staleness_rewritten_s": {"median": round(statistics.median(stale["rewrite"]), 1),
                                  "worst": round(max(stale["rewrite"]), 1),
                                  "n": len(stale["rewrite"]),
                                  "unseen_at_end": sum(k == "rewrite" for k, _, _ in pending)},
        "figure_equals_full_walk_after_full_looks": (
            "n/a" if pending else (final.apparent, final.allocated) == (check.apparent,
                                                                       check.allocated)),
    }


def qgroup(top: str, fd: int, args: argparse.Namespace, walk_allocated: int) -> dict[str, Any]:
    meter = Meter(mode="btrfs")
    reads = []
    for _ in range(200):
        got, cpu, wall = timed(lambda: meter.measure(fd))
        assert got.source == "qgroup"
        reads.append((cpu, wall))
    cpu = statistics.median(c for c, _ in reads)
    wall = statistics.median(w for _, w in reads)
    lags = []
    for k in range(args.probes):
        before = meter.measure(fd).allocated
        time.sleep(random.uniform(0, 5))  # not in step with the commits
        with open(os.path.join(top, "probe{}.bin".format(k)), "wb") as f:
            f.write(os.urandom(1024 * 1024))
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.commit_wait:
            if meter.measure(fd).allocated >= before + 1024 * 1024:
                lags.append(time.monotonic() - t0)
                break
            time.sleep(0.1)
        else:
            lags.append(float(args.commit_wait))
        say("qgroup probe {}: the write showed after {:.1f} s".format(k, lags[-1]))
    # An added file arrives at a uniform time; the figure that holds it is
    # the first refresh at or after its arrival plus its commit lag.
    rng = random.Random(16)
    stale = []
    for _ in range(10000):
        t = rng.uniform(0, INTERVAL)
        seen = t + rng.choice(lags)
        stale.append(-(-seen // INTERVAL) * INTERVAL - t + wall)
    return {
        "cpu_s_per_read": round(cpu, 6), "wall_s_per_read": round(wall, 6),
        "cpu_s_per_hour": round(cpu * 3600 / INTERVAL, 4),
        "referenced": meter.measure(fd).allocated, "walk_allocated": walk_allocated,
        "write_visible_after_s": [round(x, 1) for x in lags],
        "staleness_added_s": {"median": round(statistics.median(stale), 1),
                              "worst": round(max(stale), 1)},
        "loadavg": loadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--per-dir", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2, help="processes making the tree")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-btrfs", action="store_true")
    p.add_argument("--minutes", type=int, default=60, help="simulated minutes of the agent")
    p.add_argument("--sim-share", type=float, default=DISK.walk_share,
                   help="walk_share of the simulated agent's walks")
    p.add_argument("--adds", type=int, default=10, help="files a minute the game adds")
    p.add_argument("--rewrites", type=int, default=10,
                   help="files a minute the game appends to in place")
    p.add_argument("--probes", type=int, default=5)
    p.add_argument("--commit-wait", type=float, default=60.0,
                   help="seconds to wait for a write to show in the qgroup")
    p.add_argument("--skip-plain", action="store_true")
    args = p.parse_args()

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("signal {}".format(signum))

    signal.signal(signal.SIGTERM, stop)
    base = tempfile.mkdtemp(prefix="ctrlagent-bench-disk-", dir=args.workdir)
    held: dict[str, str] = {}
    result: dict[str, Any] = {"files": args.files, "per_dir": args.per_dir,
                              "interval_s": INTERVAL, "cpus": os.cpu_count()}
    try:
        if args.no_btrfs:
            top = os.path.join(base, "srv")
            os.mkdir(top)
        else:
            # Sparse: files this small live in the metadata (twice, DUP).
            size = max(1 << 30, args.files * 8192)
            mnt = mount_btrfs(base, size, held)
            btrfs.enable_quotas(mnt)
            top = os.path.join(mnt, "srv")
            btrfs.create_subvolume(top)
        say("making {} files".format(args.files))
        t0 = time.perf_counter()
        make_tree(top, args.files, args.per_dir, args.jobs)
        os.sync()
        result["make_tree_s"] = round(time.perf_counter() - t0, 1)
        say("made in {} s".format(result["make_tree_s"]))
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # Cold caches are not what the agent meets every minute: one warm-up walk.
            walked = plain_usage(fd)
            if not args.skip_plain:
                result["plain_walk"] = plain(fd)
            ndirs = -(-args.files // args.per_dir)
            result["agent_hour"] = agent_hour(top, fd, args, ndirs)
            if not args.no_btrfs:
                result["btrfs_qgroup"] = qgroup(top, fd, args, walked.allocated)
        finally:
            os.close(fd)
    finally:
        if "mnt" in held:
            subprocess.run(["umount", held["mnt"]], capture_output=True, timeout=300,
                           check=False)
        if "device" in held:
            subprocess.run(["losetup", "-d", held["device"]], capture_output=True, timeout=60,
                           check=False)
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
