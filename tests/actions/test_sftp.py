"""
The SFTP actions through the registry, over the real SFTP service (on
loopback, with a ``FakeServerManager``): what they answer, that "missing
keeps, null removes", that a node without SFTP answers ``CONFLICT`` instead
of ``UNKNOWN_ACTION``, that the OpenAPI document describes them, and that a
password never reaches a log event, whatever the outcome.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from ctrlagent.actions import Dispatcher
from ctrlagent.config import SftpConfig
from ctrlagent.errors import CtrlAgentError
from ctrlagent.sftp.service import SftpService
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.wire.command import ActionResult, Command
from ctrlagent.wire.json import to_json
from tests.actions.rig import FakeHost, Rig

PASSWORD = "Tr0ub4dor&3-never-logged"
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
       " user@host")


class SftpRig:
    def __init__(self, tmp: Path) -> None:
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="sftp-actions")
        self.pool.start()
        data = tmp / "servers"
        data.mkdir()
        self.servers = FakeServerManager(clock=reactor, data_dir=str(data))
        self.servers.create_server("srv1", {"image": "busybox", "aliases": ["panel-1"]})
        config = SftpConfig(endpoint="tcp:0:interface=127.0.0.1", bcrypt_rounds=4)
        self.service = SftpService(reactor, config, str(tmp / "state"), servers=self.servers,
                                   threadpool=self.pool)
        self.service.startService()
        self.dispatcher = Dispatcher(servers=self.servers, files=FakeFileManager(reactor),
                                     system=FakeHost(), clock=reactor, sftp=self.service)

    async def ok(self, action: str, server_id: str | None = None, **params: Any) -> Any:
        result = await self.dispatcher.dispatch(Command(action, server_id, params))
        assert isinstance(result, ActionResult)
        return to_json(result.data)

    async def error(self, action: str, server_id: str | None = None,
                    **params: Any) -> CtrlAgentError:
        with pytest.raises(CtrlAgentError) as e:
            await self.dispatcher.dispatch(Command(action, server_id, params))
        return e.value


@pytest.fixture
def srig(tmp_path: Path) -> Iterator[SftpRig]:
    r = SftpRig(tmp_path)
    try:
        yield r
    finally:
        pytest_twisted.blockon(r.service.stopService())
        r.pool.stop()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest_twisted.ensureDeferred
async def test_set_credentials_answers_the_username_and_the_port(srig: SftpRig) -> None:
    answer = await srig.ok("set_sftp_credentials", "panel-1", password=PASSWORD)
    assert answer == {"username": "srv1", "port": srig.service.listening_port()}
    assert answer["port"] != 2022  # the real port of tcp:0
    login = srig.service.credentials.get("srv1")
    assert login is not None and login.password_hash and not login.read_only
    assert PASSWORD not in login.password_hash


@pytest_twisted.ensureDeferred
async def test_missing_fields_keep_their_value_and_a_null_password_removes_it(
    srig: SftpRig,
) -> None:
    await srig.ok("set_sftp_credentials", "srv1", password=PASSWORD, readOnly=True)
    await srig.ok("set_sftp_credentials", "srv1", publicKeys=[KEY])
    login = srig.service.credentials.get("srv1")
    assert login is not None
    assert login.password_hash and login.read_only and len(login.public_keys) == 1
    await srig.ok("set_sftp_credentials", "srv1", password=None)
    login = srig.service.credentials.get("srv1")
    assert login is not None and login.password_hash is None and login.read_only
    error = await srig.error("set_sftp_credentials", "srv1", publicKeys=[])
    assert (error.code, error.details.get("field")) == ("INVALID_PAYLOAD", "password")


@pytest.mark.parametrize("params, field", [
    ({"password": "short"}, "password"),
    ({"password": 12345678}, "password"),
    ({"publicKeys": "ssh-ed25519 AAAA"}, "publicKeys"),
    ({"publicKeys": ["not a key"]}, "publicKeys"),
    ({"password": PASSWORD, "readOnly": "sometimes"}, "readOnly"),
])
@pytest_twisted.ensureDeferred
async def test_bad_credentials_are_invalid_payload_naming_the_field(
    srig: SftpRig, params: dict[str, Any], field: str
) -> None:
    error = await srig.error("set_sftp_credentials", "srv1", **params)
    assert (error.code, error.details.get("field")) == ("INVALID_PAYLOAD", field)
    assert srig.service.credentials.get("srv1") is None


@pytest_twisted.ensureDeferred
async def test_revoke_and_list_sessions(srig: SftpRig) -> None:
    assert await srig.ok("list_sftp_sessions") == {"sessions": []}
    assert await srig.ok("list_sftp_sessions", "panel-1") == {"sessions": []}
    await srig.ok("set_sftp_credentials", "srv1", password=PASSWORD)
    assert await srig.ok("revoke_sftp_credentials", "srv1") == {
        "revoked": True, "closedSessions": 0}
    assert srig.service.credentials.get("srv1") is None
    assert await srig.ok("revoke_sftp_credentials", "srv1") == {
        "revoked": False, "closedSessions": 0}
    for action in ("set_sftp_credentials", "revoke_sftp_credentials", "list_sftp_sessions"):
        error = await srig.error(action, "nope", password=PASSWORD)
        assert error.code == "SERVER_NOT_FOUND"
    error = await srig.error("revoke_sftp_credentials")
    assert (error.code, error.details.get("field")) == ("INVALID_PAYLOAD", "serverId")


@pytest.mark.parametrize("action", [
    "set_sftp_credentials", "revoke_sftp_credentials", "list_sftp_sessions"])
def test_without_sftp_the_actions_answer_conflict_not_unknown_action(
    rig: Rig, action: str
) -> None:
    rig.created("srv1")
    # Whatever the payload and the server: SFTP being off is the answer.
    for server_id, params in (("srv1", {"password": PASSWORD}), ("nope", {"password": 5}),
                              (None, {})):
        error = rig.error(action, server_id, **params)
        assert (error.code, error.message) == ("CONFLICT", "SFTP is disabled on this node")
    commands = rig.dispatcher.openapi_schemas()["ActionCommand"]["oneOf"]
    (command,) = [c for c in commands if action in c["properties"]["action"]["enum"]]
    assert "disabled" in command["description"]


def test_the_openapi_document_describes_the_sftp_payloads(srig: SftpRig) -> None:
    schemas = srig.dispatcher.openapi_schemas()
    login = schemas["SetSftpCredentialsPayload"]
    assert set(login["properties"]) == {"password", "publicKeys", "readOnly"}
    assert login["properties"]["publicKeys"]["type"] == "array"
    assert login["properties"]["readOnly"]["type"] == "boolean"
    assert "RevokeSftpCredentialsPayload" in schemas
    assert "ListSftpSessionsPayload" in schemas
    specs = {s.name: s for s in srig.dispatcher.specs()}
    assert specs["list_sftp_sessions"].payload.server == "optional"
    assert specs["set_sftp_credentials"].payload.server == "required"


@pytest_twisted.ensureDeferred
async def test_a_password_leaves_no_trace_in_any_log_event(
    srig: SftpRig, events: list[dict[str, Any]]
) -> None:
    # Success, refusals before and after the server is resolved, and a
    # refusal by the store: no log event holds the password, formatted or not.
    await srig.ok("set_sftp_credentials", "srv1", password=PASSWORD, aliases=["other-id"])
    await srig.error("set_sftp_credentials", "srv1", password=PASSWORD, publicKeys=["bad"])
    await srig.error("set_sftp_credentials", "nope", password=PASSWORD)
    await srig.error("set_sftp_credentials", "srv1", password=PASSWORD * 100)
    await srig.error("set_sftp_credentials", "srv1", password=PASSWORD, readOnly=3)
    assert any("credentials of srv1 set" in formatEvent(e) for e in events)
    for event in events:
        assert PASSWORD not in formatEvent(event)
        assert PASSWORD not in repr(event)
