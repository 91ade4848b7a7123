"""
The Klein app in memory: every route, auth, the Panel's body shapes and the
failure rules (command failures are HTTP 200, bad JSON 400, bad secret 401).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from openapi_spec_validator import validate
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, DeferredList

from ctrlagent import __version__
from ctrlagent.api.app import AgentApi, human_duration
from ctrlagent.api.openapi import openapi_document
from ctrlagent.config import TimeoutsConfig
from ctrlagent.wire.command import Command
from ctrlagent.wire.json import to_json
from tests.api.conftest import PANEL_ID, SECRET, UUID, ApiRig, panel_headers


async def create(rig: ApiRig) -> None:
    code, body = await rig.command(
        {
            "action": "create_server",
            "serverId": UUID,
            "payload": {
                "name": "Survival",
                "image": "ctrlagent-test/scripted:1",
                "startup": "./run.sh",
                "environment": {"PORT": 25565, "EULA": True},
                "limits": {"memory": 512, "swap": 0, "disk": 1024, "cpu": 100, "io": 500},
                "skipScripts": False,
                "panelId": PANEL_ID,
            },
        }
    )
    assert (code, body["success"]) == (200, True), body


# -- /health and friends ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_is_healthy_with_the_panel_fields(rig: ApiRig) -> None:
    rig.clock.advance(3725)
    code, body, headers = await rig.get("/health")
    assert code == 200
    assert body["status"] == "healthy"
    assert body["nodeId"] == "node-test"
    assert body["version"] == __version__
    assert body["uptime"] == "1h 2m 5s" and body["uptimeSeconds"] == 3725
    assert body["connected"] is True and body["docker"] is True
    assert body["timestamp"].endswith("Z")
    assert headers.getRawHeaders("content-type")[0].startswith("application/json")


@pytest_twisted.ensureDeferred
async def test_timestamps_are_the_wire_format_with_milliseconds(rig: ApiRig) -> None:
    rig.clock.advance(0.2567)
    _, health, _ = await rig.get("/health")
    _, status, _ = await rig.get("/api/status", Authorization="Bearer " + SECRET)
    # The one precision of both transports (wire.time.iso_ms), at the agent's clock.
    assert health["timestamp"] == status["lastSeen"] == "2023-11-14T22:13:20.256Z"


@pytest_twisted.ensureDeferred
async def test_a_down_link_leaves_the_node_online_and_shows_under_panel_link(rig: ApiRig) -> None:
    # The Panel drives the agent over HTTP and registers a node offline when
    # ``connected`` is false: an optional WebSocket link that is down must not say so.
    rig.link_up = False
    code, body, _ = await rig.get("/health")
    assert (code, body["status"], body["connected"], body["docker"]) == (
        200,
        "healthy",
        True,
        True,
    )
    assert (body["panelLink"]["enabled"], body["panelLink"]["connected"]) == (True, False)
    assert body["panelLink"]["state"] == "disconnected"
    _, status, _ = await rig.get("/api/status", Authorization="Bearer " + SECRET)
    assert status["online"] is True and status["panelLink"]["connected"] is False
    rig.link_up = True
    _, body, _ = await rig.get("/health")
    assert body["panelLink"]["connected"] is True and body["panelLink"]["state"] == "connected"


@pytest_twisted.ensureDeferred
async def test_an_agent_without_a_link_reports_it_disabled_and_is_online(rig: ApiRig) -> None:
    link = {"enabled": False, "connected": False, "state": "disabled", "url": None,
            "lastError": None, "since": None}
    api = AgentApi(
        config=rig.config, dispatcher=rig.dispatcher, servers=rig.servers,
        docker_ping=rig.docker.ping, clock=rig.clock, version=__version__,
    )
    http = StubTreq(api.app.resource())
    response = await http.get("http://node.test:8081/health")
    body = json.loads(await response.content())
    assert (response.code, body["connected"], body["status"]) == (200, True, "healthy")
    assert body["panelLink"] == link
    response = await http.get(
        "http://node.test:8081/api/status", headers={"Authorization": "Bearer " + SECRET}
    )
    status = json.loads(await response.content())
    assert status["online"] is True and status["panelLink"] == link


@pytest_twisted.ensureDeferred
async def test_a_link_state_that_raises_is_reported_unknown_not_a_500(
    rig: ApiRig, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("link went away")

    api = AgentApi(
        config=rig.config, dispatcher=rig.dispatcher, servers=rig.servers,
        docker_ping=rig.docker.ping, clock=rig.clock, version=__version__, panel_link=broken,
    )
    response = await StubTreq(api.app.resource()).get("http://node.test:8081/health")
    body = json.loads(await response.content())
    assert (response.code, body["connected"], body["panelLink"]["state"]) == (200, True, "unknown")
    # The bug is logged once, with its traceback, and nowhere else.
    assert [e["log_format"] for e in fail_on_logged_errors] == ["link state check failed"]
    fail_on_logged_errors.clear()


@pytest_twisted.ensureDeferred
async def test_health_is_503_only_when_docker_is_unreachable(rig: ApiRig) -> None:
    rig.docker.ok = False
    code, body, _ = await rig.get("/health")
    assert (code, body["docker"], body["status"]) == (503, False, "degraded")
    assert body["nodeId"] == "node-test"
    rig.clock.advance(2)
    rig.docker.ok = ConnectionRefusedError("no socket")
    code, body, _ = await rig.get("/health")
    assert (code, body["docker"]) == (503, False)
    rig.clock.advance(2)
    rig.docker.ok = True
    code, body, _ = await rig.get("/health")
    assert (code, body["docker"]) == (200, True)


@pytest_twisted.ensureDeferred
async def test_health_caches_the_docker_ping(rig: ApiRig) -> None:
    for _ in range(5):
        assert (await rig.get("/health"))[0] == 200
    assert rig.docker.pings == 1
    rig.clock.advance(2)
    await rig.get("/health")
    assert rig.docker.pings == 2


@pytest_twisted.ensureDeferred
async def test_the_engine_ping_deadline_and_cache_come_from_the_timeouts_section() -> None:
    rig = ApiRig(timeouts=TimeoutsConfig(engine_ping=1, engine_ping_cache=0.5))
    rig.docker.ok = None
    probe = Deferred.fromCoroutine(rig.get("/health"))
    rig.clock.advance(0.9)
    rig.http.flush()
    assert not probe.called
    rig.clock.advance(0.1)
    rig.http.flush()
    assert probe.called
    code, body, _ = await probe
    assert (code, body["docker"]) == (503, False)
    rig.docker.ok = True
    rig.clock.advance(0.4)
    assert (await rig.get("/health"))[0] == 503  # still the cached answer
    rig.clock.advance(0.1)
    assert (await rig.get("/health"))[0] == 200
    assert rig.docker.pings == 2


@pytest_twisted.ensureDeferred
async def test_a_hanging_docker_ping_times_out_as_unreachable(rig: ApiRig) -> None:
    rig.docker.ok = None
    first = Deferred.fromCoroutine(rig.get("/health"))
    second = Deferred.fromCoroutine(rig.get("/health"))
    assert not first.called
    rig.clock.advance(3)
    rig.http.flush()  # deliver the late answers through the in-memory transport
    (code, body, _), (code2, _, _) = await first, await second
    assert (code, body["docker"], code2) == (503, False, 503)
    assert rig.docker.pings == 1  # the second probe shared the first ping


@pytest_twisted.ensureDeferred
async def test_root_redirects_to_health(rig: ApiRig) -> None:
    response = await rig.http.get("http://node.test:8081/", allow_redirects=False)
    assert response.code == 301
    assert response.headers.getRawHeaders("location") == ["/health"]


@pytest_twisted.ensureDeferred
async def test_discovery(rig: ApiRig) -> None:
    code, body, headers = await rig.get("/api/discovery")
    assert code == 200
    assert body == {
        "type": "ctrl-alt-play-agent",
        "version": __version__,
        "name": "Ctrl-Alt-Play Agent",
        "nodeUuid": "node-test",
        "nodeId": "node-test",
    }
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]


# -- auth --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_needs_the_secret(rig: ApiRig) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic " + SECRET},
        {"Authorization": "Bearer " + SECRET + "x"},
        {"X-API-Key": "wrong"},
        {"Authorization": "Bearer"},
    ):
        code, body, _ = await rig.get("/api/status", **headers)
        assert code == 401, headers
        assert body == {
            "success": False,
            "error": "missing or invalid credentials",
            "code": "AUTH_FAILED",
        }


@pytest_twisted.ensureDeferred
async def test_status_with_bearer_or_api_key(rig: ApiRig) -> None:
    await create(rig)
    for headers in (
        {"Authorization": "Bearer " + SECRET},
        {"Authorization": "bearer " + SECRET},
        {"X-API-Key": SECRET},
        {"Authorization": "Bearer wrong", "X-API-Key": SECRET},
    ):
        code, body, _ = await rig.get("/api/status", **headers)
        assert code == 200, headers
        assert body["online"] is True
        assert body["version"] == __version__
        assert body["serverCount"] == 1
        assert isinstance(body["uptime"], (int, float))
        assert body["nodeId"] == "node-test" and body["lastSeen"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_command_with_a_wrong_secret_is_401_and_does_nothing(rig: ApiRig) -> None:
    code, body = await rig.command(
        {"action": "create_server", "serverId": UUID, "payload": {"image": "x"}}, secret="nope"
    )
    assert (code, body["code"]) == (401, "AUTH_FAILED")
    assert rig.servers.servers == {}


# -- /api/command --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_panel_flow_with_both_id_kinds(rig: ApiRig) -> None:
    await create(rig)
    code, body = await rig.command({"action": "start_server", "serverId": UUID, "payload": {}})
    assert code == 200 and body["success"] is True
    assert {key: body["data"][key] for key in ("serverId", "status", "panelStatus")} == {
        "serverId": UUID, "status": "running", "panelStatus": "RUNNING"
    }
    code, body = await rig.command(
        {"action": "console:command", "serverId": PANEL_ID, "payload": {"command": "list"}}
    )
    assert body["data"]["response"] == "> list"
    rig.servers.set_metrics(UUID, {"cpu": 5.5, "memory": 300, "players": 2})
    code, body = await rig.command({"action": "get_server_metrics", "serverId": PANEL_ID})
    data = body["data"]
    assert data["cpu"] == 5.5 and data["memory"] == 300.0 and data["players"] == 2
    assert data["network"] == {"in": 0, "out": 0}
    code, body = await rig.command(
        {"action": "stop_server", "serverId": UUID, "payload": {"signal": "SIGTERM", "timeout": 30}}
    )
    assert body["data"]["status"] == "offline"
    code, body = await rig.command({"action": "delete_server", "serverId": UUID, "payload": {}})
    assert body["success"] is True
    assert rig.servers.servers == {}


@pytest_twisted.ensureDeferred
async def test_go_agent_body_shape(rig: ApiRig) -> None:
    await create(rig)
    code, body = await rig.command(
        {"action": "write_file", "data": {"serverId": PANEL_ID, "path": "/a.txt", "content": "hi"}}
    )
    assert (code, body["success"]) == (200, True)
    code, body = await rig.command(
        {"action": "read_file", "data": {"serverId": UUID}, "payload": {"path": "a.txt"}}
    )
    assert body["data"]["content"] == "hi"


@pytest_twisted.ensureDeferred
async def test_ping_and_system_metrics_need_no_server(rig: ApiRig) -> None:
    code, body = await rig.command({"action": "system.ping"})
    assert body["success"] is True and body["data"]["message"] == "pong"
    code, body = await rig.command({"action": "get_system_metrics"})
    assert body["data"]["serverCount"] == 0


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"   ", b"[1, 2]", b'"create_server"', b"\xff\xfe{}", b"null"],
)
@pytest_twisted.ensureDeferred
async def test_unparseable_bodies_are_400_parse_error(rig: ApiRig, raw: bytes) -> None:
    code, body = await rig.command(raw)
    assert code == 400
    assert body["success"] is False and body["code"] == "PARSE_ERROR"
    assert body["error"]


@pytest.mark.parametrize(
    "command,code,field",
    [
        ({"serverId": UUID}, "INVALID_PAYLOAD", "action"),
        ({"action": 5}, "INVALID_PAYLOAD", "action"),
        (
            {"action": "start_server", "serverId": UUID, "payload": "x"},
            "INVALID_PAYLOAD",
            "payload",
        ),
        ({"action": "start_server", "serverId": {"id": 1}}, "INVALID_PAYLOAD", "serverId"),
        ({"action": "start_server"}, "INVALID_PAYLOAD", "serverId"),
        (
            {"action": "get_server_logs", "serverId": UUID, "payload": {"lines": "lots"}},
            "INVALID_PAYLOAD",
            "lines",
        ),
        ({"action": "start_server", "serverId": "nope"}, "SERVER_NOT_FOUND", None),
        (
            {"action": "read_file", "serverId": "nope", "payload": {"path": "a"}},
            "SERVER_NOT_FOUND",
            None,
        ),
        ({"action": "launch_rockets", "serverId": UUID}, "UNKNOWN_ACTION", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_command_failures_are_http_200(
    rig: ApiRig, command: dict, code: str, field: str | None
) -> None:
    await create(rig)
    status, body = await rig.command(command)
    assert status == 200
    assert body["success"] is False
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    if field is not None:
        assert body["details"]["field"] == field


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413_even_in_memory() -> None:
    rig = ApiRig(max_body_bytes=2048)
    code, body = await rig.command({"action": "system.ping", "payload": {"pad": "x" * 4096}})
    assert (code, body["success"]) == (413, False)
    code, body = await rig.command({"action": "system.ping"})
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_do_not_leak(rig: ApiRig, fail_on_logged_errors: list) -> None:
    await create(rig)
    rig.servers.fail_next("start", RuntimeError("/etc/shadow is at 0xdeadbeef"))
    code, body = await rig.command({"action": "start_server", "serverId": UUID})
    assert (code, body["code"]) == (200, "EXECUTION_ERROR")
    assert "shadow" not in json.dumps(body)
    assert len(fail_on_logged_errors) == 1
    fail_on_logged_errors.clear()


@pytest_twisted.ensureDeferred
async def test_fifty_concurrent_commands_to_one_server(rig: ApiRig) -> None:
    await create(rig)
    await rig.command({"action": "start_server", "serverId": UUID})
    results = await DeferredList(
        [
            Deferred.fromCoroutine(
                rig.command(
                    {
                        "action": "send_server_command",
                        "serverId": PANEL_ID if i % 2 else UUID,
                        "payload": {"command": "say {}".format(i)},
                    }
                )
            )
            for i in range(50)
        ],
        consumeErrors=True,
    )
    assert all(ok and r == (200, r[1]) and r[1]["success"] for ok, r in results)
    assert sorted(rig.servers.servers[UUID].stdin) == sorted("say {}".format(i) for i in range(50))


@pytest_twisted.ensureDeferred
async def test_concurrent_power_actions_conflict_cleanly(rig: ApiRig) -> None:
    await create(rig)
    await rig.command({"action": "start_server", "serverId": UUID})
    gate = rig.servers.hold("stop")
    first = Deferred.fromCoroutine(rig.command({"action": "stop_server", "serverId": UUID}))
    others = [
        await rig.command({"action": action, "serverId": PANEL_ID})
        for action in ("restart_server", "stop_server", "delete_server")
    ]
    assert [(c, b["code"]) for c, b in others] == [(200, "CONFLICT")] * 3
    gate.callback(None)
    rig.http.flush()
    code, body = await first
    assert body["data"]["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_does_not_cancel_the_action(rig: ApiRig) -> None:
    await create(rig)
    await rig.command({"action": "start_server", "serverId": UUID})
    gate = rig.servers.hold("stop")
    running = Deferred.fromCoroutine(rig.api._run(Command("stop_server", UUID, {})))
    running.cancel()
    running.addErrback(lambda f: None)
    assert to_json(rig.servers.status(UUID))["status"] == "stopping"
    # The abandoned stop is still the API's work: a stopping API waits for it.
    assert rig.api.in_flight == 1
    drained = rig.api.drain(5)
    assert not drained.called
    gate.callback(None)
    assert to_json(rig.servers.status(UUID))["status"] == "offline"
    assert drained.called and rig.api.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_commands_answer_by_the_configured_deadline() -> None:
    rig = ApiRig(timeouts=TimeoutsConfig(command_answer=5, command_margin=1))
    await create(rig)
    await rig.command({"action": "start_server", "serverId": UUID})
    gate = rig.servers.hold("stop")
    answer = Deferred.fromCoroutine(rig.command({"action": "stop_server", "serverId": UUID}))
    rig.clock.advance(4.9)
    rig.http.flush()
    assert not answer.called
    rig.clock.advance(0.1)
    rig.http.flush()
    assert answer.called
    code, body = await answer
    assert (code, body["data"]["status"]) == (200, "stopping")
    # The stop goes on in the background, under the tracker.
    assert len(rig.deadlines.tracker) == 1
    gate.callback(None)
    assert len(rig.deadlines.tracker) == 0
    assert to_json(rig.servers.status(UUID))["status"] == "offline"


# -- CORS --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cors_preflight_and_headers(rig: ApiRig) -> None:
    for path in ("/api/command", "/api/servers/x/power", "/api"):
        response = await rig.http.request("OPTIONS", "http://node.test:8081" + path)
        assert response.code == 200, path
        h = response.headers
        assert h.getRawHeaders("access-control-allow-origin") == ["*"]
        assert h.getRawHeaders("access-control-allow-methods") == [
            "GET, POST, PUT, DELETE, OPTIONS"
        ]
        assert h.getRawHeaders("access-control-allow-headers") == [
            "Content-Type, Authorization, X-API-Key"
        ]
    _, _, headers = await rig.get("/api/status")  # even a 401 carries CORS
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]


@pytest_twisted.ensureDeferred
async def test_cors_origin_is_configurable() -> None:
    rig = ApiRig(cors_origin="https://panel.example")
    _, _, headers = await rig.get("/api/status", Authorization="Bearer " + SECRET)
    assert headers.getRawHeaders("access-control-allow-origin") == ["https://panel.example"]


# -- routing errors ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods_answer_json(rig: ApiRig) -> None:
    code, body, _ = await rig.get("/api/nothing-here", Authorization="Bearer " + SECRET)
    assert (code, body["code"]) == (404, "NOT_FOUND")
    code, body, headers = await rig.get("/api/command", Authorization="Bearer " + SECRET)
    assert (code, body["code"]) == (405, "METHOD_NOT_ALLOWED")
    assert "POST" in headers.getRawHeaders("allow")[0]


# -- REST ----------------------------------------------------------------------------


async def rest(rig: ApiRig, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"headers": panel_headers()}
    if body is not None:
        kwargs["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await rig.http.request(method, "http://node.test:8081" + path, **kwargs)
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_rest_surface(rig: ApiRig) -> None:
    assert await rest(rig, "GET", "/api/servers") == (
        200,
        {"success": True, "data": {"servers": [], "count": 0}},
    )
    await create(rig)
    code, body = await rest(rig, "GET", "/api/servers/" + PANEL_ID)
    assert (code, body["data"]["serverId"], body["data"]["status"]) == (200, UUID, "offline")
    code, body = await rest(
        rig, "POST", "/api/servers/{}/power".format(PANEL_ID), {"action": "start"}
    )
    assert (code, body["data"]["status"]) == (200, "running")
    code, body = await rest(
        rig, "POST", "/api/servers/{}/commands".format(UUID), {"command": "say hello"}
    )
    assert code == 200 and body["success"] is True
    code, body = await rest(rig, "GET", "/api/servers/{}/logs?lines=1".format(UUID))
    assert (code, body["data"]["logs"]) == (200, ["> say hello"])
    code, body = await rest(
        rig, "POST", "/api/servers/{}/power".format(UUID), {"action": "stop", "signal": "SIGKILL"}
    )
    assert (code, body["data"]["status"]) == (200, "offline")
    code, body = await rest(rig, "GET", "/api/servers")
    assert body["data"]["count"] == 1


@pytest_twisted.ensureDeferred
async def test_rest_errors_use_http_codes(rig: ApiRig) -> None:
    await create(rig)
    assert (await rest(rig, "GET", "/api/servers/nope"))[0] == 404
    code, body = await rest(rig, "POST", "/api/servers/{}/power".format(UUID), {"action": "dance"})
    assert (code, body["details"]["field"]) == (400, "action")
    code, body = await rest(rig, "POST", "/api/servers/{}/power".format(UUID), b"{oops")
    assert (code, body["code"]) == (400, "PARSE_ERROR")
    code, body = await rest(rig, "POST", "/api/servers/{}/commands".format(UUID), {"command": "x"})
    assert (code, body["code"]) == (409, "CONFLICT")  # not running
    code, body = await rest(rig, "POST", "/api/servers/{}/commands".format(UUID), {})
    assert (code, body["details"]["field"]) == (400, "command")
    code, body = await rest(rig, "GET", "/api/servers/{}/logs?lines=abc".format(UUID))
    assert (code, body["details"]["field"]) == (400, "lines")
    response = await rig.http.get("http://node.test:8081/api/servers")
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_rest_aliases_record_the_panels_second_id_and_refuse_conflicts(
    rig: ApiRig,
) -> None:
    # A create that told only the power id (server.uuid), as the Panel's does.
    code, body = await rig.command({"action": "create_server", "serverId": UUID,
                                    "payload": {"name": "s", "image": "img"}})
    assert body["success"] is True
    assert (await rest(rig, "GET", "/api/servers/" + PANEL_ID))[0] == 404
    code, body = await rest(rig, "POST", "/api/servers/{}/aliases".format(UUID),
                            {"alias": PANEL_ID})
    assert (code, body["data"]["aliases"], body["data"]["added"]) == (200, [PANEL_ID], True)
    # The Panel's console/files/metrics id now works on /api/command.
    code, body = await rig.command({"action": "get_server_metrics", "serverId": PANEL_ID})
    assert (code, body["success"]) == (200, True)
    other = "b" * 32
    await rig.command({"action": "create_server", "serverId": other,
                       "payload": {"name": "t", "image": "img"}})
    code, body = await rest(rig, "POST", "/api/servers/{}/aliases".format(other),
                            {"alias": PANEL_ID})
    assert (code, body["code"]) == (409, "CONFLICT")
    code, body = await rest(rig, "POST", "/api/servers/{}/aliases".format(other), {"alias": UUID})
    assert (code, body["code"]) == (409, "CONFLICT")
    code, body = await rest(rig, "POST", "/api/servers/{}/aliases".format(other), {})
    assert (code, body["details"]["field"]) == (400, "alias")
    code, body = await rest(rig, "POST", "/api/servers/ghost/aliases", {"alias": "x1"})
    assert (code, body["code"]) == (404, "SERVER_NOT_FOUND")
    response = await rig.http.post("http://node.test:8081/api/servers/{}/aliases".format(UUID),
                                   data=b'{"alias": "y"}')
    assert response.code == 401


# -- OpenAPI -------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        for value in node.values():
            found.extend(_refs(value))
        return found
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


@pytest_twisted.ensureDeferred
async def test_openapi_document_describes_every_route(rig: ApiRig) -> None:
    code, document, _ = await rig.get("/api/openapi.json")
    assert code == 200
    validate(document)
    assert document["info"]["version"] == __version__
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    assert "get_server_metrics" in schemas["Action"]["enum"]
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    for rule in rig.api.app.url_map.iter_rules():
        path = rule.rule.replace("<server_id>", "{serverId}").replace("<backup_id>", "{backupId}")
        for method in rule.methods or ():
            if method in ("HEAD", "OPTIONS"):
                continue
            assert (path, method.lower()) in described, (path, method)


def test_openapi_document_is_a_fresh_copy() -> None:
    first = openapi_document("1")
    first["paths"].clear()
    assert openapi_document("2")["paths"]


def test_human_duration() -> None:
    assert human_duration(0) == "0s"
    assert human_duration(61) == "1m 1s"
    assert human_duration(90061) == "1d 1h 1m 1s"
    assert human_duration(3600) == "1h 0m 0s"


@pytest_twisted.ensureDeferred
async def test_drain_waits_for_commands_in_flight(rig: ApiRig) -> None:
    await create(rig)
    await rig.command({"action": "start_server", "serverId": UUID})
    assert rig.api.drain(5).called  # nothing running
    gate = rig.servers.hold("stop")
    answer = Deferred.fromCoroutine(rig.command({"action": "stop_server", "serverId": UUID}))
    assert rig.api.in_flight == 1
    drained = rig.api.drain(5)
    assert not drained.called
    gate.callback(None)
    assert drained.called and rig.api.in_flight == 0
    rig.http.flush()
    assert (await answer)[1]["data"]["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_drain_gives_up_after_its_timeout(rig: ApiRig) -> None:
    await create(rig)
    await rig.command({"action": "start_server", "serverId": UUID})
    gate = rig.servers.hold("stop")
    Deferred.fromCoroutine(rig.command({"action": "stop_server", "serverId": UUID}))
    drained = rig.api.drain(5)
    rig.clock.advance(5)
    assert drained.called
    gate.callback(None)
    rig.http.flush()


@pytest_twisted.ensureDeferred
async def test_an_empty_secret_is_open_only_in_development_mode() -> None:
    for development, expected in ((True, 200), (False, 401)):
        rig = ApiRig(secret="", development=development)
        code, _, _ = await rig.get("/api/status")
        assert code == expected, development


@pytest_twisted.ensureDeferred
async def test_head_health(rig: ApiRig) -> None:
    response = await rig.http.head("http://node.test:8081/health")
    assert response.code == 200
    assert await response.content() == b""


def test_answers_are_strict_json() -> None:
    from datetime import datetime

    from ctrlagent.wire.json import encode

    raw = encode({"cpu": float("nan"), "x": [float("inf")], "when": datetime(2026, 1, 1)})
    assert json.loads(raw) == {"cpu": None, "x": [None], "when": "2026-01-01 00:00:00"}
    assert b"NaN" not in raw and b"Infinity" not in raw
