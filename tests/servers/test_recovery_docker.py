"""
Agent restarts, engine restarts, console floods, stats, and the real Minetest
server, against real engines.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ctrlagent.engine import engine_client_config, make_engine
from ctrlagent.engine.docker.client import DockerClient
from ctrlagent.engine.podman.holders import holder_pids
from ctrlagent.events import ConsoleOutput, ResourceUpdate
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
from ctrlagent.wire.json import to_json
from tests.rig.images import build_scripted_image
from tests.servers.conftest import Rig, remove_containers, scripted, sleep, until, until_state

pytestmark = pytest.mark.docker
S = ServerState


async def say_all(manager: Any, sid: str, prefix: str, count: int) -> None:
    for i in range(count):
        await manager.send_command(sid, "say {}{}".format(prefix, i))


@pytest_twisted.ensureDeferred
async def test_agent_killed_and_restarted_reattaches_with_every_line_once(
    rig: Rig, scripted_image: str
) -> None:
    first = rig.manager()
    sid = rig.new_id()
    await first.create_server(sid, scripted(scripted_image))
    await first.start(sid)
    await until_state(first, sid, S.RUNNING)
    await say_all(first, sid, "a", 20)
    await until(lambda: "[Server] a19" in rig.recorder.lines(sid), 5, "a-lines")
    cid = first.get(sid).container_id
    assert cid is not None

    # The agent dies like a SIGKILLed process: nothing more is written.
    first.simulate_crash()

    # While no agent runs, the game keeps running and printing, and takes
    # input (through the engine, as an agent sends it: on Podman the run's
    # stdin holder, which outlived the killed agent).
    client = DockerClient.from_config(reactor, engine_client_config(rig.config))
    try:
        pipe = await make_engine(reactor, rig.config, client).open_stdin(cid)
        for i in range(20):
            pipe.write_line("say b{}".format(i))
        await sleep(0.5)
        await pipe.close()
    finally:
        await client.close()

    second = rig.manager()
    # definitions are served at once, before the engine is reconciled
    assert second.resolve(sid) == sid
    await until(lambda: "[Server] b19" in rig.recorder.lines(sid), 10, "b-lines recovered")
    await until_state(second, sid, S.RUNNING)
    await say_all(second, sid, "c", 5)
    await until(lambda: "[Server] c4" in rig.recorder.lines(sid), 5, "c-lines")

    lines = rig.recorder.lines(sid)
    duplicates = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert duplicates == []
    for prefix, count in (("a", 20), ("b", 20), ("c", 5)):
        for i in range(count):
            assert "[Server] {}{}".format(prefix, i) in lines
    assert lines[0].startswith("Starting scripted game server")
    # the new agent's history holds the old lines (from Docker's logs) once too
    history = second.console_history(sid, 1000)
    assert history.count("[Server] a0") == 1 and history.count("[Server] b0") == 1
    assert history.count("[Server] c4") == 1
    # it did not restart the container: same container, still running
    assert second.get(sid).container_id == cid
    assert ("starting", "running") not in rig.recorder.statuses(sid)[4:]


@pytest_twisted.ensureDeferred
async def test_restarted_agent_starts_servers_that_should_run_and_reports_orphans(
    rig: Rig, scripted_image: str
) -> None:
    first = rig.manager()
    sid, orphan_id = rig.new_id(), rig.new_id()
    await first.create_server(sid, scripted(scripted_image))
    await first.create_server(orphan_id, scripted(scripted_image))
    await first.start(sid)
    await until_state(first, sid, S.RUNNING)
    orphan_cid = first.get(orphan_id).container_id
    await first.stopService()  # a clean agent stop leaves game servers running
    # behind the agent's back: the server dies, and the orphan's definition is lost
    from tests.servers.test_lifecycle_docker import inspect

    cid = first.get(sid).container_id
    assert cid is not None and inspect(rig.host, cid)["State"]["Running"]
    os.system("DOCKER_HOST={} docker kill {} >/dev/null".format(rig.host, cid))
    from ctrlagent.servers.store import open_store

    store = open_store(reactor, rig.config.state_dir)
    await store.delete(orphan_id)
    await store.close()

    second = rig.manager()
    await until_state(second, sid, S.RUNNING)
    await until(lambda: second.reconciled > 0, 5, "reconcile")
    # (the shared engine may hold other agents' containers: look at ours)
    ours = [o for o in second.orphans if o["serverId"] in (sid, orphan_id)]
    assert [(o["containerId"], o["serverId"]) for o in ours] == [(orphan_cid, orphan_id)]
    assert inspect(rig.host, orphan_cid)["Id"] == orphan_cid  # reported, not deleted


@pytest_twisted.ensureDeferred
async def test_flooding_server_is_throttled_and_every_drop_is_counted(
    rig: Rig, scripted_image: str
) -> None:
    rig.servers_config(
        console_throttle_lines=500, console_throttle_interval=0.5, console_buffer_lines=20000
    )
    manager = rig.manager()
    sid = rig.new_id()
    await manager.create_server(sid, scripted(scripted_image, FLOOD_LINES=8000))
    await manager.start(sid)
    await until(lambda: "flood done" in manager.console_history(sid, 3), 15, "flood")
    await sleep(1.2)  # let the last interval's notice come out
    server = manager.get(sid)
    notices = [
        line for e in rig.recorder.events if isinstance(e, ConsoleOutput) and e.stream == "agent"
        for line in e.lines if "throttled" in line
    ]
    assert notices, "a flood must be reported"
    dropped = sum(int(n.split("throttled: ")[1].split()[0]) for n in notices)
    forwarded = len(rig.recorder.lines(sid))
    printed = sum(1 for line in server.console.buffer if line.stream != "agent")
    assert printed >= 8000
    assert forwarded + dropped == printed
    assert dropped == server.console.throttle.total_dropped > 0
    await manager.kill(sid)


@pytest_twisted.ensureDeferred
async def test_stats_are_sampled_while_running(rig: Rig, scripted_image: str) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    await manager.create_server(sid, scripted(scripted_image))
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    await until(
        lambda: any(isinstance(e, ResourceUpdate) and e.server_id == sid
                    for e in rig.recorder.events),
        8, "a stats sample",
    )
    metrics = to_json(manager.server_metrics(sid))
    assert metrics["memory"] > 0
    assert metrics["memoryLimit"] == 64.0
    assert set(metrics["network"]) == {"in", "out"}
    assert isinstance(metrics["players"], int)
    assert metrics["uptime"] > 0
    await manager.kill(sid)
    assert to_json(manager.server_metrics(sid))["memory"] == 0.0


def _free_port() -> int:
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", port))
            return int(port)
        except OSError:
            continue
        finally:
            udp.close()
            tcp.close()
    raise RuntimeError("no free port")


def _minetest_handshake(port: int) -> bytes:
    """DOCKER-IN-TESTS.md: one reliable packet; the answer starts with the protocol id."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        hello = bytes.fromhex("4f457403" "0000" "00" "03ffdc01")
        for _ in range(10):
            s.sendto(hello, ("127.0.0.1", port))
            try:
                data, _ = s.recvfrom(1024)
            except TimeoutError:
                continue
            peer = data[4:6]
            bye = bytes.fromhex("4f457403") + peer + bytes.fromhex("000003")
            s.sendto(bye, ("127.0.0.1", port))
            return data
    return b""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_minetest_answers_udp_handshake_on_published_port_and_stops_cleanly(
    rig: Rig, minetest_image: str
) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    port = _free_port()
    await manager.create_server(
        sid,
        {
            "name": "minetest",
            "image": minetest_image,
            "startup": "/usr/games/minetestserver --port {{SERVER_PORT}}"
                       " --world /home/container/world --logfile /home/container/minetest.log",
            "environment": {"HOME": "/home/container"},
            "ports": [{"internal": 30000, "external": port, "ip": "127.0.0.1"}],
            "limits": {"memory": 512, "cpu": 100},
            "startupDone": {"pattern": r"listening on \[::\]:\d+", "regex": True},
            "stop": "SIGTERM",
        },
    )
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING, timeout=20)
    reply = await deferToThread(_minetest_handshake, port)
    assert reply[:4] == bytes.fromhex("4f457403")
    await manager.stop(sid, timeout=10)
    await until_state(manager, sid, S.OFFLINE, timeout=15)
    history = manager.console_history(sid, 30)
    assert not any("killing" in line for line in history)
    from tests.servers.test_lifecycle_docker import inspect

    cid = manager.get(sid).container_id
    assert cid is not None
    assert inspect(rig.host, cid)["State"]["ExitCode"] == 0
    assert os.path.isdir(os.path.join(rig.config.data_dir, sid, "world"))


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_docker_daemon_restarted_under_a_running_agent(
    rig: Rig, private_docker: Any
) -> None:
    engine = private_docker()
    image = await deferToThread(build_scripted_image, engine.host)
    manager = rig.manager(docker_host=engine.host)
    sid = rig.new_id()
    try:
        await manager.create_server(sid, scripted(image))
        await manager.start(sid)
        await until_state(manager, sid, S.RUNNING)
        old_cid = manager.get(sid).container_id

        await deferToThread(engine.kill_engine)
        await until(
            lambda: manager.get(sid).state in (S.UNKNOWN, S.OFFLINE), 10, "engine loss noticed"
        )
        await until_state(manager, sid, S.UNKNOWN, timeout=10)
        assert manager.engine_up is False
        # the agent keeps serving
        status = to_json(manager.status(sid))
        assert status["status"] == "unknown" and status["panelStatus"] in ("RUNNING", "OFFLINE")

        await deferToThread(engine.start)
        await until_state(manager, sid, S.RUNNING, timeout=20)
        assert manager.engine_up is True
        assert manager.get(sid).container_id == old_cid
        reply = await manager.console_command(sid, "say back", wait=0.5)
        assert "[Server] back" in reply
    finally:
        remove_containers(engine.host, [sid])


class HeldConnects:
    """
    The reactor, except that Unix connects (``moment`` "connect") or process
    launches ("start") never complete: the test holds them.
    """

    def __init__(self, reactor: Any, moment: str) -> None:
        self._reactor = reactor
        self.moment = moment
        self.held: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def connectUNIX(self, address: str, factory: Any, timeout: int = 30,  # noqa: N802
                    checkPID: int = 0) -> Any:  # noqa: N803
        if self.moment != "connect":
            return self._reactor.connectUNIX(address, factory, timeout=timeout,
                                             checkPID=checkPID)
        connector = HeldConnector(address)
        factory.startedConnecting(connector)
        self.held.append(connector)
        return connector

    def spawnProcess(self, protocol: Any, executable: Any, *args: Any,  # noqa: N802
                     **kw: Any) -> None:
        if self.moment != "start":
            return self._reactor.spawnProcess(protocol, executable, *args, **kw)
        self.held.append(protocol)  # launched, never ends (until the test says)
        return None


class HeldConnector:
    """A connect under way until stopped; it never connects."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stopped = False

    def stopConnecting(self) -> None:  # noqa: N802
        self.stopped = True

    def disconnect(self) -> None:
        self.stopped = True

    def connect(self) -> None:
        pass

    def getDestination(self) -> UNIXAddress:  # noqa: N802
        return UNIXAddress(self.address)


@pytest.mark.runtimes("podman", reason="the stdin holder, and so its connect, is Podman's")
@pytest.mark.parametrize("moment", ["connect", "start"])
@pytest_twisted.ensureDeferred
async def test_an_agent_stopping_while_it_reaches_a_stdin_holder_logs_nothing_and_leaks_nothing(
    rig: Rig, scripted_image: str, moment: str
) -> None:
    """
    The agent stops while its re-attach connects to the run's holder
    ("connect"), or starts one because the run has none ("start": the holder
    was killed and its files removed): cancellation, not a failure.
    """
    first = rig.manager()
    await until(lambda: first.reconciled > 0, 15, "the first reconcile")
    sid = rig.new_id()
    await first.create_server(sid, scripted(scripted_image))
    await first.start(sid)
    await until_state(first, sid, S.RUNNING)
    await first.stopService()  # the game and its stdin holder run on
    stdin_dir = os.path.join(rig.config.state_dir, "stdin")
    if moment == "start":
        # No holder for the run any more: the next agent starts one.
        for pid in holder_pids(stdin_dir):
            os.kill(pid, signal.SIGKILL)
        for name in os.listdir(stdin_dir):
            os.unlink(os.path.join(stdin_dir, name))

    client = DockerClient.from_config(reactor, engine_client_config(rig.config))
    rig.clients.append(client)
    engine: Any = make_engine(reactor, rig.config, client)
    held = HeldConnects(reactor, moment)
    engine.holders._reactor = held
    second = ServerManager(reactor, rig.config, engine, open_store(reactor, rig.config.state_dir))
    second.add_listener(rig.recorder)
    rig.managers.append(second)
    said: list[str] = []

    def observer(event: dict) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            said.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        second.startService()
        await until(lambda: held.held, 15, "the re-attach reaching the holder's " + moment)
        await second.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
    # Cancellation, not a failure: no traceback (the autouse fixture), no "engine
    # unreachable", no "console input closed", no "holder did not answer".
    assert said == []
    assert second.get(sid).state is S.RUNNING
    if moment == "connect":
        # The connect was abandoned, not left half-open, and none was made after it.
        assert [c.stopped for c in held.held] == [True]
        # The holder kept the run's stdin: the next agent's commands reach the game.
        third = rig.manager()
        await until(lambda: third.get(sid).output_attached, 15, "re-attached")
        reply = await third.console_command(sid, "say after the stop", wait=0.5)
        assert "[Server] after the stop" in reply
    else:
        assert len(held.held) == 1  # one launch, abandoned: no second try after the stop
        third = rig.manager()
        await until(lambda: third.get(sid).output_attached, 15, "re-attached")


@pytest_twisted.ensureDeferred
async def test_a_death_whose_event_never_came_is_settled_by_the_drift_check(
    rig: Rig, scripted_image: str
) -> None:
    rig.servers_config(drift_check_interval=0.5)
    manager = rig.manager()
    sid = rig.new_id()
    await manager.create_server(sid, {**scripted(scripted_image), "crashRestart": False})
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    server = manager.get(sid)
    # The engine's die event is lost on its way (the server never hears it);
    # every other event still comes.
    hear = server.on_event
    lost: list[Any] = []

    def deaf_to_deaths(event: Any) -> Any:
        if event.action == "die":
            lost.append(event)
            return None
        return hear(event)

    server.on_event = deaf_to_deaths  # type: ignore[method-assign]
    await manager.send_command(sid, "crash 7")
    await until(lambda: bool(lost), 10, "the die event (dropped)")
    await until_state(manager, sid, S.CRASHED, 10)
    report = server.crash_report
    assert report is not None and report.exit_code == 7
    assert any("Crashing with exit code 7" in line for line in report.lines)
    assert [s for s in rig.recorder.statuses(sid) if s[1] == "crashed"] == [("running", "crashed")]


@pytest_twisted.ensureDeferred
async def test_a_container_removed_unheard_is_settled_as_a_stop_outside_the_agent(
    rig: Rig, scripted_image: str
) -> None:
    rig.servers_config(drift_check_interval=0.5)
    manager = rig.manager()
    sid = rig.new_id()
    await manager.create_server(sid, scripted(scripted_image))  # crashRestart on
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    server = manager.get(sid)
    first = server.container_id
    # Someone removes the container, and the engine's kill, die and destroy
    # events for it are all lost on their way.
    lost: list[Any] = []

    def deaf(event: Any) -> Any:
        lost.append(event)
        return None

    server.on_event = deaf  # type: ignore[method-assign]
    await deferToThread(remove_containers, rig.host, [sid])
    await until_state(manager, sid, S.OFFLINE, 10)
    assert "die" in [e.action for e in lost]  # settled without it
    assert server.crash_report is None
    assert not any(s[1] == "crashed" for s in rig.recorder.statuses(sid))
    assert any("stopped outside the agent (its container was removed)" in line
               for line in manager.console_history(sid, 20))
    # The next start makes a new container.
    del server.on_event
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    assert server.container_id not in (None, first)


@pytest_twisted.ensureDeferred
async def test_a_container_removed_outside_the_agent_is_settled_as_its_events_say(
    rig: Rig, scripted_image: str
) -> None:
    # `docker rm -f` of a running server, every event heard.  Docker sends a
    # kill before the die: a stop outside the agent.  Podman 4.3 sends no
    # kill for a forced removal (nor for a stop), only the die: a crash.
    # Either way the container is gone by the time the death is judged,
    # which must not leave the server stuck in `running`.
    manager = rig.manager()
    sid = rig.new_id()
    await manager.create_server(sid, {**scripted(scripted_image), "crashRestart": False})
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    server = manager.get(sid)
    first = server.container_id or ""
    engine: Any = server.services.engine
    kept = [name for name in ("_pids", "_warnings", "_live", "_stdin")
            if first in getattr(engine, name, {})]
    assert kept, "the engine keeps something of a running container"
    await deferToThread(remove_containers, rig.host, [sid])
    # The engine forgets what it kept of the container once its removal is read.
    await until(lambda: not any(first in getattr(engine, name) for name in kept), 10,
                "the engine to forget the container")
    if rig.config.runtime.kind == "podman":
        await until_state(manager, sid, S.CRASHED, 10)
        assert server.crash_report is not None and not server.crash_report.restarted
    else:
        await until_state(manager, sid, S.OFFLINE, 10)
        assert server.crash_report is None
        assert any("stopped outside the agent (exit code 137)" in line
                   for line in manager.console_history(sid, 20))
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
