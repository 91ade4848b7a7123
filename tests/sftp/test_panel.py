"""
The panel backend against a Panel played by a real HTTP server on loopback:
``<email>.<server id>`` logs in when the Panel accepts the password and
answers the server; a grant is cached briefly (under a keyed digest, never
the password); a wrong password, another account's server, a Panel that is
down or answers garbage all refuse the login without a traceback.
"""

from __future__ import annotations

import json

import paramiko
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import resource, server

from ctrlagent.sftp.panel import split_username
from tests.sftp.clients import connect
from tests.sftp.conftest import make_config

ALICE = ("alice@example.com", "alice's panel password")


class FakePanel(resource.Resource):
    """POST /api/auth/login and GET /api/servers/<id>, as the Panel answers them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.accounts = {ALICE[0]: ALICE[1], "bob@example.com": "bob's password!"}
        self.owns = {"alice@example.com": {"srv1", "panel-uuid-1"}, "bob@example.com": set()}
        self.calls: list[str] = []
        self.bodies: list[bytes] = []
        self.garbage = False

    def render(self, request):  # noqa: N802
        path = request.path.decode()
        self.calls.append(request.method.decode() + " " + path)
        if self.garbage:
            return b"<html>not json"
        if request.method == b"POST" and path == "/api/auth/login":
            body = request.content.read()
            self.bodies.append(body)
            data = json.loads(body)
            if self.accounts.get(data.get("email")) != data.get("password"):
                request.setResponseCode(401)
                return b'{"success": false}'
            return json.dumps({"success": True, "data": {"token": "tok-" + data["email"]}}).encode()
        if request.method == b"GET" and path.startswith("/api/servers/"):
            auth = request.getHeader("authorization") or ""
            email = auth.removeprefix("Bearer tok-")
            if path.rsplit("/", 1)[1] in self.owns.get(email, set()):
                return b'{"success": true, "data": {"id": "srv1"}}'
            request.setResponseCode(403)
            return b'{"success": false}'
        request.setResponseCode(404)
        return b""


@pytest.fixture
def panel():
    fake = FakePanel()
    port = reactor.listenTCP(0, server.Site(fake), interface="127.0.0.1")
    fake.url = "http://127.0.0.1:{}".format(port.getHost().port)
    yield fake
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def sftp_config(request, panel):
    return make_config(backend="panel", panel_url=panel.url, grant_cache_seconds=60.0)


def test_usernames_split_at_the_last_dot():
    assert split_username("alice@example.com.srv1") == ("alice@example.com", "srv1")
    assert split_username("alice.smith@mail.example.org.panel-uuid-1") == (
        "alice.smith@mail.example.org", "panel-uuid-1")
    assert split_username("srv1") is None
    assert split_username("no-at-sign.srv1") is None
    assert split_username("alice@example.com.") is None


def _login(rig, username, password):
    def run():
        t, s = connect(rig.port, username, password)
        try:
            return s.listdir("/")
        finally:
            t.close()

    return rig.in_thread(run)


@pytest_twisted.ensureDeferred
async def test_the_panel_account_opens_its_server_and_the_grant_is_cached(rig, panel, log_lines):
    (rig.root() / "world").mkdir()
    assert await _login(rig, ALICE[0] + ".srv1", ALICE[1]) == ["world"]
    assert panel.calls == ["POST /api/auth/login", "GET /api/servers/srv1"]
    assert json.loads(panel.bodies[0]) == {"email": ALICE[0], "password": ALICE[1]}
    # Within the cache: no second trip to the Panel.
    assert await _login(rig, ALICE[0] + ".srv1", ALICE[1]) == ["world"]
    assert len(panel.calls) == 2
    # A wrong password misses the cache and is refused by the Panel.
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, ALICE[0] + ".srv1", "wrong password")
    assert len(panel.calls) == 3
    assert not any(ALICE[1] in line or "wrong password" in line for line in log_lines)


@pytest_twisted.ensureDeferred
async def test_the_panel_must_answer_the_server(rig, panel):
    rig.add_server("srv2")
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, ALICE[0] + ".srv2", ALICE[1])  # not alice's server
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, "bob@example.com.srv1", "bob's password!")
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, ALICE[0] + ".no-such-server", ALICE[1])  # never asks the Panel
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, "srv1", ALICE[1])  # not the panel's username form
    assert "GET /api/servers/no-such-server" not in panel.calls


@pytest_twisted.ensureDeferred
async def test_the_grant_expires(rig, panel):
    rig.service.checker.cache_seconds = 0.2
    await _login(rig, ALICE[0] + ".panel-uuid-1", ALICE[1])
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.3, lambda: None)
    await _login(rig, ALICE[0] + ".panel-uuid-1", ALICE[1])
    assert panel.calls.count("POST /api/auth/login") == 2


@pytest_twisted.ensureDeferred
async def test_a_panel_that_answers_garbage_or_is_down_refuses_politely(rig, panel, warnings):
    panel.garbage = True
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, ALICE[0] + ".srv1", ALICE[1])
    rig.service.checker.panel_url = "http://127.0.0.1:1"  # nothing listens there
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, ALICE[0] + ".srv1", ALICE[1])
    assert any("did not answer a login check" in str(w.get("log_format")) for w in warnings)
