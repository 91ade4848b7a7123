"""
Benchmark of backups: our tar+zstd archive against ``tar -I 'zstd -T0'``
on the same tree in the same run, the restore, and restic's second run
after 1 % of the files changed.

The tree is mixed: many small text files (configs, logs), a few large
incompressible ones (region files), some compressible binaries.  Reported:
seconds, MB/s of content, archive size, the CPU seconds of each side, the
peak RSS of each of our steps (measured in a child process, so one step's
memory does not hide another's; the zstd process our archive is compressed
by is reported beside it), and the load average beside the figures.
Default 200 MiB; ``--size-mib 1024`` for the 1 GiB run; ``--keep DIR``
keeps the work directory and reuses its tree in a later run.

What each side does, exactly (the same tree, the same level):

- baseline: ``tar -C <tree> -I 'zstd -T0 -3' -cf <file> .``: GNU tar walks
  and reads, zstd (level 3, one worker per core, its default job size)
  compresses and writes the file (tar gives it the file as its stdout).
  No hash, no sync.
- ours, as the manager does it for the local driver: the measuring walk
  (``trees.tree_usage``, for the free-room check and the progress total),
  the local driver's temporary file opened, then ``write_archive``: our
  confined walk builds the tar stream (files of 256 KiB or more spliced)
  into a pipe to the zstd program (``zstd -q -c -T0 -3
  --no-sparse``), which writes the temporary file itself, while a thread of
  ours reads that file back behind it and computes its sha256.  Timed up
  to the archive being whole and hashed; the local driver's commit (fsync,
  rename, fsync of the directory) follows untimed, as tar syncs nothing,
  and its time is printed beside.

The two sides take turns ``--rounds`` times; before each run the other
side's output is removed and the disk synced (untimed), so neither pays
for the other's write-back; each round's ratio and each side's CPU are
printed, and the best time of each side is compared.

restic runs as the manager runs it: a directory snapshot through the
private mount where the machine allows one (the report says ``tree``), the
tar stream otherwise; the report names each snapshot's parent.  What the
agent's long-lived driver does once (open the repository, which derives
the key, and probe the private mount) is not timed.  Then restic's own
floor on the tree, without the agent: ``restic version`` (a process
start), ``restic --no-lock cat config`` (+ the key derivation, scrypt with
the parameters ``restic init`` calibrated), ``restic cat config`` (+ the
lock and restic 0.14's fixed 200 ms wait after taking it), and a
``restic backup`` with nothing changed since the one before (the same
private view, so the same parent), each timed from outside with its CPU;
and our planning walk alone.

    python bench/backups.py [--size-mib 200] [--small N] [--rounds 2] [--no-restic] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024


def make_tree(root: Path, size: int, small: int = 0, seed: int = 1) -> int:
    """A mixed tree of about ``size`` bytes, ``small`` small text files first; its file count."""
    rnd = random.Random(seed)
    files = 0
    total = 0
    words = ["w{}".format(i).encode() for i in range(500)]
    while total < size:
        kind = 0.5 if files < small else rnd.random()
        d = root / "d{}".format(rnd.randrange(40)) / "s{}".format(rnd.randrange(10))
        d.mkdir(parents=True, exist_ok=True)
        if kind < 0.05:
            n = rnd.randrange(2, 8) * MiB  # region file: incompressible
            data = os.urandom(n)
        elif kind < 0.25:
            n = rnd.randrange(64, 512) * 1024  # binary-ish: half compressible
            data = os.urandom(n // 2) + bytes(n - n // 2)
        else:
            n = rnd.randrange(200, 16 * 1024)  # text
            data = b" ".join(rnd.choice(words) for _ in range(n // 4))[:n]
        (d / "f{}".format(files)).write_bytes(data)
        files += 1
        total += len(data)
    return files


def child(step: str, args: list[str]) -> dict:
    """Run one measured step in a child process; its JSON answer."""
    out = subprocess.run([sys.executable, __file__, "--child", step, *args],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(step: str, args: list[str]) -> None:
    from ctrlagent.backups.archive import write_archive
    from ctrlagent.backups.ignore import IgnoreRules
    from ctrlagent.backups.restore import restore_root
    from ctrlagent.files import trees

    t0 = time.monotonic()
    cpu0 = _cpu()
    if step == "archive":
        root, out_dir = args
        from ctrlagent.backups.drivers import LocalDriver

        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        # As the manager: the tree is measured (free room, progress) first,
        # then the local driver's temporary file is written (by the zstd
        # program itself, hashed behind it by the agent).
        trees.tree_usage(fd)
        driver = LocalDriver(out_dir)
        driver.free_bytes()
        w = driver.open_writer("bench", "ours")
        stats = write_archive(fd, w.write, IgnoreRules([]), level=3,
                              file_fd=getattr(w, "file_fd", None))
        seconds, cpu1 = time.monotonic() - t0, _cpu()
        # Not timed (tar does not sync): the local driver's fsync and rename.
        t1 = time.monotonic()
        location = w.commit()
        result = {"bytes": stats.bytes, "size": stats.size, "files": stats.files,
                  "checksum": stats.checksum, "path": os.path.join(out_dir, location),
                  "commit_seconds": time.monotonic() - t1, "seconds": seconds,
                  "cpu_self": cpu1[0] - cpu0[0], "cpu_zstd": cpu1[1] - cpu0[1]}
    elif step == "restore":
        root, archive, size, checksum, content = args
        with open(archive, "rb") as f:
            r = restore_root(root, f, size=int(size), checksum=checksum,
                             content_bytes=int(content), uid=os.getuid(), gid=os.getgid(),
                             truncate=True)
        result = {"files": r.files}
    elif step == "restic":
        root, repo, password_file = args
        from ctrlagent.backups.config import ResticConfig
        from ctrlagent.backups.restic import ResticDriver

        config = ResticConfig(repository=repo, password_file=password_file)
        try:
            driver = ResticDriver(config, cache_dir=repo + "-cache", source_dir=repo + "-source")
        except TypeError:  # an older checkout (before/after figures)
            driver = ResticDriver(config, cache_dir=repo + "-cache")
        # What the agent's long-lived driver does once, at its first backup
        # (open the repository, probe the private mount), is not timed.
        driver.ensure_repository()
        getattr(driver, "tree_available", lambda: False)()
        t0 = time.monotonic()
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        backup_id = "b{}".format(time.time())
        # As the manager: a directory snapshot where a private mount works.
        backup_tree = getattr(driver, "backup_tree", None)
        done = backup_tree("bench", backup_id, root, fd, IgnoreRules([])) if backup_tree else None
        if done is not None:
            stats, location = done
            result = {"snapshot": location, "bytes": stats.bytes, "mode": "tree"}
            seconds = time.monotonic() - t0
            out, _ = driver.run(["snapshots", "--json", "--latest", "1"])
            latest = json.loads(out)
            result["parent"] = (latest[-1].get("parent") or "none")[:8] if latest else "?"
            t0 = time.monotonic() - seconds
        else:
            w = driver.open_writer("bench", backup_id)
            stats = write_archive(fd, w.write, IgnoreRules([]), level=None)
            result = {"snapshot": w.commit(), "bytes": stats.bytes, "mode": "stream"}
    elif step == "restic-floor":
        # restic's own floor on this tree: the commands run exactly as the
        # driver runs them (its environment, the same private view, so the
        # same parent), each timed from the outside with its CPU; the last
        # a backup with nothing changed since the one before.
        root, repo, password_file = args
        from ctrlagent.backups.config import ResticConfig
        from ctrlagent.backups.drivers import safe_component
        from ctrlagent.backups.restic import ResticDriver, plan_tree

        config = ResticConfig(repository=repo, password_file=password_file)
        driver = ResticDriver(config, cache_dir=repo + "-cache", source_dir=repo + "-source")
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        target = os.path.join(repo + "-source", safe_component("bench"))
        view = driver._private_view("/proc/self/fd/{}".format(fd), target, [])

        def timed(argv: list[str], private: bool = False) -> tuple[float, float, str]:
            c0, t0 = _cpu()[1], time.monotonic()
            out = subprocess.run((view if private else []) + argv, env=driver._env(),
                                 pass_fds=(fd,), capture_output=True, text=True, check=True)
            return time.monotonic() - t0, _cpu()[1] - c0, out.stdout

        result = {}
        t0 = time.monotonic()
        plan_tree(fd, IgnoreRules([]))
        result["plan"] = time.monotonic() - t0
        result["start"] = timed(["restic", "version"])[:2]
        result["key"] = timed(["restic", "--no-lock", "cat", "config"])[:2]
        result["key_lock"] = timed(["restic", "cat", "config"])[:2]
        wall, cpu, out = timed(["restic", "backup", "--json", "--host", "ctrlagent", target],
                               private=True)
        summary = json.loads(out.strip().splitlines()[-1])
        result["backup"] = (wall, cpu)
        result["restic_duration"] = summary.get("total_duration", 0.0)
        result["unmodified"] = summary.get("files_unmodified", 0)
    else:
        raise SystemExit("unknown step")
    result.setdefault("seconds", time.monotonic() - t0)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The zstd process the archive is compressed by (the largest child).
    result["child_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def repo_size(repo: Path) -> int:
    return sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--size-mib", type=int, default=200)
    p.add_argument("--small", type=int, default=None,
                   help="small files first (default: 10,000 per GiB)")
    p.add_argument("--no-restic", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="archive runs of each side")
    p.add_argument("--keep", default=None,
                   help="work directory to keep (default: a temp one); its tree is reused")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        run_child(a.child[0], a.child[1:])
        return
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench-backups-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        root = work / "servers" / "srv"
        if root.is_dir():
            # A tree kept by an earlier run (--keep): reused as it is; the
            # earlier run's repository and archives go.
            for old in ("repo", "repo-cache", "repo-source", "ours", "gnu.tar.zst"):
                path = work / old
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            files = sum(1 for f in root.rglob("*") if f.is_file())
        else:
            root.mkdir(parents=True)
            small = a.small if a.small is not None else a.size_mib * 10_000 // 1024
            files = make_tree(root, a.size_mib * MiB, small)
        content = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print("tree: {} files, {:.0f} MiB; loadavg {}".format(
            files, content / MiB, _loadavg()))

        # The new tree's dirty pages go to disk first (else the first step
        # pays the write-back), then the two sides take turns, --rounds
        # times each (each output removed first and the disk synced,
        # untimed, so neither side pays for freeing or writing back the
        # other's file), and each side's best
        # time is compared (the machine is shared: the best is the least
        # disturbed); each round's own ratio and load are printed too.
        os.sync()
        runs: list[dict] = []
        gnus: list[tuple[float, float]] = []
        gnu_out = work / "gnu.tar.zst"
        for n in range(a.rounds):
            gnu_out.unlink(missing_ok=True)
            shutil.rmtree(work / "ours", ignore_errors=True)
            os.sync()
            load = _loadavg()
            c0, t0 = _cpu()[1], time.monotonic()
            subprocess.run(["tar", "-C", str(root), "-I", "zstd -T0 -3", "-cf",
                            str(gnu_out), "."], check=True)
            gnus.append((time.monotonic() - t0, _cpu()[1] - c0))
            os.sync()  # tar's archive written back, as ours is by its commit
            r = child("archive", [str(root), str(work / "ours")])
            runs.append(r)
            print("round {}: tar+zstd {:.2f} s (CPU {:.2f} s), ours {:.2f} s (CPU: agent {:.2f} s"
                  " + zstd {:.2f} s; then fsync+rename {:.2f} s, untimed), ratio {:.2f}; "
                  "loadavg {} -> {}".format(
                      n + 1, gnus[-1][0], gnus[-1][1], r["seconds"], r["cpu_self"],
                      r["cpu_zstd"], r["commit_seconds"], gnus[-1][0] / r["seconds"], load,
                      _loadavg()))
        ours = min(runs, key=lambda r: r["seconds"])
        gnu = min(g for g, _ in gnus)
        print("ours   archive: {:.2f} s  {:.0f} MB/s  {:.1f} MiB  peak RSS {:.0f} MiB "
              "+ zstd child {:.0f} MiB  (runs: {})".format(
                  ours["seconds"], content / MiB / ours["seconds"], ours["size"] / MiB,
                  max(r["peak_rss_mib"] for r in runs), max(r["child_rss_mib"] for r in runs),
                  ", ".join("{:.2f}".format(r["seconds"]) for r in runs)))
        print("tar+zstd -T0:   {:.2f} s  {:.0f} MB/s  {:.1f} MiB  ({} cores; runs: {})".format(
            gnu, content / MiB / gnu, gnu_out.stat().st_size / MiB,
            os.cpu_count(), ", ".join("{:.2f}".format(g) for g, _ in gnus)))
        print("ratio (ours speed / tar+zstd speed): {:.2f}  (target >= 0.8); loadavg {}".format(
            gnu / ours["seconds"], _loadavg()))
        # CPU seconds move less with the load than wall time: on a machine
        # whose cores are all busy, the wall ratio tends to this one.
        print("CPU ratio (tar+zstd CPU / ours agent+zstd CPU), least of each: {:.2f}".format(
            min(c for _, c in gnus) / min(r["cpu_self"] + r["cpu_zstd"] for r in runs)))

        back = child("restore", [str(root), runs[-1]["path"], str(runs[-1]["size"]),
                                 runs[-1]["checksum"], str(runs[-1]["bytes"])])
        print("ours   restore: {:.2f} s  {:.0f} MB/s  peak RSS {:.0f} MiB".format(
            back["seconds"], content / MiB / back["seconds"], back["peak_rss_mib"]))

        if not a.no_restic and shutil.which("restic"):
            repo = work / "repo"
            pw = work / "pw"
            pw.write_text("bench")
            os.chmod(pw, 0o600)
            os.sync()
            first = child("restic", [str(root), str(repo), str(pw)])
            size1 = repo_size(repo)
            rnd = random.Random(2)
            all_files = sorted(f for f in root.rglob("*") if f.is_file())
            for f in rnd.sample(all_files, max(1, len(all_files) // 100)):
                f.write_bytes(os.urandom(min(f.stat().st_size, 64 * 1024)) +
                              f.read_bytes()[64 * 1024:])
            os.sync()
            second = child("restic", [str(root), str(repo), str(pw)])
            size2 = repo_size(repo)
            print("restic 1st ({}): {:.2f} s  repo {:.1f} MiB  peak RSS {:.0f} MiB  "
                  "parent {}".format(first["mode"], first["seconds"], size1 / MiB,
                                     first["peak_rss_mib"], first.get("parent")))
            print("restic 2nd (1 % changed): {:.2f} s ({:.0f} % of the 1st)  repo grew "
                  "{:.1f} MiB, parent {} (the 1st: {}); loadavg {}".format(
                      second["seconds"], 100 * second["seconds"] / first["seconds"],
                      (size2 - size1) / MiB, second.get("parent"),
                      first.get("snapshot", "")[5:13], _loadavg()))
            # restic's own floor: what a backup with nothing changed costs
            # restic alone (no agent), and its fixed parts.
            floor = child("restic-floor", [str(root), str(repo), str(pw)])
            print("restic floor (restic alone, wall / CPU s): start {:.2f}/{:.2f}; + key "
                  "derivation {:.2f}/{:.2f}; + lock {:.2f}/{:.2f}; a backup with nothing "
                  "changed {:.2f}/{:.2f} ({:.0f} % of the 1st; restic's own total_duration "
                  "{:.2f}, {} files unmodified); our planning walk (run during restic's start, "
                  "not after it) {:.2f} s; "
                  "loadavg {}".format(
                      *floor["start"], *floor["key"], *floor["key_lock"], *floor["backup"],
                      100 * floor["backup"][0] / first["seconds"], floor["restic_duration"],
                      floor["unmodified"], floor["plan"], _loadavg()))
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
