"""
Benchmark of backups: our tar+zstd archive against ``tar -I 'zstd -T0'``
on the same tree in the same run, the restore, and restic's second run
after 1 % of the files changed.

The tree is mixed: many small text files (configs, logs), a few large
incompressible ones (region files), some compressible binaries.  Reported:
seconds, MB/s of content, archive size, and the peak RSS of each of our
steps (measured in a child process, so one step's memory does not hide
another's).  Default 200 MiB; ``--size-mib 1024`` for the 1 GiB run.  The
machine is shared: level 3, one zstd thread for ours (``zstd -T0`` uses
every core for the baseline, which the report says).

    python bench/backups.py [--size-mib 200] [--no-restic] [--keep DIR]
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


def make_tree(root: Path, size: int, seed: int = 1) -> int:
    """A mixed tree of about ``size`` bytes; its file count."""
    rnd = random.Random(seed)
    files = 0
    total = 0
    words = ["w{}".format(i).encode() for i in range(500)]
    while total < size:
        kind = rnd.random()
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

    t0 = time.monotonic()
    if step == "archive":
        root, out = args
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        with open(out, "wb") as f:
            stats = write_archive(fd, f.write, IgnoreRules([]), level=3)
        result = {"bytes": stats.bytes, "size": stats.size, "files": stats.files,
                  "checksum": stats.checksum}
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

        driver = ResticDriver(ResticConfig(repository=repo, password_file=password_file),
                              cache_dir=repo + "-cache")
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        w = driver.open_writer("bench", "b{}".format(time.time()))
        stats = write_archive(fd, w.write, IgnoreRules([]), level=None)
        result = {"snapshot": w.commit(), "bytes": stats.bytes}
    else:
        raise SystemExit("unknown step")
    result["seconds"] = time.monotonic() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def repo_size(repo: Path) -> int:
    return sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--size-mib", type=int, default=200)
    p.add_argument("--no-restic", action="store_true")
    p.add_argument("--keep", default=None, help="work directory to keep (default: a temp one)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        run_child(a.child[0], a.child[1:])
        return
    work = Path(a.keep or tempfile.mkdtemp(prefix="bench-backups-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        root = work / "servers" / "srv"
        root.mkdir(parents=True)
        files = make_tree(root, a.size_mib * MiB)
        content = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print("tree: {} files, {:.0f} MiB".format(files, content / MiB))

        ours = child("archive", [str(root), str(work / "ours.tar.zst")])
        rate = content / MiB / ours["seconds"]
        print("ours   archive: {:.2f} s  {:.0f} MB/s  {:.1f} MiB  peak RSS {:.0f} MiB".format(
            ours["seconds"], rate, ours["size"] / MiB, ours["peak_rss_mib"]))

        t0 = time.monotonic()
        subprocess.run(["tar", "-C", str(root), "-I", "zstd -T0 -3", "-cf",
                        str(work / "gnu.tar.zst"), "."], check=True)
        gnu = time.monotonic() - t0
        print("tar+zstd -T0:   {:.2f} s  {:.0f} MB/s  {:.1f} MiB  ({} cores)".format(
            gnu, content / MiB / gnu, (work / "gnu.tar.zst").stat().st_size / MiB,
            os.cpu_count()))

        back = child("restore", [str(root), str(work / "ours.tar.zst"), str(ours["size"]),
                                 ours["checksum"], str(ours["bytes"])])
        print("ours   restore: {:.2f} s  {:.0f} MB/s  peak RSS {:.0f} MiB".format(
            back["seconds"], content / MiB / back["seconds"], back["peak_rss_mib"]))

        if not a.no_restic and shutil.which("restic"):
            repo = work / "repo"
            pw = work / "pw"
            pw.write_text("bench")
            os.chmod(pw, 0o600)
            first = child("restic", [str(root), str(repo), str(pw)])
            size1 = repo_size(repo)
            rnd = random.Random(2)
            all_files = sorted(f for f in root.rglob("*") if f.is_file())
            for f in rnd.sample(all_files, max(1, len(all_files) // 100)):
                f.write_bytes(os.urandom(min(f.stat().st_size, 64 * 1024)) +
                              f.read_bytes()[64 * 1024:])
            second = child("restic", [str(root), str(repo), str(pw)])
            size2 = repo_size(repo)
            print("restic 1st:     {:.2f} s  repo {:.1f} MiB  peak RSS {:.0f} MiB".format(
                first["seconds"], size1 / MiB, first["peak_rss_mib"]))
            print("restic 2nd (1 % changed): {:.2f} s  repo grew {:.1f} MiB".format(
                second["seconds"], (size2 - size1) / MiB))
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
