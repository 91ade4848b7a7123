"""
Benchmark: HTTP command latency of the agent, as the Panel sees it.

Runs the agent for real (``twistd -n ctrlagent`` as a subprocess) against the
engine at DOCKER_HOST, or a private engine when none answers; creates and
starts ``--servers`` scripted game servers (default 20, stats sampling on);
then sends ``get_server_status`` and ``get_server_metrics`` with the Panel's
headers over keep-alive HTTP connections from 1 and 16 concurrent clients,
spread over all servers, and prints p50/p99/max latency, requests/s and the
agent's CPU time per request (from ``/proc/<pid>/stat``: what the agent spends,
whatever share of a core a loaded host leaves it), plus the agent's RSS and
the host's load.  Targets: p99 under 10 ms with 1 client (issue 5) and with 16
(issue 16: with one reactor thread, 16 clients wait about 16 times the CPU per
request).  The servers publish no ports, so that hundreds fit.

After each client count, the same client measures the host's floor
(``bench/floor_server.py``: a bare Twisted responder, one thread, the same
answer size, nothing else): what the host lets any such server reach in the
same moment.  The report gives the agent's p99 as a multiple of the floor's.

The client is a small asyncio HTTP/1.1 client in this process, so that client
overhead stays far below the agent's.  Run: ``python bench/http_latency.py``.
``bench/panel_link.py`` runs it too, before its console floods.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rig.agentproc import AgentProcess  # noqa: E402
from tests.rig.dockerd import PrivateDockerd, engine_answers  # noqa: E402
from tests.rig.images import build_scripted_image  # noqa: E402

# Seconds the agent's idle CPU is measured for, before the runs.
IDLE_SECONDS = 3.0
# The host's floor: the cheapest answer a Twisted reactor gives this client.
FLOOR_SERVER = ROOT / "bench" / "floor_server.py"


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered))) - 1))
    return ordered[rank]


class Client:
    """One keep-alive HTTP/1.1 connection posting Panel commands."""

    def __init__(self, agent: AgentProcess | FloorServer) -> None:
        self.agent = agent
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        # The Panel's headers, formatted once (the client's CPU competes
        # with the agent's on a small host).
        self._head = "".join(
            "{}: {}\r\n".format(k, v) for k, v in agent.headers().items()
        )

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.agent.port)

    async def command(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.reader is not None and self.writer is not None
        payload = json.dumps(body).encode()
        self.writer.write(
            "POST /api/command HTTP/1.1\r\nHost: 127.0.0.1\r\n{}Content-Length: {}\r\n\r\n".format(
                self._head, len(payload)
            ).encode()
            + payload
        )
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        status = int(status_and_headers.split(b" ", 2)[1])
        length = 0
        chunked = False
        for line in status_and_headers.split(b"\r\n"):
            lower = line.lower()
            if lower.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
            elif lower.startswith(b"transfer-encoding:") and b"chunked" in lower:
                chunked = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            data = b"".join(parts)
        else:
            data = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError("HTTP {}: {!r}".format(status, data[:200]))
        return dict(json.loads(data))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU time (user, system) the process ``pid`` has used so far."""
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); the split starts at field 3.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far."""
    return sum(cpu_split(pid))


async def measure(
    agent: AgentProcess | FloorServer,
    server_ids: list[str],
    action: str,
    clients: int,
    total: int,
    keep: bool = False,
) -> dict[str, Any]:
    """
    Send ``total`` ``action`` commands from ``clients`` concurrent connections
    (``keep``: every latency as well, under ``latencies_ms``, for ``pooled``).
    """
    conns = [Client(agent) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in conns))
    latencies: list[float] = []
    per_client = total // clients

    async def run(index: int, conn: Client) -> None:
        for i in range(per_client):
            sid = server_ids[(index * per_client + i) % len(server_ids)]
            started = time.perf_counter()
            answer = await conn.command({"action": action, "serverId": sid, "payload": {}})
            latencies.append(time.perf_counter() - started)
            if not answer.get("success"):
                raise RuntimeError("{} failed: {}".format(action, answer))

    # Warm-up: one request per connection, not counted.
    for conn in conns:
        await conn.command({"action": action, "serverId": server_ids[0], "payload": {}})
    assert agent.process is not None
    user_before, system_before = cpu_split(agent.process.pid)
    client_before = time.process_time()
    wall_started = time.time()
    started = time.perf_counter()
    await asyncio.gather(*(run(i, c) for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - started
    # The agent's CPU per request, whatever share of a core the host left it
    # (its idle work during the run included).
    user_after, system_after = cpu_split(agent.process.pid)
    # This client's, which shares the host's cores with the agent.
    client_ms = (time.process_time() - client_before) * 1000
    for conn in conns:
        conn.close()
    return figures(
        action, clients, [x * 1000 for x in latencies],
        per_s=len(latencies) / elapsed,
        user_ms=(user_after - user_before) * 1000,
        system_ms=(system_after - system_before) * 1000,
        client_ms=client_ms,
        window=[wall_started, wall_started + elapsed],
        keep=keep,
    )


def figures(
    action: str,
    clients: int,
    ms: list[float],
    *,
    per_s: float,
    user_ms: float,
    system_ms: float,
    client_ms: float,
    window: list[float],
    keep: bool,
) -> dict[str, Any]:
    """
    One batch's figures from its latencies (``ms``) and the CPU the agent
    (``user_ms``, ``system_ms``) and the client (``client_ms``) spent on it:
    what ``measure`` and ``wrk_client.measure_wrk`` both return.
    """
    return {
        "action": action,
        "clients": clients,
        "requests": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "per_s": per_s,
        "cpu_ms_per_request": (user_ms + system_ms) / len(ms),
        # Its two parts: the kernel's (sockets, epoll, waking up) and the rest.
        "cpu_user_ms_per_request": user_ms / len(ms),
        "cpu_system_ms_per_request": system_ms / len(ms),
        "client_cpu_ms_per_request": client_ms / len(ms),
        # Wall-clock bounds of the run, to line it up with the agent's log.
        "window": window,
        **({"latencies_ms": ms} if keep else {}),
    }


def pooled(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Several ``measure(..., keep=True)`` batches of one action and client
    count as one run: the percentiles of all their latencies together, the
    rates and CPU over all of them, and each batch's own p99
    (``batch_p99_ms``).  A p99 of one batch of 2,000 requests at 16 clients
    (a third of a second) is decided by the host's two or three longest
    preemptions of that moment, each felt by 16 requests at once; pooled
    batches taken seconds apart give the percentile requests see.
    """
    ms = [x for b in batches for x in b["latencies_ms"]]
    seconds = sum(b["requests"] / b["per_s"] for b in batches)

    def weighted(key: str) -> float:
        return sum(b[key] * b["requests"] for b in batches) / len(ms)

    first = batches[0]
    return {
        "action": first["action"],
        "clients": first["clients"],
        "requests": len(ms),
        "batches": len(batches),
        "p50_ms": statistics.median(ms),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "batch_p99_ms": [b["p99_ms"] for b in batches],
        "per_s": len(ms) / seconds,
        **{key: weighted(key) for key in (
            "cpu_ms_per_request", "cpu_user_ms_per_request", "cpu_system_ms_per_request",
            "client_cpu_ms_per_request")},
        "window": [first["window"][0], batches[-1]["window"][1]],
    }


class FloorServer:
    """
    ``bench/floor_server.py`` in a child process, measured like an agent:
    with the same client, right after the agent, its p50 and p99 are what
    the host allows any one-threaded Twisted server in that moment.
    """

    def __init__(self, body_bytes: int) -> None:
        self.body_bytes = body_bytes
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FloorServer:
        self.process = subprocess.Popen(
            [sys.executable, str(FLOOR_SERVER), str(self.body_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the floor server did not start: {!r}".format(line))
        self.port = int(line)
        return self

    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"}

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()  # it stops when its stdin closes
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def answer_bytes(agent: AgentProcess, server_id: str, action: str) -> int:
    """About how long the agent's answer to ``action`` is (its JSON body)."""
    answer = agent.command_sync({"action": action, "serverId": server_id, "payload": {}})
    return len(json.dumps(answer, separators=(",", ":")))


def measure_floor(body_bytes: int, clients: int, total: int, keep: bool = False) -> dict[str, Any]:
    """``measure`` against a ``FloorServer`` answering ``body_bytes`` bodies."""
    floor = FloorServer(body_bytes).start()
    try:
        run = asyncio.run(measure(floor, ["floor"], "floor", clients, total, keep))
    finally:
        floor.stop()
    run["action"] = "floor"
    return run


def rss_mb(pid: int) -> float:
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_benchmark(host: str, servers: int, requests: int) -> dict[str, Any]:
    """Start an agent on ``host``, run the servers, measure; clean up everything."""
    image = build_scripted_image(host)
    workdir = Path(tempfile.mkdtemp(prefix="ctrlagent-bench-http-"))
    agent = AgentProcess(
        workdir, host, extra_config="[servers]\nstop_timeout = 2.0\nport_range = \"\"\n"
    ).start()
    server_ids = ["bench-" + uuid.uuid4().hex[:12] for _ in range(servers)]
    try:
        for sid in server_ids:
            answer = agent.command_sync(
                {
                    "action": "create_server",
                    "serverId": sid,
                    "payload": {"name": sid, "image": image,
                                "startup": "/usr/local/bin/gameserver",
                                "limits": {"memory": 64, "cpu": 50}},
                }
            )
            if not answer.get("success"):
                raise RuntimeError("create failed: {}".format(answer))
            agent.command_sync({"action": "start_server", "serverId": sid})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [
                agent.command_sync({"action": "get_server_status", "serverId": sid})["data"][
                    "status"
                ]
                for sid in server_ids
            ]
            if all(s == "running" for s in states):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("servers did not all reach running: {}".format(states))
        time.sleep(3)  # let stats sampling settle into its steady state
        # The agent's own background work (stats sampling, timers), which the
        # CPU per request below includes: measured while no request comes.
        assert agent.process is not None
        idle_before = cpu_seconds(agent.process.pid)
        time.sleep(IDLE_SECONDS)
        idle_cpu = (cpu_seconds(agent.process.pid) - idle_before) / IDLE_SECONDS
        results = []
        floors = []
        size = answer_bytes(agent, server_ids[0], "get_server_status")
        for clients in (1, 16):
            for action in ("get_server_status", "get_server_metrics"):
                results.append(
                    asyncio.run(measure(agent, server_ids, action, clients, requests))
                )
            # The host's floor in the same moment (see FloorServer).
            floors.append(measure_floor(size, clients, requests))
        assert agent.process is not None
        with open("/proc/loadavg") as f:
            loadavg = " ".join(f.read().split()[:3])
        for run in results:
            # Less the background work the run's duration held.
            run["cpu_ms_per_request_net"] = run["cpu_ms_per_request"] - (
                idle_cpu * 1000 / run["per_s"]
            )
        return {
            "servers": servers,
            "idle_cpu_percent": idle_cpu * 100,
            "runs": results,
            "floor": floors,
            "agent_rss_mb": rss_mb(agent.process.pid),
            "loadavg": loadavg,
        }
    finally:
        for sid in server_ids:
            try:
                agent.command_sync(
                    {"action": "delete_server", "serverId": sid, "payload": {"purgeFiles": True}}
                )
            except Exception:  # noqa: BLE001 - best-effort cleanup of our own servers
                pass
        agent.stop()


def report(results: dict[str, Any]) -> str:
    lines = [
        "HTTP command latency, {} running servers, agent RSS {:.1f} MB, idle agent CPU "
        "{:.1f} % (target: p99 < 10 ms at 16 clients), load {}".format(
            results["servers"],
            results["agent_rss_mb"],
            results["idle_cpu_percent"],
            results.get("loadavg", "?"),
        )
    ]
    for r in results["runs"]:
        lines.append(
            "  {action:<20} {clients:>2} client(s): p50 {p50_ms:6.2f} ms  p99 {p99_ms:6.2f} ms  "
            "max {max_ms:6.1f} ms  {per_s:7.0f} req/s  agent CPU {cpu_ms_per_request:5.2f} ms/req"
            " ({cpu_ms_per_request_net:5.2f} less idle work; user {cpu_user_ms_per_request:4.2f}"
            " + system {cpu_system_ms_per_request:4.2f}), client CPU"
            " {client_cpu_ms_per_request:5.2f} ms/req  ({requests} requests)".format(**r)
        )
    lines.extend(floor_lines(results["runs"], results.get("floor", [])))
    return "\n".join(lines)


def floor_lines(runs: list[dict[str, Any]], floors: list[dict[str, Any]]) -> list[str]:
    """The floor's figures, and the agent's p99 as a multiple of the floor's."""
    lines = []
    for f in floors:
        agent_p99 = [r["p99_ms"] for r in runs if r["clients"] == f["clients"]]
        lines.append(
            "  floor (a bare Twisted responder, same client and answer size, measured right"
            " after) {clients:>2} client(s): p50 {p50_ms:6.2f} ms  p99 {p99_ms:6.2f} ms"
            "  {per_s:7.0f} req/s  its CPU {cpu_ms_per_request:5.2f} ms/req;"
            " the agent's p99 {ratio}".format(
                ratio=" and ".join(
                    "x{:.1f}".format(p / max(f["p99_ms"], 0.001)) for p in agent_p99
                ) or "-",
                **f,
            )
        )
    return lines


def run_benchmark_anywhere(host: str, servers: int, requests: int) -> dict[str, Any]:
    """``run_benchmark`` on ``host`` if it answers, else on a private engine."""
    private: PrivateDockerd | None = None
    if not (host.startswith("unix://") and engine_answers(host[len("unix://"):])):
        private = PrivateDockerd().start()
        host = private.host
    try:
        return run_benchmark(host, servers, requests)
    finally:
        if private is not None:
            private.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run_benchmark_anywhere(os.environ.get("DOCKER_HOST", ""), args.servers, args.requests)
    print(json.dumps(results, indent=2) if args.json else report(results))  # noqa: T201


if __name__ == "__main__":
    main()
