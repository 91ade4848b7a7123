"""
Benchmark: console lines per second delivered over the Panel link.

Three measurements in one run:

1. ``synthetic``: a flooding source publishes ``ConsoleOutput`` events straight
   into a ``PanelLink`` as fast as the reactor allows; a loopback Autobahn
   server playing the Panel (``FakePanel``) counts the lines it receives.  This
   is the link's own ceiling (batching, JSON, WebSocket framing, TCP).
2. ``docker`` (when an engine answers at ``--docker-host``): the scripted game
   server prints ``--lines`` numbered lines as fast as it can.
   - baseline: the raw Docker stream of such a container, read with the
     agent's ``DockerClient.logs(follow=True)`` and only counted;
   - agent: the same flood through the real ``ServerManager`` (console throttle
     raised so it does not apply) and the ``PanelLink`` to the loopback Panel.
   The target is delivered/raw >= 50 %.  Both are measured ``--repeat`` times
   in alternation (raw, agent, manager alone); the ratio reported is the
   median of the paired ratios, since the engine's own rate drifts by +-20 %
   between runs on a shared machine.
3. HTTP command latency (``bench/http_latency.py``), first, on a quiet engine.

The Panel runs in a child process (``--in-process-panel`` for the harsher
figure where it shares the agent's CPU); it shares this machine's two cores
with the engine and the agent all the same.

    python bench/panel_link.py [--lines 200000] [--repeat 5] [--docker-host unix:///...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import task, threads
from twisted.internet.defer import Deferred, succeed

from ctrlagent.config import AgentConfig, DockerConfig, PanelConfig, ServersConfig
from ctrlagent.events import ConsoleOutput, ServerEvent
from ctrlagent.panel.link import PanelLink
from ctrlagent.testing.panel import FakePanel

reactor: Any = _reactor
SECRET = "bench-secret"


class LineCounter:
    """Counts console lines arriving at the fake Panel, with first/last times."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.lines = 0
        self.frames = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done_at: float | None = None

    def __call__(self, payload: bytes) -> None:
        frame = json.loads(payload)
        if frame.get("event") != "server_log":
            return
        data = frame["data"]
        if data.get("serverId") != self.server_id:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.frames += 1
        self.lines += len(data["lines"])
        if "flood done" in data["lines"]:
            self.done_at = now


@dataclass
class Published:
    """Flood lines the server manager published, with first/last times."""

    lines: int = 0
    first: float | None = None
    done: float | None = None

    def rate(self) -> float:
        if self.first is None or self.done is None:
            return 0.0
        return self.lines / max(self.done - self.first, 1e-9)


class FloodSource:
    """An event source whose only server floods its console."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[ServerEvent], None]] = []

    def add_listener(self, listener: Callable[[ServerEvent], None]) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Callable[[ServerEvent], None]) -> None:
        self.listeners.remove(listener)

    def list_servers(self) -> list[dict[str, Any]]:
        return [{"serverId": "flood", "status": "running"}]

    def publish(self, lines: list[str]) -> None:
        event = ConsoleOutput("flood", "stdout", lines, time.time())
        for listener in self.listeners:
            listener(event)


class NoDispatcher:
    """The benchmark sends no commands."""

    def dispatch(self, command: Any) -> Deferred[Any]:
        raise NotImplementedError


# Link settings under test (``--batch-lines``, ``--no-legacy``); defaults otherwise.
LINK_OPTIONS: dict[str, Any] = {}


def panel_config(port: int) -> PanelConfig:
    return PanelConfig(url="ws://127.0.0.1:{}/ws".format(port), **LINK_OPTIONS)


async def until(predicate: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        await task.deferLater(reactor, 0.01, lambda: None)


class InProcessPanel:
    """The fake Panel in this process (shares the CPU with the agent)."""

    def __init__(self, server_id: str) -> None:
        self.panel = FakePanel(reactor, SECRET, request_system_info=False, parse=False)
        self.counter = LineCounter(server_id)
        self.panel.on_frame = self.counter
        self._port = reactor.listenTCP(0, self.panel.factory, interface="127.0.0.1")
        self.port: int = self._port.getHost().port

    async def wait_done(self, timeout: float) -> LineCounter:
        await until(lambda: self.counter.done_at is not None, timeout)
        return self.counter

    async def close(self) -> None:
        await self._port.stopListening()


class SubprocessPanel:
    """
    The fake Panel in a child process, as a real Panel would be: the agent's
    figures then do not pay for the Panel's JSON parsing and unmasking.
    Both processes time with ``time.monotonic()``, which is system-wide.
    """

    def __init__(self, server_id: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-panel", server_id],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    async def wait_done(self, timeout: float) -> LineCounter:
        assert self.proc.stdout is not None
        d = threads.deferToThread(self.proc.stdout.readline)
        line = await d.addTimeout(timeout, reactor)
        result = json.loads(line)
        counter = LineCounter(result["server_id"])
        counter.__dict__.update(result["counter"])
        return counter

    async def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its Popen handle
        await threads.deferToThread(self.proc.wait, 10)


def start_panel(server_id: str, external: bool) -> InProcessPanel | SubprocessPanel:
    return SubprocessPanel(server_id) if external else InProcessPanel(server_id)


async def serve_panel(server_id: str) -> None:
    """``--serve-panel``: count one server's lines, print the result, exit."""
    panel = InProcessPanel(server_id)
    sys.stdout.write(json.dumps({"port": panel.port}) + "\n")
    sys.stdout.flush()
    counter = await panel.wait_done(600)
    out = {"server_id": server_id, "counter": {k: v for k, v in counter.__dict__.items()}}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    # Let the agent's close handshake finish before going away.
    await task.deferLater(reactor, 0.5, lambda: None)
    await panel.close()


async def synthetic(lines: int, external: bool, event_lines: int = 100) -> dict[str, Any]:
    """The link's ceiling: events published in a tight loop."""
    panel = start_panel("flood", external)
    source = FloodSource()
    config = AgentConfig(
        node_id="bench", secret=SECRET, development=True,
        panel=panel_config(panel.port),
    )
    link = PanelLink(
        reactor, config, NoDispatcher(), source,  # type: ignore[arg-type]
        lambda: succeed({}), lambda: succeed({}),
    )
    link.startService()
    try:
        await until(lambda: link.connected, 10)
        start = time.monotonic()
        published = 0
        chunk = 2_000
        # Publish in chunks, yielding to the reactor between them as a busy
        # Docker stream would (its data arrives in reads of a few KB, which the
        # manager publishes as one event of ``event_lines`` lines each).
        while published < lines:
            end = min(published + chunk, lines)
            for first in range(published, end, event_lines):
                last = min(first + event_lines, end)
                source.publish([str(i) for i in range(first + 1, last + 1)])
            published = end
            await task.deferLater(reactor, 0, lambda: None)
        source.publish(["flood done"])
        published_at = time.monotonic()
        counter = await panel.wait_done(120)
        assert counter.done_at is not None
        elapsed = counter.done_at - start
        return {
            "lines": lines,
            "published_per_s": lines / (published_at - start),
            "delivered_per_s": counter.lines / elapsed,
            "delivered_lines": counter.lines - 1,
            "frames": counter.frames,
            "lines_per_frame": counter.lines / max(counter.frames, 1),
        }
    finally:
        await link.stopService()
        await panel.close()


async def docker_raw(host: str, image: str, lines: int) -> dict[str, Any]:
    """The raw Docker stream of a flooding container, only counted."""
    from ctrlagent.engine.docker.client import DockerClient

    client = DockerClient.from_config(reactor, DockerConfig(host=host, call_timeout=30.0))
    cid = await client.container_create(
        "bench-raw-" + uuid.uuid4().hex[:8],
        {
            "Image": image,
            "Cmd": ["/usr/local/bin/gameserver"],
            "Env": ["FLOOD_LINES={}".format(lines)],
            "OpenStdin": True,
            "Labels": {"ctrlagent.bench": "raw"},
        },
    )
    try:
        await client.container_start(cid)
        stream = client.logs(cid, follow=True)
        count = 0
        first: float | None = None
        done: float | None = None
        async for batch in stream.batches():
            now = time.monotonic()
            for _stream, line in batch:
                if first is None and line.isdigit():
                    first = now
                if line.isdigit():
                    count += 1
                if line == "flood done":
                    done = now
            if done is not None:
                break
        stream.close()
        assert first is not None and done is not None
        return {"lines": count, "per_s": count / max(done - first, 1e-9)}
    finally:
        await client.container_remove(cid, force=True)
        await client.close()


async def docker_agent(
    host: str, image: str, lines: int, external: bool, with_link: bool = True
) -> dict[str, Any]:
    """
    The same flood through the ServerManager and the PanelLink to the Panel.

    Without ``with_link`` only the manager runs, to tell the link's cost from
    the console pipeline's that feeds it.
    """
    from ctrlagent.actions import Dispatcher
    from ctrlagent.engine import make_engine
    from ctrlagent.engine.docker.client import DockerClient
    from ctrlagent.servers.manager import ServerManager
    from ctrlagent.servers.store import open_store
    from ctrlagent.testing.files import FakeFileManager

    tmp = tempfile.mkdtemp(prefix="ctrlagent-bench-")
    sid = "bench-" + uuid.uuid4().hex[:8]
    panel = start_panel(sid, external)
    config = AgentConfig(
        node_id="bench", secret=SECRET, development=True,
        state_dir=os.path.join(tmp, "state"), data_dir=os.path.join(tmp, "data"),
        panel=panel_config(panel.port),
        docker=DockerConfig(host=host, call_timeout=30.0),
        # "Before throttling applies": the manager's console throttle is raised
        # out of the way; what is measured is the pipeline's capacity.
        servers=ServersConfig(console_throttle_lines=100_000_000, stop_timeout=2.0,
                              disk_check_interval=0.0),
    )
    client = DockerClient.from_config(reactor, config.docker)
    store = open_store(reactor, config.state_dir)
    manager = ServerManager(reactor, config, make_engine(reactor, config, client), store)
    manager.startService()
    published = Published()

    def watch(event: ServerEvent) -> None:
        # Cheap per event, as the agent's own listeners are: what it costs
        # here is the benchmark's, not the agent's.
        if isinstance(event, ConsoleOutput) and event.server_id == sid:
            if published.first is None:
                published.first = time.monotonic()
            published.lines += len(event.lines)
            if "flood done" in event.lines:
                published.done = time.monotonic()

    manager.add_listener(watch)

    class Host:
        async def snapshot(self) -> dict[str, Any]:
            return {}

        async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
            return {}

    dispatcher = Dispatcher(servers=manager, files=FakeFileManager(reactor), system=Host(),
                            clock=reactor)
    link = PanelLink(reactor, config, dispatcher, manager, lambda: succeed({}),
                     lambda: succeed({}))
    if with_link:
        link.startService()
    try:
        if with_link:
            await until(lambda: link.connected, 10)
        await manager.create_server(sid, {
            "name": "bench", "image": image, "startup": "/usr/local/bin/gameserver",
            "environment": {"FLOOD_LINES": lines},
            "limits": {"memory": 256, "swap": 0, "cpu": 0, "io": 500, "disk": 0},
            "stop": {"type": "command", "value": "stop", "timeout": 2},
        })
        await until(lambda: manager.get(sid).state.value == "offline", 60)
        await manager.start(sid)
        if not with_link:
            await until(lambda: published.done is not None, 300)
            return {"manager_published_per_s": published.rate()}
        counter = await panel.wait_done(300)
        assert counter.first is not None and counter.done_at is not None
        delivered = counter.lines - 1  # minus "flood done"
        out = {
            "lines": lines,
            "delivered_lines": delivered,
            "delivered_per_s": delivered / max(counter.done_at - counter.first, 1e-9),
            "frames": counter.frames,
            "lines_per_frame": counter.lines / max(counter.frames, 1),
        }
        if published.done is not None:
            out["manager_published_per_s"] = published.rate()
        return out
    finally:
        manager.remove_listener(watch)
        if with_link:
            await link.stopService()
        try:
            await manager.delete(sid, purge_files=True)
        except Exception:
            pass
        await manager.stopService()
        await client.close()
        await panel.close()


def engine_answers(host: str) -> bool:
    from tests.rig.dockerd import engine_answers as answers

    return host.startswith("unix://") and answers(host[len("unix://"):])


async def main(args: argparse.Namespace) -> dict[str, Any]:
    external = not args.in_process_panel
    results: dict[str, Any] = {
        "panel": "in-process" if args.in_process_panel else "subprocess",
        "link_options": dict(LINK_OPTIONS),
        "synthetic": await synthetic(args.lines, external),
    }
    host = args.docker_host
    if host and engine_answers(host) and not args.synthetic_only:
        from tests.rig.images import build_scripted_image

        image = build_scripted_image(host)
        raws, agents, alone = [], [], []
        for _ in range(args.repeat):
            raws.append(await docker_raw(host, image, args.lines))
            agents.append(await docker_agent(host, image, args.lines, external))
            alone.append(
                await docker_agent(host, image, args.lines, external, with_link=False)
            )
        # The machine is shared and noisy: compare the runs of one iteration
        # with each other (paired), and report the median of those ratios.
        raw_rates = [r["per_s"] for r in raws]
        agent_rates = [a["delivered_per_s"] for a in agents]
        alone_rates = [a["manager_published_per_s"] for a in alone]
        ratios = [a / r for a, r in zip(agent_rates, raw_rates, strict=True)]
        link_share = [a / m for a, m in zip(agent_rates, alone_rates, strict=True)]
        best = max(agents, key=lambda a: a["delivered_per_s"])
        results["docker"] = {
            "raw_runs": raw_rates,
            "agent_runs": agent_rates,
            "manager_alone_runs": alone_rates,
            "delivered_over_raw_runs": ratios,
            "delivered_over_raw": statistics.median(ratios),
            "delivered_over_manager_alone": statistics.median(link_share),
            "raw_per_s": statistics.median(raw_rates),
            "agent": best,
            "agent_per_s": statistics.median(agent_rates),
            "manager_alone_per_s": statistics.median(alone_rates),
            "target": 0.5,
        }
    else:
        results["docker"] = None
    return results


def report(results: dict[str, Any]) -> str:
    s = results["synthetic"]
    lines = [
        "Panel: " + results["panel"],
        "synthetic: published {:,.0f} lines/s, delivered {:,.0f} lines/s "
        "({:.1f} lines/frame, {:,} frames)".format(
            s["published_per_s"], s["delivered_per_s"], s["lines_per_frame"], s["frames"]
        )
    ]
    d = results.get("docker")
    if d is None:
        lines.append("docker: no engine, skipped")
    else:
        lines.append(
            "docker (medians of {} paired runs): raw stream {:,.0f} lines/s; delivered to the "
            "Panel {:,.0f} lines/s = {:.0%} of raw (target {:.0%}); the manager alone (no link) "
            "publishes {:,.0f} lines/s, so the link delivers {:.0%} of what it is fed; "
            "{:.1f} lines/frame".format(
                len(d["raw_runs"]), d["raw_per_s"], d["agent_per_s"], d["delivered_over_raw"],
                d["target"], d["manager_alone_per_s"], d["delivered_over_manager_alone"],
                d["agent"]["lines_per_frame"],
            )
        )
    return "\n".join(lines)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST", ""))
    parser.add_argument("--synthetic-only", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--in-process-panel", action="store_true",
                        help="run the fake Panel in this process (a harsher figure)")
    parser.add_argument("--batch-lines", type=int, help="panel.console_batch_lines")
    parser.add_argument("--no-legacy", action="store_true",
                        help="do not send the legacy server_output frames")
    parser.add_argument("--no-http", action="store_true",
                        help="skip the HTTP command latency part")
    parser.add_argument("--serve-panel", metavar="SERVER_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_lines:
        LINK_OPTIONS["console_batch_lines"] = args.batch_lines
    if args.no_legacy:
        LINK_OPTIONS["legacy_frames"] = False
    out: dict[str, Any] = {}
    run_http = not (args.serve_panel or args.synthetic_only or args.no_http)
    if run_http:
        # HTTP command latency (issue 5): the agent as a twistd subprocess with
        # 20 running servers.  Measured first, on a quiet engine: right after
        # the floods below the engine is still busy dropping their logs, which
        # measures the engine's cleanup rather than the agent.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import http_latency

        out["http"] = http_latency.run_benchmark_anywhere(args.docker_host, 20, 2000)

    async def go() -> None:
        if args.serve_panel:
            await serve_panel(args.serve_panel)
            return
        out.update(await main(args))

    def done(result: Any) -> Any:
        reactor.stop()
        return result

    d = Deferred.fromCoroutine(go())
    d.addBoth(done)
    failures: list[Any] = []
    d.addErrback(failures.append)
    reactor.run()
    if failures:
        failures[0].printTraceback(file=sys.stderr)
        sys.exit(1)
    if args.serve_panel:
        return
    text = json.dumps(out, indent=2) if args.json else report(out)
    if run_http and not args.json:
        text += "\n" + http_latency.report(out["http"])
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    run()
