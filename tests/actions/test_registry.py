"""
The registry's one pipeline: lookup and aliases, the check of every payload, alias
learning, which error wins, deadlines and unexpected errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ctrlagent.actions import Dispatcher, build_registry
from ctrlagent.actions.payload import Payload
from ctrlagent.actions.registry import ActionSpec, Call
from ctrlagent.config import TimeoutsConfig
from ctrlagent.errors import CtrlAgentError
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.wire.command import ActionResult, Command, IDispatcher, check_payload, parse_command
from ctrlagent.wire.json import to_json
from ctrlagent.work import Deadlines, Tracker
from tests.actions.rig import PANEL_ID, UUID, FakeHost, Rig
from tests.api.conftest import ApiRig


def test_dispatcher_provides_the_interface(rig: Rig) -> None:
    assert IDispatcher.providedBy(rig.dispatcher)
    for action in ("create_server", "console:download", "system.ping", "get_status", "list_mods"):
        assert action in rig.dispatcher.actions()


def test_unknown_action_is_unknown_action(rig: Rig) -> None:
    assert rig.error("make_coffee", UUID).code == "UNKNOWN_ACTION"


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


def test_legacy_names_reach_the_same_actions(rig: Rig) -> None:
    rig.ok("server_create", UUID, image="img")
    assert rig.ok("server_start", UUID)["status"] == "running"
    rig.ok("server_command", UUID, command="hello")
    assert "> hello" in rig.ok("get_server_logs", UUID)["logs"]
    assert rig.ok("server_stop", UUID)["status"] == "offline"


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
        json.dumps(to_json(result.data), allow_nan=True)


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


# -- the registry itself ------------------------------------------------------------------


def test_a_name_or_alias_cannot_be_registered_twice(rig: Rig) -> None:
    (ping,) = [s for s in rig.dispatcher.specs() if s.name == "system.ping"]
    with pytest.raises(ValueError, match="system.ping"):
        rig.dispatcher.register(ping)
    with pytest.raises(ValueError, match="get_status"):
        rig.dispatcher.register(replace(ping, name="new_name", aliases=("get_status",)))
    assert "new_name" not in rig.dispatcher.names()


def test_build_registry_answers_what_the_dispatcher_answers(rig: Rig) -> None:
    registry = build_registry(
        servers=rig.servers, files=rig.files, host=FakeHost(),
        deadlines=Deadlines(rig.clock, Tracker(), TimeoutsConfig()),
    )
    assert registry.names() == rig.dispatcher.names()
    assert [s.name for s in registry.specs()] == [s.name for s in rig.dispatcher.specs()]
    families = {s.family for s in registry.specs()}
    assert families == {"servers", "console", "files", "mods", "node", "sftp", "backups"}
    answered: list[Any] = []
    registry.dispatch(Command("system.ping", None, {})).addBoth(answered.append)
    assert answered[0].message == "pong"


@dataclass(frozen=True)
class Plain:
    """A result record, as the domain's typed records are."""

    server_id: str
    status: str


@to_json.register
def _plain_json(value: Plain) -> dict[str, Any]:
    return {"serverId": value.server_id, "status": value.status, "kind": "record"}


def _echo_spec(name: str, result: object, **kw: Any) -> ActionSpec:
    async def handler(call: Call) -> object:
        return result

    return ActionSpec(name, "test", "echo", Payload(), handler, **kw)


def test_a_record_answer_goes_through_untouched_and_a_mapping_gets_its_server_id(
    rig: Rig,
) -> None:
    rig.created()
    record = Plain("whoever", "running")
    rig.dispatcher.register(_echo_spec("echo_record", record, names_server=True))
    rig.dispatcher.register(_echo_spec("echo_mapping", {"status": "x"}, names_server=True))
    rig.dispatcher.register(_echo_spec("echo_plain", {"status": "x"}))
    rig.dispatcher.register(_echo_spec("echo_none", None, names_server=True))
    answered: list[Any] = []
    rig.dispatcher.dispatch(Command("echo_record", PANEL_ID, {})).addBoth(answered.append)
    assert answered[0].data is record
    assert rig.ok("echo_record", PANEL_ID)["kind"] == "record"
    assert rig.ok("echo_mapping", PANEL_ID) == {"status": "x", "serverId": UUID}
    assert rig.ok("echo_plain", PANEL_ID) == {"status": "x"}
    assert rig.ok("echo_none", PANEL_ID) == {}


def test_handlers_read_domain_records_through_to_json(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    rig.created("other", panelId="other-panel")
    listed = rig.servers.list_servers()
    rig.servers.list_servers = lambda: [  # type: ignore[method-assign]
        Plain(to_json(s)["serverId"], to_json(s)["status"]) for s in listed
    ]
    status = rig.ok("system.status")
    assert (status["serverCount"], status["runningServers"]) == (2, 1)
    assert rig.ok("list_servers")["servers"][0]["kind"] == "record"
    rig.servers.status = lambda server_id: Plain(server_id, "stopping")  # type: ignore[assignment]
    rig.servers.hold("stop")
    d = rig.start("stop_server", UUID)
    rig.clock.advance(25)
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert answered[0].data == {
        "serverId": UUID, "status": "stopping", "kind": "record", "pending": True
    }


# -- answers at once, and the rest of an action that waits ----------------------------


def test_a_read_is_answered_at_once_without_a_coroutine_driver(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.created()
    driven: list[object] = []
    from_coroutine = Deferred.fromCoroutine

    def counting(coroutine: Any) -> Deferred[Any]:
        driven.append(coroutine)
        return from_coroutine(coroutine)

    monkeypatch.setattr(Deferred, "fromCoroutine", counting)
    status = rig.dispatcher.dispatch(Command("get_server_status", PANEL_ID, {}))
    metrics = rig.dispatcher.dispatch(Command("get_server_metrics", UUID, {}))
    assert status.result.data.server_id == UUID
    assert to_json(metrics.result.data)["serverId"] == UUID
    unknown = rig.dispatcher.dispatch(Command("get_server_status", "nope", {}))
    failed: list[Any] = []
    unknown.addErrback(failed.append)
    assert failed[0].value.code == "SERVER_NOT_FOUND"
    assert driven == []
    # A command that waits is driven (and bounded by its deadline) as ever.
    rig.servers.hold("start")
    start = rig.dispatcher.dispatch(Command("start_server", UUID, {}))
    assert not start.called
    assert driven


def _waiting_registry(handler: Any) -> tuple[Dispatcher, Clock]:
    clock = Clock()
    servers, files = FakeServerManager(clock), FakeFileManager(clock)
    dispatcher = Dispatcher(servers=servers, files=files, system=FakeHost(), clock=clock,
                            tracker=Tracker())
    dispatcher.register(
        ActionSpec("wait_twice", "node", "waits", Payload(server="none"), handler)
    )
    return dispatcher, clock


def test_an_action_that_waits_gets_what_each_wait_gives_or_raises() -> None:
    first: Deferred[str] = Deferred()
    second: Deferred[str] = Deferred()
    seen: list[object] = []

    async def handler(call: Call) -> object:
        seen.append(await first)
        try:
            await second
        except CtrlAgentError as e:
            seen.append(e.code)
        return {"seen": list(seen)}

    dispatcher, _ = _waiting_registry(handler)
    answer = dispatcher.dispatch(Command("wait_twice", None, {}))
    assert not answer.called
    first.callback("one")
    assert seen == ["one"] and not answer.called
    second.errback(CtrlAgentError("no", code="CONFLICT"))
    assert answer.result.data == {"seen": ["one", "CONFLICT"]}


def test_an_error_after_a_wait_is_answered_with_its_code() -> None:
    gate: Deferred[None] = Deferred()

    async def handler(call: Call) -> object:
        await gate
        raise CtrlAgentError("taken", code="CONFLICT")

    dispatcher, _ = _waiting_registry(handler)
    answer = dispatcher.dispatch(Command("wait_twice", None, {}))
    gate.callback(None)
    failed: list[Any] = []
    answer.addErrback(failed.append)
    assert failed[0].value.code == "CONFLICT"


def test_cancelling_the_answer_of_an_action_that_waits_leaves_its_work_going() -> None:
    cancelled: list[object] = []
    gate: Deferred[None] = Deferred(cancelled.append)
    reached: list[str] = []

    async def handler(call: Call) -> object:
        await gate
        reached.append("after the wait")
        return {}

    dispatcher, _ = _waiting_registry(handler)
    answer = dispatcher.dispatch(Command("wait_twice", None, {}))
    answer.addErrback(lambda failure: None)
    answer.cancel()
    assert cancelled == []
    gate.callback(None)
    assert reached == ["after the wait"]
