"""
Unit tests of the kernel stats reader (``ctrlagent.engine.cgroups``) on
planted cgroup v1 and v2 trees and ``/proc`` entries: finding a container's
cgroup from its pid, the figures of ``docker stats``, the CPU rate between
reads on an injected clock.  The real kernel is the behaviour suite's
(``test_behaviour.py``, ``test_the_kernel_reader_*``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from ctrlagent.engine import cgroups
from ctrlagent.engine.interface import IStatsReader
from ctrlagent.errors import EngineError, NotFound

CID = "1b28a21ebf3eb7de2fb297c5910a2f09a6bc1af1d51b3b93f2deef4a6c346444"
PID = 4242
MB = 1024 * 1024
NET_DEV = "".join(
    line + "\n"
    for line in [
        "Inter-|   Receive                                                |  Transmit",
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets ...",
        "    lo:    9999       5    0    0    0     0          0         0     9999       5",
        "  eth0:     426       5    0    0    0     0          0         0      100       2",
        "  eth1:      74       1    0    0    0     0          0         0       20       1",
    ]
)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc(tmp: Path, cgroup_lines: str) -> Path:
    proc = tmp / "proc"
    _write(proc / str(PID) / "cgroup", cgroup_lines)
    _write(proc / str(PID) / "net" / "dev", NET_DEV)
    _write(proc / "meminfo", "MemTotal:        2048000 kB\nMemFree: 1 kB\n")
    return proc


def _v1(tmp: Path, limit: str = str(64 * MB)) -> tuple[Path, Path]:
    root = tmp / "sys"
    where = "docker/" + CID
    _write(root / "cpuacct" / where / "cpuacct.usage", "1000000000\n")
    _write(root / "memory" / where / "memory.usage_in_bytes", str(30 * MB) + "\n")
    _write(root / "memory" / where / "memory.limit_in_bytes", limit + "\n")
    _write(root / "memory" / where / "memory.stat",
           "cache 0\ninactive_file 1\nhierarchical_memory_limit {}\ntotal_rss 1\n"
           "total_inactive_file {}\n".format(limit, 10 * MB))
    _write(root / "pids" / where / "pids.current", "4\n")
    _write(root / "blkio" / where / "blkio.throttle.io_service_bytes_recursive",
           "8:0 Read 4096\n8:0 Write 8192\n8:16 Read 1\n8:0 Total 12288\nTotal 12289\n")
    lines = "".join(
        "{}:{}:/docker/{}\n".format(i, name, CID)
        for i, name in enumerate(["cpu", "cpuacct", "memory", "pids", "blkio", "name=systemd"], 1)
    ) + "0::/docker/{}\n".format(CID)
    return root, _proc(tmp, lines)


def _v2(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "sys"
    _write(root / "cgroup.controllers", "cpu io memory pids\n")
    where = root / "system.slice" / "docker-{}.scope".format(CID)
    _write(where / "cpu.stat", "usage_usec 1000000\nuser_usec 1\nsystem_usec 1\n")
    _write(where / "memory.current", str(30 * MB))
    _write(where / "memory.max", "max\n")
    _write(where / "memory.stat", "anon 1\nfile 2\ninactive_file {}\n".format(10 * MB))
    _write(where / "pids.current", "2\n")
    _write(where / "io.stat", "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2\n8:16 rbytes=1 wbytes=0\n")
    return root, _proc(tmp, "0::/system.slice/docker-{}.scope\n".format(CID))


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_v1_container_reads_as_docker_stats_with_cpu_between_reads(tmp_path: Path) -> None:
    root, proc = _v1(tmp_path)
    paths = cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root))
    assert paths is not None and paths.version == 1
    clock = Ticks()
    reader = cgroups.CgroupStatsReader(paths, clock, proc=str(proc), host_memory=2 * 1024 * MB)
    assert verifyObject(IStatsReader, reader)
    first = reader.read()
    assert first.cpu_percent == 0.0  # no earlier read: no rate yet
    assert first.memory_bytes == 20 * MB  # usage less the inactive file cache
    assert first.memory_limit_bytes == 64 * MB
    assert (first.rx_bytes, first.tx_bytes) == (500, 120)  # every interface but lo
    assert (first.blk_read, first.blk_write) == (4097, 8192)
    assert first.pids == 4
    # Half a core for two seconds: 1 s of CPU time more.  Kept files are re-read.
    (root / "cpuacct" / "docker" / CID / "cpuacct.usage").write_text("2000000000\n")
    clock.now += 2.0
    assert reader.read().cpu_percent == 50.0
    reader.close()
    with pytest.raises(NotFound):
        reader.read()


def test_a_v1_container_without_a_memory_limit_reads_the_hosts(tmp_path: Path) -> None:
    root, proc = _v1(tmp_path, limit="9223372036854771712")
    paths = cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root))
    assert paths is not None
    host = cgroups.host_memory_bytes(str(proc))
    assert host == 2048000 * 1024
    reader = cgroups.CgroupStatsReader(paths, Ticks(), proc=str(proc), host_memory=host)
    assert reader.read().memory_limit_bytes == host


def test_a_v2_container_reads_the_same_figures(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path)
    paths = cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root))
    assert paths is not None and paths.version == 2
    clock = Ticks()
    reader = cgroups.CgroupStatsReader(paths, clock, proc=str(proc), host_memory=512 * MB)
    sample = reader.read()
    assert sample.memory_bytes == 20 * MB and sample.memory_limit_bytes == 512 * MB
    assert (sample.blk_read, sample.blk_write) == (4097, 8192) and sample.pids == 2
    assert (sample.rx_bytes, sample.tx_bytes) == (500, 120)
    (Path(paths.cpu) / "cpu.stat").write_text("usage_usec 1500000\n")
    clock.now += 1.0
    assert reader.read().cpu_percent == 50.0


def test_a_pid_whose_cgroup_does_not_name_the_container_is_not_read(tmp_path: Path) -> None:
    # The engine's pid seen from another pid namespace is some other process.
    root, proc = _v1(tmp_path)
    _write(proc / str(PID) / "cgroup", "4:memory:/user.slice\n0::/user.slice\n")
    assert cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root)) is None
    assert cgroups.find_cgroup(PID + 1, CID, proc=str(proc), root=str(root)) is None
    assert cgroups.find_cgroup(0, CID, proc=str(proc), root=str(root)) is None


def test_a_missing_controller_means_no_reader(tmp_path: Path) -> None:
    root, proc = _v1(tmp_path)
    shutil.rmtree(root / "pids")
    assert cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root)) is None


def test_a_container_whose_cgroup_went_away_is_not_found(tmp_path: Path) -> None:
    root, proc = _v1(tmp_path)
    paths = cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root))
    assert paths is not None
    reader = cgroups.CgroupStatsReader(paths, Ticks(), proc=str(proc))
    shutil.rmtree(root / "memory")
    with pytest.raises(NotFound):
        reader.read()
    with pytest.raises(NotFound):
        reader.read()  # closed with it


def test_the_parsers_skip_what_they_do_not_know() -> None:
    stat = b"cache 5\ntotal_cache 7\nbad x\nlast 9"
    assert cgroups.keyed_value(stat, b"cache") == 5 and cgroups.keyed_value(stat, b"last") == 9
    assert cgroups.keyed_value(stat, b"total_cache") == 7
    assert cgroups.keyed_value(stat, b"bad") is None and cgroups.keyed_value(stat, b"ache") is None
    assert cgroups.parse_blkio("8:0 Read x\n8:0 Async 5\nTotal 7\n") == (0, 0)
    assert cgroups.parse_io_stat("8:0 rbytes=x wbytes=3 dbytes=9\n") == (0, 3)
    assert cgroups.parse_net_dev("h\nh\n  eth0: 1 2\nnocolon\n") == (0, 0)


def test_a_file_that_cannot_be_read_is_an_engine_error_not_the_end(tmp_path: Path) -> None:
    # Out of descriptors or refused: the container still runs, its figures
    # must come from elsewhere (the sampler then asks the engine's API).
    root, proc = _v1(tmp_path)
    paths = cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root))
    assert paths is not None
    usage = root / "memory" / "docker" / CID / "memory.usage_in_bytes"
    usage.unlink()
    usage.mkdir()  # read() of a directory fails with EISDIR
    reader = cgroups.CgroupStatsReader(paths, Ticks(), proc=str(proc))
    with pytest.raises(EngineError) as failure:
        reader.read()
    assert not isinstance(failure.value, NotFound)


def test_readers_keep_at_most_their_share_of_descriptors_and_read_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the share, files are opened, read and closed: same figures, nothing kept."""
    root, proc = _v1(tmp_path)
    paths = cgroups.find_cgroup(PID, CID, proc=str(proc), root=str(root))
    assert paths is not None
    kept = cgroups.KeptFiles(limit=3)
    monkeypatch.setattr(cgroups, "_KEPT", kept)
    first = cgroups.CgroupStatsReader(paths, Ticks(), proc=str(proc))
    second = cgroups.CgroupStatsReader(paths, Ticks(), proc=str(proc))
    a, b = first.read(), second.read()
    assert kept.kept == 3 and len(first._fds) + len(second._fds) == 3
    assert a == b  # the one that keeps nothing reads the same figures
    assert second.read() == b
    first.close()
    second.close()
    assert kept.kept == 0
    third = cgroups.CgroupStatsReader(paths, Ticks(), proc=str(proc))
    third.read()
    assert kept.kept == 3  # given back on close, taken again
    third.close()


def test_the_share_is_a_quarter_of_the_open_file_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert cgroups._kept_share() == soft // 4
