"""
Mods and their downloads: install/list/uninstall through ``FileManager``, and
the SSRF rules of ``SafeFetcher`` against real HTTP servers on loopback.

Two servers: one on 127.0.0.1 plays an internal service (it counts every
connection it receives, which must stay zero), one on 127.0.0.2 plays a public
mod host (the tests' policy allows exactly that address).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.util import Redirect

from ctrlagent.errors import (
    Conflict,
    FileNotFound,
    InsufficientResources,
    InvalidInput,
    PermissionDenied,
)
from ctrlagent.files.fetch import DownloadError, SafeFetcher, allow_also, public_only
from ctrlagent.files.mods import MANIFEST
from ctrlagent.wire.json import to_json
from tests.files.conftest import Tree, make_manager

MOD = os.urandom(100_000)


class CountingSite(Site):
    """A Site that counts the connections it accepted."""

    connections = 0

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        self.connections += 1
        return super().buildProtocol(addr)


class Blob(Resource):
    isLeaf = True

    def __init__(self, data: bytes, length: bool = True) -> None:
        super().__init__()
        self.data = data
        self.length = length

    def render_GET(self, request: Request) -> bytes | int:  # noqa: N802
        if not self.length:
            # No Content-Length: the cap must hold while streaming.
            request.write(self.data)
            request.finish()
            return NOT_DONE_YET
        return self.data


class Hang(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> int:  # noqa: N802
        return NOT_DONE_YET


@dataclass
class Hosts:
    internal: CountingSite
    internal_url: str
    public_url: str


@pytest_twisted.async_yield_fixture
async def hosts() -> AsyncIterator[Hosts]:
    from twisted.internet import reactor

    internal_root = Resource()
    internal_root.putChild(b"mod.jar", Blob(MOD))
    internal = CountingSite(internal_root)
    p1 = reactor.listenTCP(0, internal, interface="127.0.0.1")  # type: ignore[attr-defined]
    internal_url = "http://127.0.0.1:{}".format(p1.getHost().port)

    public_root = Resource()
    public_root.putChild(b"mod.jar", Blob(MOD))
    public_root.putChild(b"stream.jar", Blob(MOD, length=False))
    public_root.putChild(b"hang", Hang())
    public_root.putChild(b"to-internal",
                         Redirect((internal_url + "/mod.jar").encode()))
    public_root.putChild(b"to-localhost", Redirect(
        "http://localhost:{}/mod.jar".format(p1.getHost().port).encode()))
    public_root.putChild(b"to-file", Redirect(b"file:///etc/passwd"))
    public_root.putChild(b"loop", Redirect(b"/loop"))
    public_root.putChild(b"missing", notFound())
    public_site = Site(public_root)
    p2 = reactor.listenTCP(0, public_site, interface="127.0.0.2")  # type: ignore[attr-defined]
    public_url = "http://127.0.0.2:{}".format(p2.getHost().port)
    public_root.putChild(b"to-public", Redirect((public_url + "/mod.jar").encode()))
    try:
        yield Hosts(internal, internal_url, public_url)
    finally:
        await p1.stopListening()
        await p2.stopListening()


def _fetcher(**kw: Any) -> SafeFetcher:
    from twisted.internet import reactor

    return SafeFetcher(reactor, policy=allow_also("127.0.0.2"), **kw)


async def _fetch(fetcher: SafeFetcher, url: str, max_bytes: int = 10**7,
                 timeout: float = 10.0) -> bytes:
    got: list[bytes] = []

    async def sink(data: bytes) -> None:
        got.append(data)

    await fetcher.fetch(url, sink, max_bytes, timeout)
    return b"".join(got)


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.0.0.1", "192.168.1.1", "172.16.0.1",
                                  "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
                                  "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
                                  "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                                  "2002:7f00:1::", "ff02::1", "64:ff9b::a00:1"])
def test_default_policy_refuses_internal_addresses(addr: str) -> None:
    assert public_only(ipaddress.ip_address(addr)) is False


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_default_policy_allows_public_addresses(addr: str) -> None:
    assert public_only(ipaddress.ip_address(addr)) is True


@pytest_twisted.ensureDeferred
async def test_fetch_from_allowed_host(hosts: Hosts) -> None:
    assert await _fetch(_fetcher(), hosts.public_url + "/mod.jar") == MOD
    assert await _fetch(_fetcher(), hosts.public_url + "/stream.jar") == MOD
    assert await _fetch(_fetcher(), hosts.public_url + "/to-public") == MOD


@pytest.mark.parametrize("path", ["direct", "/to-internal", "/to-localhost"])
@pytest_twisted.ensureDeferred
async def test_internal_address_refused_before_any_request(hosts: Hosts, path: str) -> None:
    url = hosts.internal_url + "/mod.jar" if path == "direct" else hosts.public_url + path
    with pytest.raises(PermissionDenied):
        await _fetch(_fetcher(), url)
    # The internal service never saw a connection, let alone a request.
    assert hosts.internal.connections == 0


@pytest_twisted.ensureDeferred
async def test_default_fetcher_refuses_loopback_entirely(hosts: Hosts) -> None:
    from twisted.internet import reactor

    with pytest.raises(PermissionDenied):
        await _fetch(SafeFetcher(reactor), hosts.public_url + "/mod.jar")
    assert hosts.internal.connections == 0


@pytest_twisted.ensureDeferred
async def test_fetch_refusals(hosts: Hosts) -> None:
    with pytest.raises(InvalidInput):
        await _fetch(_fetcher(), hosts.public_url + "/to-file")
    with pytest.raises(InvalidInput):
        await _fetch(_fetcher(), "ftp://127.0.0.2/mod.jar")
    with pytest.raises(DownloadError):
        await _fetch(_fetcher(max_redirects=3), hosts.public_url + "/loop")
    with pytest.raises(DownloadError):
        await _fetch(_fetcher(), hosts.public_url + "/missing")
    with pytest.raises(InsufficientResources):
        await _fetch(_fetcher(), hosts.public_url + "/mod.jar", max_bytes=1000)
    with pytest.raises(InsufficientResources):
        await _fetch(_fetcher(), hosts.public_url + "/stream.jar", max_bytes=1000)
    with pytest.raises(DownloadError):
        await _fetch(_fetcher(), hosts.public_url + "/hang", timeout=0.5)


@pytest_twisted.ensureDeferred
async def test_install_mod_from_url_list_and_uninstall(tree: Tree, hosts: Hosts) -> None:
    fm = make_manager(fetcher=_fetcher())
    result = to_json(await fm.install_mod(tree.root, {
        "type": "steam_workshop", "workshopId": "123456", "name": "Better Things",
        "downloadUrl": hosts.public_url + "/mod.jar"}))
    assert result["mod"]["id"] == "123456" and result["mod"]["name"] == "Better Things"
    assert (tree.root_path / "mods" / "mod.jar").read_bytes() == MOD
    assert os.stat(tree.root_path / "mods" / "mod.jar").st_uid == 1000
    listed = to_json(await fm.list_mods(tree.root))
    assert listed["count"] == 1
    mod = listed["mods"][0]
    assert {k: mod[k] for k in ("id", "name", "version", "description", "enabled")} == {
        "id": "123456", "name": "Better Things", "version": "", "description": "",
        "enabled": True}
    manifest = json.loads((tree.root_path / "mods" / MANIFEST).read_text())
    assert manifest["mods"][0]["fileName"] == "mod.jar"
    left = to_json(await fm.uninstall_mod(tree.root, "123456"))
    assert left == {"mods": [], "count": 0}
    assert not (tree.root_path / "mods" / "mod.jar").exists()
    with pytest.raises(FileNotFound):
        await fm.uninstall_mod(tree.root, "123456")


@pytest_twisted.ensureDeferred
async def test_install_mod_refuses_internal_url_and_leaves_nothing(
    tree: Tree, hosts: Hosts
) -> None:
    fm = make_manager(fetcher=_fetcher())
    with pytest.raises(PermissionDenied):
        await fm.install_mod(tree.root, {"modId": "x", "modUrl": hosts.public_url + "/to-internal"})
    assert hosts.internal.connections == 0
    assert os.listdir(tree.root_path / "mods") == []
    assert to_json(await fm.list_mods(tree.root))["count"] == 0


@pytest_twisted.ensureDeferred
async def test_install_mod_respects_disk_limit(tree: Tree, hosts: Hosts) -> None:
    from ctrlagent.interfaces import ServerRoot

    fm = make_manager(fetcher=_fetcher())
    root = ServerRoot("srv1", str(tree.root_path), 50_000, 1000, 1000)
    with pytest.raises(InsufficientResources):
        await fm.install_mod(root, {"modId": "big", "modUrl": hosts.public_url + "/mod.jar"})
    assert os.listdir(tree.root_path / "mods") == []


class StubFetcher:
    """Delivers fixed bytes in pieces, as a download would."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.urls: list[str] = []

    def fetch(self, url: str, sink: Any, max_bytes: int, timeout: float) -> Deferred[int]:
        self.urls.append(url)

        async def run() -> int:
            for i in range(0, len(self.data), 4096):
                await sink(self.data[i:i + 4096])
            return len(self.data)

        return Deferred.fromCoroutine(run())


@pytest_twisted.ensureDeferred
async def test_install_mod_from_uploaded_file_and_replace(tree: Tree) -> None:
    fetcher = StubFetcher(b"v2" * 1000)
    fm = make_manager(fetcher=fetcher)
    await fm.upload_file(tree.root, "uploads/cool.jar", base64.b64encode(b"v1").decode())
    r = to_json(await fm.install_mod(tree.root, {"modId": "cool", "path": "uploads/cool.jar",
                                                 "version": "1.0"}))
    assert r["mod"]["version"] == "1.0"
    assert (tree.root_path / "mods" / "cool.jar").read_bytes() == b"v1"
    # Same id again, from a URL with another file name: the old file goes.
    await fm.install_mod(tree.root, {"modId": "cool", "modUrl": "https://example.invalid/c2.jar",
                                     "version": "2.0"})
    assert fetcher.urls == ["https://example.invalid/c2.jar"]
    assert not (tree.root_path / "mods" / "cool.jar").exists()
    assert (tree.root_path / "mods" / "c2.jar").read_bytes() == b"v2" * 1000
    mods = to_json(await fm.list_mods(tree.root))["mods"]
    assert [(m["id"], m["version"]) for m in mods] == [("cool", "2.0")]
    with pytest.raises(Conflict):
        await fm.install_mod(tree.root, {"modId": "other", "path": "uploads/cool.jar",
                                         "fileName": "c2.jar"})


@pytest.mark.parametrize("params", [
    {},
    {"type": "steam_workshop", "workshopId": "1"},
    {"modId": "x", "modUrl": "file:///etc/passwd"},
    {"modId": "x", "modUrl": "gopher://a/b"},
    {"modId": "../x", "modUrl": "https://example.invalid/a.jar"},
    {"modId": "x", "modUrl": "https://example.invalid/a.jar", "fileName": "../a.jar"},
    {"modId": "x", "modUrl": "https://example.invalid/a", "path": "a"},
])
@pytest_twisted.ensureDeferred
async def test_install_mod_bad_payloads(tree: Tree, params: dict[str, Any]) -> None:
    fm = make_manager(fetcher=StubFetcher(b""))
    with pytest.raises(InvalidInput):
        await fm.install_mod(tree.root, params)


@pytest_twisted.ensureDeferred
async def test_install_mod_from_file_outside_refused(tree: Tree) -> None:
    fm = make_manager(fetcher=StubFetcher(b""))
    with pytest.raises(PermissionDenied):
        await fm.install_mod(tree.root, {"modId": "x", "path": "link_passwd"})
    with pytest.raises(PermissionDenied):
        await fm.install_mod(tree.root, {"modId": "x", "path": "../outside/secret.txt"})


@pytest_twisted.ensureDeferred
async def test_mods_folder_that_is_a_symlink_out_is_refused(tree: Tree) -> None:
    os.symlink(str(tree.outside), tree.root_path / "mods")
    fm = make_manager(fetcher=StubFetcher(b"data"))
    before = tree.outside_state()
    with pytest.raises(PermissionDenied):
        await fm.install_mod(tree.root, {"modId": "x", "modUrl": "https://example.invalid/a.jar"})
    with pytest.raises(PermissionDenied):
        await fm.list_mods(tree.root)
    assert tree.outside_state() == before


@pytest_twisted.ensureDeferred
async def test_install_mod_times_out_and_leaves_nothing(tree: Tree, hosts: Hosts) -> None:
    fm = make_manager(fetcher=_fetcher(), mod_download_timeout=0.5)
    with pytest.raises(DownloadError):
        await fm.install_mod(tree.root, {"modId": "slow", "modUrl": hosts.public_url + "/hang"})
    assert os.listdir(tree.root_path / "mods") == []
    assert to_json(await fm.list_mods(tree.root))["count"] == 0
