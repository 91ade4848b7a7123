"""
Which disk mode is active, as ``/health`` and ``system_info`` say it: per
node, and per server once its directory is a subvolume.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from ctrlagent.config import AgentConfig, DiskConfig
from ctrlagent.system import disk_mode
from tests.api.conftest import ApiRig
from tests.disk.test_btrfs import OWNER, MiB, datadirs


@pytest_twisted.ensureDeferred
async def test_health_reports_the_mode_and_the_servers_not_yet_converted(
    data_root: Path,
) -> None:
    dirs = datadirs(data_root, "auto")
    dirs.start()
    await dirs.prepare("s1", OWNER, settle=True, disk_limit=5 * MiB)
    (data_root / "s2").mkdir()  # a plain directory, its server not started since
    await dirs.usage("s2")
    rig = ApiRig()
    rig.api._disk_report = lambda: dirs.report(["s1", "s2"])
    code, body, _ = await rig.get("/health")
    assert code == 200
    assert body["disk"] == {"mode": "btrfs", "servers": {"btrfs": 1, "walk": 1},
                            "walkServers": ["s2"]}
    # Converted at its start: then it counts as btrfs.
    await dirs.prepare("s2", OWNER, settle=True, disk_limit=5 * MiB)
    _, body, _ = await rig.get("/health")
    assert body["disk"] == {"mode": "btrfs", "servers": {"btrfs": 2, "walk": 0}}


def test_walk_mode_says_why_auto_chose_it(tmp_path: Path) -> None:
    dirs = datadirs(tmp_path / "servers", "auto")
    dirs.start()
    report = dirs.report(["a"])
    assert report["mode"] == "walk" and report["servers"] == {"btrfs": 0, "walk": 1}
    assert "not on btrfs" in report["reason"]


def test_system_info_names_the_nodes_mode(data_root: Path, tmp_path: Path) -> None:
    datadirs(data_root, "auto").start()
    assert disk_mode(AgentConfig(data_dir=str(data_root))) == "btrfs"
    assert disk_mode(AgentConfig(data_dir=str(data_root), disk=DiskConfig(mode="walk"))) == "walk"
    assert disk_mode(AgentConfig(data_dir=str(tmp_path))) == "walk"
