"""
Every file and mod action over HTTP, as the Panel sends it: the real
``AgentApi`` and ``Dispatcher`` listening on loopback, the real
``FileManager`` behind them, and the in-memory fake server manager (no Docker:
the server only has to own a data directory).
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
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


# One instant with an exact binary fraction, so its millisecond form is certain.
STAMP = 1_700_000_000.25
STAMP_ISO = "2023-11-14T22:13:20.250Z"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _owner(path: Path) -> tuple[str, str]:
    st = os.stat(path)
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return user, group


def _same_bytes(data: Any, expected: Any) -> None:
    """``data`` is ``expected`` down to the order of its keys (the JSON text the Panel gets)."""
    assert json.dumps(data) == json.dumps(expected)


@pytest_twisted.ensureDeferred
async def test_file_answers_are_the_panels_shapes_to_the_byte(agent: HttpAgent) -> None:
    a = agent
    _same_bytes(await a.ok("create_directory", path="/config"), {"path": "/config"})
    written = await a.ok("write_file", path="/config/server.properties", content="motd=hi\n")
    assert list(written) == ["path", "size", "modified"] and ISO_MS.match(written["modified"])
    _same_bytes({**written, "modified": None},
                {"path": "/config/server.properties", "size": 8, "modified": None})
    props = a.data_dir / "config" / "server.properties"
    for p in (props, a.data_dir / "config"):
        os.utime(p, (STAMP, STAMP))
    os.chmod(props, 0o640)
    user, group = _owner(props)
    entry = {"name": "server.properties", "type": "file", "size": 8, "modified": STAMP_ISO,
             "lastModified": STAMP_ISO, "permissions": "640", "owner": user, "group": group,
             "path": "/config/server.properties", "extension": "properties"}
    server_id = (await a.ok("read_file", path="/config/server.properties"))["serverId"]
    assert server_id in (UUID, PANEL_ID)

    _same_bytes(await a.ok("read_file", path="/config/server.properties"),
                {"serverId": server_id, "path": "/config/server.properties",
                 "content": "motd=hi\n", "size": 8, "modified": STAMP_ISO, "encoding": "utf8"})
    _same_bytes(await a.ok("download_file", path="/config/server.properties"),
                {"serverId": server_id, "path": "/config/server.properties",
                 "content": base64.b64encode(b"motd=hi\n").decode(), "encoding": "base64",
                 "size": 8, "modified": STAMP_ISO})
    _same_bytes(await a.ok("list_files", path="/config"),
                {"serverId": server_id, "path": "/config", "files": [entry], "total": 1,
                 "offset": 0, "limit": 100_000, "truncated": False})
    user_dir, group_dir = _owner(a.data_dir / "config")
    mode_dir = "{:03o}".format(os.stat(a.data_dir / "config").st_mode & 0o777)
    _same_bytes(await a.ok("list_files", path="/", limit=1),
                {"serverId": server_id, "path": "/",
                 "files": [{"name": "config", "type": "directory", "size": 0,
                            "modified": STAMP_ISO, "lastModified": STAMP_ISO,
                            "permissions": mode_dir, "owner": user_dir, "group": group_dir,
                            "path": "/config"}],
                 "total": 1, "offset": 0, "limit": 1, "truncated": False})
    _same_bytes(await a.ok("search_files", path="/", query="PROPS", fileType="all"),
                {"serverId": server_id, "path": "/", "query": "PROPS", "files": [],
                 "truncated": False})
    _same_bytes(await a.ok("search_files", path="/", query="server"),
                {"serverId": server_id, "path": "/", "query": "server", "files": [entry],
                 "truncated": False})
    _same_bytes(await a.ok("get_file_info", path="config/server.properties"),
                {**entry, "mode": "0640"})
    _same_bytes(await a.ok("set_file_permissions", path="/config/server.properties", mode="600"),
                {"path": "/config/server.properties", "mode": "0600"})

    # Uploads: plain, chunks (one of them completing the file), and an assembly by empty upload.
    up = await a.ok("upload_file", path="/u.bin", content=base64.b64encode(b"abc").decode())
    assert list(up) == ["path", "size", "modified"] and (up["path"], up["size"]) == ("/u.bin", 3)
    _same_bytes(await a.ok("upload_file", path="/c.bin", content="YQ==", chunkIndex=0,
                           totalChunks=2),
                {"path": "/c.bin.chunk0", "size": 1, "chunk": 0, "assembled": False})
    _same_bytes(await a.ok("upload_file", path="/c.bin.chunk1", content="Yg==", totalChunks=2),
                {"path": "/c.bin.chunk1", "size": 1, "chunk": 1, "assembled": True,
                 "target": "/c.bin", "targetSize": 2})
    await a.ok("upload_file", path="/e.bin.chunk0", content="YQ==")
    joined = await a.ok("upload_file", path="/e.bin", content="")
    assert list(joined) == ["path", "size", "modified", "assembled", "chunks"]
    _same_bytes({**joined, "modified": None},
                {"path": "/e.bin", "size": 1, "modified": None, "assembled": True, "chunks": 1})

    _same_bytes(await a.ok("rename_file", oldPath="/config/server.properties",
                           newPath="config/old.props"),
                {"oldPath": "/config/server.properties", "newPath": "/config/old.props"})
    _same_bytes(await a.ok("create_archive", files=["/config"], archivePath="/b.zip",
                           format="zip"),
                {"archivePath": "/b.zip", "size": os.path.getsize(a.data_dir / "b.zip"),
                 "files": 1})
    _same_bytes(await a.ok("extract_archive", archivePath="b.zip", extractPath="/restore"),
                {"archivePath": "/b.zip", "extractPath": "/restore", "extracted": 1,
                 "skipped": 0})
    _same_bytes(await a.ok("delete_file", path="restore"),
                {"message": "deleted /restore", "path": "/restore"})


@pytest_twisted.ensureDeferred
async def test_mod_answers_are_the_panels_shapes_to_the_byte(agent: HttpAgent) -> None:
    installed = (await agent.ok("install_mod", type="steam_workshop", workshopId="42",
                                name="Cool Mod", downloadUrl=agent.mod_url + "/cool-mod.jar"))
    at = installed["mod"]["installedAt"]
    assert ISO_MS.match(at)
    source = agent.mod_url + "/cool-mod.jar"
    _same_bytes(installed, {"mod": {"id": "42", "name": "Cool Mod", "version": "",
                                    "description": "", "enabled": True,
                                    "fileName": "cool-mod.jar", "size": len(MOD),
                                    "source": source, "type": "steam_workshop",
                                    "installedAt": at}})
    listed = {"id": "42", "fileName": "cool-mod.jar", "name": "Cool Mod", "version": "",
              "description": "", "source": source, "type": "steam_workshop", "installedAt": at,
              "enabled": True, "size": len(MOD)}
    _same_bytes(await agent.ok("list_mods"), {"mods": [listed], "count": 1})
    (agent.data_dir / "up.jar").write_bytes(b"jar")
    await agent.ok("install_mod", modId="7", path="/up.jar")
    left = await agent.ok("uninstall_mod", modId="7")
    _same_bytes(left, {"mods": [listed], "count": 1})
    _same_bytes(await agent.ok("uninstall_mod", modId="42"), {"mods": [], "count": 0})
