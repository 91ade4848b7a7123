"""
The agent driven over HTTP exactly as the Panel drives it.

``twistd -n ctrlagent`` runs as a subprocess on the session's real Docker
engine; these tests speak to it with the Panel's headers and body shapes, and
use both of the Panel's ids for one server: the uuid-style id for
create/power, the cuid alias (``panelId``) for console, files and metrics.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.rig.agentproc import AgentProcess

pytestmark = pytest.mark.e2e

UUID = "9d2c7e3a1b4f4e5d8c6b7a6958473621"
PANEL_ID = "clxe2e0000panelid0000abcd"


def post(agent: AgentProcess, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST /api/command; ``(HTTP status, decoded JSON)`` whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        agent.base_url + "/api/command",
        data=data,
        headers=agent.headers() if headers is None else headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=35) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ok(agent: AgentProcess, action: str, server_id: str | None = None, **payload: Any) -> Any:
    """Run one action in the Panel's body shape; assert success; return ``data``."""
    body: dict[str, Any] = {"action": action, "payload": payload}
    if server_id is not None:
        body["serverId"] = server_id
    status, answer = post(agent, body)
    assert status == 200, answer
    assert answer["success"] is True, answer
    return answer["data"]


def wait_status(agent: AgentProcess, server_id: str, wanted: str, timeout: float = 30.0) -> dict:
    """Poll get_server_status (bounded) until ``wanted``."""
    data: dict = {}
    for _ in range(int(timeout / 0.2)):
        data = ok(agent, "get_server_status", server_id)
        if data["status"] == wanted:
            return data
        time.sleep(0.2)
    raise AssertionError("{} never reached {}: {}".format(server_id, wanted, data))


def create_payload(image: str) -> dict[str, Any]:
    """What the Panel sends to create a server, with the scripted game server."""
    return {
        "name": "E2E Survival",
        "image": image,
        "startup": "/usr/local/bin/gameserver",
        "environment": {"SERVER_NAME": "e2e", "MAX_PLAYERS": 10, "PVP": True},
        "limits": {"memory": 64, "swap": 0, "disk": 100, "cpu": 50, "io": 500},
        "skipScripts": True,
        "panelId": PANEL_ID,
        "stop": {"type": "command", "value": "stop", "timeout": 5},
        "startupDone": "Done (",
    }


def assert_panel_metrics(data: dict[str, Any]) -> None:
    for key in ("cpu", "memory", "disk"):
        assert isinstance(data[key], float), (key, data)
    assert isinstance(data["players"], int) and not isinstance(data["players"], bool)
    assert isinstance(data["network"]["in"], int) and isinstance(data["network"]["out"], int)
    assert data["timestamp"]


def test_panel_drives_a_server_from_create_to_delete(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    created = ok(agent, "create_server", UUID, **create_payload(scripted_image))
    assert created["serverId"] == UUID
    assert created["status"] in ("offline", "installing")
    # The Panel sends no ports: the agent allocates one of servers.port_range.
    [allocation] = created["allocations"]
    assert 25565 <= allocation["port"] <= 25665 and allocation["primary"] is True
    offline = wait_status(agent, PANEL_ID, "offline")
    assert offline["allocations"] == created["allocations"]

    started = ok(agent, "start_server", UUID)
    assert started["status"] in ("starting", "running")
    status = wait_status(agent, PANEL_ID, "running")
    assert status["panelStatus"] == "RUNNING" and status["serverId"] == UUID

    reply = ok(agent, "console:command", PANEL_ID, command="say hello panel")
    assert "> say hello panel" in reply["response"]
    history = ok(agent, "console:history", PANEL_ID, lines=50)["history"]
    assert "[Server] hello panel" in history
    logs = ok(agent, "get_server_logs", PANEL_ID, lines=50)["logs"]
    assert "[Server] hello panel" in logs
    console = ok(agent, "console:status", PANEL_ID)
    assert console["connected"] is True and console["bufferSize"] > 0

    # files through the alias, in the Go agent's body shape too
    status_code, answer = post(
        agent,
        {
            "action": "write_file",
            "data": {"serverId": PANEL_ID, "path": "/server.properties", "content": "motd=e2e\n"},
        },
    )
    assert (status_code, answer["success"]) == (200, True), answer
    listing = ok(agent, "list_files", PANEL_ID, path="/")
    assert "server.properties" in [f["name"] for f in listing["files"]]
    assert ok(agent, "read_file", PANEL_ID, path="server.properties")["content"] == "motd=e2e\n"

    metrics = ok(agent, "get_server_metrics", PANEL_ID)
    assert_panel_metrics(metrics)
    system = ok(agent, "get_system_metrics")
    assert system["serverCount"] == 1 and system["memory"]["total"] > 0
    servers = ok(agent, "list_servers")
    assert servers["count"] == 1 and servers["servers"][0]["serverId"] == UUID

    # an id the agent has not heard of yet can be taught through any payload
    status_code, answer = post(agent, {"action": "get_server_metrics", "serverId": "clxlateid"})
    assert (status_code, answer["code"]) == (200, "SERVER_NOT_FOUND")
    ok(agent, "get_server_status", UUID, aliases=["clxlateid"])
    assert_panel_metrics(ok(agent, "get_server_metrics", "clxlateid"))

    stopped = ok(agent, "stop_server", UUID, signal="SIGTERM", timeout=30)
    assert stopped["status"] in ("stopping", "offline")
    wait_status(agent, PANEL_ID, "offline")
    idle = ok(agent, "get_server_metrics", PANEL_ID)
    assert_panel_metrics(idle)
    assert idle["cpu"] == 0.0 and idle["players"] == 0

    ok(agent, "delete_server", UUID)
    status_code, answer = post(agent, {"action": "get_server_status", "serverId": PANEL_ID})
    assert (status_code, answer["success"], answer["code"]) == (200, False, "SERVER_NOT_FOUND")
    assert ok(agent, "list_servers") == {"servers": [], "count": 0}


def _raw(
    agent: AgentProcess, head: bytes, body_chunks: list[bytes], timeout: float = 20.0
) -> bytes:
    """
    Send a hand-made request, reading while sending as HTTP clients do (the
    agent may answer 413 before the body is through); read until it closes.
    """
    pending = memoryview(head + b"".join(body_chunks))
    received = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", agent.port), timeout=timeout) as sock:
        sock.setblocking(False)
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    break
                if not data:
                    break
                received += data
            if writable and pending:
                try:
                    sent = sock.send(pending[:65536])
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    pending = memoryview(b"")  # the agent stopped reading: fine
                    continue
                pending = pending[sent:]
    return received


def test_bad_input_gets_the_right_code_and_the_agent_keeps_serving(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    ok(agent, "create_server", UUID, **create_payload(scripted_image))

    assert post(agent, b'{"action": "start_server", "serverId": ')[0] == 400
    status, answer = post(agent, b"[]")
    assert (status, answer["code"]) == (400, "PARSE_ERROR")

    status, answer = post(
        agent, {"action": "get_server_logs", "serverId": UUID, "payload": {"lines": "all"}}
    )
    assert (status, answer["code"], answer["details"]["field"]) == (200, "INVALID_PAYLOAD", "lines")
    status, answer = post(
        agent, {"action": "write_file", "serverId": PANEL_ID, "payload": {"path": 7}}
    )
    assert (status, answer["code"], answer["details"]["field"]) == (200, "INVALID_PAYLOAD", "path")
    status, answer = post(
        agent, {"action": "create_server", "serverId": "x1", "payload": {"image": 3}}
    )
    assert (status, answer["code"]) == (200, "INVALID_PAYLOAD")
    status, answer = post(agent, {"action": "start_server", "serverId": "no-such-server"})
    assert (status, answer["success"], answer["code"]) == (200, False, "SERVER_NOT_FOUND")
    status, answer = post(agent, {"action": "teleport_server", "serverId": UUID})
    assert (status, answer["code"]) == (200, "UNKNOWN_ACTION")

    no_secret = {"Content-Type": "application/json"}
    status, answer = post(agent, {"action": "system.ping"}, headers=no_secret)
    assert (status, answer["code"]) == (401, "AUTH_FAILED")
    # One character off (never the same one: the secret is random).
    last = "y" if agent.secret.endswith("x") else "x"
    wrong = dict(agent.headers(), Authorization="Bearer " + agent.secret[:-1] + last)
    assert post(agent, {"action": "system.ping"}, headers=wrong)[0] == 401
    api_key = {"Content-Type": "application/json", "X-API-Key": agent.secret}
    assert post(agent, {"action": "system.ping"}, headers=api_key)[1]["data"]["message"] == "pong"

    # A declared 200 MB body is refused from the headers alone.
    head = (
        "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n".format(agent.secret, 200 << 20)
    ).encode()
    answer_raw = _raw(agent, head, [])
    assert answer_raw.startswith(b"HTTP/1.1 413"), answer_raw[:200]
    # A chunked body that grows past the limit (24 MiB by default) is cut off.
    head = (
        "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n".format(agent.secret)
    ).encode()
    piece = b"A" * (1 << 20)
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    answer_raw = _raw(agent, head, [chunk] * 30 + [b"0\r\n\r\n"])
    assert answer_raw.startswith(b"HTTP/1.1 413"), answer_raw[:200]

    assert agent.health()["status"] == "healthy"
    assert ok(agent, "system.ping")["message"] == "pong"
    assert ok(agent, "get_server_status", PANEL_ID)["serverId"] == UUID


def test_fifty_concurrent_commands_to_one_server(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    ok(agent, "create_server", UUID, **create_payload(scripted_image))
    ok(agent, "start_server", UUID)
    wait_status(agent, UUID, "running")

    bodies: list[dict[str, Any]] = []
    for i in range(50):
        kind = i % 5
        if kind in (0, 1, 2):
            bodies.append(
                {
                    "action": "send_server_command",
                    "serverId": PANEL_ID if i % 2 else UUID,
                    "payload": {"command": "say n{}".format(i)},
                }
            )
        elif kind == 3:
            bodies.append({"action": "get_server_metrics", "serverId": PANEL_ID})
        else:
            bodies.append({"action": "get_server_status", "serverId": UUID})
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda b: post(agent, b), bodies))
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, (body, answer)
        assert answer["success"] is True, (body, answer)
        if body["action"] == "get_server_metrics":
            assert_panel_metrics(answer["data"])
    sent = {b["payload"]["command"] for b in bodies if b["action"] == "send_server_command"}
    for _ in range(50):
        logs = set(ok(agent, "get_server_logs", UUID, lines=500)["logs"])
        if {"> " + c for c in sent} <= logs:
            break
        time.sleep(0.2)
    assert {"> " + c for c in sent} <= logs

    # Power actions racing each other: each answered, each 200, the server ends consistent.
    power = [{"action": a, "serverId": UUID} for a in ["restart_server", "stop_server"] * 5]
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda b: post(agent, b), power))
    for status, answer in answers:
        assert status == 200
        assert answer["success"] is True or answer["code"] in ("CONFLICT", "INVALID_PAYLOAD"), (
            answer
        )
    # Let the winner finish (a restart ends running, a stop offline), then kill.
    settled = None
    for _ in range(100):
        state = ok(agent, "get_server_status", UUID)["status"]
        if state in ("running", "offline") and state == settled:
            break
        settled = state
        time.sleep(0.5)
    assert settled in ("running", "offline")
    ok(agent, "stop_server", UUID, signal="SIGKILL")
    wait_status(agent, UUID, "offline")
    assert agent.health()["status"] == "healthy"


def test_a_long_stop_answers_at_once_and_finishes_in_the_background(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    payload = create_payload(scripted_image)
    payload["environment"] = {"IGNORE_SIGTERM": "1"}
    payload["stop"] = "SIGTERM"  # no console "stop": only the signal, which the game ignores
    ok(agent, "create_server", UUID, **payload)
    ok(agent, "start_server", UUID)
    wait_status(agent, PANEL_ID, "running")

    began = time.monotonic()
    stopped = ok(agent, "stop_server", UUID, signal="SIGTERM", timeout=6)
    assert time.monotonic() - began < 3.0  # well inside the Panel's 30 s
    assert stopped["status"] == "stopping"
    assert ok(agent, "get_server_status", PANEL_ID)["status"] == "stopping"
    # The game ignores SIGTERM: the agent kills it once the timeout has passed.
    wait_status(agent, PANEL_ID, "offline", timeout=20)
    assert time.monotonic() - began >= 5.0
    assert "SIGTERM ignored" in ok(agent, "get_server_logs", PANEL_ID, lines=50)["logs"]


def test_file_actions_through_the_panel_id(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    ok(agent, "create_server", UUID, **create_payload(scripted_image))
    blob = bytes(range(256)) * 64
    encoded = base64.b64encode(blob).decode()

    ok(agent, "create_directory", PANEL_ID, path="/world/region")
    uploaded = ok(agent, "upload_file", PANEL_ID, path="/world/region/r.0.0.mca", content=encoded)
    assert uploaded["size"] == len(blob)
    down = ok(agent, "download_file", PANEL_ID, path="world/region/r.0.0.mca")
    assert base64.b64decode(down["content"]) == blob and down["encoding"] == "base64"
    # a chunked upload, assembled by the final chunk
    half = len(encoded) // 2 // 4 * 4
    for index, piece in enumerate((encoded[:half], encoded[half:])):
        ok(
            agent,
            "upload_file",
            PANEL_ID,
            path="/big.bin",
            content=piece,
            chunkIndex=index,
            totalChunks=2,
        )
    assert ok(agent, "get_file_info", PANEL_ID, path="/big.bin")["size"] == len(blob)

    ok(agent, "set_file_permissions", PANEL_ID, path="/big.bin", mode="600")
    info = ok(agent, "get_file_info", PANEL_ID, path="/big.bin")
    assert info["permissions"] == "600" and info["type"] == "file"
    ok(agent, "rename_file", PANEL_ID, oldPath="/big.bin", newPath="/world/big.bin")
    found = ok(agent, "search_files", PANEL_ID, path="/", query="big")["files"]
    assert [f["path"].lstrip("/") for f in found] == ["world/big.bin"]

    ok(agent, "create_archive", PANEL_ID, files=["/world"], archivePath="/backup.zip", format="zip")
    ok(agent, "create_directory", PANEL_ID, path="/restore")
    ok(agent, "extract_archive", PANEL_ID, archivePath="/backup.zip", extractPath="/restore")
    restored = ok(agent, "download_file", PANEL_ID, path="/restore/world/region/r.0.0.mca")
    assert base64.b64decode(restored["content"]) == blob
    ok(agent, "delete_file", PANEL_ID, path="/restore")
    names = {f["name"] for f in ok(agent, "list_files", PANEL_ID, path="/")["files"]}
    assert {"world", "backup.zip"} <= names and "restore" not in names

    status, answer = post(
        agent,
        {"action": "read_file", "serverId": PANEL_ID, "payload": {"path": "../../../etc/passwd"}},
    )
    assert (status, answer["success"], answer["code"]) == (200, False, "PERMISSION_DENIED")
    status, answer = post(
        agent,
        {
            "action": "set_file_permissions",
            "serverId": PANEL_ID,
            "payload": {"path": "/world", "mode": "u+s"},
        },
    )
    assert (status, answer["code"], answer["details"]["field"]) == (200, "INVALID_PAYLOAD", "mode")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_node_endpoints_as_the_panel_and_a_browser_see_them(agent_process: AgentProcess) -> None:
    agent = agent_process
    opener = urllib.request.build_opener(_NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(agent.base_url + "/", timeout=5)
    assert redirect.value.code == 301 and redirect.value.headers["Location"] == "/health"

    with urllib.request.urlopen(agent.base_url + "/api/discovery", timeout=5) as response:
        discovery = json.loads(response.read())
    assert discovery["type"] == "ctrl-alt-play-agent" and discovery["nodeUuid"] == "e2e-node"

    preflight = urllib.request.Request(agent.base_url + "/api/command", method="OPTIONS")
    with urllib.request.urlopen(preflight, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "X-API-Key" in response.headers["Access-Control-Allow-Headers"]

    status = urllib.request.Request(agent.base_url + "/api/status", headers=agent.headers())
    with urllib.request.urlopen(status, timeout=5) as response:
        body = json.loads(response.read())
    assert body["online"] is True and body["version"] and body["serverCount"] == 0

    with urllib.request.urlopen(agent.base_url + "/api/openapi.json", timeout=5) as response:
        document = json.loads(response.read())
    assert "/api/command" in document["paths"]
    assert "get_server_metrics" in document["components"]["schemas"]["Action"]["enum"]

    rest = urllib.request.Request(agent.base_url + "/api/servers", headers=agent.headers())
    with urllib.request.urlopen(rest, timeout=5) as response:
        assert json.loads(response.read())["data"] == {"servers": [], "count": 0}
