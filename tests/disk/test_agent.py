"""
The agent as a whole on a btrfs data directory (``twistd -n ctrlagent``, the
shared engine): ``/health`` says btrfs; a server's existing plain directory
becomes a subvolume at its install, with its files; the limit follows
``update_server``; ``delete_server`` with purge deletes the subvolume.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ctrlagent.files import btrfs
from tests.disk.test_btrfs import MiB, subvolume
from tests.e2e.conftest import make_agent  # noqa: F401 (fixture)
from tests.e2e.test_panel_http import create_payload, ok, wait_status
from tests.rig.agentproc import AgentProcess

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


def test_a_servers_directory_is_a_subvolume_whose_qgroup_follows_its_limit(
    make_agent: Callable[..., AgentProcess],  # noqa: F811 (the imported fixture)
    data_root: Path, scripted_image: str,
) -> None:
    agent = make_agent(workdir=data_root / "agent").start()
    health = agent.health()
    assert health["disk"]["mode"] == "btrfs", health
    server_id = "diske2e{}".format(os.getpid())
    home = agent.data_dir / server_id
    # What an older agent left: a plain directory with the server's files.
    home.mkdir()
    (home / "world.dat").write_bytes(b"w" * 50_000)
    os.symlink("world.dat", home / "link")
    ok(agent, "create_server", server_id, **create_payload(scripted_image))
    wait_status(agent, server_id, "offline", timeout=60)
    sub = subvolume(home)
    assert sub is not None
    assert btrfs.limit_of(sub) == 100 * MiB
    assert (home / "world.dat").read_bytes() == b"w" * 50_000
    assert os.readlink(home / "link") == "world.dat"
    assert agent.health()["disk"]["servers"] == {"btrfs": 1, "walk": 0}
    ok(agent, "update_server", server_id, limits={"disk": 30})
    assert btrfs.limit_of(sub) == 30 * MiB
    ok(agent, "delete_server", server_id, purgeFiles=True)
    assert not home.exists()
