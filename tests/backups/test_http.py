"""
The archive download over real HTTP on loopback (a Klein route as the API
would declare it, ``treq`` as the client): whole, one range, and a range
that selects nothing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.web.server import Site

from ctrlagent.backups.http import serve_download
from tests.backups.rig import Rig, make_rig


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    (r.root() / "noise").write_bytes(os.urandom(3 * 1024 * 1024))
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


@pytest_twisted.ensureDeferred
async def test_download_over_http_whole_ranged_and_unsatisfiable(rig: Rig) -> None:
    m = rig.manager()
    m.startService()
    await m.ready
    answer = await m.create_backup("srv1")
    record = await m.finished(answer["backupId"])
    with open(os.path.join(rig.config.directory, record.location or ""), "rb") as f:
        whole = f.read()

    app = Klein()

    @app.route("/api/servers/<server_id>/backups/<backup_id>/download", methods=["GET"])
    async def download(request: Any, server_id: str, backup_id: str) -> bytes:
        return await serve_download(request, m, server_id, backup_id)

    port = reactor.listenTCP(0, Site(app.resource()), interface="127.0.0.1")
    try:
        url = "http://127.0.0.1:{}/api/servers/srv1/backups/{}/download".format(
            port.getHost().port, record.id)
        r = await treq.get(url)
        assert r.code == 200
        assert await r.content() == whole
        assert r.headers.getRawHeaders("accept-ranges") == ["bytes"]
        assert r.headers.getRawHeaders("etag") == ['"{}"'.format(record.checksum)]
        r = await treq.get(url, headers={"Range": "bytes=1000-1999"})
        assert r.code == 206 and await r.content() == whole[1000:2000]
        assert r.headers.getRawHeaders("content-range") == [
            "bytes 1000-1999/{}".format(len(whole))]
        r = await treq.get(url, headers={"Range": "bytes={}-".format(len(whole))})
        assert r.code == 416
        assert r.headers.getRawHeaders("content-range") == ["bytes */{}".format(len(whole))]
        await r.content()
    finally:
        await port.stopListening()
