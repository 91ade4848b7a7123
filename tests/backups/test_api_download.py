"""
The agent's own API route for backup archives
(``GET``/``HEAD /api/servers/{id}/backups/{backupId}/download``): the real
``AgentApi`` on loopback over a real ``BackupManager``, wired as tap.py
wires it; behind the API's authentication, with ``Range``, and errors as
the REST surface's JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.web.server import Site

from ctrlagent import __version__
from ctrlagent.actions import Dispatcher
from ctrlagent.api.app import AgentApi
from ctrlagent.backups.http import serve_download
from ctrlagent.backups.manager import BackupManager
from ctrlagent.config import AgentConfig
from ctrlagent.testing.files import FakeFileManager
from tests.actions.rig import FakeHost
from tests.backups.rig import Rig, make_rig

SECRET = "download-secret"
AUTH = {"Authorization": "Bearer " + SECRET}


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    (r.root() / "noise").write_bytes(os.urandom(1024 * 1024))
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


def _api(rig: Rig, manager: BackupManager | None) -> AgentApi:
    config = AgentConfig(secret=SECRET)
    dispatcher = Dispatcher(servers=rig.servers, files=FakeFileManager(reactor),
                            system=FakeHost(), clock=reactor, backups=manager)

    def download(request: Any, server_id: str, backup_id: str) -> Any:
        assert manager is not None
        return serve_download(request, manager, server_id, backup_id)

    return AgentApi(config=config, dispatcher=dispatcher, servers=rig.servers,
                    link_connected=lambda: True, docker_ping=lambda: succeed(True),
                    clock=reactor, version=__version__,
                    backup_download=None if manager is None else download)


async def _serve(api: AgentApi) -> tuple[Any, str]:
    port = reactor.listenTCP(0, Site(api.app.resource()), interface="127.0.0.1")
    return port, "http://127.0.0.1:{}/api/servers/".format(port.getHost().port)


@pytest_twisted.ensureDeferred
async def test_the_api_serves_an_archive_whole_ranged_and_head_behind_its_auth(
    rig: Rig,
) -> None:
    m = rig.manager()
    m.startService()
    await m.ready
    record = await m.finished((await m.create_backup("srv1"))["backupId"])
    with open(os.path.join(rig.config.directory, record.location or ""), "rb") as f:
        whole = f.read()
    port, base = await _serve(_api(rig, m))
    try:
        url = base + "srv1/backups/{}/download".format(record.id)
        r = await treq.get(url)
        assert r.code == 401
        assert json.loads(await r.content())["code"] == "AUTH_FAILED"
        r = await treq.get(url, headers={"X-API-Key": "wrong"})
        assert r.code == 401
        await r.content()

        r = await treq.get(url, headers=AUTH)
        assert r.code == 200 and await r.content() == whole
        r = await treq.get(url, headers={**AUTH, "Range": "bytes=100-4195"})
        assert r.code == 206 and await r.content() == whole[100:4196]
        assert r.headers.getRawHeaders("content-range") == [
            "bytes 100-4195/{}".format(len(whole))]
        r = await treq.get(url, headers={**AUTH, "Range": "bytes=-10"})
        assert r.code == 206 and await r.content() == whole[-10:]
        r = await treq.get(url, headers={**AUTH, "Range": "bytes={}-".format(len(whole) + 5)})
        assert r.code == 416
        await r.content()
        r = await treq.head(url, headers=AUTH)
        assert r.code == 200
        assert r.headers.getRawHeaders("content-length") == [str(len(whole))]
        assert await r.content() == b""
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_unknown_backups_and_servers_are_404_json_and_no_backups_is_409(
    rig: Rig,
) -> None:
    m = rig.manager()
    m.startService()
    await m.ready
    other = rig.add_server("srv2")
    (other / "f").write_text("x")
    theirs = await m.finished((await m.create_backup("srv2"))["backupId"])
    port, base = await _serve(_api(rig, m))
    try:
        for path, code, error in (
            ("srv1/backups/nope/download", 404, "NOT_FOUND"),
            # Another server's backup is not found either, exactly as an unknown one.
            ("srv1/backups/{}/download".format(theirs.id), 404, "NOT_FOUND"),
            ("nobody/backups/{}/download".format(theirs.id), 404, "SERVER_NOT_FOUND"),
        ):
            r = await treq.get(base + path, headers=AUTH)
            body = json.loads(await r.content())
            assert (r.code, body["success"], body["code"]) == (code, False, error), path
    finally:
        await port.stopListening()
    port, base = await _serve(_api(rig, None))
    try:
        r = await treq.get(base + "srv1/backups/x/download", headers=AUTH)
        body = json.loads(await r.content())
        assert (r.code, body["code"]) == (409, "CONFLICT")
    finally:
        await port.stopListening()
