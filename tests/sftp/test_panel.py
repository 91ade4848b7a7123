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
from ctrlagent.wire.json import to_json
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
        # GET /api/servers/<id> -> the Panel's server record (``data``).
        self.records: dict[str, dict[str, str]] = {}

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
            asked = path.rsplit("/", 1)[1]
            if asked in self.owns.get(email, set()):
                record = self.records.get(asked, {"id": "srv1"})
                return json.dumps({"success": True, "data": record}).encode()
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
        # Unknown here: put to the Panel (it may reveal an alias), which refuses it.
        await _login(rig, ALICE[0] + ".no-such-server", ALICE[1])
    calls = len(panel.calls)
    with pytest.raises(paramiko.AuthenticationException):
        await _login(rig, "srv1", ALICE[1])  # not the panel's username form
    assert len(panel.calls) == calls  # never asks the Panel
    assert to_json(rig.servers.status("srv2"))["aliases"] == []
    with pytest.raises(Exception, match="no-such-server"):
        rig.servers.resolve("no-such-server")


@pytest_twisted.ensureDeferred
async def test_a_panel_answer_naming_both_ids_teaches_the_alias(rig, panel, log_lines):
    # The agent knows the server by the Panel's uuid (create and power use it);
    # SFTP users log in with the Panel's server.id, which the Panel answers with both.
    rig.add_server("3f2b8c1e9d4a4b7f8e6c5d4b3a291807")
    (rig.root("3f2b8c1e9d4a4b7f8e6c5d4b3a291807") / "world").mkdir()
    panel.owns[ALICE[0]].add("clx9k2m4p0000abcd1234efgh")
    panel.records["clx9k2m4p0000abcd1234efgh"] = {
        "id": "clx9k2m4p0000abcd1234efgh", "uuid": "3f2b8c1e9d4a4b7f8e6c5d4b3a291807",
        "name": "Survival", "nodeId": "node-1",
    }
    assert await _login(rig, ALICE[0] + ".clx9k2m4p0000abcd1234efgh", ALICE[1]) == ["world"]
    assert rig.servers.resolve("clx9k2m4p0000abcd1234efgh") == "3f2b8c1e9d4a4b7f8e6c5d4b3a291807"
    assert to_json(rig.servers.status("3f2b8c1e9d4a4b7f8e6c5d4b3a291807"))["aliases"] == [
        "clx9k2m4p0000abcd1234efgh"]
    assert any("alias recorded" in line for line in log_lines)
    # From then on the grant is cached like any other.
    calls = len(panel.calls)
    assert await _login(rig, ALICE[0] + ".clx9k2m4p0000abcd1234efgh", ALICE[1]) == ["world"]
    assert len(panel.calls) == calls


@pytest_twisted.ensureDeferred
async def test_a_panel_answer_that_names_nothing_here_or_two_servers_teaches_nothing(
    rig, panel, warnings
):
    rig.add_server("uuid-a")
    rig.add_server("uuid-b")
    panel.owns[ALICE[0]].update({"cuid-x", "cuid-y", "cuid-z"})
    # Its ids name no server on this node.
    panel.records["cuid-x"] = {"id": "cuid-x", "uuid": "uuid-elsewhere"}
    # Not an answer about the id asked for.
    panel.records["cuid-y"] = {"id": "cuid-other", "uuid": "uuid-a"}
    for ref in ("cuid-x", "cuid-y"):
        with pytest.raises(paramiko.AuthenticationException):
            await _login(rig, ALICE[0] + "." + ref, ALICE[1])
    # Its two ids name two different servers here: refused, nothing recorded.
    rig.servers.servers["uuid-b"].aliases.add("cuid-z")
    panel.records["cuid-z"] = {"id": "cuid-z", "uuid": "uuid-a"}
    assert await _login(rig, ALICE[0] + ".cuid-z", ALICE[1]) == []
    assert to_json(rig.servers.status("uuid-a"))["aliases"] == []
    assert to_json(rig.servers.status("uuid-b"))["aliases"] == ["cuid-z"]
    assert any("names two servers here" in str(w.get("log_format")) for w in warnings)


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
