"""Unit tests of PodmanEngine's corrections (engine/podman/engine.py): no engine."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from ctrlagent.config import AgentConfig, DockerConfig, RuntimeConfig
from ctrlagent.engine import PODMAN_SOCKET, engine_client_config, make_engine, runtime_kind
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.docker.errors import (
    DockerConflict,
    DockerError,
    DockerInvalidInput,
    ImageNotFound,
    PullFailed,
)
from ctrlagent.engine.docker.models import DockerEvent
from ctrlagent.engine.interface import IContainerEngine, ResourceLimits
from ctrlagent.engine.podman.engine import (
    PodmanEngine,
    _as_conflict,
    _loopback,
    _Numbering,
    _PodmanEvents,
    _pull_error,
    dropped_limits,
    update_body,
)
from ctrlagent.errors import ConfigInvalid, NotFound
from tests.engine.docker.test_client_unit import FakeEngine, stub_client

MB = 1024 * 1024
SECOND = 1_000_000_000


def test_lines_of_one_whole_second_are_numbered_by_their_position() -> None:
    numbering = _Numbering()
    first = numbering.lines([
        ("stdout", "2026-12-01T20:58:08Z a"),
        ("stdout", "2026-12-01T20:58:08Z b"),
    ])
    more = numbering.lines([
        ("stdout", "no stamp"),
        ("stderr", "2026-12-01T20:58:08Z c"),
        ("stdout", "2026-12-01T20:58:09Z d"),
    ])
    base = first[0].ns
    assert base % SECOND == 0
    assert [(x.ns - base, x.stream, x.text) for x in first + more[1:]] == [
        (0, "stdout", "a"), (1, "stdout", "b"), (2, "stderr", "c"), (SECOND, "stdout", "d")]
    assert (more[0].ns, more[0].text) == (0, "no stamp")


def test_stamps_with_a_fraction_keep_their_nanosecond() -> None:
    lines = _Numbering().lines([
        ("stdout", "2026-12-01T20:58:08.000000005Z a"),
        ("stdout", "2026-12-01T20:58:08.000000009Z b"),
    ])
    assert [x.ns % SECOND for x in lines] == [5, 9]


def test_podmans_500_conflicts_become_conflicts_and_other_errors_stay() -> None:
    taken = DockerError(500, 'the container name "x" is already in use by abc')
    improper = DockerError(500, "can only kill running containers: container state improper")
    other = DockerError(500, "runc failed")
    assert isinstance(_as_conflict(taken), DockerConflict)
    assert isinstance(_as_conflict(improper), DockerConflict)
    assert _as_conflict(other) is other


def test_update_body_is_the_oci_resources_of_the_limits() -> None:
    body = update_body(ResourceLimits(64 * MB, -1, 150.0, 3, 200))
    assert body == {
        "memory": {"limit": 64 * MB, "swap": -1},
        "cpu": {"quota": 150_000, "period": 100_000},
        "blockIO": {"weight": 10},
        "pids": {"limit": 200},
    }
    assert update_body(ResourceLimits()) == {
        "cpu": {"quota": -1, "period": 100_000}, "blockIO": {"weight": 500}}


def test_dropped_limits_are_named() -> None:
    asked = ResourceLimits(64 * MB, 64 * MB, 50.0, 300, 100)
    assert dropped_limits(asked, asked) == []
    got = ResourceLimits(64 * MB, 64 * MB, 50.0, 0, 2048)
    warnings = dropped_limits(asked, got)
    assert len(warnings) == 2
    assert "Block I/O weight 300" in warnings[0] and "PID limit 100" in warnings[1]


def _WithRuntime(**runtime: str) -> AgentConfig:  # noqa: N802 (reads as the config it builds)
    """``AgentConfig`` with the given ``[runtime]`` table (not validated: odd kinds too)."""
    return dataclasses.replace(AgentConfig(), runtime=RuntimeConfig(**runtime))


def test_make_engine_builds_podman_on_its_socket_by_the_runtime_kind() -> None:
    config = _WithRuntime(kind="podman")
    engine = make_engine(Clock(), config)
    assert isinstance(engine, PodmanEngine) and engine.name == "podman"
    assert verifyObject(IContainerEngine, engine)
    assert engine_client_config(config).host == PODMAN_SOCKET == "unix:///run/podman/podman.sock"
    assert engine.client.host.path == "/run/podman/podman.sock"
    own = _WithRuntime(kind="podman", podman_host="unix:///tmp/p.sock")
    assert engine_client_config(own).host == "unix:///tmp/p.sock"
    assert engine_client_config(own).call_timeout == own.docker.call_timeout


def test_the_runtime_is_docker_unless_told_and_an_unknown_one_is_refused() -> None:
    assert runtime_kind(AgentConfig()) == "docker"
    assert runtime_kind(_WithRuntime(kind="")) == "docker"
    docker = _WithRuntime(kind="docker", podman_host="unix:///tmp/p.sock")
    assert engine_client_config(docker) is docker.docker
    with pytest.raises(ConfigInvalid, match="unknown container runtime 'lxc'"):
        make_engine(Clock(), _WithRuntime(kind="lxc"))


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [("127.0.0.1:5000", True), ("localhost:5000", True), ("localhost", True),
     ("[::1]:5000", True), ("127.8.9.1", True), ("docker.io", False),
     ("10.0.0.5:5000", False), ("ghcr.io", False), ("localhost.evil.com", False)],
)
def test_only_registries_on_loopback_are_pulled_without_tls(registry: str, loopback: bool) -> None:
    assert _loopback(registry) is loopback


def test_a_libpod_pull_answer_ends_in_an_error_or_an_image() -> None:
    ok = b'{"stream":"Copying blob"}\n{"images":["abc"],"id":"abc"}\n'
    assert _pull_error("r:1", "127.0.0.1:5000", ok) is None
    missing = b'{"stream":"x"}\n{"error":"reading manifest 2 in r: manifest unknown"}\n'
    assert isinstance(_pull_error("r:2", "127.0.0.1:5000", missing), ImageNotFound)
    refused = b'{"error":"dial tcp 127.0.0.1:5000: connection refused"}\n'
    error = _pull_error("r:3", "127.0.0.1:5000", refused)
    assert isinstance(error, PullFailed) and not isinstance(error, ImageNotFound)
    assert "127.0.0.1:5000" in error.message


@pytest.mark.parametrize(
    ("version", "swapped"),
    [("4.3.1", True), ("4.0.0", True), ("3.4.4", True), ("4.4.0", False), ("4.4.0-rc1", False),
     ("5.0.0-dev", False), ("10.1", False), (None, False), ("", False), ("podman", False)],
)
def test_received_and_sent_are_swapped_back_for_podman_before_4_4(
    version: str | None, swapped: bool,
) -> None:
    from ctrlagent.engine.interface import StatsSample

    engine = make_engine(Clock(), _WithRuntime(kind="podman"))
    assert isinstance(engine, PodmanEngine)
    engine.client.engine_version = version
    sample = StatsSample(cpu_percent=1.0, memory_bytes=2, memory_limit_bytes=3, rx_bytes=10,
                         tx_bytes=20, blk_read=4, blk_write=5, pids=6)
    fixed = engine._fix_net(sample)
    assert (fixed.rx_bytes, fixed.tx_bytes) == ((20, 10) if swapped else (10, 20))
    assert dataclasses.replace(fixed, rx_bytes=10, tx_bytes=20) == sample


class _Replay:
    """Docker event documents handed out in order, as ``ResumableEvents`` would."""

    def __init__(self, events: list[Any]) -> None:
        self._events = list(events)

    def __aiter__(self) -> _Replay:
        return self

    async def __anext__(self) -> Any:
        if not self._events:
            raise StopAsyncIteration
        return self._events.pop(0)

    reconnects = 0

    def close(self) -> None:
        self._events = []


def _podman_actions(events: list[tuple[str, str, int | None]],
                   undoing: dict[str, int] | None = None,
                   removed: list[str] | None = None) -> list[tuple[str, str, int | None]]:
    """What the stream hands on of ``events``, the i-th stamped at i + 1 seconds."""
    stream = _PodmanEvents(_Replay([  # type: ignore[arg-type]
        DockerEvent(action, cid, exit_code=code, time_nano=(i + 1) * SECOND)
        for i, (action, cid, code) in enumerate(events)
    ]), 0, {} if undoing is None else undoing,
        (removed if removed is not None else []).append)

    async def collect() -> list[tuple[str, str, int | None]]:
        return [(e.action, e.container_id, e.exit_code) async for e in stream]

    got: list[list[tuple[str, str, int | None]]] = []
    Deferred.fromCoroutine(collect()).addCallback(got.append)
    return got[0]


def test_the_death_of_a_reinitialized_container_is_not_the_death_of_a_run() -> None:
    # A run (init, start, die), then an attach re-initializes the dead
    # container (init, attach) and the engine stops that (die): one death.
    got = _podman_actions([
        ("create", "a", None), ("init", "a", None), ("start", "a", None),
        ("kill", "a", None), ("die", "a", 137), ("cleanup", "a", None),
        ("init", "a", None), ("attach", "a", None), ("die", "a", 137),
        ("init", "b", None), ("start", "b", None), ("die", "b", 1),
        # The next start of the re-initialized container is a run again.
        ("start", "a", None), ("die", "a", 0), ("remove", "a", None),
    ])
    assert got == [
        ("start", "a", None), ("kill", "a", None), ("die", "a", 137),
        ("start", "b", None), ("die", "b", 1),
        ("start", "a", None), ("die", "a", 0),
    ]


def test_an_undo_whose_init_came_before_the_stream_opened_is_dropped_once() -> None:
    # An agent started after another client's attach re-initialized the
    # container: its start undoes that first (from 1 s on), and the stop's
    # die is no run's.
    undoing = {"a": SECOND}
    got = _podman_actions([("die", "a", 137), ("init", "a", None), ("start", "a", None),
                           ("die", "a", 1)], undoing)
    assert got == [("start", "a", None), ("die", "a", 1)]
    assert undoing == {}


@pytest.mark.parametrize("seen_start", [True, False])
def test_a_run_death_read_late_is_kept_while_its_undo_is_under_way(seen_start: bool) -> None:
    # The stream lags: the run's own death (stamped before the undo began at
    # 3 s) is read after the engine began the undo; it is kept, whether or
    # not the stream saw the run start.  The undo's (after the init) is not.
    head = [("start", "a", None)] if seen_start else [("kill", "a", None)]
    undoing = {"a": 3 * SECOND}
    got = _podman_actions([*head, ("die", "a", 137), ("init", "a", None),
                           ("attach", "a", None), ("die", "a", 137), ("start", "a", None)],
                          undoing)
    assert got == [*head, ("die", "a", 137), ("start", "a", None)]


def test_an_undo_that_stopped_nothing_is_forgotten_at_the_next_start() -> None:
    undoing = {"a": SECOND}
    got = _podman_actions([("init", "a", None), ("start", "a", None), ("die", "a", 3)], undoing)
    assert got == [("start", "a", None), ("die", "a", 3)]
    assert undoing == {}


def test_a_death_whose_init_came_before_the_stream_opened_is_kept() -> None:
    assert _podman_actions([("die", "a", 2)]) == [("die", "a", 2)]


@pytest_twisted.ensureDeferred
async def test_a_kill_goes_through_libpod_which_answers_once_the_signal_is_sent() -> None:
    # Podman's compatible SIGKILL also waits for conmon to exit, and a
    # re-initialization by an attach gives it a conmon that does not (seen:
    # no answer in 30 s).  libpod's kill does not wait: the agent waits for
    # the die event itself, bounded (Server.hard_kill).
    improper = ("can only kill running containers. c2 is in state exited: "
                "container state improper")
    client, api = stub_client({
        "/v1.43/libpod/containers/c1/kill": (204, b""),
        "/v1.43/libpod/containers/c2/kill": (500, {"message": improper}),
    })
    engine = PodmanEngine(client, Clock())
    await engine.kill("c1")
    await engine.kill("c1", "SIGTERM")
    with pytest.raises(DockerConflict):
        await engine.kill("c2")
    with pytest.raises(NotFound):
        await engine.kill("c3")
    with pytest.raises(DockerInvalidInput):
        await engine.kill("..")
    assert [uri for _, uri in api.seen if b"kill" in uri] == [
        b"/v1.43/libpod/containers/c1/kill?signal=SIGKILL",
        b"/v1.43/libpod/containers/c1/kill?signal=SIGTERM",
        b"/v1.43/libpod/containers/c2/kill?signal=SIGKILL",
        b"/v1.43/libpod/containers/c3/kill?signal=SIGKILL",
    ]


class _Sequenced(FakeEngine):
    """``FakeEngine`` whose answers to some paths come in turn, their bodies kept."""

    def __init__(self, answers: dict[str, tuple[int, Any]],
                 queued: dict[str, list[tuple[int, Any]]]) -> None:
        super().__init__(answers)
        self.queued = queued
        self.bodies: list[Any] = []

    def render(self, request: Any) -> bytes:
        path = request.path.decode()
        if self.queued.get(path):
            self.bodies.append(json.loads(request.content.read() or b"null"))
            self.answers[path] = self.queued[path].pop(0)
        return super().render(request)


@pytest_twisted.ensureDeferred
async def test_a_live_update_on_a_kernel_without_block_io_weight_goes_in_without_it() -> None:
    # runc's update fails as a whole when the kernel has no blkio.weight
    # (seen on this kind of host): the rest is applied and the weight warned of.
    failed = ("`/usr/bin/runc update --resources=/tmp/podman1 c1` failed: exit status 1")
    running = {"Id": "c1", "State": {"Running": True, "Status": "running",
                                     "StartedAt": "2026-12-03T19:00:00.5Z"},
               "HostConfig": {"Memory": 64 * MB, "BlkioWeight": 0}}
    api = _Sequenced(
        {"/version": (200, {"ApiVersion": "1.43", "Version": "4.3.1"}),
         "/v1.43/containers/c1/json": (200, running)},
        {"/v1.43/libpod/containers/c1/update": [(500, {"message": failed}), (201, b"")]})
    engine = PodmanEngine(DockerClient(StubTreq(api), Clock(), DockerConfig()), Clock())
    limits = ResourceLimits(memory_bytes=128 * MB, memory_swap_bytes=256 * MB,
                            cpu_percent=50.0, io_weight=300, pids=100)
    await engine.update_limits("c1", limits)
    first, second = api.bodies
    assert first["blockIO"] == {"weight": 300}
    assert "blockIO" not in second and second["memory"] == first["memory"]
    assert second["pids"] == {"limit": 100}
    warnings = engine.last_warnings("c1")
    assert "Block I/O weight 300 was discarded: the kernel does not support it" in warnings
    live = (await engine.inspect("c1")).limits
    assert live is not None and (live.memory_bytes, live.io_weight) == (128 * MB, 0)


def _inspected(status: str, pid: int, running: bool = False) -> dict[str, Any]:
    return {"Id": "c1", "State": {"Running": running, "Status": status, "Pid": pid,
                                  "ExitCode": 0, "StartedAt": "2026-12-03T19:00:00.5Z"}}


def _podman(answers: dict[str, tuple[int, Any]]) -> tuple[PodmanEngine, FakeEngine]:
    client, api = stub_client(answers)
    return PodmanEngine(client, Clock()), api


def _posts(api: FakeEngine) -> list[bytes]:
    return [uri for method, uri in api.seen if method == "POST"]


@pytest.mark.parametrize(
    ("inspect", "posts"),
    [
        # Re-initialized by another client's attach: stopped, then started afresh.
        ((200, _inspected("created", 4242)),
         [b"/v1.43/libpod/containers/c1/stop?timeout=0", b"/v1.43/containers/c1/start"]),
        # Created and never started, or exited: started as it is.
        ((200, _inspected("created", 0)), [b"/v1.43/containers/c1/start"]),
        ((200, _inspected("exited", 0)), [b"/v1.43/containers/c1/start"]),
        # The engine cannot say: the start itself answers.
        ((500, {"message": "boom"}), [b"/v1.43/containers/c1/start"]),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_start_undoes_a_reinitialization_first(
    inspect: tuple[int, Any], posts: list[bytes],
) -> None:
    engine, api = _podman({
        "/v1.43/containers/c1/json": inspect,
        "/v1.43/libpod/containers/c1/stop": (204, b""),
        "/v1.43/containers/c1/start": (204, b""),
    })
    await engine.start("c1")
    assert _posts(api) == posts
    assert set(engine._undoing) == ({"c1"} if len(posts) == 2 else set())


class _Pipe:
    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("inspect", "error", "closed", "stopped"),
    [
        ((200, _inspected("running", 7, running=True)), None, False, False),
        ((200, _inspected("created", 4242)), DockerConflict, True, True),
        ((200, _inspected("exited", 0)), DockerConflict, True, False),
        ((404, {"message": "no such container"}), NotFound, True, False),
        # No answer: an attach is not closed on a guess (it would end a
        # running game's stdin); the next start undoes what it must.
        ((500, {"message": "boom"}), None, False, False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_attach_made_now_is_kept_only_while_its_run_runs(
    inspect: tuple[int, Any], error: type[Exception] | None, closed: bool, stopped: bool,
) -> None:
    engine, api = _podman({
        "/v1.43/containers/c1/json": inspect,
        "/v1.43/libpod/containers/c1/stop": (204, b""),
    })
    pipe = _Pipe()
    if error is None:
        await engine._still_running("c1", pipe)  # type: ignore[arg-type]
    else:
        with pytest.raises(error):
            await engine._still_running("c1", pipe)  # type: ignore[arg-type]
    assert pipe.closed is closed
    assert _posts(api) == ([b"/v1.43/libpod/containers/c1/stop?timeout=0"] if stopped else [])


@pytest_twisted.ensureDeferred
async def test_a_live_update_refused_for_another_reason_is_not_sent_again() -> None:
    improper = "container state improper"
    engine, api = _podman({
        "/v1.43/containers/c1/json": (200, _inspected("running", 7, running=True)),
        "/v1.43/libpod/containers/c1/update": (500, {"message": improper}),
    })
    with pytest.raises(DockerConflict):
        await engine.update_limits("c1", ResourceLimits(memory_bytes=128 * MB, io_weight=300))
    assert _posts(api) == [b"/v1.43/libpod/containers/c1/update"]



def test_every_removal_read_is_told_so_the_engine_forgets_the_container() -> None:
    # Removed by another client (`podman rm -f`): Podman's own `remove`, and
    # Docker's `destroy` through the compatible API, are both told.
    removed: list[str] = []
    got = _podman_actions([
        ("start", "a", None), ("died", "a", 137), ("remove", "a", None),
        ("destroy", "b", None), ("start", "c", None),
    ], removed=removed)
    assert removed == ["a", "b"]
    assert got == [("start", "a", None), ("destroy", "b", None), ("start", "c", None)]


def test_forget_drops_what_the_engine_kept_of_a_container() -> None:
    engine = make_engine(Clock(), _WithRuntime(kind="podman"))
    assert isinstance(engine, PodmanEngine)
    cid = "f" * 64
    engine._live[cid] = (1, ResourceLimits())
    engine._pids[cid] = 42
    engine._warnings[cid] = ("w",)
    engine.forget(cid)
    assert cid not in engine._live and cid not in engine._pids and cid not in engine._warnings
    engine.forget(cid)  # twice, or never kept: nothing to do
