"""
A Steam Workshop install through ``twistd -n ctrlagent``, as the Panel's
workshop service sends it: the agent's own composition (``tap.py``) runs the
stand-in steamcmd image (``tests/rig/steamcmd.py``; Steam is unreachable
from the test machines) named in its ``[workshop]`` settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.test_panel_http import PANEL_ID, UUID, create_payload, ok, post, wait_status
from tests.rig.agentproc import AgentProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def steamcmd_image(docker_engine: Any) -> str:
    from tests.rig.steamcmd import build_steamcmd_image

    return build_steamcmd_image(docker_engine.host)


@pytest.mark.runtimes(
    "docker",
    reason="the steamcmd stand-in image is built on the Docker engine only (on Podman the agent"
    " would try to pull it from a registry); the helper container's path is the engine seam's,"
    " held to the same behaviour on both runtimes by tests/engine",
)
def test_the_panels_workshop_install_through_the_agent_process(
    make_agent: Callable[..., AgentProcess], scripted_image: str, steamcmd_image: str
) -> None:
    agent = make_agent(extra_config='[workshop]\nimage = "{}"\napp_id = 4000\nnetwork = "none"\n'
                       'timeout = 20\n'.format(steamcmd_image)).start()
    ok(agent, "create_server", UUID, **create_payload(scripted_image))
    wait_status(agent, PANEL_ID, "offline")

    installed = ok(agent, "install_mod", PANEL_ID, type="steam_workshop", workshopId="1001",
                   name="Stand-in Mod", downloadUrl="steam://workshop/download/1001")
    assert installed["mod"]["id"] == "1001" and installed["mod"]["size"] == 3027
    mods = agent.data_dir / UUID / "mods"
    assert (mods / "1001" / "addons" / "thing.pbo").read_bytes() == b"p" * 3000
    assert [m["id"] for m in ok(agent, "list_mods", PANEL_ID)["mods"]] == ["1001"]

    status, answer = post(agent, {"action": "install_mod", "serverId": PANEL_ID, "payload": {
        "type": "steam_workshop", "workshopId": "1004", "name": "Broken",
        "downloadUrl": "steam://workshop/download/1004"}})
    assert status == 200 and answer["success"] is False
    assert answer["code"] == "WORKSHOP_DOWNLOAD_FAILED" and "Failure" in answer["error"]
    assert sorted(os.listdir(mods)) == [".ctrlagent-mods.json", "1001"]
    assert os.listdir(agent.state_dir / "workshop") == []

    assert ok(agent, "uninstall_mod", PANEL_ID, modId="1001")["count"] == 0
    assert not (mods / "1001").exists()
