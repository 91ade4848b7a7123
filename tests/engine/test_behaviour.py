"""
One behaviour suite for every container engine: the fake and the real one.

Each test runs twice, on ``FakeEngine`` (in memory) and on ``DockerEngine``
against the test Docker engine with the scripted game image (marked
``docker``): what the server domain relies on holds for both, so a test of
the domain on the fake means the same on Docker.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface.verify import verifyObject

from ctrlagent.engine.interface import (
    ContainerSpec,
    EngineEvent,
    IContainerEngine,
    IEventStream,
    ILogStream,
    IStatsReader,
    IStdinPipe,
    LogLine,
    ResourceLimits,
    StatsSample,
)
from ctrlagent.engine.podman.engine import RESTART_WARNING
from ctrlagent.errors import Conflict, EngineError, NotFound
from ctrlagent.testing.engine import FakeEngine

RUN = secrets.token_hex(6)
MB = 1024 * 1024
# Explicit process limits on every test container, as the agent's own
# (``servers.containers.DEFAULT_ULIMITS``): Podman's defaults exceed what
# some hosts allow (docs/RUNTIMES.md).
ULIMITS = {"nofile": (1024, 1024), "nproc": (4096, 4096)}


@dataclass
class Harness:
    """An engine under test, the image it runs, and what a test made on it."""

    engine: Any
    image: str
    kind: str
    case: str = field(default_factory=lambda: secrets.token_hex(4))
    networks: list[str] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        # Not the agent's managed label: the agent's suites sweep those.
        return {"ctrlagent.test": RUN, "ctrlagent.case": self.case}

    def spec(self, env: dict[str, str] | None = None, **changes: Any) -> ContainerSpec:
        spec = ContainerSpec(
            name="ctrlagent-t-{}-{}".format(self.case, secrets.token_hex(3)),
            image=self.image,
            labels=self.labels,
            env=dict(env or {}),
            working_dir="/home/container",
            interactive=True,
            output_max_bytes=MB,
            ulimits=ULIMITS,
        )
        return replace(spec, **changes)

    async def started(self, env: dict[str, str] | None = None, **changes: Any) -> str:
        """A running scripted game, once it printed its startup line (its traps are set)."""
        cid = await self.engine.create(self.spec(env, **changes))
        await self.engine.start(cid)
        await lines_until(self.engine, cid, "Done (0.1s)! For help, type help")
        return cid


async def within(seconds: float, awaitable: Awaitable[Any]) -> Any:
    d: Deferred[Any] = ensureDeferred(awaitable)  # type: ignore[arg-type]
    d.addTimeout(seconds, reactor)
    return await d


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def read_all(stream: ILogStream) -> list[Any]:
    items: list[Any] = []
    try:
        async for batch in stream.batches():
            items.extend(batch)
    finally:
        stream.close()
    return items


async def drain_all(stream: ILogStream) -> list[Any]:
    """Every item of ``stream`` read with ``drain`` (each list handed to a function)."""
    items: list[Any] = []
    sizes: list[int] = []

    def sink(batch: list[Any]) -> None:
        sizes.append(len(batch))
        items.extend(batch)

    try:
        await stream.drain(sink, 7)
    finally:
        stream.close()
    assert all(0 < size <= 7 for size in sizes), sizes
    return items


async def lines_until(engine: Any, cid: str, text: str, seconds: float = 15.0) -> list[LogLine]:
    """Follow the output until a line reads ``text``; every line up to it."""

    async def follow() -> list[LogLine]:
        stream = engine.output(cid, follow=True)
        seen: list[LogLine] = []
        try:
            async for batch in stream.batches():
                for line in batch:
                    seen.append(line)
                    if line.text == text:
                        return seen
        finally:
            stream.close()
        raise AssertionError("output ended before {!r}: {!r}".format(text, seen[-10:]))

    result: list[LogLine] = await within(seconds, follow())
    return result


class Events:
    """Collects an event stream in the background."""

    def __init__(self, stream: IEventStream) -> None:
        self.stream = stream
        self.got: list[EngineEvent] = []
        self.breaks: list[EngineError] = []
        self.done = ensureDeferred(self._consume())

    async def _consume(self) -> None:
        async for event in self.stream:
            self.got.append(event)

    async def wait_for(self, action: str, cid: str, seconds: float = 15.0) -> EngineEvent:
        for _ in range(int(seconds / 0.02)):
            for event in self.got:
                if event.action == action and event.container_id == cid:
                    return event
            await sleep(0.02)
        raise AssertionError("no {} event of {}: {!r}".format(action, cid, self.got))

    async def close(self) -> None:
        self.stream.close()
        await within(10, self.done)


def open_events(h: Harness, since_ns: int | None = None) -> Events:
    breaks: list[EngineError] = []
    events = Events(h.engine.events(h.labels, since_ns=since_ns, on_break=breaks.append,
                                    on_resume=lambda: None))
    events.breaks = breaks
    return events


@pytest_twisted.async_yield_fixture(
    params=[
        "fake",
        # The fake behind the metrics' wrapper at the seam (ctrlagent.metrics.MeteredEngine).
        "metered",
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("podman", marks=pytest.mark.docker),
    ]
)
async def engine(request: Any) -> AsyncIterator[Harness]:
    if request.param in ("fake", "metered"):
        image = "ctrlagent-test/scripted:fake"
        fake: Any = FakeEngine(reactor, images=(image,))
        if request.param == "metered":
            from ctrlagent.metrics import MeteredEngine

            fake = MeteredEngine(fake, lambda operation, seconds, ok: None, reactor)
        yield Harness(fake, image, "fake")
        return
    from ctrlagent.config import DockerConfig
    from ctrlagent.engine.docker import DockerClient
    from ctrlagent.engine.docker.engine import DockerEngine
    from ctrlagent.engine.podman import PodmanEngine

    if request.param == "podman":
        host = request.getfixturevalue("podman_service").host
        image = request.getfixturevalue("podman_scripted_image")
        kind: Any = PodmanEngine
    else:
        host = request.getfixturevalue("docker_engine").host
        image = request.getfixturevalue("scripted_image")
        kind = DockerEngine
    client = DockerClient.from_config(
        reactor, DockerConfig(host=host, call_timeout=15.0, pull_policy="never")
    )
    extra: dict[str, Any] = {}
    stdin_dir = None
    if request.param == "podman":
        # Console input through stdin holders, as the agent's engine has it.
        stdin_dir = str(request.getfixturevalue("tmp_path") / "stdin")
        extra["stdin_dir"] = stdin_dir
    harness = Harness(kind(client, reactor, events_retry=0.1, events_retry_max=0.5, **extra),
                      image, request.param)
    try:
        yield harness
    finally:
        for state in await client.container_list(labels=harness.labels, all=True):
            try:
                await client.container_remove(state["Id"], force=True)
            except NotFound:
                pass
        for name in harness.networks:
            try:
                await client.network_remove(name)
            except NotFound:
                pass
        await client.close()
        if stdin_dir is not None:
            from tests.rig.holders import end_holders

            left = await deferToThread(end_holders, stdin_dir)
            assert left == [], "stdin holders outlived their containers"


def test_the_engine_provides_the_interface(engine: Harness) -> None:
    assert verifyObject(IContainerEngine, engine.engine)
    assert engine.engine.name == engine.kind


@pytest_twisted.ensureDeferred
async def test_engine_answers_ping_and_version(engine: Harness) -> None:
    assert await engine.engine.ping() is True
    assert await engine.engine.version()


@pytest_twisted.ensureDeferred
async def test_created_container_is_inspected_and_listed_by_its_labels(engine: Harness) -> None:
    e = engine.engine
    spec = engine.spec()
    cid = await e.create(spec)
    state = await e.inspect(cid)
    assert state.id == cid
    assert spec.name in state.names
    assert dict(state.labels, **spec.labels) == dict(state.labels)
    assert (state.running, state.status, state.exit_code) == (False, "created", None)
    assert state.started_at_ns is None
    assert (await e.inspect(spec.name)).id == cid
    listed = await e.list(engine.labels)
    assert [(s.id, s.running, s.status) for s in listed] == [(cid, False, "created")]
    assert spec.name in listed[0].names
    assert await e.list({**engine.labels, "ctrlagent.case": "other"}) == []


@pytest_twisted.ensureDeferred
async def test_a_taken_name_is_a_conflict(engine: Harness) -> None:
    spec = engine.spec()
    await engine.engine.create(spec)
    with pytest.raises(Conflict):
        await engine.engine.create(spec)


@pytest_twisted.ensureDeferred
async def test_start_is_reported_as_a_start_event(engine: Harness) -> None:
    e = engine.engine
    events = open_events(engine)
    try:
        await sleep(0.2)  # the stream is open before the start
        cid = await e.create(engine.spec())
        await e.start(cid)
        event = await events.wait_for("start", cid)
        assert event.labels["ctrlagent.case"] == engine.case
        assert event.exit_code is None
        state = await e.inspect(cid)
        assert state.running and state.status == "running"
        assert state.started_at_ns is not None
        assert abs(state.started_at_ns - event.at_ns) < 5 * 10**9
    finally:
        await events.close()


@pytest_twisted.ensureDeferred
async def test_output_since_returns_only_later_lines_in_order(engine: Harness) -> None:
    e = engine.engine
    cid = await e.create(engine.spec({"FLOOD_LINES": "20"}))
    await e.start(cid)
    await lines_until(e, cid, "flood done")
    everything = await read_all(e.output(cid, follow=False))
    assert [line.text for line in everything][1:] == [
        "Done (0.1s)! For help, type help", *(str(n) for n in range(1, 21)), "flood done"
    ]
    assert all(isinstance(line, LogLine) and line.stream == "stdout" for line in everything)
    stamps = [line.ns for line in everything]
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False)), "ns not increasing"
    since = everything[5].ns
    later = await read_all(e.output(cid, follow=False, since_ns=since))
    assert [(x.ns, x.text) for x in later] == [(x.ns, x.text) for x in everything[6:]]
    last = await read_all(e.output(cid, follow=False, tail=3))
    assert [x.text for x in last] == ["19", "20", "flood done"]
    # Drained rather than iterated: the very same lines.
    for kw in ({}, {"since_ns": since}, {"tail": 3}):
        drained = await drain_all(e.output(cid, follow=False, **kw))
        iterated = await read_all(e.output(cid, follow=False, **kw))
        assert [(x.ns, x.stream, x.text) for x in drained] == [
            (x.ns, x.stream, x.text) for x in iterated], kw


@pytest_twisted.ensureDeferred
async def test_stdin_reaches_the_game_and_its_answer_comes_back(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started()
    pipe = await e.open_stdin(cid)
    assert verifyObject(IStdinPipe, pipe)
    assert pipe.connected
    pipe.write_line("say hello there")
    seen = await lines_until(e, cid, "[Server] hello there")
    assert "> say hello there" in [line.text for line in seen]
    await pipe.close()
    assert not pipe.connected


@pytest_twisted.ensureDeferred
async def test_raw_stdin_bytes_reach_the_game_exactly_as_written(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started()
    pipe = await e.open_stdin(cid)
    # No newline is added: the game reads its line only once one is written.
    pipe.write(b"say half")
    pipe.write(b" and half\nsay second\n")
    seen = await lines_until(e, cid, "[Server] second")
    texts = [line.text for line in seen]
    assert "> say half and half" in texts and "[Server] half and half" in texts
    assert "> say half" not in texts
    await pipe.close()


@pytest_twisted.ensureDeferred
async def test_sigint_reaches_the_game_as_ctrl_c(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started()
    await e.kill(cid, "SIGINT")
    await lines_until(e, cid, "Stopping server (SIGINT)")
    assert await within(15, e.wait(cid)) == 0


@pytest_twisted.ensureDeferred
async def test_sigterm_stops_the_game_with_exit_0_seen_by_die_and_wait(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started()
    events = open_events(engine)
    try:
        await sleep(0.2)
        await e.kill(cid, "SIGTERM")
        assert await within(15, e.wait(cid)) == 0
        die = await events.wait_for("die", cid)
        assert die.exit_code == 0
        state = await e.inspect(cid)
        assert (state.running, state.status, state.exit_code) == (False, "exited", 0)
        assert not state.oom_killed
    finally:
        await events.close()


@pytest_twisted.ensureDeferred
async def test_an_ignored_sigterm_leaves_it_running_until_sigkill(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started({"IGNORE_SIGTERM": "1"})
    await e.kill(cid, "SIGTERM")
    await lines_until(e, cid, "SIGTERM ignored")
    assert (await e.inspect(cid)).running
    await e.kill(cid, "SIGKILL")
    assert await within(15, e.wait(cid)) == 137


@pytest_twisted.ensureDeferred
async def test_the_console_stop_command_and_a_crash_end_the_game(engine: Harness) -> None:
    e = engine.engine
    stopping = await engine.started()
    crashing = await engine.started()
    for cid, line in ((stopping, "stop"), (crashing, "crash 7")):
        pipe = await e.open_stdin(cid)
        pipe.write_line(line)
    assert await within(15, e.wait(stopping)) == 0
    assert await within(15, e.wait(crashing)) == 7


@pytest_twisted.ensureDeferred
async def test_killing_a_container_that_does_not_run_is_a_conflict(engine: Harness) -> None:
    e = engine.engine
    cid = await e.create(engine.spec())
    with pytest.raises(Conflict):
        await e.kill(cid, "SIGTERM")
    await e.start(cid)
    await e.kill(cid, "SIGKILL")
    await within(15, e.wait(cid))
    with pytest.raises(Conflict):
        await e.kill(cid, "SIGKILL")


@pytest_twisted.ensureDeferred
async def test_removed_containers_are_not_found(engine: Harness) -> None:
    e = engine.engine
    stopped = await e.create(engine.spec())
    running = await engine.started()
    await e.remove(stopped)
    await e.remove(running)
    for cid in (stopped, running):
        with pytest.raises(NotFound):
            await e.inspect(cid)
        with pytest.raises(NotFound):
            await e.wait(cid)
        with pytest.raises(NotFound):
            await read_all(e.output(cid, follow=True))
        with pytest.raises(NotFound):
            await drain_all(e.output(cid, follow=True))
    assert await e.list(engine.labels) == []
    with pytest.raises(NotFound):
        await e.remove(stopped)


@pytest_twisted.ensureDeferred
async def test_following_an_exited_container_gives_its_lines_and_ends(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started()
    await e.kill(cid, "SIGTERM")
    await within(15, e.wait(cid))
    lines = await within(15, read_all(e.output(cid, follow=True)))
    assert [x.text for x in lines][-2:] == [
        "Done (0.1s)! For help, type help", "Stopping server (SIGTERM)"]
    drained = await within(15, drain_all(e.output(cid, follow=True)))
    assert [(x.ns, x.text) for x in drained] == [(x.ns, x.text) for x in lines]


async def _stdin_before_the_start(engine: Harness, cid: str) -> Any:
    """
    Stdin opened while ``cid`` does not run, then the start: a pipe bound to
    that start.  Podman refuses (``Conflict``): its attach would initialize
    the container for the next start, its mounts fixed until then, and
    nothing says that start ever comes; the pipe is opened after the start.
    """
    e = engine.engine
    if engine.kind == "podman":
        with pytest.raises(Conflict):
            await e.open_stdin(cid)
        assert not (await e.inspect(cid)).running
        await e.start(cid)
        return await e.open_stdin(cid)
    pipe = await e.open_stdin(cid)
    await e.start(cid)
    return pipe


@pytest_twisted.ensureDeferred
async def test_stdin_opened_before_the_start_reaches_the_game(engine: Harness) -> None:
    e = engine.engine
    cid = await e.create(engine.spec())
    pipe = await _stdin_before_the_start(engine, cid)
    await lines_until(e, cid, "Done (0.1s)! For help, type help")
    pipe.write_line("say early")
    await lines_until(e, cid, "[Server] early")
    await pipe.close()


@pytest_twisted.ensureDeferred
async def test_stdin_opened_after_the_exit_reaches_the_next_run(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started()
    old = await e.open_stdin(cid)
    await e.kill(cid, "SIGKILL")
    await within(15, e.wait(cid))
    for _ in range(250):
        if not old.connected:
            break
        await sleep(0.02)
    assert not old.connected  # bound to the run that ended
    pipe = await _stdin_before_the_start(engine, cid)
    await sleep(0.5)
    pipe.write_line("say again")
    await lines_until(e, cid, "[Server] again")
    await pipe.close()


@pytest_twisted.ensureDeferred
async def test_limits_are_set_at_create_and_updated_live(engine: Harness) -> None:
    e = engine.engine
    first = ResourceLimits(memory_bytes=64 * MB, memory_swap_bytes=128 * MB, cpu_percent=50.0,
                           io_weight=300, pids=100)
    cid = await engine.started(limits=first)
    got = (await e.inspect(cid)).limits
    assert got is not None
    assert (got.memory_bytes, got.memory_swap_bytes, got.cpu_percent, got.pids) == (
        64 * MB, 128 * MB, 50.0, 100)
    second = ResourceLimits(memory_bytes=96 * MB, memory_swap_bytes=-1, cpu_percent=150.0,
                            io_weight=300, pids=200)
    await e.update_limits(cid, second)
    got = (await e.inspect(cid)).limits
    assert got is not None
    assert (got.memory_bytes, got.memory_swap_bytes, got.cpu_percent, got.pids) == (
        96 * MB, -1, 150.0, 200)


@pytest_twisted.ensureDeferred
async def test_stats_of_a_running_game(engine: Harness) -> None:
    e = engine.engine
    cid = await engine.started(limits=ResourceLimits(memory_bytes=64 * MB,
                                                     memory_swap_bytes=64 * MB))
    sample = await within(20, e.stats(cid))
    assert isinstance(sample, StatsSample)
    assert sample.memory_bytes > 0 and sample.pids >= 1
    assert sample.memory_limit_bytes == 64 * MB
    assert sample.cpu_percent >= 0.0
    assert min(sample.rx_bytes, sample.tx_bytes, sample.blk_read, sample.blk_write) >= 0
    stream = e.stats_stream(cid)
    assert verifyObject(ILogStream, stream)
    try:
        batch = await within(20, stream.batches().__anext__())
    finally:
        stream.close()
    assert batch and all(isinstance(s, StatsSample) for s in batch)
    assert batch[0].memory_limit_bytes == 64 * MB


@pytest_twisted.ensureDeferred
async def test_the_kernel_reader_reads_what_the_stats_api_reports(engine: Harness) -> None:
    # Every engine here runs on this host: each offers its containers'
    # kernel figures, and they are the stats API's.
    e = engine.engine
    cid = await engine.started(limits=ResourceLimits(memory_bytes=64 * MB,
                                                     memory_swap_bytes=64 * MB))
    api = await within(20, e.stats(cid))
    reader = await within(20, e.stats_reader(cid))
    assert reader is not None and verifyObject(IStatsReader, reader)
    try:
        first = reader.read()
        second = reader.read()
    finally:
        reader.close()
    for sample in (first, second):
        assert isinstance(sample, StatsSample)
        assert sample.memory_limit_bytes == api.memory_limit_bytes == 64 * MB
        assert sample.pids >= 1 and sample.memory_bytes > 0
        # The same accounting: an idle game's memory moves by little.
        assert abs(sample.memory_bytes - api.memory_bytes) < 16 * MB
        # Received/sent as the container sees them (its own interfaces);
        # which is which: the next test.
        assert sample.rx_bytes >= api.rx_bytes and sample.tx_bytes >= api.tx_bytes
        assert sample.blk_read >= 0 and sample.blk_write >= 0
    assert first.cpu_percent == 0.0 <= second.cpu_percent
    with pytest.raises(NotFound):
        reader.read()  # closed


def _send_udp(address: str, count: int, size: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(b"x" * size, (address, 9))  # discard: nothing listens


@pytest.mark.parametrize(
    "engine",  # the real engines only: the fake has no network
    [pytest.param("docker", marks=pytest.mark.docker),
     pytest.param("podman", marks=pytest.mark.docker)],
    indirect=True,
)
@pytest_twisted.ensureDeferred
async def test_bytes_received_and_sent_are_each_itself_in_the_api_and_the_kernel(
    engine: Harness,
) -> None:
    # The host sends the container 400 kB it never answers in kind: its
    # received bytes grow by that much, its sent bytes by little (Podman
    # before 4.4 reports the two swapped: the engine swaps them back).
    e = engine.engine
    cid = await engine.started()
    doc = await e.client.container_inspect(cid)
    settings = doc.get("NetworkSettings") or {}
    address = settings.get("IPAddress") or next(
        (n.get("IPAddress") for n in (settings.get("Networks") or {}).values()
         if n.get("IPAddress")), None)
    assert address, settings
    before = await within(20, e.stats(cid))
    await deferToThread(_send_udp, address, 400, 1000)
    await sleep(0.5)
    api = await within(20, e.stats(cid))
    reader = await within(20, e.stats_reader(cid))
    assert reader is not None
    try:
        kernel = reader.read()
    finally:
        reader.close()
    for sample in (api, kernel):
        received = sample.rx_bytes - before.rx_bytes
        sent = sample.tx_bytes - before.tx_bytes
        assert received >= 400 * 1000, (sample, before)
        assert sent < received / 4, (sample, before)
    stream = e.stats_stream(cid)
    try:
        batch = await within(20, stream.batches().__anext__())
    finally:
        stream.close()
    streamed = batch[-1]
    assert streamed.rx_bytes - before.rx_bytes >= 400 * 1000
    assert streamed.tx_bytes - before.tx_bytes < (streamed.rx_bytes - before.rx_bytes) / 4


@pytest_twisted.ensureDeferred
async def test_the_kernel_reader_ends_with_the_run_and_needs_one(engine: Harness) -> None:
    e = engine.engine
    with pytest.raises(NotFound):
        await e.stats_reader("ctrlagent-t-no-such-container")
    cid = await e.create(engine.spec())
    assert await e.stats_reader(cid) is None  # created, not running: nothing to read
    await e.start(cid)
    await lines_until(e, cid, "Done (0.1s)! For help, type help")
    reader = await within(20, e.stats_reader(cid))
    assert reader is not None
    reader.read()
    await e.kill(cid, "SIGKILL")
    await within(20, e.wait(cid))
    # The run's cgroup goes with it (the engine removes it as the exit is
    # reported; bounded wait for that).
    for _ in range(50):
        try:
            reader.read()
        except NotFound:
            break
        await sleep(0.1)
    else:
        raise AssertionError("the reader still reads a container that exited")
    assert await e.stats_reader(cid) is None


@pytest_twisted.ensureDeferred
async def test_events_resumed_from_the_last_one_replay_nothing_twice(engine: Harness) -> None:
    e = engine.engine
    before = open_events(engine)
    try:
        await sleep(0.2)
        cid = await engine.started()
        start = await before.wait_for("start", cid)
    finally:
        await before.close()
    # While nobody listens, the game is killed.
    await e.kill(cid, "SIGKILL")
    await within(15, e.wait(cid))
    resumed = open_events(engine, since_ns=start.at_ns)
    try:
        await resumed.wait_for("die", cid)
        await e.start(cid)
        await resumed.wait_for("start", cid)
        await sleep(0.3)
        ours = [(ev.action, ev.at_ns) for ev in resumed.got if ev.container_id == cid]
        assert (start.action, start.at_ns) not in ours
        assert [a for a, _ in ours] == ["kill", "die", "start"]
        assert len(set(ours)) == len(ours)
        assert all(at > start.at_ns for _, at in ours)
    finally:
        await resumed.close()


@pytest_twisted.ensureDeferred
async def test_ensure_network_is_idempotent_and_containers_join_it(engine: Harness) -> None:
    e = engine.engine
    name = "ctrlagent-t-net-{}".format(engine.case)
    engine.networks.append(name)
    await e.ensure_network(name, None, {"ctrlagent.test": RUN})
    await e.ensure_network(name, None, {"ctrlagent.test": RUN})
    await e.ensure_network("bridge", None, {})
    cid = await e.create(engine.spec(network=name))
    await e.start(cid)
    assert (await e.inspect(cid)).running


@pytest_twisted.ensureDeferred
async def test_ensure_image_takes_a_present_image_and_refuses_a_missing_one(
    engine: Harness,
) -> None:
    # The docker engine here runs with pull_policy "never".
    await engine.engine.ensure_image(engine.image)
    with pytest.raises(NotFound):
        await engine.engine.ensure_image("ctrlagent-test/absent:{}".format(engine.case))


@pytest_twisted.ensureDeferred
async def test_a_limit_the_engine_drops_is_reported_as_a_warning(engine: Harness) -> None:
    e = engine.engine
    asked = ResourceLimits(memory_bytes=64 * MB, memory_swap_bytes=64 * MB, io_weight=300)
    cid = await engine.started(limits=asked)
    for step in ("create", "update"):
        got = (await e.inspect(cid)).limits
        assert got is not None and got.memory_bytes == 64 * MB
        warnings = e.last_warnings(cid)
        assert isinstance(warnings, tuple) and all(isinstance(w, str) and w for w in warnings)
        if got.io_weight != asked.io_weight:
            # A kernel without block I/O weight: the engine dropped it, and says so.
            assert any("I/O weight" in w for w in warnings), (step, warnings)
        elif engine.kind == "podman" and step == "update":
            assert warnings == (RESTART_WARNING,)
        else:
            assert warnings == (), (step, warnings)
        asked = replace(asked, io_weight=400)
        await e.update_limits(cid, asked)
    await e.remove(cid)
    assert e.last_warnings(cid) == ()


@pytest_twisted.ensureDeferred
async def test_the_process_limits_asked_are_the_containers(engine: Harness) -> None:
    e = engine.engine
    spec = engine.spec(command=("/bin/sh", "-c", "echo nofile $(ulimit -Sn) $(ulimit -Hn)"),
                       interactive=False, ulimits={"nofile": (512, 768), "nproc": (4096, 4096)})
    cid = await e.create(spec)
    if engine.kind == "fake":
        # The fake runs no process: what it was asked is what it keeps.
        assert engine.engine.get(cid).spec.ulimits == spec.ulimits
        return
    await e.start(cid)
    assert await within(15, e.wait(cid)) == 0
    lines = await read_all(e.output(cid, follow=False))
    assert [x.text for x in lines] == ["nofile 512 768"]


@pytest_twisted.ensureDeferred
async def test_a_live_limit_change_lasts_past_a_restart_or_is_warned_of(engine: Harness) -> None:
    e = engine.engine
    first = ResourceLimits(memory_bytes=64 * MB, memory_swap_bytes=64 * MB, pids=100)
    second = ResourceLimits(memory_bytes=96 * MB, memory_swap_bytes=96 * MB, pids=200)
    cid = await engine.started(limits=first)
    await e.update_limits(cid, second)
    await e.kill(cid, "SIGKILL")
    await within(15, e.wait(cid))
    await e.start(cid)
    got = (await e.inspect(cid)).limits
    assert got is not None
    if engine.kind == "podman":
        # Podman 4.3 changes the running cgroups only and says so.
        assert (got.memory_bytes, got.pids) == (64 * MB, 100)
        assert RESTART_WARNING in e.last_warnings(cid)
    else:
        assert (got.memory_bytes, got.pids) == (96 * MB, 200)


@pytest_twisted.ensureDeferred
async def test_limits_of_a_container_that_does_not_run(engine: Harness) -> None:
    e = engine.engine
    cid = await e.create(engine.spec(limits=ResourceLimits(memory_bytes=64 * MB,
                                                           memory_swap_bytes=64 * MB)))
    later = ResourceLimits(memory_bytes=96 * MB, memory_swap_bytes=96 * MB)
    if engine.kind == "podman":
        # Podman 4.3 updates the cgroups of a running container only.
        with pytest.raises(Conflict):
            await e.update_limits(cid, later)
        return
    await e.update_limits(cid, later)
    got = (await e.inspect(cid)).limits
    assert got is not None and got.memory_bytes == 96 * MB
