"""
Benchmark of the file manager against plain Python (and GNU tar) in the same run.

Measures, through ``FileManager``'s Deferred API on a real reactor:

- ``list_files`` of a directory with 10,000 entries: p50 (and p90) in ms, and
  the same with the answer turned into the Panel's JSON (``to_json`` then
  ``json.dumps``), which is what either transport pays, in wall and CPU time;
- read and write of a 64 MiB file (``read_file``/``write_file``, the agent's
  path including UTF-8 decoding and its atomic, fsync-ed write) against plain
  ``open().read()`` / ``open().write()`` (+ fsync, and without), MB/s and ratio;
- ``extract_archive`` of a ~100 MB tar.gz (150 MiB inside) against ``tar -xzf``:
  seconds and ratio (``tar_xzf_s / agent_s``; above 1 means the agent is faster).

Run: ``python bench/files.py [--workdir DIR] [--only listing|io|extract]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

from twisted.internet import task

from ctrlagent.config import FilesConfig
from ctrlagent.files.manager import FileManager
from ctrlagent.interfaces import ServerRoot
from ctrlagent.wire.json import to_json

MIB = 1024 * 1024


def _median_time(samples: list[float]) -> float:
    return statistics.median(samples)


async def bench_listing(fm: FileManager, root: ServerRoot, base: str) -> dict[str, Any]:
    d = os.path.join(base, "many")
    os.mkdir(d)
    for i in range(10_000):
        if i % 10 == 0:
            os.mkdir(os.path.join(d, "dir{:05d}".format(i)))
        else:
            with open(os.path.join(d, "file{:05d}.txt".format(i)), "w") as f:
                f.write("x")
    await fm.list_files(root, "many")  # warm caches
    times = []
    for _ in range(21):
        t0 = time.perf_counter()
        data = await fm.list_files(root, "many")
        times.append((time.perf_counter() - t0) * 1000)
    assert len(to_json(data)["files"]) == 10_000
    # Wall time and CPU time (all threads): on a shared machine the CPU
    # time is the steadier figure.
    served, served_cpu = [], []
    for _ in range(21):
        t0, c0 = time.perf_counter(), time.process_time()
        json.dumps(to_json(await fm.list_files(root, "many")))
        served.append((time.perf_counter() - t0) * 1000)
        served_cpu.append((time.process_time() - c0) * 1000)
    plain = []
    for _ in range(21):
        t0 = time.perf_counter()
        with os.scandir(d) as it:
            rows = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        rows.sort()
        plain.append((time.perf_counter() - t0) * 1000)
    times.sort()
    served.sort()
    return {"entries": 10_000, "p50_ms": round(statistics.median(times), 1),
            "p90_ms": round(times[int(len(times) * 0.9)], 1),
            "as_json_p50_ms": round(statistics.median(served), 1),
            "as_json_p90_ms": round(served[int(len(served) * 0.9)], 1),
            "as_json_cpu_p50_ms": round(statistics.median(served_cpu), 1),
            "plain_scandir_stat_p50_ms": round(statistics.median(plain), 1)}


async def bench_io(fm: FileManager, root: ServerRoot, base: str) -> dict[str, Any]:
    size = 64 * MIB
    line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
    content = (line * (size // len(line) + 1))[:size]
    path = os.path.join(base, "big.txt")
    mb = size / MIB
    agent_w, plain_w, plain_w_nosync, agent_r, plain_r = [], [], [], [], []
    for _ in range(5):
        t0 = time.perf_counter()
        await fm.write_file(root, "big.txt", content)
        agent_w.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with open(path + ".plain", "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        plain_w.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with open(path + ".plain2", "w", encoding="utf-8") as f:
            f.write(content)
        plain_w_nosync.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        data = await fm.read_file(root, "big.txt")
        agent_r.append(time.perf_counter() - t0)
        assert len(to_json(data)["content"]) == size

        t0 = time.perf_counter()
        with open(path + ".plain", encoding="utf-8") as f:
            text = f.read()
        plain_r.append(time.perf_counter() - t0)
        assert len(text) == size
    aw, pw, pwn = (mb / _median_time(x) for x in (agent_w, plain_w, plain_w_nosync))
    ar, pr = (mb / _median_time(x) for x in (agent_r, plain_r))
    return {
        "file_mib": 64,
        "write_agent_mb_s": round(aw, 1), "write_plain_fsync_mb_s": round(pw, 1),
        "write_plain_nofsync_mb_s": round(pwn, 1),
        "write_ratio_vs_fsync": round(aw / pw, 2), "write_ratio_vs_nofsync": round(aw / pwn, 2),
        "read_agent_mb_s": round(ar, 1), "read_plain_mb_s": round(pr, 1),
        "read_ratio": round(ar / pr, 2),
    }


FILES = 300


def _make_targz(path: str) -> int:
    """
    A ~100 MB tar.gz of 150 MiB of content in 300 files: two thirds
    incompressible (region files), one third text (configs, logs).
    """
    text = (b"level-seed=12345\nmotd=A Minecraft Server\n" * 30_000)[:512 * 1024]
    total = 0
    with tarfile.open(path, "w:gz", compresslevel=6) as tf:
        for i in range(FILES):
            data = os.urandom(512 * 1024) if i % 3 else text
            info = tarfile.TarInfo("world/region{:02d}/r.{}.mca".format(i % 20, i))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            total += len(data)
    return total


async def bench_extract(fm: FileManager, root: ServerRoot, base: str) -> dict[str, Any]:
    archive = os.path.join(base, "world.tar.gz")
    content = _make_targz(archive)
    agent, gnu = [], []
    for i in range(3):
        t0 = time.perf_counter()
        result = await fm.extract_archive(root, "world.tar.gz", "x{}".format(i))
        agent.append(time.perf_counter() - t0)
        assert to_json(result)["extracted"] == FILES
        dest = os.path.join(base, "t{}".format(i))
        os.mkdir(dest)
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xzf", archive, "-C", dest], check=True)
        gnu.append(time.perf_counter() - t0)
        shutil.rmtree(os.path.join(base, "x{}".format(i)))
        shutil.rmtree(dest)
    a, g = _median_time(agent), _median_time(gnu)
    return {"archive_mb": round(os.path.getsize(archive) / MIB, 1),
            "content_mb": round(content / MIB, 1), "agent_s": round(a, 2),
            "tar_xzf_s": round(g, 2), "ratio_tar_over_agent": round(g / a, 2)}


BENCHES = {"listing": ("list_files", bench_listing), "io": ("io", bench_io),
           "extract": ("extract", bench_extract)}


async def main(reactor: Any, workdir: str | None, only: str | None = None) -> None:
    base = tempfile.mkdtemp(prefix="ctrlagent-bench-", dir=workdir)
    try:
        config = FilesConfig(max_read_bytes=128 * MIB, archive_max_ratio=1000.0)
        fm = FileManager(reactor, config)
        root = ServerRoot("bench", base, None, os.getuid(), os.getgid())
        out: dict[str, Any] = {
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
        }
        for name, (key, bench) in BENCHES.items():
            if only in (None, name):
                out[key] = await bench(fm, root, base)
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--workdir", default=None, help="where to create the temp tree")
    parser.add_argument("--only", choices=sorted(BENCHES), default=None,
                        help="run one benchmark only")
    args = parser.parse_args()
    task.react(lambda reactor: __import__("twisted.internet.defer", fromlist=["Deferred"])
               .Deferred.fromCoroutine(main(reactor, args.workdir, args.only)))
