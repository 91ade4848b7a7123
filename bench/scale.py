"""
Benchmark: one agent with many running idle servers, then restarted.

Runs the agent for real (``twistd -n ctrlagent`` as a subprocess) on the
engine at DOCKER_HOST, or on a private engine when none answers, and:

1. creates and starts ``--servers`` scripted game servers (default 500) that
   print ``tick <n>`` every ``--tick`` seconds (default 5), through
   ``POST /api/command`` from 8 concurrent connections;
2. steady state, ``--settle`` seconds (default 30) after the last server
   runs, and at least until the agent is past its first heap renewal
   (``ctrlagent.heap``, 310 s after its start: an agent that has run for a
   while, whose full collections no longer walk the servers made after its
   start): the agent's RSS and CPU (percent of one core, from
   ``/proc/<pid>/stat`` over ``--window`` seconds, default 60: one whole
   round of the disk checks, which come every ``servers.disk_check_interval``
   for all servers at once, so a shorter window holds one or none), with no
   Panel link up:
   the servers are then sampled every ``servers.stats_idle_interval``.
   Each server's ticks are console lines the agent reads and delivers
   (``--servers`` / ``--tick`` lines a second in all);
3. ``get_server_status`` and ``get_server_metrics`` latency (p50/p99) from 1
   and 16 concurrent keep-alive clients (``bench/http_latency.py``'s client)
   in ``--batches`` batches of ``--requests`` a few seconds apart, each
   followed by the host's floor: the same client against a bare Twisted
   responder (``bench/floor_server.py``), whose p99 is what the host allows
   any one-threaded server in that moment.  The percentiles are over all
   batches together (``http_latency.pooled``), and each batch's own p99 is
   reported beside them.  Then the same again through ``wrk`` when Debian's
   ``wrk`` is installed (``bench/wrk_client.py``: a C client spending a
   fraction of the asyncio client's CPU, in ``--wrk-seconds`` batches),
   with its own floor.  How busy the host's cores are (``/proc/stat``, and
   the hypervisor's steal) is reported for the idle window and for each
   client count's batches;
4. a Panel (``ctrlagent.testing.panel.FakePanel``, a real WebSocket server, in
   a child process so that its parsing is not the agent's CPU) comes up on
   the URL the agent dials: once the link is connected, the agent's CPU over
   ``--window`` again, every server now sampled every ``stats_interval``
   and its ``resource_update`` frames sent (counted by the Panel); the Panel
   then goes away again;
5. the agent stopped (SIGTERM) and started again on the same state: the time
   from the new process's start to every server re-attached (its console
   followed again, ``console:status`` connected), and every server's ticks
   checked for a gap or a repeat across the restart (no line lost or
   duplicated); then the time until every kept history was read back behind
   the followed consoles (each buffer holds what it held before).
   ``--history N`` has every server print N lines at its start, as servers
   that ran for days have a full history (``servers.console_buffer_lines``).

Targets (issue 16): under 150 MB RSS and 5 % of one core at 500 servers,
HTTP p99 under 10 ms at 16 clients, all re-attached within 10 s.  With
``--servers 100,500`` it runs twice and prints the per-server growth, so
that anything worse than linear shows.  Every server is deleted at the end.

    python bench/scale.py [--servers 500] [--tick 5] [--settle 30] [--window 60]
                          [--requests 2000] [--batches 5] [--wrk-seconds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import wrk_client  # noqa: E402
from http_latency import (  # noqa: E402
    Client,
    answer_bytes,
    floor_lines,
    measure,
    measure_floor,
    pooled,
    rss_mb,
)
from wrk_client import measure_wrk, wrk_floor  # noqa: E402

from ctrlagent.heap import EVERY_SECONDS, FIRST_SECONDS  # noqa: E402
from tests.rig.agentproc import AgentProcess, free_port  # noqa: E402
from tests.rig.dockerd import PrivateDockerd, engine_answers  # noqa: E402
from tests.rig.images import _docker, build_scripted_image  # noqa: E402

_TICK = re.compile(r"tick (\d+)$")
# Seconds between two latency batches.
BATCH_GAP_SECONDS = 2.0
# The reads measured, in this order in each batch.
ACTIONS = ("get_server_status", "get_server_metrics")
# Seconds from the agent's start until it is past its first heap renewal.
PAST_HEAP_RENEWAL_SECONDS = FIRST_SECONDS + EVERY_SECONDS + 10.0
_CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK


def host_ticks() -> tuple[int, int, int]:
    """
    The host's CPU time so far, in clock ticks over all its cores: (busy,
    stolen, all).  Busy is all but idle and I/O wait; stolen is what the
    hypervisor gave other machines while this one had work (``steal``).
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    # guest time is already counted in user (fields 8 and 9).
    total = sum(fields[:8])
    return total - idle, steal, total


class HostShare:
    """The host's busy and stolen share of its CPUs over the spans added to it."""

    def __init__(self) -> None:
        self.busy = self.steal = self.total = 0

    def span(self, before: tuple[int, int, int], after: tuple[int, int, int]) -> None:
        self.busy += after[0] - before[0]
        self.steal += after[1] - before[1]
        self.total += after[2] - before[2]

    def percent(self) -> dict[str, float]:
        """Busy and stolen, in percent of all the host's cores."""
        total = max(self.total, 1)
        return {"busy": 100.0 * self.busy / total, "steal": 100.0 * self.steal / total}


def latency_runs(
    batch: Callable[[str, int], dict[str, Any]],
    floor_batch: Callable[[int], dict[str, Any]],
    batches: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """
    Both reads at 1 and 16 clients, ``batches`` batches each a few seconds
    apart, each pair followed by the host's floor through the same client:
    the pooled runs (with the host's share of its cores during the reads'
    batches) and the pooled floors.  One batch's p99 is the host's longest
    preemptions of that moment (http_latency.pooled).
    """
    runs: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    for clients in (1, 16):
        done: dict[str, list[dict[str, Any]]] = {a: [] for a in ACTIONS}
        floor_done = []
        busy = HostShare()
        for _ in range(batches):
            for action in ACTIONS:
                before = host_ticks()
                done[action].append(batch(action, clients))
                busy.span(before, host_ticks())
            floor_done.append(floor_batch(clients))
            time.sleep(BATCH_GAP_SECONDS)
        runs.extend({**pooled(done[a]), "host": busy.percent()} for a in ACTIONS)
        floors.append(pooled(floor_done))
    return runs, floors


def host_speed() -> float:
    """
    Milliseconds of CPU a fixed pure-Python loop takes here (best of three).

    Not the agent: the host's own pace, measured in the same run, so that
    figures from runs on a busier or slower host can be told apart (on the
    development VM the same loop takes 190-350 ms as load and the kernel's
    own work vary).
    """
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        sum(i * i for i in range(3_000_000))
        best = min(best, time.process_time() - start)
    return best * 1000.0


async def _all(agent: AgentProcess, bodies: list[dict[str, Any]], clients: int = 8) -> list[Any]:
    """Send every body from ``clients`` keep-alive connections; answers in order."""
    conns = [Client(agent) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in conns))
    answers: list[Any] = [None] * len(bodies)

    async def worker(index: int, conn: Client) -> None:
        for i in range(index, len(bodies), clients):
            answers[i] = await conn.command(bodies[i])

    try:
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            conn.close()
    return answers


def send_all(agent: AgentProcess, bodies: list[dict[str, Any]]) -> list[Any]:
    return asyncio.run(_all(agent, bodies))


def _failed(answers: list[Any]) -> list[Any]:
    return [a for a in answers if not (isinstance(a, dict) and a.get("success"))]


def wait_until(check: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError("{} not within {} s".format(what, timeout))


def ticks(agent: AgentProcess, server_ids: list[str]) -> dict[str, list[int]]:
    answers = send_all(
        agent,
        [{"action": "console:history", "serverId": sid, "payload": {"lines": 1000}}
         for sid in server_ids],
    )
    found: dict[str, list[int]] = {}
    for sid, answer in zip(server_ids, answers, strict=True):
        numbers = []
        for line in (answer.get("data") or {}).get("history") or []:
            m = _TICK.search(line)
            if m:
                numbers.append(int(m.group(1)))
        found[sid] = numbers
    return found


def serve_panel(secret: str, port: int) -> None:
    """``--serve-panel``: a Panel counting the frames it gets; prints them at SIGTERM."""
    from collections import Counter

    from twisted.internet import reactor

    from ctrlagent.testing.panel import FakePanel

    kinds: Counter[str] = Counter()
    panel = FakePanel(reactor, secret, request_system_info=False, parse=False)

    def count(payload: bytes) -> None:
        # An event's name, else the frame's type, without decoding it whole.
        head = payload[:200]
        found = re.search(rb'"event":"([a-z_]+)"', head) or re.search(rb'"type":"([a-z_]+)"', head)
        kinds[found.group(1).decode() if found else "?"] += 1

    panel.on_frame = count
    reactor.listenTCP(port, panel.factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    print("listening", flush=True)  # noqa: T201
    reactor.run()  # type: ignore[attr-defined]  # until SIGTERM (Twisted's handler)
    print(json.dumps(dict(kinds)), flush=True)  # noqa: T201


class PanelChild:
    """The counting Panel in a child process of ours."""

    def __init__(self, secret: str, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-panel", secret, str(port)],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "listening":
            raise RuntimeError("the benchmark's Panel did not start")

    def stop(self) -> dict[str, int]:
        """End it (our own child, by its handle); the frames it counted."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return dict(json.loads(out.splitlines()[-1])) if out.strip() else {}


def link_connected(agent: AgentProcess) -> bool:
    import urllib.request

    with urllib.request.urlopen("{}/health".format(agent.base_url), timeout=10) as r:
        return bool(json.load(r).get("panelLink", {}).get("connected"))


class BenchAgent(AgentProcess):
    """
    The agent on a network of the benchmark's own, big enough for every
    server (a shared engine's default network may be a /24 others use too).
    """

    def __init__(self, *args: Any, network: str, subnet: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.network = network
        self.subnet = subnet

    def _write_config(self) -> None:
        super()._write_config()
        text = self.config_path.read_text()
        table = '[docker]\nhost = "{}"\n'.format(self.docker_host)
        assert table in text
        self.config_path.write_text(text.replace(
            table, table + 'network_name = "{}"\nnetwork_subnet = "{}"\n'.format(
                self.network, self.subnet)))


def run_once(host: str, image: str, servers: int, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ctrlagent-bench-scale-"))
    # Idle servers publish no ports (500 of them would be 1,000 docker-proxy processes).
    config = '[servers]\nstop_timeout = 2.0\nport_range = ""\n'
    # The link dials a Panel that comes up only for step 4 (retrying every 2 s
    # at most meanwhile).
    panel_port = free_port()
    link = dict(panel_url="ws://127.0.0.1:{}/ws".format(panel_port),
                panel_settings="backoff_max = 2.0")
    agent_started = time.monotonic()
    agent = (BenchAgent(workdir, host, extra_config=config, network=args.network,
                        subnet=args.subnet, **link) if args.network
             else AgentProcess(workdir, host, extra_config=config, **link)).start()
    server_ids = ["scale-" + uuid.uuid4().hex[:12] for _ in range(servers)]
    result: dict[str, Any] = {"servers": servers, "history_lines": args.history,
                              "host_loop_ms_before": host_speed()}
    environment = {"TICK_INTERVAL": str(args.tick)}
    if args.history:
        # Each server prints that many lines at its start: the kept history
        # a server that ran for days has, which the re-attach reads back.
        environment["FLOOD_LINES"] = str(args.history)
    try:
        started = time.monotonic()
        created = send_all(
            agent,
            [
                {
                    "action": "create_server",
                    "serverId": sid,
                    "payload": {
                        "name": sid,
                        "image": image,
                        "startup": "/usr/local/bin/gameserver",
                        "environment": environment,
                        "limits": {"memory": 32, "cpu": 10},
                    },
                }
                for sid in server_ids
            ],
        )
        if _failed(created):
            raise RuntimeError("create failed: {}".format(_failed(created)[:3]))
        begun = send_all(agent, [{"action": "start_server", "serverId": sid}
                                 for sid in server_ids])
        if _failed(begun):
            raise RuntimeError("start failed: {}".format(_failed(begun)[:3]))

        def all_running() -> bool:
            listed = agent.command_sync({"action": "list_servers"})["data"]["servers"]
            return sum(1 for s in listed if s["status"] == "running") == servers

        wait_until(all_running, 60 + servers, "all servers running")
        result["create_and_start_s"] = time.monotonic() - started
        # The steady state: past the start-up's tail (every server's first
        # disk check, first kernel samples, the start events' work) and past
        # the heap's first renewal (before it, full collections walk every
        # server made since the start: ctrlagent.heap).
        time.sleep(max(args.settle,
                       PAST_HEAP_RENEWAL_SECONDS - (time.monotonic() - agent_started)))
        assert agent.process is not None
        pid = agent.process.pid
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        # The window in thirds as well: whether the CPU still falls after the starts.
        thirds = []
        idle_host = HostShare()
        host_before = host_ticks()
        for _ in range(3):
            c, t = cpu_seconds(pid), time.monotonic()
            time.sleep(args.window / 3)
            thirds.append(100.0 * (cpu_seconds(pid) - c) / (time.monotonic() - t))
        result["cpu_percent"] = 100.0 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        result["cpu_percent_thirds"] = thirds
        idle_host.span(host_before, host_ticks())
        # The whole host meanwhile (the engine, its 500 containers, the agent).
        result["host_idle_window"] = idle_host.percent()
        result["host_loop_ms"] = host_speed()
        result["loadavg"] = os.getloadavg()[0]
        result["rss_mb"] = rss_mb(pid)
        size = answer_bytes(agent, server_ids[0], "get_server_status")

        def asyncio_batch(action: str, clients: int) -> dict[str, Any]:
            return asyncio.run(measure(agent, server_ids, action, clients, args.requests,
                                       keep=True))

        # The host's floor in the same moment (bench/floor_server.py).
        result["http"], result["floor"] = latency_runs(
            asyncio_batch,
            lambda clients: measure_floor(size, clients, args.requests, keep=True),
            args.batches)
        if args.wrk_seconds and wrk_client.available():
            # The same reads from wrk (bench/wrk_client.py), a client that
            # takes a fraction of the host's CPU the asyncio one takes.
            result["http_wrk"], result["floor_wrk"] = latency_runs(
                lambda action, clients: measure_wrk(
                    agent, server_ids, action, clients, args.wrk_seconds, keep=True),
                lambda clients: wrk_floor(size, clients, args.wrk_seconds),
                args.batches)

        # A Panel comes: every server sampled and forwarded every stats_interval.
        panel = PanelChild(agent.secret, panel_port)
        try:
            wait_until(lambda: link_connected(agent), 30, "the Panel link connected")
            time.sleep(5)
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(args.window)
            result["cpu_percent_panel"] = (
                100.0 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0))
        finally:
            frames = panel.stop()
        result["panel_resource_updates"] = frames.get("resource_update", 0)
        wait_until(lambda: not link_connected(agent), 30, "the Panel link down")

        # Restart on the same state; time until every console is followed again.
        held = buffer_sizes(agent, server_ids)
        agent.stop()
        time.sleep(args.tick * 2)  # ticks printed while no agent runs must not be lost
        restarted = time.monotonic()
        agent.start(timeout=60)
        # The process's own start (imports, config, store) apart from the
        # re-attach: on a loaded host the interpreter's start alone takes seconds.
        up = time.monotonic()
        result["agent_up_s"] = up - restarted

        pending = list(server_ids)

        def all_attached() -> bool:
            # Only the servers not seen attached yet: asking all 500 every
            # round would itself take seconds, and hide when the last came.
            statuses = console_statuses(agent, pending)
            pending[:] = [sid for sid in pending if not statuses[sid].get("connected")]
            return not pending

        wait_until(all_attached, 120, "all consoles re-attached")
        result["reattach_s"] = time.monotonic() - restarted
        result["reattach_after_up_s"] = time.monotonic() - up
        # The kept histories are read back behind the followed consoles: the
        # time until every buffer holds at least what it held before.
        short = list(server_ids)

        def all_histories_back() -> bool:
            sizes = buffer_sizes(agent, short)
            short[:] = [sid for sid in short if sizes[sid] < held[sid]]
            return not short

        wait_until(all_histories_back, 120, "all histories read back")
        result["history_back_s"] = time.monotonic() - restarted
        time.sleep(args.tick * 2)
        gaps = repeats = 0
        for numbers in ticks(agent, server_ids).values():
            repeats += len(numbers) - len(set(numbers))
            if numbers:
                gaps += (max(numbers) - min(numbers) + 1) - len(set(numbers))
        result["ticks_lost"] = gaps
        result["ticks_repeated"] = repeats
        assert agent.process is not None
        result["rss_after_restart_mb"] = rss_mb(agent.process.pid)
        return result
    finally:
        if agent.process is not None:
            send_all(
                agent,
                [{"action": "delete_server", "serverId": sid, "payload": {"purgeFiles": True}}
                 for sid in server_ids],
            )
        agent.stop()


def console_statuses(agent: AgentProcess, server_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each server's ``console:status`` answer (its ``data``)."""
    answers = send_all(agent, [{"action": "console:status", "serverId": sid}
                               for sid in server_ids])
    return {sid: a.get("data") or {} for sid, a in zip(server_ids, answers, strict=True)}


def buffer_sizes(agent: AgentProcess, server_ids: list[str]) -> dict[str, int]:
    """Each server's console buffer size."""
    return {sid: int(data.get("bufferSize") or 0)
            for sid, data in console_statuses(agent, server_ids).items()}


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(
            "{servers} servers ({history_lines} history lines each): created+started in"
            " {create_and_start_s:.0f} s; agent RSS "
            "{rss_mb:.0f} MB (target < 150), CPU {cpu_percent:.1f} % of a core (target < 5; "
            "{thirds} in its thirds), "
            "{cpu_percent_panel:.1f} % with a Panel connected ({panel_resource_updates} "
            "resource updates sent); "
            "restart: all re-attached in {reattach_s:.1f} s (target < 10; {agent_up_s:.1f} s to "
            "answer /health, then {reattach_after_up_s:.1f} s; every history read back "
            "{history_back_s:.1f} s after the start), RSS "
            "{rss_after_restart_mb:.0f} MB, ticks lost {ticks_lost}, repeated "
            "{ticks_repeated}; host: a fixed Python loop {host_loop_ms:.0f} ms in the idle window "
            "({host_loop_ms_before:.0f} ms before the servers), load {loadavg:.1f}, its cores"
            " {busy:.0f} % busy ({steal:.1f} % stolen by the hypervisor)".format(
                thirds=" / ".join("{:.1f}".format(c) for c in r.get("cpu_percent_thirds", [])),
                busy=r.get("host_idle_window", {}).get("busy", float("nan")),
                steal=r.get("host_idle_window", {}).get("steal", float("nan")),
                **r)
        )
        lines.extend(_http_line(h) for h in r["http"])
        lines.extend(floor_lines(r["http"], r.get("floor", [])))
        if r.get("http_wrk"):
            lines.append("  the same through wrk (bench/wrk_client.py: a C client, a third of the"
                         " asyncio client's CPU per request):")
            lines.extend(_http_line(h, agent_cpu=True) for h in r["http_wrk"])
            lines.extend(floor_lines(r["http_wrk"], r.get("floor_wrk", [])))
        else:
            lines.append("  (wrk not installed or --wrk-seconds 0: the asyncio client only)")
    if len(results) > 1:
        a, b = results[0], results[-1]
        per = (b["rss_mb"] - a["rss_mb"]) / (b["servers"] - a["servers"])
        lines.append(
            "growth {} -> {} servers: RSS {:.2f} MB per server, CPU x{:.1f} for x{:.1f} servers,"
            " re-attach x{:.1f}".format(
                a["servers"], b["servers"], per,
                b["cpu_percent"] / max(a["cpu_percent"], 0.01), b["servers"] / a["servers"],
                b["reattach_s"] / max(a["reattach_s"], 0.01),
            )
        )
    return "\n".join(lines)


def _http_line(run: dict[str, Any], agent_cpu: bool = False) -> str:
    """One pooled run of a read (``agent_cpu``: with the agent's CPU per read)."""
    return (
        "  {action:<20} {clients:>2} client(s): p50 {p50_ms:6.2f} ms  p99 {p99_ms:6.2f} ms"
        "  (target p99 < 10 ms at 16)  {per_s:6.0f} req/s;{cpu} {requests} requests in"
        " {batches} batches, their own p99 {low:.1f}-{high:.1f} ms{host_note}".format(
            low=min(run["batch_p99_ms"]), high=max(run["batch_p99_ms"]),
            cpu=" agent CPU {:5.3f} ms/req;".format(run["cpu_ms_per_request"])
            if agent_cpu else "",
            host_note=_host_note(run), **run)
    )


def _host_note(run: dict[str, Any]) -> str:
    host = run.get("host")
    if not host:
        return ""
    return "; the host's cores {:.0f} % busy, {:.1f} % stolen".format(host["busy"], host["steal"])


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="500", help="comma-separated counts")
    parser.add_argument("--tick", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=60.0,
                        help="seconds each CPU figure is measured over (default 60: one"
                        " whole round of the disk checks, servers.disk_check_interval)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds from all running to the idle window (default 30), and"
                        " at least until the agent is past its first heap renewal")
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests in one batch (default 2000)")
    parser.add_argument("--batches", type=_at_least_one, default=5,
                        help="batches of --requests per action and client count, a few"
                        " seconds apart; the percentiles are over all of them (default 5)")
    parser.add_argument("--history", type=int, default=0,
                        help="lines each server prints at its start, so that the restart's"
                        " re-attach reads back a kept history that long (up to"
                        " servers.console_buffer_lines, 1000: servers that ran for days);"
                        " default 0")
    parser.add_argument("--wrk-seconds", type=int, default=1,
                        help="seconds in one wrk batch (bench/wrk_client.py), when wrk is"
                        " installed; 0: the asyncio client only (default 1)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--network", default="",
                        help="the servers' network, created with --subnet and removed at the end"
                        " (default: the agent's own, ctrl-alt-play)")
    parser.add_argument("--subnet", default="10.184.0.0/22")
    parser.add_argument("--serve-panel", nargs=2, metavar=("SECRET", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_panel:
        serve_panel(args.serve_panel[0], int(args.serve_panel[1]))
        return
    host = os.environ.get("DOCKER_HOST", "")
    private: PrivateDockerd | None = None
    if not (host.startswith("unix://") and engine_answers(host[len("unix://"):])):
        private = PrivateDockerd().start()
        host = private.host
    try:
        image = build_scripted_image(host)
        if private is not None:
            # The private engine's pools hand out /24 networks (253 addresses):
            # the agent's network is made here first, a /22 inside the engine's
            # pool, and the agent uses it as it finds it.  An operator's engine
            # gives /16 or /20 networks by default (or docker.network_subnet).
            octet = private.pool_base.split(".")[1]
            _docker(host, "network", "create", "--subnet", "10.{}.64.0/22".format(octet),
                    "--label", "ctrl-alt-play.managed=true", "ctrl-alt-play")
        if args.network and private is None:
            # Made here, before the agent: its first creates run at once, and
            # an engine refuses all but one of concurrent creates of a
            # network with a subnet as an overlapping pool (not as a taken
            # name), which fails those servers' installs.
            _docker(host, "network", "create", "--subnet", args.subnet,
                    "--label", "ctrl-alt-play.managed=true", args.network)
        results = []
        for n in args.servers.split(","):
            results.append(run_once(host, image, int(n), args))
            # Each run's figures as soon as they are known (a later run may fail).
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # noqa: T201
    finally:
        if args.network and private is None:
            # The engine releases the endpoints of hundreds of removed
            # containers in the background: "has active endpoints" for a while.
            for attempt in range(30):
                try:
                    _docker(host, "network", "rm", args.network)
                    break
                except RuntimeError as e:
                    if attempt == 29 or "active endpoints" not in str(e):
                        print("network {} not removed: {}".format(args.network, e),  # noqa: T201
                              file=sys.stderr)
                        break
                    time.sleep(2)
        if private is not None:
            private.stop()
    print(json.dumps(results, indent=2) if args.json else report(results))  # noqa: T201


if __name__ == "__main__":
    main()
