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


async def _raw_get(port: int, path: str, read: int) -> bytes:
    """A client that asks for ``path``, reads ``read`` bytes and hangs up."""
    import socket

    from twisted.internet.threads import deferToThread

    def go() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall("GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n".format(
                path, AUTH["Authorization"]).encode())
            got = b""
            while len(got) < read:
                try:
                    part = s.recv(read - len(got))
                except ConnectionResetError:
                    break  # cut by the agent
                if not part:
                    break
                got += part
            return got

    return await deferToThread(go)


@pytest_twisted.ensureDeferred
async def test_a_client_that_hangs_up_mid_download_costs_nothing_and_the_next_one_is_served(
    rig: Rig,
) -> None:
    # The suite fails on any logged error: a hang-up must not log a traceback.
    (rig.root() / "more").write_bytes(os.urandom(8 * 1024 * 1024))
    m = rig.manager()
    m.startService()
    await m.ready
    record = await m.finished((await m.create_backup("srv1"))["backupId"])
    port, base = await _serve(_api(rig, m))
    path = "/api/servers/srv1/backups/{}/download".format(record.id)
    try:
        for _ in range(3):
            head = await _raw_get(port.getHost().port, path, 4096)
            assert head.startswith(b"HTTP/1.1 200")
        r = await treq.get(base + "srv1/backups/{}/download".format(record.id), headers=AUTH)
        assert r.code == 200 and len(await r.content()) == record.size
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_read_that_fails_mid_download_cuts_the_connection_with_one_warning(
    rig: Rig, monkeypatch: Any
) -> None:
    from twisted.logger import globalLogPublisher

    from ctrlagent.backups.manager import BackupDownload

    (rig.root() / "more").write_bytes(os.urandom(4 * 1024 * 1024))
    m = rig.manager()
    m.startService()
    await m.ready
    record = await m.finished((await m.create_backup("srv1"))["backupId"])
    real = BackupDownload.read
    calls: list[int] = []

    def failing(self: Any, n: int) -> Any:
        calls.append(n)
        if len(calls) > 2:
            raise OSError(5, "Input/output error")
        return real(self, n)

    monkeypatch.setattr(BackupDownload, "read", failing)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    port, base = await _serve(_api(rig, m))
    try:
        got = await _raw_get(port.getHost().port,
                             "/api/servers/srv1/backups/{}/download".format(record.id),
                             record.size + 10_000)
        assert got.startswith(b"HTTP/1.1 200")
        # Cut short: the client never takes a short body for the whole archive.
        assert len(got) < record.size
    finally:
        globalLogPublisher.removeObserver(seen.append)
        await port.stopListening()
    cut = [e for e in seen if "download cut short" in e.get("log_format", "")]
    assert len(cut) == 1 and not cut[0].get("log_failure")
