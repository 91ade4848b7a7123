"""
The dispatcher, action by action, against the in-memory fakes.

Time is a ``Clock``; the fakes answer synchronously unless a test holds a gate,
so most tests read the outcome straight off the Deferred.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ctrlagent.actions.registry import Dispatcher
from ctrlagent.actions.servers import coerce_metrics as panel_metrics
from ctrlagent.config import TimeoutsConfig
from ctrlagent.errors import CtrlAgentError
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.wire.command import ActionResult, Command, IDispatcher, check_payload, parse_command
from ctrlagent.work import Deadlines, Tracker
from tests.api.conftest import ApiRig

UUID = "3f2b8c1e9d4a4b7f8e6c5d4b3a291807"
PANEL_ID = "clx9k2m4p0000abcd1234efgh"


class FakeHost:
    """A host view with fixed figures."""

    async def snapshot(self) -> dict[str, Any]:
        return {
            "cpu": 12.5,
            "memory": {"total": 8 << 30, "used": 2 << 30},
            "disk": {"total": 100 << 30, "used": 10 << 30},
            "uptime": 3600,
        }

    async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
        return {"nodeId": node_id or "node-1", "os": "linux", "capabilities": ["docker"]}


class Rig:
    """A dispatcher over fakes, with helpers that run one action synchronously."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.servers = FakeServerManager(self.clock)
        self.files = FakeFileManager(self.clock)
        self.tracker = Tracker()
        self.dispatcher = Dispatcher(
            servers=self.servers,
            files=self.files,
            system=FakeHost(),
            clock=self.clock,
            tracker=self.tracker,
        )

    def start(self, action: str, server_id: str | None = None, /, **params: Any) -> Deferred[Any]:
        return self.dispatcher.dispatch(Command(action, server_id, params))

    def ok(self, action: str, server_id: str | None = None, /, **params: Any) -> dict[str, Any]:
        d = self.start(action, server_id, **params)
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "{} did not answer".format(action)
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        assert isinstance(result, ActionResult)
        json.dumps(result.data)  # every answer must be JSON
        return result.data

    def error(self, action: str, server_id: str | None = None, /, **params: Any) -> CtrlAgentError:
        d = self.start(action, server_id, **params)
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "{} did not answer".format(action)
        failure = results[0]
        assert isinstance(failure, Failure), "expected a failure, got {!r}".format(failure)
        assert isinstance(failure.value, CtrlAgentError), failure.getTraceback()
        return failure.value

    def created(self, server_id: str = UUID, **extra: Any) -> dict[str, Any]:
        params = {
            "name": "Survival",
            "image": "ctrlagent-test/scripted:1",
            "startup": "./run.sh",
            "environment": {"MAX_PLAYERS": 20},
            "limits": {"memory": 512, "disk": 1, "cpu": 100},
            "panelId": PANEL_ID,
        }
        params.update(extra)
        return self.ok("create_server", server_id, **params)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_dispatcher_provides_the_interface(rig: Rig) -> None:
    assert IDispatcher.providedBy(rig.dispatcher)
    for action in ("create_server", "console:download", "system.ping", "get_status", "list_mods"):
        assert action in rig.dispatcher.actions()


def test_ping_answers_pong_with_a_timestamp(rig: Rig) -> None:
    data = rig.ok("system.ping")
    assert data["message"] == "pong"
    assert data["timestamp"].endswith("Z")


def test_unknown_action_is_unknown_action(rig: Rig) -> None:
    assert rig.error("make_coffee", UUID).code == "UNKNOWN_ACTION"


# -- servers -------------------------------------------------------------------


def test_create_then_either_id_reaches_the_same_server(rig: Rig) -> None:
    data = rig.created()
    assert data["serverId"] == UUID
    assert data["status"] == "offline"
    assert rig.ok("get_server_status", PANEL_ID)["serverId"] == UUID
    assert rig.ok("get_status", UUID)["panelStatus"] == "OFFLINE"
    # the container name resolves as well
    assert rig.ok("get_status", "ctrl-alt-play-" + UUID)["serverId"] == UUID


def test_create_needs_a_server_id_and_an_image(rig: Rig) -> None:
    err = rig.error("create_server", None, image="x")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "serverId")
    err = rig.error("create_server", UUID, name="x")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "image")
    err = rig.error("create_server", UUID, image=42)
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "image")


@pytest.mark.parametrize(
    "field,value",
    [
        ("environment", "A=1"),
        ("limits", [512]),
        ("ports", {"internal": 1}),
        ("skipScripts", "maybe"),
        ("startup", 12),
        ("aliases", "abc"),
    ],
)
def test_create_names_the_wrongly_typed_field(rig: Rig, field: str, value: Any) -> None:
    err = rig.error("create_server", UUID, image="img", **{field: value})
    assert err.code == "INVALID_PAYLOAD"
    assert err.details["field"] == field


def test_second_create_of_the_same_id_or_alias_conflicts(rig: Rig) -> None:
    rig.created()
    assert rig.error("create_server", UUID, image="img").code == "CONFLICT"
    assert rig.error("create_server", PANEL_ID, image="img").code == "CONFLICT"


def test_slow_create_answers_installing_in_time_and_finishes_later(rig: Rig) -> None:
    gate = rig.servers.hold("create")
    d = rig.start("create_server", UUID, image="img", panelId=PANEL_ID)
    assert not d.called
    rig.clock.advance(24)
    assert not d.called
    rig.clock.advance(1)
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert isinstance(answered[0], ActionResult)
    assert answered[0].data["status"] == "installing"
    assert answered[0].data["pending"] is True
    assert rig.ok("get_status", PANEL_ID)["status"] == "installing"
    assert len(rig.tracker) == 1
    gate.callback(None)
    assert len(rig.tracker) == 0
    assert rig.ok("get_status", PANEL_ID)["status"] == "offline"


def test_power_cycle(rig: Rig) -> None:
    rig.created()
    assert rig.ok("start_server", UUID)["status"] == "running"
    assert rig.ok("get_server_status", PANEL_ID)["panelStatus"] == "RUNNING"
    assert rig.ok("restart_server", UUID)["status"] == "running"
    assert rig.ok("stop_server", UUID, signal="SIGTERM", timeout=30)["status"] == "offline"
    assert rig.ok("start_server", PANEL_ID)["status"] == "running"
    assert rig.ok("kill_server", UUID)["status"] == "offline"
    assert [c for c in rig.servers.calls if c[0] in ("start", "stop", "kill")] == [
        ("start", UUID),
        ("stop", UUID),
        ("start", UUID),
        ("stop", UUID),
        ("start", UUID),
        ("kill", UUID),
    ]


def test_stop_with_sigkill_kills(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    rig.servers.hold("stop")  # a graceful stop would hang; a kill must not
    assert rig.ok("stop_server", UUID, signal="SIGKILL", timeout=5)["status"] == "offline"
    assert ("kill", UUID) in rig.servers.calls


def test_stop_signal_is_normalised_and_checked(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    assert rig.ok("stop_server", UUID, signal="kill")["status"] == "offline"
    rig.ok("start_server", UUID)
    err = rig.error("stop_server", UUID, signal="SIG KILL; rm")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "signal")
    err = rig.error("stop_server", UUID, timeout="soon")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "timeout")
    err = rig.error("stop_server", UUID, timeout=-1)
    assert err.details["field"] == "timeout"


def test_long_stop_answers_stopping_and_finishes_in_the_background(rig: Rig) -> None:
    events: list[Any] = []
    rig.servers.add_listener(events.append)
    rig.created()
    rig.ok("start_server", UUID)
    gate = rig.servers.hold("stop")
    d = rig.start("stop_server", UUID, timeout=600)
    rig.clock.advance(25)
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert answered[0].data["status"] == "stopping"
    assert answered[0].data["panelStatus"] == "STOPPING"
    # a second power action while the first is under way is a conflict
    assert rig.error("restart_server", UUID).code == "CONFLICT"
    gate.callback(None)
    assert rig.ok("get_status", UUID)["status"] == "offline"
    assert [e.current for e in events if hasattr(e, "current")][-2:] == ["stopping", "offline"]


def test_concurrent_power_action_conflicts(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    gate = rig.servers.hold("stop")
    d = rig.start("stop_server", UUID)
    assert rig.error("restart_server", PANEL_ID).code == "CONFLICT"
    gate.callback(None)
    assert d.called


def test_background_failure_after_the_deadline_is_logged(
    rig: Rig, fail_on_logged_errors: list[dict]
) -> None:
    gate = rig.servers.hold("create")
    d = rig.start("create_server", UUID, image="img")
    rig.clock.advance(25)
    assert d.called
    gate.errback(RuntimeError("unexpected"))
    assert len(fail_on_logged_errors) == 1
    fail_on_logged_errors.clear()


def test_a_coded_failure_after_the_deadline_is_a_warning_with_its_message(
    rig: Rig, fail_on_logged_errors: list[dict], warnings: list[dict]
) -> None:
    gate = rig.servers.hold("create")
    d = rig.start("create_server", UUID, image="img")
    rig.clock.advance(25)
    assert d.called
    gate.errback(CtrlAgentError("pull failed", code="DOCKER_ERROR"))
    assert fail_on_logged_errors == []
    assert [e["error"] for e in warnings if "background work failed" in e["log_format"]] == [
        "pull failed"
    ]


def test_kill_never_removes_the_server(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    rig.ok("kill_server", PANEL_ID)
    assert rig.ok("list_servers")["count"] == 1


def test_delete_removes_and_optionally_purges(rig: Rig) -> None:
    rig.created()
    rig.created("other", panelId="other-panel")
    rig.ok("delete_server", PANEL_ID)
    assert rig.servers.purged == []
    assert rig.error("get_status", UUID).code == "SERVER_NOT_FOUND"
    rig.ok("delete_server", "other", purgeFiles=True)
    assert rig.servers.purged == ["other"]
    assert rig.ok("list_servers") == {"servers": [], "count": 0}


def test_delete_purge_flag_must_be_boolean(rig: Rig) -> None:
    rig.created()
    assert (
        rig.error("delete_server", UUID, purgeFiles="yes please").details["field"] == "purgeFiles"
    )


@pytest.mark.parametrize(
    "action,params",
    [
        ("start_server", {}),
        ("stop_server", {}),
        ("restart_server", {}),
        ("kill_server", {}),
        ("delete_server", {}),
        ("get_server_status", {}),
        ("get_status", {}),
        ("get_server_metrics", {}),
        ("get_server_logs", {}),
        ("send_server_command", {"command": "say hi"}),
        ("console:command", {"command": "list"}),
        ("console:history", {}),
        ("console:status", {}),
        ("console:clear", {}),
        ("console:download", {}),
        ("list_files", {"path": "/"}),
        ("read_file", {"path": "a.txt"}),
        ("write_file", {"path": "a.txt", "content": "x"}),
        ("list_mods", {}),
        ("update_server", {}),
        ("suspend_server", {}),
    ],
)
def test_unknown_server_is_server_not_found(rig: Rig, action: str, params: dict) -> None:
    rig.created()
    assert rig.error(action, "no-such-server", **params).code == "SERVER_NOT_FOUND"


@pytest.mark.parametrize("action", ["start_server", "get_server_metrics", "list_files"])
def test_missing_server_id_is_invalid_payload(rig: Rig, action: str) -> None:
    err = rig.error(action, None)
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "serverId")


def test_power_server_maps_its_action(rig: Rig) -> None:
    rig.created()
    assert rig.ok("power_server", UUID, action="start")["status"] == "running"
    assert rig.ok("server_power", UUID, action="kill")["status"] == "offline"
    assert rig.error("power_server", UUID, action="explode").details["field"] == "action"


def test_legacy_names_reach_the_same_actions(rig: Rig) -> None:
    rig.ok("server_create", UUID, image="img")
    assert rig.ok("server_start", UUID)["status"] == "running"
    rig.ok("server_command", UUID, command="hello")
    assert "> hello" in rig.ok("get_server_logs", UUID)["logs"]
    assert rig.ok("server_stop", UUID)["status"] == "offline"


def test_suspend_refuses_starts_until_unsuspended(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    assert rig.ok("suspend_server", UUID)["status"] == "suspended"
    assert rig.error("start_server", UUID).code == "CONFLICT"
    rig.ok("unsuspend_server", UUID)
    assert rig.ok("start_server", UUID)["status"] == "running"


def test_reinstall_and_update(rig: Rig) -> None:
    rig.created()
    assert rig.ok("reinstall_server", UUID)["status"] == "offline"
    rig.ok("update_server", UUID, startup="./other.sh", limits={"memory": 1024})
    assert rig.servers.servers[UUID].params["limits"] == {"memory": 1024}
    assert rig.error("update_server", UUID, limits=5).details["field"] == "limits"


def test_list_servers_is_an_empty_list_not_null(rig: Rig) -> None:
    assert rig.ok("list_servers") == {"servers": [], "count": 0}
    rig.created()
    data = rig.ok("list_servers")
    assert data["count"] == 1
    assert data["servers"][0]["serverId"] == UUID


# -- metrics -------------------------------------------------------------------


def test_metrics_are_zero_with_network_when_stopped(rig: Rig) -> None:
    rig.created()
    data = rig.ok("get_server_metrics", PANEL_ID)
    assert data["cpu"] == 0.0 and data["memory"] == 0.0 and data["disk"] == 0.0
    assert data["network"] == {"in": 0, "out": 0}
    assert data["players"] == 0 and isinstance(data["players"], int)
    assert data["timestamp"]


def test_metrics_coerce_to_the_panel_shape(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    rig.servers.set_metrics(
        UUID, {"cpu": "33.5", "memory": 256, "disk": 12.25, "players": 3.0, "network": None}
    )
    data = rig.ok("get_server_metrics", PANEL_ID)
    assert data["cpu"] == 33.5 and isinstance(data["cpu"], float)
    assert data["memory"] == 256.0 and isinstance(data["memory"], float)
    assert data["players"] == 3 and isinstance(data["players"], int)
    assert data["network"] == {"in": 0, "out": 0}


def test_panel_metrics_never_drops_network() -> None:
    out = panel_metrics({"network": {"in": "10", "out": 2.9}, "players": None})
    assert out["network"] == {"in": 10, "out": 2}
    assert out["players"] == 0


def test_system_metrics_and_status(rig: Rig) -> None:
    rig.created()
    data = rig.ok("get_system_metrics")
    assert data["cpu"] == 12.5
    assert data["memory"]["total"] > data["memory"]["used"]
    assert data["serverCount"] == 1
    assert data["timestamp"]
    status = rig.ok("system.status")
    assert status["status"] == "online" and status["serverCount"] == 1
    assert rig.ok("system.info")["nodeId"] == "node-1"


# -- console -------------------------------------------------------------------


def test_console_actions(rig: Rig) -> None:
    rig.created()
    err = rig.error("send_server_command", UUID, command="say hi")
    assert err.code == "CONFLICT"  # not running
    rig.ok("start_server", UUID)
    assert rig.error("send_server_command", UUID).details["field"] == "command"
    assert rig.error("send_server_command", UUID, command=5).details["field"] == "command"
    rig.ok("send_server_command", PANEL_ID, command="say hi")
    assert rig.servers.servers[UUID].stdin == ["say hi"]
    assert rig.ok("console:command", PANEL_ID, command="list")["response"] == "> list"
    history = rig.ok("console:history", PANEL_ID, lines=2)
    assert history == {"serverId": UUID, "history": ["> say hi", "> list"], "lines": 2}
    status = rig.ok("console:status", PANEL_ID)
    assert status["connected"] is True and status["bufferSize"] == 3
    assert status["lastActivity"].endswith("Z")
    assert rig.ok("console:connect", PANEL_ID)["connected"] is True
    rig.ok("console:disconnect", PANEL_ID)
    txt = rig.ok("console:download", PANEL_ID)["content"]
    assert txt == "[fake] server started\n> say hi\n> list\n"
    js = json.loads(rig.ok("console:download", PANEL_ID, format="json")["content"])
    assert js["lines"][-1] == "> list"
    assert rig.error("console:download", PANEL_ID, format="pdf").details["field"] == "format"
    rig.ok("console:clear", PANEL_ID)
    assert rig.ok("console:history", PANEL_ID)["history"] == []


def test_log_lines_accept_digit_strings_and_refuse_nonsense(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    for i in range(5):
        rig.servers.emit_console(UUID, "line {}".format(i))
    assert rig.ok("get_server_logs", UUID, lines="2")["logs"] == ["line 3", "line 4"]
    for bad in ("many", True, 0, 2.5, [1]):
        err = rig.error("get_server_logs", UUID, lines=bad)
        assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "lines")


# -- files ---------------------------------------------------------------------


def test_file_round_trip_through_the_panel_id(rig: Rig) -> None:
    rig.created()
    rig.ok("create_directory", PANEL_ID, path="/config")
    written = rig.ok("write_file", PANEL_ID, path="/config/server.properties", content="motd=hi\n")
    assert written["size"] == 8
    read = rig.ok("read_file", PANEL_ID, path="config/server.properties")
    assert read["content"] == "motd=hi\n" and read["encoding"] == "utf8"
    listing = rig.ok("list_files", PANEL_ID, path="/config")
    (entry,) = listing["files"]
    assert entry["name"] == "server.properties" and entry["type"] == "file"
    assert entry["extension"] == "properties" and entry["permissions"] == "644"
    assert rig.ok("list_files", PANEL_ID)["files"][0]["type"] == "directory"
    found = rig.ok("search_files", PANEL_ID, path="/", query="PROPERTIES")["files"]
    assert [f["path"] for f in found] == ["/config/server.properties"]
    assert rig.ok("search_files", PANEL_ID, query="config", fileType="file")["files"] == []
    rig.ok("rename_file", PANEL_ID, oldPath="/config", newPath="/cfg")
    info = rig.ok("get_file_info", PANEL_ID, path="/cfg/server.properties")
    assert info["mode"] == "0644"
    rig.ok("set_file_permissions", PANEL_ID, path="/cfg/server.properties", mode="600")
    assert rig.ok("get_file_info", PANEL_ID, path="/cfg/server.properties")["permissions"] == "600"
    down = rig.ok("download_file", PANEL_ID, path="/cfg/server.properties")
    assert base64.b64decode(down["content"]) == b"motd=hi\n"
    rig.ok("delete_file", PANEL_ID, path="/cfg")
    assert rig.ok("list_files", PANEL_ID)["files"] == []
    # the files live under the canonical id's directory
    assert "/srv/ctrlagent/servers/" + UUID in rig.files.trees


def test_upload_encodings(rig: Rig) -> None:
    rig.created()
    blob = bytes(range(256))
    up = rig.ok("upload_file", PANEL_ID, path="/world.bin", content=base64.b64encode(blob).decode())
    assert up["size"] == 256
    rig.ok("upload_file", PANEL_ID, path="/a.txt", content="héllo", encoding="utf8")
    assert rig.ok("read_file", PANEL_ID, path="a.txt")["content"] == "héllo"
    err = rig.error("upload_file", PANEL_ID, path="/b", content="!!!not base64")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "content")
    err = rig.error("upload_file", PANEL_ID, path="/b", content="", encoding="rot13")
    assert err.details["field"] == "encoding"
    # a binary file cannot be read as text
    assert rig.error("read_file", PANEL_ID, path="/world.bin").code == "INVALID_PAYLOAD"


def test_file_payload_errors_name_the_field(rig: Rig) -> None:
    rig.created()
    cases = [
        ("read_file", {}, "path"),
        ("read_file", {"path": 7}, "path"),
        ("write_file", {"path": "a"}, "content"),
        ("write_file", {"path": "a", "content": {"x": 1}}, "content"),
        ("rename_file", {"oldPath": "a"}, "newPath"),
        ("set_file_permissions", {"path": "a", "mode": "rwxr-xr-x"}, "mode"),
        ("set_file_permissions", {"path": "a", "mode": "99999"}, "mode"),
        ("set_file_permissions", {"path": "a", "mode": "755\n"}, "mode"),
        ("create_archive", {"archivePath": "a.zip"}, "files"),
        ("create_archive", {"files": ["a"], "archivePath": "a.rar", "format": "rar"}, "format"),
        ("extract_archive", {}, "archivePath"),
        ("search_files", {"path": "/"}, "query"),
        ("search_files", {"query": "x", "fileType": "socket"}, "fileType"),
        ("list_files", {"path": ["/"]}, "path"),
    ]
    for action, params, field in cases:
        err = rig.error(action, UUID, **params)
        assert (action, err.code, err.details.get("field")) == (action, "INVALID_PAYLOAD", field)


def test_paths_cannot_leave_the_server_directory(rig: Rig) -> None:
    rig.created()
    assert rig.error("read_file", UUID, path="../../etc/passwd").code == "PERMISSION_DENIED"
    assert rig.error("list_files", UUID, path="/..").code == "PERMISSION_DENIED"
    assert rig.error("read_file", UUID, path="/missing.txt").code == "FILE_NOT_FOUND"


def test_disk_limit_is_enforced(rig: Rig) -> None:
    rig.created(limits={"disk": 1})
    big = base64.b64encode(b"x" * (1024 * 1024 + 1)).decode()
    assert rig.error("upload_file", UUID, path="/big", content=big).code == "INSUFFICIENT_RESOURCES"


def test_archive_round_trip(rig: Rig) -> None:
    rig.created()
    rig.ok("create_directory", UUID, path="/world/region")
    rig.ok("write_file", UUID, path="/world/region/r.0.0", content="blocks")
    rig.ok("create_archive", UUID, files=["/world"], archivePath="/backup.zip", format="zip")
    rig.ok("create_directory", UUID, path="/restore")
    rig.ok("extract_archive", UUID, archivePath="/backup.zip", extractPath="/restore")
    assert rig.ok("read_file", UUID, path="/restore/world/region/r.0.0")["content"] == "blocks"


def test_mods(rig: Rig) -> None:
    rig.created()
    assert rig.ok("list_mods", PANEL_ID) == {"mods": [], "count": 0}
    rig.ok("install_mod", PANEL_ID, type="steam_workshop", workshopId="123", name="Maps")
    rig.ok("install_mod", PANEL_ID, modId=77)
    assert rig.error("install_mod", PANEL_ID, workshopId="123").code == "CONFLICT"
    assert rig.error("install_mod", PANEL_ID, name="nothing to fetch").details["field"] == "modId"
    assert rig.ok("list_mods", PANEL_ID)["count"] == 2
    left = rig.ok("uninstall_mod", PANEL_ID, modId="123")
    assert [m["id"] for m in left["mods"]] == ["77"]
    assert rig.error("uninstall_mod", PANEL_ID, modId="123").code == "NOT_FOUND"
    assert rig.error("uninstall_mod", PANEL_ID).details["field"] == "modId"


# -- failures ------------------------------------------------------------------


def test_unexpected_exception_is_execution_error_without_traceback(
    rig: Rig, fail_on_logged_errors: list[dict]
) -> None:
    rig.created()
    rig.servers.fail_next("start", ZeroDivisionError("secret internals"))
    err = rig.error("start_server", UUID)
    assert err.code == "EXECUTION_ERROR"
    assert "secret internals" not in err.message and "Traceback" not in err.message
    assert len(fail_on_logged_errors) == 1
    fail_on_logged_errors.clear()


def test_domain_errors_pass_through_with_their_code(rig: Rig) -> None:
    rig.created()
    rig.servers.fail_next("start", CtrlAgentError("no such image", code="DOCKER_ERROR"))
    err = rig.error("start_server", UUID)
    assert (err.code, err.message) == ("DOCKER_ERROR", "no such image")


def test_both_http_body_shapes_dispatch_alike(rig: Rig) -> None:
    rig.created()
    panel = parse_command({"action": "read_file", "serverId": PANEL_ID, "payload": {"path": "/"}})
    go = parse_command({"action": "list_files", "data": {"serverId": PANEL_ID, "path": "/"}})
    results: list[Any] = []
    rig.dispatcher.dispatch(panel).addBoth(results.append)
    rig.dispatcher.dispatch(go).addBoth(results.append)
    assert isinstance(results[0], Failure) and results[0].value.code == "INVALID_PAYLOAD"
    assert results[1].data["files"] == []


def test_any_payload_may_register_the_panels_other_id(rig: Rig) -> None:
    rig.ok("create_server", UUID, image="img")
    assert rig.error("get_status", PANEL_ID).code == "SERVER_NOT_FOUND"
    rig.ok("start_server", UUID, panelId=PANEL_ID, aliases=["third-name"])
    assert rig.ok("get_server_metrics", PANEL_ID)["serverId"] == UUID
    assert rig.ok("get_status", "third-name")["serverId"] == UUID


def test_an_alias_of_another_server_is_not_stolen(rig: Rig) -> None:
    rig.created()  # owns PANEL_ID
    rig.ok("create_server", "second", image="img")
    assert rig.ok("start_server", "second", panelId=PANEL_ID)["status"] == "running"
    assert rig.ok("get_status", PANEL_ID)["serverId"] == UUID


def test_upload_chunk_fields_are_checked_and_passed_on(rig: Rig) -> None:
    rig.created()
    piece = base64.b64encode(b"abc").decode()
    rig.ok("upload_file", UUID, path="/big.zip", content=piece, chunkIndex=0, totalChunks=2)
    assert [f["name"] for f in rig.ok("list_files", UUID)["files"]] == ["big.zip.chunk0"]
    err = rig.error("upload_file", UUID, path="/big.zip", content=piece, chunkIndex="first")
    assert err.details["field"] == "chunkIndex"
    err = rig.error(
        "upload_file", UUID, path="/big.zip", content=piece, chunkIndex=2, totalChunks=2
    )
    assert err.details["field"] == "chunkIndex"


# -- fuzzing -------------------------------------------------------------------


_FIELDS = [
    "path",
    "content",
    "command",
    "lines",
    "signal",
    "timeout",
    "mode",
    "files",
    "archivePath",
    "extractPath",
    "format",
    "query",
    "fileType",
    "oldPath",
    "newPath",
    "encoding",
    "modId",
    "workshopId",
    "downloadUrl",
    "action",
    "purgeFiles",
    "image",
    "name",
    "startup",
    "limits",
    "environment",
    "ports",
    "aliases",
    "panelId",
    "chunkIndex",
    "totalChunks",
    "limit",
    "offset",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["/", "a.txt", "../x", "SIGKILL", "zip", "utf8", "644", "start", "all"]),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=6), _SCALARS, max_size=3),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    action=st.sampled_from(Rig().dispatcher.actions()),
    server_id=st.sampled_from([UUID, PANEL_ID, "nope", None]),
    params=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=6),
)
def test_any_payload_is_answered_with_a_protocol_code(
    action: str, server_id: str | None, params: dict[str, Any]
) -> None:
    """Whatever the Panel sends, the answer is data or a coded error, never a crash."""
    rig = Rig()
    rig.created()
    rig.ok("start_server", UUID)
    rig.ok("write_file", UUID, path="/a.txt", content="hello")
    d = rig.start(action, server_id, **params)
    rig.clock.advance(30)  # past any long-action deadline
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, (action, params)
    result = results[0]
    if isinstance(result, Failure):
        assert isinstance(result.value, CtrlAgentError), result.getTraceback()
        assert result.value.code != "EXECUTION_ERROR", result.getTraceback()
    else:
        json.dumps(result.data, allow_nan=True)


def test_the_answer_deadlines_come_from_the_timeouts_section() -> None:
    clock = Clock()
    servers, files = FakeServerManager(clock), FakeFileManager(clock)
    deadlines = Deadlines(
        clock, Tracker("late"), TimeoutsConfig(command_answer=5, command_margin=1)
    )
    dispatcher = Dispatcher(servers=servers, files=files, system=FakeHost(), deadlines=deadlines)
    create = dispatcher.dispatch(Command("create_server", UUID, {"image": "img"}))
    assert isinstance(create.result, ActionResult)
    servers.hold("stop")
    dispatcher.dispatch(Command("start_server", UUID, {}))
    stop = dispatcher.dispatch(Command("stop_server", UUID, {"timeout": 600}))
    clock.advance(4.9)
    assert not stop.called
    clock.advance(0.1)
    assert stop.result.data["status"] == "stopping"
    slow: Deferred[dict[str, Any]] = Deferred()
    files.read_file = lambda root, path: slow  # type: ignore[method-assign]
    read = dispatcher.dispatch(Command("read_file", UUID, {"path": "/huge.log"}))
    clock.advance(5.9)
    assert not read.called
    clock.advance(0.1)
    answered: list[Any] = []
    read.addBoth(answered.append)
    assert "still running after 6 s" in answered[0].value.message
    assert len(deadlines.tracker) == 2
    slow.callback({"content": "late"})
    assert len(deadlines.tracker) == 1


def test_any_slow_action_is_answered_before_the_panel_gives_up(rig: Rig) -> None:
    rig.created()
    slow: Deferred[dict[str, Any]] = Deferred()
    rig.files.read_file = lambda root, path: slow  # type: ignore[method-assign]
    d = rig.start("read_file", PANEL_ID, path="/huge.log")
    rig.clock.advance(26.9)
    assert not d.called
    rig.clock.advance(0.1)
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert isinstance(answered[0], Failure)
    assert answered[0].value.code == "EXECUTION_ERROR"
    assert "background" in answered[0].value.message
    assert len(rig.tracker) == 1
    slow.callback({"content": "late"})  # finishing late is fine and quiet
    assert len(rig.tracker) == 0


# -- one check of every payload, whichever transport brought it ---------------------------


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


_BAD_PAYLOADS = [
    ("create_server", {"limits": {"cpu": float("inf")}}, "limits.cpu"),
    ("create_server", {"limits": {"cpu": float("-inf")}}, "limits.cpu"),
    ("create_server", {"limits": {"cpu": float("nan")}}, "limits.cpu"),
    ("create_server", {"limits": {"cpu": 1e300}}, "limits.cpu"),
    ("create_server", {"limits": {"memory": 2**53 + 1}}, "limits.memory"),
    ("create_server", {"limits": {"cpu": "inf"}}, "limits.cpu"),
    ("create_server", {"limits": {"cpu": "1e999"}}, "limits.cpu"),
    ("create_server", {"ports": [{"internal": 25565, "external": 2**64}]}, "ports[0].external"),
    ("create_server", {"environment": {"SEED": float("nan")}}, "environment.SEED"),
    ("create_server", {"environment": {"X": "a\ud800"}}, "environment.X"),
    ("stop_server", {"timeout": "1e400"}, "timeout"),
    ("stop_server", {"timeout": 1e300}, "timeout"),
    ("write_file", {"path": "a\ud800.txt", "content": ""}, "path"),
    ("send_server_command", {"command": "say \udfff"}, "command"),
    ("list_files", {"path": "/", "extra": _nested(40)}, "extra.k.k"),
]


@pytest.mark.parametrize(("action", "params", "field"), _BAD_PAYLOADS)
def test_a_non_finite_absurd_deep_or_unusable_value_anywhere_is_invalid_payload(
    rig: Rig, action: str, params: dict[str, Any], field: str
) -> None:
    rig.created()
    if action == "create_server":
        params = {"image": "busybox", **params}
        server_id = "fresh"
    else:
        server_id = UUID
    error = rig.error(action, server_id, **params)
    assert error.code == "INVALID_PAYLOAD", error.message
    assert error.details["field"].startswith(field), error.details
    assert "fresh" not in rig.servers.servers


def test_a_server_id_holding_a_lone_surrogate_is_invalid_payload(rig: Rig) -> None:
    error = rig.error("create_server", "srv\ud800", image="busybox")
    assert (error.code, error.details["field"]) == ("INVALID_PAYLOAD", "serverId")


def test_usable_values_pass_the_check_untouched(rig: Rig) -> None:
    rig.created()
    params = {"path": "/\udcffname.txt", "content": "héllo 😀", "n": 2**53, "f": -(2.0**53)}
    check_payload(params)  # the bytes of a non-UTF-8 file name round-trip
    data = rig.ok("write_file", UUID, path="/ok.txt", content="héllo 😀", deep=_nested(30))
    assert data["size"] == len("héllo 😀".encode())


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("literal", ["1e999", "-1e999", "Infinity", "-Infinity", "NaN",
                                     "9007199254740993", "1e300"])
async def test_http_commands_with_such_numbers_answer_invalid_payload_naming_the_field(
    literal: str,
) -> None:
    api = ApiRig()
    body = ('{"action":"create_server","serverId":"http-1","payload":{"image":"busybox",'
            '"limits":{"memory":512,"cpu":' + literal + "}}}")
    code, answer = await api.command(body.encode())
    assert code == 200
    assert (answer["success"], answer["code"]) == (False, "INVALID_PAYLOAD")
    assert answer["details"]["field"] == "limits.cpu"
    assert "http-1" not in api.servers.servers


# -- which error wins when a command is wrong twice -------------------------------------

_PRECEDENCE = [
    # an unknown action wins over everything
    ("make_coffee", "no-such-server", {"path": 5}, "UNKNOWN_ACTION", None),
    # the one walk of every payload comes before the server
    ("read_file", "no-such-server", {"path": "a\ud800"}, "INVALID_PAYLOAD", "path"),
    ("start_server", "no-such-server", {"x": float("nan")}, "INVALID_PAYLOAD", "x"),
    # server and node actions resolve the server before reading their fields
    ("stop_server", "no-such-server", {"signal": "SIG KILL; rm"}, "SERVER_NOT_FOUND", None),
    ("stop_server", None, {"signal": "SIG KILL; rm"}, "INVALID_PAYLOAD", "serverId"),
    ("delete_server", "no-such-server", {"purgeFiles": "yes"}, "SERVER_NOT_FOUND", None),
    ("update_server", "no-such-server", {"limits": 5}, "SERVER_NOT_FOUND", None),
    ("get_server_logs", "no-such-server", {"lines": "many"}, "SERVER_NOT_FOUND", None),
    ("send_server_command", "no-such-server", {}, "SERVER_NOT_FOUND", None),
    ("console:command", "no-such-server", {}, "SERVER_NOT_FOUND", None),
    ("console:history", "no-such-server", {"lines": 0}, "SERVER_NOT_FOUND", None),
    ("console:download", "no-such-server", {"format": "pdf"}, "SERVER_NOT_FOUND", None),
    # create needs an id first, then its definition
    ("create_server", None, {}, "INVALID_PAYLOAD", "serverId"),
    ("create_server", "fresh", {"name": 5}, "INVALID_PAYLOAD", "image"),
    ("create_server", "fresh", {"image": "img", "name": 5, "environment": "A=1"},
     "INVALID_PAYLOAD", "name"),
    ("create_server", "fresh", {"image": "img", "limits": [1], "ports": {}},
     "INVALID_PAYLOAD", "limits"),
    ("create_server", "fresh", {"image": "img", "ports": {}, "skipScripts": "maybe"},
     "INVALID_PAYLOAD", "ports"),
    # power_server reads its action before the server
    ("power_server", "no-such-server", {"action": "explode"}, "INVALID_PAYLOAD", "action"),
    ("power_server", None, {"action": "explode"}, "INVALID_PAYLOAD", "action"),
    # file and mod actions read their fields before the server (and its root)
    ("read_file", "no-such-server", {}, "INVALID_PAYLOAD", "path"),
    ("read_file", None, {}, "INVALID_PAYLOAD", "path"),
    ("write_file", "no-such-server", {"path": "a"}, "INVALID_PAYLOAD", "content"),
    ("list_files", "no-such-server", {"path": ["/"], "limit": 0}, "INVALID_PAYLOAD", "path"),
    ("list_files", "no-such-server", {"limit": 0, "offset": -1}, "INVALID_PAYLOAD", "limit"),
    ("search_files", "no-such-server", {"fileType": "socket"}, "INVALID_PAYLOAD", "query"),
    ("rename_file", "no-such-server", {}, "INVALID_PAYLOAD", "oldPath"),
    ("upload_file", "no-such-server", {"encoding": "rot13"}, "INVALID_PAYLOAD", "path"),
    ("upload_file", "no-such-server", {"path": "a", "encoding": "rot13"},
     "INVALID_PAYLOAD", "content"),
    ("upload_file", "no-such-server", {"path": "a", "content": "", "encoding": "rot13",
                                       "chunkIndex": "x"}, "INVALID_PAYLOAD", "encoding"),
    ("set_file_permissions", "no-such-server", {"mode": "x"}, "INVALID_PAYLOAD", "path"),
    ("create_archive", "no-such-server", {"format": "rar"}, "INVALID_PAYLOAD", "files"),
    ("create_archive", "no-such-server", {"files": ["a"], "format": "rar"},
     "INVALID_PAYLOAD", "archivePath"),
    ("extract_archive", "no-such-server", {"extractPath": 5}, "INVALID_PAYLOAD", "archivePath"),
    ("install_mod", "no-such-server", {}, "INVALID_PAYLOAD", "modId"),
    ("install_mod", "no-such-server", {"type": 5, "workshopId": 6}, "INVALID_PAYLOAD", "type"),
    ("install_mod", "no-such-server", {"version": 5, "modId": [1]}, "INVALID_PAYLOAD", "version"),
    ("uninstall_mod", "no-such-server", {}, "INVALID_PAYLOAD", "modId"),
    ("list_mods", "no-such-server", {}, "SERVER_NOT_FOUND", None),
    ("list_files", None, {}, "INVALID_PAYLOAD", "serverId"),
]


@pytest.mark.parametrize(("action", "server_id", "params", "code", "field"), _PRECEDENCE)
def test_a_doubly_wrong_command_reports_the_same_error_first(
    rig: Rig, action: str, server_id: str | None, params: dict[str, Any], code: str,
    field: str | None,
) -> None:
    rig.created()
    error = rig.error(action, server_id, **params)
    assert (error.code, error.details.get("field")) == (code, field)
