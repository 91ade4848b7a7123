"""
Malformed mod URLs are refused as ``INVALID_PAYLOAD`` naming ``downloadUrl``
(or the alias the payload used), from the Panel's payload and from a redirect
alike, before anything resolves or fetches them; well-formed ones pass, and
the SSRF policy still decides where they may go (``test_mods``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ctrlagent.errors import InvalidInput
from ctrlagent.files.fetch import SafeFetcher, allow_also
from ctrlagent.files.urls import check_url
from tests.files.conftest import Tree, make_manager

MALFORMED = [
    "http://exa mple.com/mod.jar",            # a space in the host
    "http://example.com\r\n.evil/mod.jar",    # CRLF in the host
    "http://example.com/mod.jar\r\nX-Injected: 1",
    "http://example.com/a b.jar",             # a space in the path
    "http://\tex.com/",
    "http://[::1/mod.jar",                    # unbalanced [
    "http://[::1]]/mod.jar",
    "http://ex]ample.com/",
    "http://[not-an-address]/",
    "http://[fe80::1%25eth0]/",               # a zone
    "http://" + "a" * 300 + "/mod.jar",       # a 300-character label
    "http://" + "a" * 64 + ".com/mod.jar",    # one character over a label's 63
    "http://" + ".".join(["abcdefgh"] * 40) + "/",  # a 359-character host
    "http://exämple.com/mod.jar",             # non-ASCII
    "http://example.com/\udcff.jar",          # a lone surrogate
    "http://\u202eexample.com/",
    "http://ex\x00ample.com/",
    "http://example.com:99999/",              # port out of range
    "http://example.com:0/",
    "http://example.com:-1/",
    "http://example.com:8o8o/",
    "http://example.com:/",
    "http://a..b/",
    "http://-example.com/",
    "http://example-.com/",
    "http://0x7f.1/mod.jar",                  # an address in disguise
    "http://127.1/mod.jar",
    "http://999.1.1.1/",
    "http://user:secret@example.com/",
    "http://@example.com/",
    "http:///mod.jar",
    "http:example.com/mod.jar",
    "ftp://example.com/mod.jar",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "//example.com/mod.jar",
    "https://example.com/" + "a" * 3000,
]

WELL_FORMED = [
    "https://example.com/mods/a.jar",
    "http://example.com:8080/a.jar?x=1#frag",
    "https://cdn.example.co.uk./a%20b.jar",
    "http://host_name.example.com/a.jar",
    "http://1.1.1.1/a.jar",
    "http://[2606:4700:4700::1111]:443/a.jar",
    "HTTPS://EXAMPLE.COM/A.JAR",
    "http://xn--exmple-cua.com/a.jar",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_are_refused_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_url(url)
    assert caught.value.code == "INVALID_PAYLOAD"
    assert caught.value.details["field"] == "downloadUrl"


@pytest.mark.parametrize("url", WELL_FORMED)
def test_well_formed_urls_pass(url: str) -> None:
    assert check_url(url) == url


@given(st.text(max_size=300))
def test_any_text_is_either_accepted_or_refused_cleanly(tail: str) -> None:
    for url in (tail, "http://" + tail, "https://example.com:" + tail, "http://[" + tail):
        try:
            check_url(url)
        except InvalidInput as e:
            assert e.details["field"] == "downloadUrl"


@pytest.mark.parametrize("field", ["downloadUrl", "modUrl", "url"])
@pytest.mark.parametrize("url", MALFORMED)
@pytest_twisted.ensureDeferred
async def test_install_mod_refuses_malformed_urls_before_any_fetch(
    tree: Tree, url: str, field: str
) -> None:
    # The real fetcher: nothing may reach it, let alone the resolver.
    fm = make_manager()
    with pytest.raises(InvalidInput) as caught:
        await fm.install_mod(tree.root, {"modId": "m", field: url})
    assert caught.value.details["field"] == field
    assert not (tree.root_path / "mods").exists()


class RedirectTo(Resource):
    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location

    def render_GET(self, request: Request) -> bytes:  # noqa: N802
        request.setResponseCode(302)
        request.setHeader(b"location", self.location)
        return b""


@pytest_twisted.async_yield_fixture
async def redirector() -> AsyncIterator[str]:
    from twisted.internet import reactor

    root = Resource()
    for name, location in (
        (b"space", b"http://exa mple.com/mod.jar"),
        (b"bracket", b"http://[::1/mod.jar"),
        (b"label", b"http://" + b"a" * 300 + b"/mod.jar"),
        (b"port", b"http://example.com:99999/mod.jar"),
        (b"latin1", b"http://ex\xe4mple.com/mod.jar"),
    ):
        root.putChild(name, RedirectTo(location))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.2")  # type: ignore[attr-defined]
    try:
        yield "http://127.0.0.2:{}".format(port.getHost().port)
    finally:
        await port.stopListening()


@pytest.mark.parametrize("path", ["space", "bracket", "label", "port", "latin1"])
@pytest_twisted.ensureDeferred
async def test_a_redirect_to_a_malformed_url_is_refused(redirector: str, path: str) -> None:
    from twisted.internet import reactor

    fetcher = SafeFetcher(reactor, policy=allow_also("127.0.0.2"))
    got: list[Any] = []

    async def sink(data: bytes) -> None:
        got.append(data)

    with pytest.raises(InvalidInput) as caught:
        await fetcher.fetch(redirector + "/" + path, sink, 10**6, 10.0)
    assert caught.value.details["field"] == "downloadUrl"
    assert got == []


@pytest.mark.parametrize("value", [123, 1.5, True, ["http://example.com/"], {"u": 1}])
@pytest_twisted.ensureDeferred
async def test_install_mod_refuses_a_url_that_is_not_text(tree: Tree, value: Any) -> None:
    fm = make_manager()
    with pytest.raises(InvalidInput) as caught:
        await fm.install_mod(tree.root, {"modId": "m", "downloadUrl": value})
    assert caught.value.details["field"] == "downloadUrl"
