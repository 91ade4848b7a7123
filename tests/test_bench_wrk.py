"""
``bench/wrk_client.py``: the benchmarks' second client, Debian's ``wrk``,
measuring the same Panel commands as the asyncio client.  Against a real
``wrk`` and a real server on loopback: every answer is counted and its
latency kept; an answer that is not a success fails the batch.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.backups.conftest import require_tool
from tests.rig.benchmods import load


def _wrk() -> ModuleType:
    module = load("wrk_client")
    require_tool(module.available(), "wrk (apt-get install wrk)")
    return module


class _Answers(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    success = True
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's hook)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append(json.loads(body))
        answer = json.dumps({"success": self.success, "data": {}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[Any]:
    """A loopback server that answers every command (success or not, as set)."""

    class Handler(_Answers):
        bodies: list[dict[str, Any]] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    target = SimpleNamespace(
        port=server.server_address[1],
        process=SimpleNamespace(pid=os.getpid()),
        handler=Handler,
        headers=lambda: {"Authorization": "Bearer s]]e\"cret", "Content-Type": "application/json"},
    )
    try:
        yield target
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_every_answer_is_counted_with_its_latency(answering: Any) -> None:
    wrk = _wrk()
    ids = ["a", 'b"]]', "c"]
    run = wrk.measure_wrk(answering, ids, "get_server_status", 2, 1, keep=True)
    assert run["action"] == "get_server_status" and run["clients"] == 2
    assert run["requests"] > 10
    assert len(run["latencies_ms"]) == run["requests"]
    assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
    assert run["per_s"] > 0 and run["client_cpu_ms_per_request"] > 0
    # The commands the Panel sends, spread over the servers, as JSON.
    seen = answering.handler.bodies
    assert {b["serverId"] for b in seen} == set(ids)
    assert all(b["action"] == "get_server_status" and b["payload"] == {} for b in seen)


def test_an_answer_that_is_not_a_success_fails_the_batch(answering: Any) -> None:
    wrk = _wrk()
    answering.handler.success = False
    with pytest.raises(RuntimeError, match="failed answers"):
        wrk.measure_wrk(answering, ["a"], "get_server_metrics", 1, 1)


def test_nothing_listening_is_an_error() -> None:
    wrk = _wrk()
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    target = SimpleNamespace(port=port, process=SimpleNamespace(pid=os.getpid()),
                             headers=lambda: {})
    with pytest.raises(RuntimeError):
        wrk.measure_wrk(target, ["a"], "get_server_status", 1, 1)
