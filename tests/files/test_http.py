"""
Every file and mod action over HTTP, as the Panel sends it: the real
``AgentApi`` and ``Dispatcher`` listening on loopback, the real
``FileManager`` behind them, and the in-memory fake server manager (no Docker:
the server only has to own a data directory).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import succeed
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.util import Redirect

from ctrlagent.actions import Dispatcher
from ctrlagent.api import AgentApi
from ctrlagent.config import AgentConfig, FilesConfig
from ctrlagent.files.fetch import SafeFetcher, allow_also
from ctrlagent.files.manager import FileManager
from ctrlagent.testing.servers import FakeServerManager
from tests.api.conftest import PANEL_ID, SECRET, UUID, StaticHost, panel_headers

MOD = os.urandom(50_000)


@dataclass
class HttpAgent:
    """The running agent as the Panel sees it, plus where its files land."""

    url: str
    client: HTTPClient
    data_dir: Path
    mod_url: str
    internal_url: str

    async def command(self, action: str, **payload: Any) -> dict[str, Any]:
        body = {"action": action, "serverId": PANEL_ID, "payload": payload}
        response = await self.client.post(self.url + "/api/command",
                                          data=json.dumps(body).encode(),
                                          headers=panel_headers())
        assert response.code == 200, "the Panel marks a node offline on any non-2xx"
        answer: dict[str, Any] = json.loads(await response.content())
        return answer

    async def ok(self, action: str, **payload: Any) -> dict[str, Any]:
        answer = await self.command(action, **payload)
        assert answer["success"] is True, answer
        data: dict[str, Any] = answer.get("data") or {}
        return data


@pytest_twisted.async_yield_fixture
async def agent(tmp_path: Path) -> AsyncIterator[HttpAgent]:
    from twisted.internet import reactor

    data_dir = tmp_path / "servers"
    servers = FakeServerManager(clock=reactor, data_dir=str(data_dir))
    await servers.create_server(UUID, {"image": "game", "panelId": PANEL_ID})
    (data_dir / UUID).mkdir(parents=True)
    fetcher = SafeFetcher(reactor, policy=allow_also("127.0.0.2"))
    files = FileManager(reactor, FilesConfig(), fetcher=fetcher)
    dispatcher = Dispatcher(servers=servers, files=files, system=StaticHost(), clock=reactor)
    api = AgentApi(config=AgentConfig(node_id="node-test", secret=SECRET),
                   dispatcher=dispatcher, servers=servers, link_connected=lambda: True,
                   docker_ping=lambda: succeed(True), clock=reactor, version="test")
    port = reactor.listenTCP(0, Site(api.app.resource()),  # type: ignore[attr-defined]
                             interface="127.0.0.1")
    # A mod host (allowed) and an internal service (refused).
    internal = Resource()
    internal_port = reactor.listenTCP(0, Site(internal),  # type: ignore[attr-defined]
                                      interface="127.0.0.1")
    internal_url = "http://127.0.0.1:{}/x.jar".format(internal_port.getHost().port)
    hosted = Resource()
    from tests.files.test_mods import Blob

    hosted.putChild(b"cool-mod.jar", Blob(MOD))
    hosted.putChild(b"to-internal", Redirect(internal_url.encode()))
    mod_port = reactor.listenTCP(0, Site(hosted), interface="127.0.0.2")  # type: ignore[attr-defined]
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    try:
        yield HttpAgent("http://127.0.0.1:{}".format(port.getHost().port), client, data_dir / UUID,
                     "http://127.0.0.2:{}".format(mod_port.getHost().port), internal_url)
    finally:
        for p in (port, internal_port, mod_port):
            await p.stopListening()


@pytest_twisted.ensureDeferred
async def test_every_file_action_over_http(agent: HttpAgent) -> None:
    a = agent
    await a.ok("create_directory", path="/config")
    written = await a.ok("write_file", path="/config/server.properties", content="motd=hi\n")
    assert written["size"] == 8 and "modified" in written
    read = await a.ok("read_file", path="config/server.properties")
    assert read["content"] == "motd=hi\n" and read["encoding"] == "utf8"

    listing = await a.ok("list_files", path="/")
    assert [f["name"] for f in listing["files"]] == ["config"]
    assert listing["files"][0]["type"] == "directory"
    found = await a.ok("search_files", path="/", query="properties", fileType="file")
    assert [f["path"] for f in found["files"]] == ["/config/server.properties"]

    info = await a.ok("get_file_info", path="/config/server.properties")
    assert info["permissions"] == "644" and info["mode"] == "0644" and info["type"] == "file"
    await a.ok("set_file_permissions", path="/config/server.properties", mode="600")
    assert (await a.ok("get_file_info", path="/config/server.properties"))["mode"] == "0600"

    await a.ok("rename_file", oldPath="/config/server.properties", newPath="/config/old.props")
    assert (a.data_dir / "config" / "old.props").exists()

    await a.ok("create_archive", files=["/config"], archivePath="/backup.tar.gz",
               format="tar.gz")
    await a.ok("delete_file", path="/config")
    assert not (a.data_dir / "config").exists()
    await a.ok("extract_archive", archivePath="/backup.tar.gz", extractPath="/")
    assert (a.data_dir / "config" / "old.props").read_text() == "motd=hi\n"


@pytest_twisted.ensureDeferred
async def test_binary_round_trip_chunked_upload_then_download_over_http(agent: HttpAgent) -> None:
    blob = os.urandom(200_000) + bytes(range(256))
    encoded = base64.b64encode(blob).decode()
    # The Panel's way: <path>.chunk<N>, base64 each, then the final name.
    step = 65536
    pieces = [blob[i:i + step] for i in range(0, len(blob), step)]
    for index, piece in enumerate(pieces):
        up = await agent.ok("upload_file", path="/world/r.0.0.mca.chunk{}".format(index),
                            content=base64.b64encode(piece).decode(), encoding="base64")
        assert up["size"] == len(piece)
    done = await agent.ok("upload_file", path="/world/r.0.0.mca", content="")
    assert done["size"] == len(blob) and done["assembled"] is True
    down = await agent.ok("download_file", path="/world/r.0.0.mca")
    assert down["encoding"] == "base64" and down["size"] == len(blob)
    assert base64.b64decode(down["content"]) == blob
    # A plain, unchunked binary upload too.
    await agent.ok("upload_file", path="/plain.bin", content=encoded)
    again = await agent.ok("download_file", path="/plain.bin")
    assert base64.b64decode(again["content"]) == blob


@pytest_twisted.ensureDeferred
async def test_escapes_answer_permission_denied_over_http(agent: HttpAgent, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    os.symlink(str(secret), agent.data_dir / "link")
    for action, payload in [
        ("read_file", {"path": "../../secret.txt"}),
        ("read_file", {"path": "link"}),
        ("write_file", {"path": "link", "content": "pwned"}),
        ("set_file_permissions", {"path": "link", "mode": "777"}),
        ("rename_file", {"oldPath": "link/x", "newPath": "y"}),
        ("set_file_permissions", {"path": "/", "mode": "4755"}),
    ]:
        answer = await agent.command(action, **payload)
        assert (answer["success"], answer["code"]) == (False, "PERMISSION_DENIED"), action
    assert secret.read_text() == "top secret"
    answer = await agent.command("read_file", path="a\x00b")
    assert answer["success"] is False


@pytest_twisted.ensureDeferred
async def test_mods_over_http(agent: HttpAgent) -> None:
    installed = await agent.ok("install_mod", type="steam_workshop", workshopId="42",
                               name="Cool Mod", downloadUrl=agent.mod_url + "/cool-mod.jar")
    assert installed["mod"]["id"] == "42"
    assert (agent.data_dir / "mods" / "cool-mod.jar").read_bytes() == MOD
    listed = await agent.ok("list_mods")
    assert listed["count"] == 1 and listed["mods"][0]["name"] == "Cool Mod"
    for url in (agent.internal_url, agent.mod_url + "/to-internal"):
        answer = await agent.command("install_mod", modId="bad", modUrl=url)
        assert (answer["success"], answer["code"]) == (False, "PERMISSION_DENIED")
    left = await agent.ok("uninstall_mod", modId="42")
    assert left["count"] == 0 and left["mods"] == []
    assert not (agent.data_dir / "mods" / "cool-mod.jar").exists()
