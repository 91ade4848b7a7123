"""
Steam Workshop installs without an engine: the Panel's payload parsed, the
outcome of steamcmd's real output lines, and the confined copy of an item
(written the way steamcmd leaves it, hostile entries included) into the
mods folder, through the ``FileManager`` and through the ``install_mod``
action on both channels (HTTP and the Panel WebSocket link).  The engine
itself is in ``test_workshop_engine.py``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ctrlagent.config import FilesConfig
from ctrlagent.errors import Conflict, InsufficientResources, InvalidInput, PermissionDenied
from ctrlagent.files.manager import FileManager
from ctrlagent.files.mods import MANIFEST, parse_install
from ctrlagent.files.paths import Components
from ctrlagent.files.workshop import IWorkshopDownloader, WorkshopDownloadFailed
from ctrlagent.interfaces import ServerRoot
from ctrlagent.servers.workshop import item_components, outcome, steamcmd_arguments
from ctrlagent.wire.json import to_json
from tests.files.conftest import SERVER_UID, Tree, snapshot

# The Panel's workshop service, exactly (steamWorkshopService.installWorkshopItem).
PANEL_PAYLOAD = {"type": "steam_workshop", "workshopId": "2009463077", "name": "Epic Mod Pack",
                 "downloadUrl": "steam://workshop/download/2009463077"}
APP = 4000

Populate = Callable[[Path], None]


def make_manager(fetcher: Any = None, workshop: Any = None) -> FileManager:
    from twisted.internet import reactor

    return FileManager(reactor, FilesConfig(), fetcher=fetcher, workshop=workshop)


@implementer(IWorkshopDownloader)
class StagedDownloader:
    """
    Plays steamcmd's part: writes the item where steamcmd would (by
    ``populate``, per item id), lends it, then removes its staging directory.
    """

    def __init__(self, base: Path, items: dict[str, Populate], *, max_item_bytes: int = 10**9,
                 max_item_entries: int = 10_000, default_app: int = APP) -> None:
        self.base = base
        self.items = items
        self.max_item_bytes = max_item_bytes
        self.max_item_entries = max_item_entries
        self.default_app = default_app
        self.calls: list[tuple[int | None, str, tuple[int, int]]] = []

    async def download(self, app_id: int | None, item_id: str, owner: tuple[int, int],
                       use: Callable[[str, Components], Awaitable[Any]]) -> Any:
        import shutil

        self.calls.append((app_id, item_id, owner))
        app = app_id or self.default_app
        staging = self.base / "staging-{}".format(len(self.calls))
        staging.mkdir(parents=True)
        try:
            if item_id not in self.items:
                raise WorkshopDownloadFailed("steamcmd could not download workshop item {} of"
                                             " app {}: File Not Found".format(item_id, app))
            item = staging.joinpath(*item_components(app, item_id))
            item.mkdir(parents=True)
            self.items[item_id](item)
            return await use(str(staging), item_components(app, item_id))
        finally:
            shutil.rmtree(staging)

    def leftovers(self) -> list[str]:
        return sorted(os.listdir(self.base)) if self.base.exists() else []


def small_mod(item: Path) -> None:
    (item / "addons").mkdir()
    (item / "mod.cpp").write_text('name = "Epic";\n')
    (item / "addons" / "thing.pbo").write_bytes(b"p" * 3000)
    (item / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(item / "run.sh", 0o4755)  # setuid: never copied as such


def hostile_mod(tree: Tree) -> Populate:
    def populate(item: Path) -> None:
        (item / "good.txt").write_text("good\n")
        os.symlink("/etc/passwd", item / "passwd")
        os.symlink(str(tree.outside / "passwd"), item / "canary")
        os.symlink(str(tree.outside), item / "outside")
        os.symlink("../../../../../../", item / "up")
        os.mkfifo(item / "pipe")
        (item / ".ctrlagent-tmp-planted").write_text("x")
        (item / "sub").mkdir()
        os.symlink("/etc", item / "sub" / "etc")
    return populate


def test_the_panels_payload_is_a_steamcmd_request() -> None:
    req = parse_install(dict(PANEL_PAYLOAD))
    assert req.workshop == (None, "2009463077")
    assert (req.mod_id, req.name, req.file_name, req.kind, req.url) == (
        "2009463077", "Epic Mod Pack", "2009463077", "steam_workshop", None)
    # The Panel's fallback item has an empty downloadUrl; an appId overrides the node's.
    assert parse_install({"type": "steam_workshop", "workshopId": "5", "downloadUrl": "",
                          "appId": "107410"}).workshop == (107410, "5")
    # An http(s) URL stays a URL download (the SSRF guard applies).
    req = parse_install({"type": "steam_workshop", "workshopId": "5",
                         "downloadUrl": "https://example.invalid/m.zip"})
    assert req.workshop is None and req.url == "https://example.invalid/m.zip"


@pytest.mark.parametrize(("params", "field"), [
    ({"type": "steam_workshop", "workshopId": "demo-mod-1", "downloadUrl": ""}, "workshopId"),
    ({"type": "steam_workshop", "workshopId": "../../etc"}, "workshopId"),
    ({"type": "steam_workshop", "workshopId": "0"}, "workshopId"),
    ({"type": "steam_workshop", "workshopId": "1" * 21}, "workshopId"),
    ({"type": "steam_workshop", "workshopId": "12",
      "downloadUrl": "steam://workshop/download/13"}, "downloadUrl"),
    ({"type": "steam_workshop", "workshopId": "12",
      "downloadUrl": "steam://workshop/download/12/../../x"}, "downloadUrl"),
    ({"type": "steam_workshop", "workshopId": "12", "appId": "x1"}, "appId"),
    ({"type": "steam_workshop", "workshopId": "12", "appId": str(2**32)}, "appId"),
    ({"type": "steam_workshop", "workshopId": "12", "fileName": "../mods"}, "fileName"),
    ({"type": "steam_workshop", "workshopId": "12", "fileName": ".ctrlagent-mods.json"},
     "fileName"),
    ({"type": "steam_workshop"}, "workshopId"),
])
def test_bad_workshop_payloads_name_their_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_install(params)
    assert e.value.details["field"] == field


def test_steamcmd_command_line_is_the_real_ones() -> None:
    assert steamcmd_arguments(4000, "123") == (
        "+force_install_dir", "/steam", "+login", "anonymous",
        "+workshop_download_item", "4000", "123", "+quit")
    assert item_components(4000, "123") == ("steamapps", "workshop", "content", "4000", "123")


BANNER = ["Redirecting stderr to '/steam/Steam/logs/stderr.txt'",
          "Steam Console Client (c) Valve Corporation - version 1716242052",
          "-- type 'quit' to exit --", "Loading Steam API...OK",
          "Connecting anonymously to Steam Public...OK", "Waiting for client config...OK",
          "Waiting for user info...OK", "Downloading item 123 ..."]


@pytest.mark.parametrize(("tail", "code", "ok", "reason"), [
    (['Success. Downloaded item 123 to "/steam/steamapps/workshop/content/4000/123"'
      ' (3026 bytes)', "Unloading Steam API...OK"], 0, True, ""),
    (["ERROR! Download item 123 failed (Failure)."], 0, False, "Failure"),
    (["ERROR! Download item 123 failed (Access Denied).Unloading Steam API...OK"], 0, False,
     "Access Denied"),
    (["\x1b[0mERROR! Download item 123 failed (Timeout).\r"], 6, False, "Timeout"),
    (["Logging in user 'x' to Steam Public...FAILED (Invalid Password)"], 5, False,
     "Logging in user 'x' to Steam Public failed (Invalid Password)"),
    (["ERROR! Not logged on."], 0, False, "Not logged on."),
    (['Success. Downloaded item 9999 to "/steam/x" (2 bytes)'], 0, False,
     "steamcmd did not report the item downloaded"),
    ([], 8, False, "steamcmd exited with code 8"),
    (['Success. Downloaded item 123 to "/x" (1 bytes)'], 139, False,
     "steamcmd exited with code 139"),
    (["ERROR! Download item 123 failed (\x07" + "A" * 500 + ")."], 0, False, "A" * 200),
])
def test_outcome_reads_steamcmds_real_lines(tail: list[str], code: int, ok: bool,
                                             reason: str) -> None:
    result = outcome(BANNER + tail, "123", code)
    assert (result.ok, result.reason) == (ok, reason.strip())


def test_staged_downloader_provides_the_interface(tmp_path: Path) -> None:
    verifyObject(IWorkshopDownloader, StagedDownloader(tmp_path, {}))


@pytest_twisted.ensureDeferred
async def test_workshop_item_installed_as_a_folder_listed_and_uninstalled(
    tree: Tree, tmp_path: Path
) -> None:
    steam = StagedDownloader(tmp_path / "steam", {"2009463077": small_mod})
    fm = make_manager(workshop=steam)
    installed = to_json(await fm.install_mod(tree.root, dict(PANEL_PAYLOAD)))
    mod = installed["mod"]
    assert (mod["id"], mod["name"], mod["fileName"], mod["type"], mod["source"], mod["size"]) == (
        "2009463077", "Epic Mod Pack", "2009463077", "steam_workshop",
        "steam://workshop/download/2009463077", 15 + 3000 + 10)
    assert steam.calls == [(None, "2009463077", (SERVER_UID, SERVER_UID))]
    folder = tree.root_path / "mods" / "2009463077"
    assert (folder / "addons" / "thing.pbo").read_bytes() == b"p" * 3000
    assert (folder / "mod.cpp").read_text() == 'name = "Epic";\n'
    for path in (folder, folder / "addons", folder / "mod.cpp", folder / "run.sh"):
        assert os.stat(path).st_uid == SERVER_UID
    assert stat.S_IMODE(os.stat(folder / "run.sh").st_mode) == 0o755  # no setuid bit
    assert stat.S_IMODE(os.stat(folder / "mod.cpp").st_mode) == 0o644
    assert set(os.listdir(tree.root_path / "mods")) == {"2009463077", MANIFEST}
    assert steam.leftovers() == []
    listed = to_json(await fm.list_mods(tree.root))
    assert [m["id"] for m in listed["mods"]] == ["2009463077"]
    assert json.loads((tree.root_path / "mods" / MANIFEST).read_text())["mods"][0]["folder"]

    # Installed again: the folder is replaced, not merged, and recorded once.
    def newer(item: Path) -> None:
        (item / "v2.txt").write_text("2")

    steam.items["2009463077"] = newer
    await fm.install_mod(tree.root, dict(PANEL_PAYLOAD))
    assert os.listdir(folder) == ["v2.txt"]
    assert len(to_json(await fm.list_mods(tree.root))["mods"]) == 1

    left = to_json(await fm.uninstall_mod(tree.root, "2009463077"))
    assert left == {"mods": [], "count": 0}
    assert os.listdir(tree.root_path / "mods") == [MANIFEST]


@pytest_twisted.ensureDeferred
async def test_hostile_item_links_and_special_files_are_left_out(
    tree: Tree, tmp_path: Path
) -> None:
    steam = StagedDownloader(tmp_path / "steam", {"66": hostile_mod(tree)})
    fm = make_manager(workshop=steam)
    before = tree.outside_state()
    mod = to_json(await fm.install_mod(tree.root, {"type": "steam_workshop",
                                                   "workshopId": "66"}))["mod"]
    folder = tree.root_path / "mods" / "66"
    assert sorted(os.listdir(folder)) == ["good.txt", "sub"]
    assert os.listdir(folder / "sub") == []
    assert mod["size"] == 5
    assert tree.outside_state() == before
    # Nothing in the server's tree is a link out or a special file.
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            assert stat.S_ISDIR(mode) or stat.S_ISREG(mode)
    # Uninstalling never follows what a game server may plant there since.
    os.symlink(str(tree.outside), folder / "planted")
    await fm.uninstall_mod(tree.root, "66")
    assert not folder.exists() and tree.outside_state() == before


@pytest_twisted.ensureDeferred
async def test_item_over_the_disk_limit_or_item_limit_leaves_nothing(
    tree: Tree, tmp_path: Path
) -> None:
    def big(item: Path) -> None:
        (item / "a.bin").write_bytes(b"a" * 40_000)
        with open(item / "sparse.bin", "wb") as f:
            f.truncate(1 << 30)  # a sparse gigabyte: counted as read, stopped early

    steam = StagedDownloader(tmp_path / "steam", {"7": big}, max_item_bytes=100_000)
    fm = make_manager(workshop=steam)
    before = snapshot(tree.root_path)
    with pytest.raises(InsufficientResources, match="larger than 100000 bytes"):
        await fm.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "7"})
    limited = ServerRoot("srv1", str(tree.root_path), 30_000, SERVER_UID, SERVER_UID)
    steam.items["7"] = lambda item: (item / "a.bin").write_bytes(b"a" * 40_000)
    with pytest.raises(InsufficientResources, match="disk limit"):
        await fm.install_mod(limited, {"type": "steam_workshop", "workshopId": "7"})
    many = StagedDownloader(tmp_path / "many", {"8": lambda item: [
        (item / str(i)).write_text("x") for i in range(20)]}, max_item_entries=10)
    with pytest.raises(InsufficientResources, match="more than 10 files"):
        await make_manager(workshop=many).install_mod(
            tree.root, {"type": "steam_workshop", "workshopId": "8"})
    # The mods folder may have been made; nothing is in it, nothing recorded.
    assert os.listdir(tree.root_path / "mods") == []
    after = snapshot(tree.root_path)
    after.pop(str(tree.root_path / "mods"))
    assert {k: v for k, v in after.items() if k != str(tree.root_path)} == {
        k: v for k, v in before.items() if k != str(tree.root_path)}
    assert steam.leftovers() == [] and many.leftovers() == []


@pytest_twisted.ensureDeferred
async def test_failed_download_is_a_coded_error_and_leaves_nothing(
    tree: Tree, tmp_path: Path
) -> None:
    steam = StagedDownloader(tmp_path / "steam", {})
    fm = make_manager(workshop=steam)
    with pytest.raises(WorkshopDownloadFailed) as e:
        await fm.install_mod(tree.root, dict(PANEL_PAYLOAD))
    assert e.value.code == "WORKSHOP_DOWNLOAD_FAILED"
    assert "File Not Found" in e.value.message
    assert not (tree.root_path / "mods").exists()
    assert to_json(await fm.list_mods(tree.root))["count"] == 0


@pytest_twisted.ensureDeferred
async def test_a_folder_that_is_not_the_mods_own_is_never_replaced(
    tree: Tree, tmp_path: Path
) -> None:
    steam = StagedDownloader(tmp_path / "steam", {"9": small_mod})
    fm = make_manager(workshop=steam)
    (tree.root_path / "mods" / "9").mkdir(parents=True)
    (tree.root_path / "mods" / "9" / "world.dat").write_text("keep")
    with pytest.raises(Conflict):
        await fm.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "9"})
    assert os.listdir(tree.root_path / "mods" / "9") == ["world.dat"]
    assert sorted(os.listdir(tree.root_path / "mods")) == ["9"]


@pytest_twisted.ensureDeferred
async def test_without_a_downloader_a_workshop_item_is_refused(tree: Tree) -> None:
    with pytest.raises(InvalidInput, match="not set up"):
        await make_manager().install_mod(tree.root, dict(PANEL_PAYLOAD))


@pytest_twisted.ensureDeferred
async def test_the_panels_http_workshop_url_keeps_the_ssrf_guard(tree: Tree,
                                                                  tmp_path: Path) -> None:
    """A steam_workshop payload with an http(s) downloadUrl is a guarded download."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from ctrlagent.files.fetch import SafeFetcher

    hits: list[bytes] = []

    class Internal(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            hits.append(request.uri)
            return b"internal secret"

    port = reactor.listenTCP(0, Site(Internal()), interface="127.0.0.1")  # type: ignore[attr-defined]
    steam = StagedDownloader(tmp_path / "steam", {})
    try:
        fm = make_manager(fetcher=SafeFetcher(reactor), workshop=steam)
        url = "http://127.0.0.1:{}/mod.zip".format(port.getHost().port)
        with pytest.raises(PermissionDenied):
            await fm.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "5",
                                             "name": "x", "downloadUrl": url})
        for internal in ("http://169.254.169.254/latest/meta-data/", "http://[::1]:80/x",
                         "http://localhost/x"):
            with pytest.raises((PermissionDenied, InvalidInput)):
                await fm.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "5",
                                                 "downloadUrl": internal})
    finally:
        await port.stopListening()
    assert hits == [] and steam.calls == []
    assert os.listdir(tree.root_path / "mods") == []


# -- the action, on both channels ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_panels_payload_over_http_and_the_websocket_link(tmp_path: Path) -> None:
    from treq.client import HTTPClient
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.server import Site

    from ctrlagent.actions import Dispatcher
    from ctrlagent.api import AgentApi
    from ctrlagent.config import AgentConfig
    from ctrlagent.panel.link import PanelLink
    from ctrlagent.testing.panel import FakePanel
    from ctrlagent.testing.servers import FakeServerManager
    from tests.api.conftest import PANEL_ID, SECRET, UUID, StaticHost, panel_headers
    from tests.panel.test_link_loopback import fast_config, until, within

    data_dir = tmp_path / "servers"
    servers = FakeServerManager(clock=reactor, data_dir=str(data_dir))
    await servers.create_server(UUID, {"image": "game", "panelId": PANEL_ID})
    (data_dir / UUID).mkdir(parents=True)
    steam = StagedDownloader(tmp_path / "steam", {"2009463077": small_mod, "77": small_mod})
    files = make_manager(workshop=steam)
    dispatcher = Dispatcher(servers=servers, files=files, system=StaticHost(), clock=reactor)

    # HTTP: POST /api/command exactly as externalAgentService.installMod sends it.
    api = AgentApi(config=AgentConfig(node_id="node-test", secret=SECRET),
                   dispatcher=dispatcher, servers=servers, link_connected=lambda: True,
                   docker_ping=lambda: succeed(True), clock=reactor, version="test")
    port = reactor.listenTCP(0, Site(api.app.resource()),  # type: ignore[attr-defined]
                             interface="127.0.0.1")
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    panel = FakePanel(reactor, SECRET)
    listening = reactor.listenTCP(0, panel.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    config = fast_config(listening.getHost().port)
    link = PanelLink(reactor, AgentConfig(node_id="node-1", secret=SECRET, development=True,
                                          panel=config.panel),
                     dispatcher, servers, lambda: succeed({"os": "linux"}),
                     lambda: succeed({"cpu": 1.0}))
    try:
        url = "http://127.0.0.1:{}/api/command".format(port.getHost().port)

        async def post(action: str, payload: dict[str, Any]) -> dict[str, Any]:
            body = {"action": action, "serverId": PANEL_ID, "payload": payload}
            response = await client.post(url, data=json.dumps(body).encode(),
                                         headers=panel_headers())
            assert response.code == 200
            answer: dict[str, Any] = json.loads(await response.content())
            return answer

        answer = await post("install_mod", dict(PANEL_PAYLOAD))
        assert answer["success"] is True, answer
        assert answer["data"]["mod"]["id"] == "2009463077"
        assert (data_dir / UUID / "mods" / "2009463077" / "mod.cpp").exists()
        failed = await post("install_mod", {"type": "steam_workshop", "workshopId": "404",
                                            "name": "Gone",
                                            "downloadUrl": "steam://workshop/download/404"})
        assert failed["success"] is False
        assert failed["code"] == "WORKSHOP_DOWNLOAD_FAILED"
        assert "File Not Found" in failed["error"]

        # The WebSocket link: the same payload in a command frame.
        link.startService()
        await within(panel.wait_for_frame("system_info", 1))
        panel.send({"id": "w1", "type": "command", "action": "install_mod", "serverId": PANEL_ID,
                    "payload": {"type": "steam_workshop", "workshopId": "77", "name": "Other",
                                "downloadUrl": "steam://workshop/download/77"}})
        panel.send({"id": "w2", "type": "command", "action": "install_mod", "serverId": PANEL_ID,
                    "payload": {"type": "steam_workshop", "workshopId": "demo-mod-1",
                                "name": "Demo", "downloadUrl": ""}})
        await until(lambda: {"w1", "w2"} <= set(panel.responses()))
        w1 = panel.responses()["w1"][0]
        assert w1["success"] is True and w1["data"]["mod"]["fileName"] == "77"
        w2 = panel.responses()["w2"][0]
        assert w2["success"] is False and w2["error"]["code"] == "INVALID_PAYLOAD"
        panel.send({"id": "w3", "type": "command", "action": "list_mods", "serverId": PANEL_ID})
        await until(lambda: "w3" in panel.responses())
        listed = panel.responses()["w3"][0]["data"]["mods"]
        assert sorted(m["id"] for m in listed) == ["2009463077", "77"]
        assert steam.leftovers() == []
    finally:
        if link.running:
            await link.stopService()
        await listening.stopListening()
        await port.stopListening()


def test_the_failure_code_is_a_listed_protocol_code() -> None:
    from ctrlagent.wire.tables import ERROR_CODES, REST_STATUS

    assert WorkshopDownloadFailed.code in ERROR_CODES
    assert REST_STATUS[WorkshopDownloadFailed.code] == 502


@pytest.mark.parametrize(("table", "message"), [
    ({"app_id": -1}, "workshop.app_id"),
    ({"app_id": 2**32}, "workshop.app_id"),
    ({"timeout": 0}, "workshop.timeout"),
    ({"timeout": "nan"}, "workshop.timeout"),
    ({"image": " "}, "workshop.image"),
    ({"steamcmd": ""}, "workshop.steamcmd"),
    ({"max_item_bytes": 0}, "workshop.max_item_bytes"),
    ({"max_item_entries": -5}, "workshop.max_item_entries"),
    ({"network": ""}, "workshop.network"),
    ({"imgae": "x"}, "workshop.imgae"),
])
def test_workshop_settings_that_cannot_work_are_refused(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    from ctrlagent.config import load_config
    from ctrlagent.errors import ConfigInvalid

    lines = ["[workshop]"] + ["{} = {}".format(k, json.dumps(v)) for k, v in table.items()]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigInvalid, match=message.replace(".", r"\.")):
        load_config(str(path), environ={}, overrides={"development": True})


def test_workshop_settings_are_read_from_the_file(tmp_path: Path) -> None:
    from ctrlagent.config import load_config

    path = tmp_path / "agent.toml"
    path.write_text('[workshop]\nimage = "example/steamcmd:1"\napp_id = 107410\ntimeout = 90\n')
    config = load_config(str(path), environ={}, overrides={"development": True}).workshop
    assert (config.image, config.app_id, config.timeout) == ("example/steamcmd:1", 107410, 90.0)


@pytest_twisted.ensureDeferred
async def test_odd_names_are_left_out_and_a_too_deep_item_refused(
    tree: Tree, tmp_path: Path
) -> None:
    def odd(item: Path) -> None:
        (item / "ok.txt").write_text("ok")
        os.close(os.open(os.path.join(os.fsencode(item), b"bad-\xff-name"),
                         os.O_CREAT | os.O_WRONLY, 0o644))
        (item / "..." ).write_text("dots are a name")

    def deep(item: Path) -> None:
        os.makedirs(item.joinpath(*["d"] * 70))

    steam = StagedDownloader(tmp_path / "steam", {"11": odd, "12": deep})
    fm = make_manager(workshop=steam)
    await fm.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "11"})
    assert sorted(os.listdir(tree.root_path / "mods" / "11")) == ["...", "ok.txt"]
    with pytest.raises(WorkshopDownloadFailed, match="deeper than 64"):
        await fm.install_mod(tree.root, {"type": "steam_workshop", "workshopId": "12"})
    assert set(os.listdir(tree.root_path / "mods")) == {"11", MANIFEST}
    assert [m["id"] for m in to_json(await fm.list_mods(tree.root))["mods"]] == ["11"]


def test_the_item_id_may_come_from_the_steam_url_alone() -> None:
    req = parse_install({"type": "steam_workshop", "name": "From URL",
                         "downloadUrl": "steam://workshop/download/0042"})
    assert req.workshop == (None, "42") and req.mod_id == "42"
    assert parse_install({"type": "steam_workshop", "workshopId": 42,
                          "downloadUrl": "steam://workshop/download/042/"}).workshop == (None, "42")
    with pytest.raises(InvalidInput) as e:
        parse_install({"type": "steam_workshop", "downloadUrl": "steam://workshop/download/x"})
    assert e.value.details["field"] == "downloadUrl"
    with pytest.raises(InvalidInput) as e:
        parse_install({"type": "steam_workshop", "modId": "7",
                       "downloadUrl": "steam://rungame/4000"})
    assert e.value.details["field"] == "downloadUrl"
