"""
Steam Workshop installs on the real engine: ``SteamCmdDownloader`` runs the
stand-in steamcmd image (``tests/rig/steamcmd.py``: Steam is unreachable from
the test machines; the stand-in takes the real command line and prints the
real lines) in a helper container, and the ``FileManager`` copies the item
into a real server directory.  Every outcome ends with no helper container
and no staging directory left.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from ctrlagent.config import AgentConfig, DockerConfig, FilesConfig, WorkshopConfig
from ctrlagent.engine import make_engine
from ctrlagent.engine.docker.client import DockerClient
from ctrlagent.errors import InsufficientResources, InvalidInput
from ctrlagent.files.manager import FileManager
from ctrlagent.files.mods import MANIFEST
from ctrlagent.files.workshop import WorkshopDownloadFailed
from ctrlagent.interfaces import ServerRoot
from ctrlagent.servers.containers import ROLE_LABEL
from ctrlagent.servers.workshop import SteamCmdDownloader
from ctrlagent.wire.json import to_json
from ctrlagent.work import Deadlines, Tracker
from tests.files.conftest import SERVER_GID, SERVER_UID, Tree

pytestmark = pytest.mark.docker

APP = 4000


@dataclass
class Steam:
    """A downloader on the shared engine, the file manager using it, and their state."""

    engine: Any
    config: AgentConfig
    files: FileManager
    downloader: SteamCmdDownloader

    def with_workshop(self, **kw: Any) -> Steam:
        config = replace(self.config, workshop=replace(self.config.workshop, **kw))
        downloader = SteamCmdDownloader(reactor, self.engine, config,
                                        self.downloader.deadlines)
        files = FileManager(reactor, FilesConfig(), workshop=downloader)
        return Steam(self.engine, config, files, downloader)

    def staging_left(self) -> list[str]:
        root = self.downloader.staging_root
        return sorted(os.listdir(root)) if os.path.isdir(root) else []


@pytest.fixture(scope="session")
def steamcmd_image(docker_engine: Any) -> str:
    from tests.rig.steamcmd import build_steamcmd_image

    return build_steamcmd_image(docker_engine.host)


@pytest_twisted.async_yield_fixture
async def steam(docker_engine: Any, steamcmd_image: str, tmp_path: Path) -> AsyncIterator[Steam]:
    config = AgentConfig(
        development=True,
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        docker=DockerConfig(host=docker_engine.host, call_timeout=15.0, pull_policy="never"),
        # The stand-in needs no network: none, so the test sends no traffic.
        workshop=WorkshopConfig(image=steamcmd_image, app_id=APP, timeout=20.0, network="none"),
    )
    client = DockerClient.from_config(reactor, config.docker)
    engine = make_engine(reactor, config, client)
    tracker = Tracker("workshop-test")
    deadlines = Deadlines(reactor, tracker, config.timeouts)
    downloader = SteamCmdDownloader(reactor, engine, config, deadlines)
    files = FileManager(reactor, FilesConfig(), workshop=downloader)
    before = await _helpers_of(engine)
    try:
        yield Steam(engine, config, files, downloader)
    finally:
        # Only the helpers this test made (there should be none left).
        for cid in await _helpers_of(engine) - before:
            await engine.remove(cid)
        await client.close()


async def _helpers_of(engine: Any) -> set[str]:
    return {c.id for c in await engine.list({ROLE_LABEL: "workshop"})
            if any(n.lstrip("/").startswith("ctrlagent-workshop-") for n in c.names)}


async def _no_helper_left(steam: Steam, before: set[str]) -> None:
    now = await _helpers(steam)
    assert now - before == set(), "a helper container was left behind"
    assert steam.staging_left() == []


async def _helpers(steam: Steam) -> set[str]:
    return await _helpers_of(steam.engine)


@pytest_twisted.ensureDeferred
async def test_the_panels_payload_installs_the_item_with_steamcmd(
    steam: Steam, tree: Tree
) -> None:
    before = await _helpers(steam)
    payload = {"type": "steam_workshop", "workshopId": "1001", "name": "Stand-in Mod",
               "downloadUrl": "steam://workshop/download/1001"}
    mod = to_json(await steam.files.install_mod(tree.root, payload))["mod"]
    assert (mod["id"], mod["fileName"], mod["size"]) == ("1001", "1001", 3027)
    folder = tree.root_path / "mods" / "1001"
    assert (folder / "addons" / "thing.pbo").read_bytes() == b"p" * 3000
    assert (folder / "mod.cpp").read_text() == 'name = "Stand-in Mod";\n'
    assert (folder / "keys" / "a.bikey").read_text() == "key\n"
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert (st.st_uid, st.st_gid) == (SERVER_UID, SERVER_GID)
    assert [m["id"] for m in to_json(await steam.files.list_mods(tree.root))["mods"]] == ["1001"]
    await _no_helper_left(steam, before)
    # The app id of the payload wins over the node's: the stand-in puts the
    # item under that app, where it is looked for.
    await steam.files.install_mod(tree.root, dict(payload, appId="107410"))
    assert (folder / "mod.cpp").exists()
    await _no_helper_left(steam, before)


@pytest_twisted.ensureDeferred
async def test_hostile_helper_output_never_reaches_outside(steam: Steam, tree: Tree) -> None:
    before = await _helpers(steam)
    outside = tree.outside_state()
    mod = to_json(await steam.files.install_mod(
        tree.root, {"type": "steam_workshop", "workshopId": "1002"}))["mod"]
    folder = tree.root_path / "mods" / "1002"
    # The link to /etc/passwd, the link to /, the FIFO and the reserved name
    # stayed behind; the success line's "../../../etc" path was never used.
    assert os.listdir(folder) == ["good.txt"] and mod["size"] == 5
    assert stat.S_ISREG(os.lstat(folder / "good.txt").st_mode)
    assert tree.outside_state() == outside
    # The item's folder itself a link to /etc: nothing is read through it.
    with pytest.raises(WorkshopDownloadFailed, match="no folder"):
        await steam.files.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "1009"})
    assert not (tree.root_path / "mods" / "1009").exists()
    assert tree.outside_state() == outside
    await _no_helper_left(steam, before)


@pytest.mark.parametrize(("item", "reason"), [
    ("1004", "Failure"),
    ("42", "File Not Found"),
    ("1005", "steamcmd exited with code 8"),
    ("1007", "no folder"),
    ("1008", "steamcmd did not report the item downloaded"),
])
@pytest_twisted.ensureDeferred
async def test_failed_downloads_are_coded_and_leave_nothing(
    steam: Steam, tree: Tree, item: str, reason: str
) -> None:
    before = await _helpers(steam)
    with pytest.raises(WorkshopDownloadFailed) as e:
        await steam.files.install_mod(tree.root, {"type": "steam_workshop", "workshopId": item,
                                                  "downloadUrl": ""})
    assert e.value.code == "WORKSHOP_DOWNLOAD_FAILED"
    assert reason in e.value.message
    assert e.value.details["workshopId"] == item and e.value.details["appId"] == APP
    mods = tree.root_path / "mods"
    assert not mods.exists() or os.listdir(mods) == []
    await _no_helper_left(steam, before)


@pytest_twisted.ensureDeferred
async def test_a_download_past_its_timeout_is_killed_and_removed(steam: Steam,
                                                                 tree: Tree) -> None:
    before = await _helpers(steam)
    quick = steam.with_workshop(timeout=2.0)
    started = reactor.seconds()
    with pytest.raises(WorkshopDownloadFailed, match="within 2 s") as e:
        await quick.files.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "1006"})
    assert reactor.seconds() - started < 15
    assert e.value.details["reason"] == "timeout"
    await _no_helper_left(quick, before)


@pytest_twisted.ensureDeferred
async def test_a_huge_item_is_stopped_at_the_limits(steam: Steam, tree: Tree) -> None:
    before = await _helpers(steam)
    small = steam.with_workshop(max_item_bytes=1024 * 1024)
    with pytest.raises(InsufficientResources, match="larger than"):
        await small.files.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "1003"})
    limited = ServerRoot("srv1", str(tree.root_path), 2 * 1024 * 1024, SERVER_UID, SERVER_GID)
    with pytest.raises(InsufficientResources, match="disk limit"):
        await steam.files.install_mod(limited, {"type": "steam_workshop", "workshopId": "1003"})
    assert os.listdir(tree.root_path / "mods") == []
    await _no_helper_left(steam, before)


@pytest_twisted.ensureDeferred
async def test_without_an_app_id_nothing_runs(steam: Steam, tree: Tree) -> None:
    before = await _helpers(steam)
    none = steam.with_workshop(app_id=0)
    with pytest.raises(InvalidInput) as e:
        await none.files.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "1001"})
    assert e.value.details["field"] == "appId"
    await _no_helper_left(none, before)
    assert not (tree.root_path / "mods" / MANIFEST).exists()


@pytest_twisted.ensureDeferred
async def test_leftovers_of_an_agent_killed_mid_download_are_swept(
    steam: Steam, tree: Tree
) -> None:
    before = await _helpers(steam)
    d = steam.downloader
    # A helper still running its download, and its staging folder, as an
    # agent killed mid-download leaves them.
    os.makedirs(os.path.join(d.staging_root, "0123456789abcdef", "steamapps"))
    cid = await steam.engine.create(d.container(
        "ctrlagent-workshop-0123456789abcdef", os.path.join(d.staging_root, "0123456789abcdef"),
        APP, "1006", (SERVER_UID, SERVER_GID)))
    await steam.engine.start(cid)
    # Another agent's helper (another state directory) is not ours to remove.
    other = SteamCmdDownloader(reactor, steam.engine, replace(
        steam.config, state_dir=steam.config.state_dir + "-other"), d.deadlines)
    theirs = await steam.engine.create(other.container(
        "ctrlagent-workshop-fedcba9876543210", str(tree.base), APP, "1006",
        (SERVER_UID, SERVER_GID)))
    try:
        await steam.files.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "1001"})
        assert await _helpers(steam) - before == {theirs}
        assert steam.staging_left() == []
    finally:
        await steam.engine.remove(theirs)
    await _no_helper_left(steam, before)
