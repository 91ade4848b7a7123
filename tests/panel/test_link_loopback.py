"""
The Panel link against a real Autobahn WebSocket server on 127.0.0.1 playing the
Panel (``FakePanel``): refused secret, 1008 without a known node id,
``system_info_request`` first, heartbeat spacing, flat/nested/legacy commands,
and a Panel that dies mid-stream and comes back while a server floods its
console.  The agent side is the real ``Dispatcher`` over the fake server manager
(the real-container variant is ``test_link_real_containers.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ctrlagent.actions import Dispatcher
from ctrlagent.config import AgentConfig, PanelConfig
from ctrlagent.panel.link import PanelLink
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.panel import FakePanel
from ctrlagent.testing.servers import FakeServerManager

from .harness import SECRET, FakeHost

reactor: Any = _reactor


def fast_config(port: int, **overrides: Any) -> AgentConfig:
    panel = PanelConfig(
        url="ws://127.0.0.1:{}/ws".format(port),
        heartbeat_interval=0.2,
        backoff_initial=0.05,
        backoff_max=0.2,
        refused_backoff=0.3,
        stable_after=0.5,
        open_handshake_timeout=2.0,
        auto_ping_interval=1.0,
        auto_ping_timeout=2.0,
        console_batch_lines=20,
        console_batch_window=0.02,
    )
    for key, value in overrides.items():
        panel = PanelConfig(**{**panel.__dict__, key: value})
    return AgentConfig(node_id="node-1", secret=SECRET, development=True, panel=panel)


async def within(d: Deferred[Any], seconds: float = 10.0) -> Any:
    return await d.addTimeout(seconds, reactor)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate: Callable[[], Any], seconds: float = 10.0) -> Any:
    """Poll ``predicate`` on the real reactor until truthy."""
    deadline = reactor.seconds() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met within {}s".format(seconds))
        await sleep(0.01)


@dataclass
class Rig:
    panel: FakePanel
    port_number: int
    servers: FakeServerManager
    link: PanelLink
    listening: Any = None
    pongs: list[Any] = field(default_factory=list)

    def listen(self) -> None:
        self.listening = reactor.listenTCP(
            self.port_number, self.panel.factory, interface="127.0.0.1"
        )

    async def stop_listening(self) -> None:
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(*, agent_secret: str = SECRET, node_ids: set[str] | None = None, **panel: Any) -> Rig:
        fake = FakePanel(reactor, SECRET, node_ids=node_ids)
        listening = reactor.listenTCP(0, fake.factory, interface="127.0.0.1")
        port_number = listening.getHost().port
        config = fast_config(port_number, **panel)
        config = AgentConfig(
            node_id=config.node_id, secret=agent_secret, development=True, panel=config.panel
        )
        servers = FakeServerManager(reactor)
        dispatcher = Dispatcher(
            servers=servers, files=FakeFileManager(reactor), system=FakeHost(), clock=reactor
        )
        link = PanelLink(
            reactor,
            config,
            dispatcher,
            servers,
            lambda: succeed({"os": "linux", "cpuCount": 2}),
            lambda: succeed({"cpu": 1.0, "memory": 2.0, "disk": 3.0}),
        )
        rig = Rig(fake, port_number, servers, link, listening)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        pytest_twisted.blockon(Deferred.fromCoroutine(_teardown(rig)))


async def _teardown(rig: Rig) -> None:
    if rig.link.running:
        await rig.link.stopService()
    await rig.stop_listening()
    for connection in rig.panel.connections:
        if connection.transport is not None:
            connection.transport.abortConnection()
    await sleep(0.05)


def intervals(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest_twisted.ensureDeferred
async def test_a_wrong_secret_is_refused_with_401_and_retried_slowly(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(agent_secret="not the secret", refused_backoff=0.3)
    times: list[float] = []
    original = rig.panel.handshake

    def record(protocol: Any, request: Any) -> None:
        times.append(reactor.seconds())
        original(protocol, request)

    rig.panel.handshake = record  # type: ignore[method-assign]
    rig.link.startService()
    await until(lambda: len(rig.panel.refusals) >= 3, 5)
    assert rig.panel.refusals[:3] == [401, 401, 401]
    assert all(gap >= 0.29 for gap in intervals(times[:3])), intervals(times)
    assert not rig.link.connected and rig.link.connections == 0
    assert not rig.link.is_connected()


@pytest_twisted.ensureDeferred
async def test_an_unknown_node_is_closed_1008_and_backed_off(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(node_ids={"another-node"}, backoff_initial=0.05, backoff_max=5.0)
    rig.link.startService()
    await until(lambda: len(rig.panel.open_times) >= 4, 10)
    gaps = intervals(rig.panel.open_times[:4])
    # At least 0.1, 0.2, 0.4 s (jitter and load only lengthen them): ClientService
    # alone would retry every 0.05 s since each attempt connected.
    assert gaps[0] >= 0.099 and gaps[1] >= 0.199 and gaps[2] >= 0.399, gaps
    assert rig.link.backoff.failed_handshakes >= 3
    assert rig.panel.requests[0].params["nodeId"] == ["node-1"]
    await until(lambda: not rig.link.connected, 2)


@pytest_twisted.ensureDeferred
async def test_commands_heartbeats_and_a_panel_that_dies_mid_stream(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    panel, link, servers = rig.panel, rig.link, rig.servers
    link.startService()
    await within(panel.wait_for_frame("system_info", 2))
    assert link.connected
    first = panel.frames(connection=0)
    assert first[0]["type"] == "heartbeat" and first[1]["type"] == "system_info"
    request = panel.requests[0]
    assert request.headers["authorization"] == "Bearer " + SECRET
    assert request.headers["x-node-id"] == request.headers["x-agent-id"] == "node-1"

    # Flat and nested commands, each answered once with its id.
    panel.send({"id": "c-create", "type": "command", "action": "create_server",
                "serverId": "s1", "payload": {"image": "busybox", "name": "s1"},
                "timestamp": "2026-11-24T02:20:30.000Z", "agentId": "node-1"})
    await until(lambda: "c-create" in panel.responses())
    panel.send({"id": "c-start", "type": "command",
                "data": {"action": "start_server", "serverId": "s1"}, "timestamp": 1795482053257})
    panel.send({"id": "c-status", "type": "command", "action": "get_server_status",
                "serverId": "s1"})
    panel.send({"id": "c-unknown", "type": "command", "action": "launch_rockets"})
    panel.send({"type": "server_command", "data": {"serverId": "s1", "command": "say hi"}})
    panel.send({"type": "ping", "id": 17})
    panel.send({"type": "console", "data": "from a browser"})
    panel.send(b"{not json")
    await until(lambda: {"c-start", "c-status", "c-unknown"} <= set(panel.responses()))
    await until(lambda: panel.frames("pong"))
    assert panel.frames("pong")[0]["id"] == 17
    assert panel.responses()["c-unknown"][0]["error"]["code"] == "UNKNOWN_ACTION"
    await until(lambda: servers.servers["s1"].stdin == ["say hi"])

    # Heartbeats every 0.2 s.
    await until(lambda: len(panel.frames("heartbeat", connection=0)) >= 5, 5)
    beats = [r.at for r in panel.received
             if r.connection == 0 and r.frame["type"] == "heartbeat"]
    # LoopingCall keeps to its schedule; the upper bound leaves room for a loaded machine.
    assert all(0.15 <= gap <= 0.65 for gap in intervals(beats[:5])), intervals(beats)

    # A server floods its console while the Panel dies and comes back.
    emitted: list[tuple[int, bool]] = []  # (line number, link up when emitted)

    def flood() -> None:
        for _ in range(10):
            n = len(emitted)
            emitted.append((n, link.connected))
            servers.emit_console("s1", "line {}".format(n))

    flooding = LoopingCall(flood)
    flooding.clock = reactor
    flooding.start(0.005)
    gate = servers.hold("stop")
    panel.send({"id": "c-stop", "type": "command", "action": "stop_server", "serverId": "s1",
                "payload": {"timeout": 30}})
    await until(lambda: servers.servers["s1"].status == "stopping")
    await sleep(0.2)

    await rig.stop_listening()
    panel.drop()
    await until(lambda: not link.connected)
    assert not link.is_connected()
    gate.callback(None)  # the stop finishes while the link is down
    await sleep(0.4)  # several refused TCP attempts
    assert not link.connected
    rig.listen()
    await until(lambda: len(panel.connections) == 2, 5)
    await until(lambda: link.connected)
    await sleep(0.2)
    flooding.stop()
    last = len(emitted) - 1
    await until(lambda: panel.console_lines()[-1:] == ["line {}".format(last)], 5)

    # Every command answered exactly once, the one in flight on the new connection.
    responses = panel.responses()
    assert sorted(responses) == ["c-create", "c-start", "c-status", "c-stop", "c-unknown"]
    assert all(len(replies) == 1 for replies in responses.values())
    assert [f["id"] for f in panel.frames("response", connection=1)] == ["c-stop"]
    assert responses["c-stop"][0]["success"] is True

    # Console lines: never reordered or duplicated; none produced while the link
    # was down lost; only frames already written to the dead socket may be gone.
    received = [int(line.split()[1]) for line in panel.console_lines("s1")
                if line.startswith("line ")]
    assert received == sorted(set(received))
    missing = set(range(len(emitted))) - set(received)
    while_down = [n for n, up in emitted if not up]
    assert while_down, "the flood never ran while the link was down"
    assert not missing & set(while_down)
    assert len(missing) < 200, len(missing)
    assert not panel.frames("events_dropped")

    # On the new connection: system_info, the queued frames, then a fresh snapshot.
    second = [r for r in panel.received if r.connection == 1]
    kinds = [r.frame.get("event") or r.frame["type"] for r in second]
    assert kinds[:2] == ["heartbeat", "system_info"]
    snapshot_at = next(
        i for i, r in enumerate(second)
        if r.frame.get("event") == "server_status_changed"
        and r.frame["data"]["previousStatus"] == r.frame["data"]["currentStatus"]
    )
    assert second[snapshot_at].frame["data"]["status"] == "offline"
    queued_changes = [r.frame["data"]["currentStatus"] for r in second[:snapshot_at]
                      if r.frame.get("event") == "server_status_changed"]
    assert queued_changes == ["offline"]  # stopping -> offline happened while down
    down_lines = {f"line {n}" for n in while_down}
    lines_before_snapshot = {line for r in second[:snapshot_at]
                             if r.frame.get("event") == "server_log"
                             for line in r.frame["data"]["lines"]}
    assert down_lines <= lines_before_snapshot
    await until(lambda: len(panel.frames("heartbeat", connection=1)) >= 2, 2)


class OneTurnLater:
    """The real dispatcher, each answer a reactor turn late, recording the link's intake."""

    def __init__(self, inner: Dispatcher, link: PanelLink) -> None:
        self.inner = inner
        self.link = link
        self.most_in_flight = 0
        self.most_held_bytes = 0

    def dispatch(self, command: Any) -> Deferred[Any]:
        stats = self.link.stats()
        self.most_in_flight = max(self.most_in_flight, stats["commandsInFlight"])
        self.most_held_bytes = max(self.most_held_bytes, stats["heldBytes"])
        d: Deferred[Any] = self.inner.dispatch(command)
        return d.addCallback(lambda result: deferLater(reactor, 0, lambda: result))


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_burst_of_20000_commands_is_answered_in_full_with_bounded_intake(
    make_rig: Callable[..., Rig],
) -> None:
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(formatEvent(event))

    rig = make_rig(auto_ping_interval=0, auto_ping_timeout=0, heartbeat_interval=5.0)
    panel, link = rig.panel, rig.link
    link.max_in_flight = 64
    link.max_held_bytes = 64 * 1024
    recorder = OneTurnLater(link._dispatcher, link)  # type: ignore[arg-type]
    link._dispatcher = recorder
    link.startService()
    await within(panel.wait_for_frame("system_info", 1))
    globalLogPublisher.addObserver(observe)
    try:
        count = 20_000
        for i in range(count):
            panel.send({"id": "b{}".format(i), "type": "command", "action": "system.ping",
                        "timestamp": 1795482053257})
        await until(lambda: len(panel.frames("response")) >= count, 180)
        await sleep(0.2)  # nothing more may come
    finally:
        globalLogPublisher.removeObserver(observe)

    responses = panel.responses()
    assert len(panel.frames("response")) == count
    assert set(responses) == {"b{}".format(i) for i in range(count)}
    assert all(len(v) == 1 and v[0]["success"] for v in responses.values())
    stats = link.stats()
    assert recorder.most_in_flight <= 64
    # Pausing stops further reads; the frames of the read in progress are still
    # held: one 64 KiB read of ~110-byte frames charges under 100 KiB.
    assert recorder.most_held_bytes <= 64 * 1024 + 2 * 65536
    assert stats["readPauses"] >= 1, stats  # the reader really was held back
    assert (stats["dropped"], stats["commandsInFlight"], stats["framesHeld"]) == (0, 0, 0)
    assert not panel.frames("events_dropped")
    assert link.connections == 1 and link.connected
    assert not [w for w in warnings if "drop" in w], warnings
