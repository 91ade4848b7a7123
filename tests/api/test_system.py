"""SystemInfo (the IHost): real host figures from /proc and statvfs, as wire.node records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from ctrlagent.config import AgentConfig
from ctrlagent.interfaces import IHost
from ctrlagent.system import (
    CAPABILITIES,
    SystemInfo,
    cpu_percent,
    disk_usage,
    read_cpu_times,
    read_meminfo,
)
from ctrlagent.wire.json import to_json
from ctrlagent.wire.node import NetworkAddress


def test_cpu_times_skip_guest_and_count_iowait_as_idle(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 50 0 0 0 999 999\ncpu0 1 2 3 4\n")
    assert read_cpu_times(str(stat)) == (150, 1000)


def test_cpu_percent_between_samples() -> None:
    assert cpu_percent((100, 1000), (150, 1100)) == 50.0
    assert cpu_percent((100, 1000), (100, 1000)) == 0.0  # no time passed


def test_meminfo_in_bytes(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2048 kB\nMemAvailable: 1024 kB\nHugePages_Total: 0\n")
    assert read_meminfo(str(meminfo)) == {
        "MemTotal": 2 << 20,
        "MemAvailable": 1 << 20,
        "HugePages_Total": 0,
    }


def test_disk_usage_of_a_not_yet_created_data_dir(tmp_path: Path) -> None:
    total, used, free = disk_usage(str(tmp_path / "servers" / "later"))
    assert total > 0 and 0 <= used <= total and 0 < free <= total


@pytest_twisted.ensureDeferred
async def test_snapshot_has_real_numbers(tmp_path: Path) -> None:
    info = SystemInfo(reactor, AgentConfig(data_dir=str(tmp_path)))
    first = await info.snapshot()
    second = await info.snapshot()
    for record in (first, second):
        snap = to_json(record)
        assert 0.0 <= snap["cpu"] <= 100.0
        assert snap["memory"]["total"] > snap["memory"]["used"] > 0
        assert snap["disk"]["total"] >= snap["disk"]["used"] > 0
        assert snap["uptime"] > 0 and len(snap["load"]) == 3
    load = to_json(await info.system_load())
    assert set(load) == {"cpu", "memory", "disk"}
    assert all(0.0 <= value <= 100.0 for value in load.values())


@pytest_twisted.ensureDeferred
async def test_the_host_records_have_the_panels_keys(tmp_path: Path) -> None:
    # Exactly the keys the Panel has always read, in JSON types.
    host = SystemInfo(Clock(), AgentConfig(data_dir=str(tmp_path)), lambda: succeed("27.5.1"))
    verifyObject(IHost, host)
    snap = to_json(await host.snapshot())
    assert list(snap) == [
        "cpu", "cpuCount", "memory", "disk", "uptime", "load", "timestamp",
    ]
    assert list(snap["memory"]) == list(snap["disk"]) == ["total", "used", "free", "percent"]
    assert isinstance(snap["load"], list) and snap["timestamp"].endswith("Z")
    assert list(to_json(await host.system_load())) == ["cpu", "memory", "disk"]
    info = to_json(await host.system_info())
    assert list(info) == [
        "nodeId", "agentVersion", "version", "hostname", "os", "platform", "release", "arch",
        "cpu", "cpuCount", "cpus", "memory", "totalMemory", "freeMemory", "totalDisk",
        "freeDisk", "uptime", "loadAverage", "dockerVersion", "docker", "capabilities",
        "networks", "timestamp", "diskMode",
    ]
    assert info["diskMode"] in ("btrfs", "walk")
    assert info["version"] == info["agentVersion"] and info["cpus"] == info["cpuCount"]
    assert isinstance(info["loadAverage"], list) and isinstance(info["capabilities"], list)
    # The whole answer is JSON as it stands (no record, tuple or NaN left in it).
    assert json.loads(json.dumps(info, allow_nan=False)) == info
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap


def test_network_addresses_have_nodes_shape_per_family() -> None:
    v4 = NetworkAddress(address="10.0.0.2", netmask="255.0.0.0", family="IPv4", internal=False)
    v6 = NetworkAddress(address="::1", prefix_length=128, family="IPv6", internal=True)
    assert to_json(v4) == {
        "address": "10.0.0.2", "netmask": "255.0.0.0", "family": "IPv4", "internal": False,
    }
    assert to_json(v6) == {
        "address": "::1", "prefixLength": 128, "family": "IPv6", "internal": True,
    }


@pytest_twisted.ensureDeferred
async def test_system_info_union_shape(tmp_path: Path) -> None:
    info = SystemInfo(
        Clock(), AgentConfig(node_id="n-7", data_dir=str(tmp_path)), lambda: succeed("27.5.1")
    )
    data = to_json(await info.system_info())
    assert data["nodeId"] == "n-7"
    assert data["os"] == data["platform"] == "linux"
    assert data["arch"] and data["cpu"] and data["cpuCount"] >= 1
    assert data["memory"] == data["totalMemory"] > data["freeMemory"] > 0
    assert data["totalDisk"] >= data["freeDisk"] > 0
    assert data["dockerVersion"] == "27.5.1"
    assert data["capabilities"] == CAPABILITIES
    assert "lo" in data["networks"]
    assert {"address": "127.0.0.1", "family": "IPv4"}.items() <= data["networks"]["lo"][0].items()


@pytest_twisted.ensureDeferred
async def test_system_info_without_docker(tmp_path: Path) -> None:
    def broken() -> object:
        raise ConnectionRefusedError("no engine")

    info = SystemInfo(Clock(), AgentConfig(data_dir=str(tmp_path)), broken)  # type: ignore[arg-type]
    data = to_json(await info.system_info("other"))
    assert data["nodeId"] == "other" and data["dockerVersion"] is None and data["docker"] is False
