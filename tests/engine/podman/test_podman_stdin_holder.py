"""
Console input on Podman outlives the agent: the stdin holder
(``ctrlagent/engine/podman/holders.py``, ``stdinholder.py``) keeps the run's
one stdin attach open when the agent process is SIGKILLed or its engine is
dropped unclosed, the next engine finds it, every command reaches the game
exactly once, and the holder ends with its container.  A holder killed while
its game runs is said (a precise error, logged once), never a silent drop.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.interface import ContainerSpec, ContainerState, Mount
from ctrlagent.engine.podman import PodmanEngine
from ctrlagent.engine.podman.holders import StdinClosed, holder_pids
from ctrlagent.errors import Conflict, NotFound
from tests.engine.test_behaviour import Events, lines_until, within
from tests.rig.holders import is_holder, kill_left_holders
from tests.rig.podman import PrivatePodman

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[3]
ULIMITS = {"nofile": (1024, 1024), "nproc": (4096, 4096)}

# Another agent process: opens the game's stdin, sends one command, says so,
# then waits to be killed.
AGENT = """
import sys
from twisted.internet import reactor, defer
from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.podman import PodmanEngine

host, stdin_dir, cid = sys.argv[1:4]

async def main():
    client = DockerClient.from_config(reactor, DockerConfig(host=host, call_timeout=15.0))
    engine = PodmanEngine(client, reactor, stdin_dir=stdin_dir)
    pipe = await engine.open_stdin(cid)
    pipe.write_line("say from the first agent")
    await deferLater(reactor, 0.3, lambda: None)
    print("sent", flush=True)

from twisted.internet.task import deferLater
d = defer.ensureDeferred(main())
d.addErrback(lambda f: print("failed", f.getErrorMessage(), flush=True))
reactor.run()
"""


class Game:
    """One running scripted game on the session's Podman service and the holders' directory."""

    def __init__(self, service: PrivatePodman, image: str, stdin_dir: str) -> None:
        self.host = service.host
        self.image = image
        self.stdin_dir = stdin_dir
        self.client = DockerClient.from_config(reactor, DockerConfig(
            host=service.host, call_timeout=15.0, pull_policy="never"))
        self.labels = {"ctrlagent.test": "stdin-holder", "ctrlagent.case": secrets.token_hex(4)}

    def engine(self) -> PodmanEngine:
        return PodmanEngine(self.client, reactor, stdin_dir=self.stdin_dir)

    async def started(self, engine: PodmanEngine, **changes: Any) -> str:
        cid = await engine.create(ContainerSpec(**{**dict(
            name="ctrlagent-t-stdin-{}".format(secrets.token_hex(4)), image=self.image,
            labels=self.labels, env={}, working_dir="/home/container", interactive=True,
            output_max_bytes=1024 * 1024, ulimits=ULIMITS), **changes}))
        await engine.start(cid)
        await lines_until(engine, cid, "Done (0.1s)! For help, type help")
        return cid

    def pids(self) -> list[int]:
        return [pid for pid in holder_pids(self.stdin_dir) if is_holder(pid)]


@pytest_twisted.async_yield_fixture
async def game(podman_service: PrivatePodman, podman_scripted_image: str,
               tmp_path: Path) -> AsyncIterator[Game]:
    stdin_dir = str(tmp_path / "stdin")
    g = Game(podman_service, podman_scripted_image, stdin_dir)
    try:
        yield g
    finally:
        for state in await g.client.container_list(labels=g.labels, all=True):
            try:
                await g.client.container_remove(state["Id"], force=True)
            except NotFound:
                pass
        left = kill_left_holders(stdin_dir)
        await g.client.close()
        assert left == [], "holders outlived their containers"


async def _until(check: Any, seconds: float = 15.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("still false after {}s".format(seconds))


async def _texts(engine: PodmanEngine, cid: str) -> list[str]:
    out: list[str] = []
    stream = engine.output(cid, follow=False)
    async for batch in stream.batches():
        out.extend(line.text for line in batch)
    return out


def _run_agent(host: str, stdin_dir: str, cid: str) -> str:
    """A second agent process that sends one command and is then SIGKILLed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT, host, stdin_dir, cid], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout is not None
        timer = threading.Timer(60.0, proc.kill)  # bounded: a stuck agent ends the read
        timer.start()
        try:
            said = proc.stdout.readline().strip()
        finally:
            timer.cancel()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    return said


@pytest_twisted.ensureDeferred
async def test_a_command_reaches_the_game_once_after_the_agent_process_was_sigkilled(
    game: Game,
) -> None:
    engine = game.engine()
    cid = await game.started(engine)
    said = await deferToThread(_run_agent, game.host, game.stdin_dir, cid)
    assert said == "sent"
    await lines_until(engine, cid, "[Server] from the first agent")
    holders = game.pids()
    assert len(holders) == 1  # it outlived the agent that started it

    pipe = await engine.open_stdin(cid)
    pipe.write_line("say after the kill")
    await lines_until(engine, cid, "[Server] after the kill")
    await pipe.close()
    again = await engine.open_stdin(cid)  # closing a pipe left the input open
    again.write_line("say closed and reopened")
    await lines_until(engine, cid, "[Server] closed and reopened")
    texts = await _texts(engine, cid)
    for line in ("from the first agent", "after the kill", "closed and reopened"):
        assert texts.count("[Server] " + line) == 1
    assert game.pids() == holders  # one holder for the run, whoever connects

    await engine.remove(cid)
    await _until(lambda: not any(is_holder(pid) for pid in holders))
    assert os.listdir(game.stdin_dir) == []


@pytest_twisted.ensureDeferred
async def test_an_engine_dropped_unclosed_leaves_the_input_to_the_next_one(game: Game) -> None:
    first = game.engine()
    cid = await game.started(first)
    pipe = await first.open_stdin(cid)
    pipe.write_line("say one")
    await lines_until(first, cid, "[Server] one")
    # The first engine's connection ends as a dead process's would.
    pipe.transport.abortConnection()
    del first, pipe
    second = game.engine()
    pipe = await second.open_stdin(cid)
    pipe.write_line("say two")
    await lines_until(second, cid, "[Server] two")
    assert (await _texts(second, cid)).count("[Server] two") == 1
    holders = game.pids()
    await second.kill(cid)
    await _until(lambda: not any(is_holder(pid) for pid in holders))  # ends with the run


@pytest_twisted.ensureDeferred
async def test_each_run_gets_its_own_holder_and_the_last_one_ends_with_it(game: Game) -> None:
    engine = game.engine()
    cid = await game.started(engine)
    (await engine.open_stdin(cid)).write_line("say run one")
    await lines_until(engine, cid, "[Server] run one")
    first = game.pids()
    await engine.kill(cid)
    await _until(lambda: not any(is_holder(pid) for pid in first))
    await engine.start(cid)
    pipe = await engine.open_stdin(cid)
    pipe.write_line("say run two")
    await lines_until(engine, cid, "[Server] run two")
    second = game.pids()
    assert len(second) == 1 and second != first


@pytest_twisted.ensureDeferred
async def test_a_killed_holder_is_a_precise_error_logged_once_not_a_silent_drop(
    game: Game, caplog: Any,
) -> None:
    engine = game.engine()
    cid = await game.started(engine)
    (await engine.open_stdin(cid)).write_line("say held")
    await lines_until(engine, cid, "[Server] held")
    [pid] = game.pids()
    os.kill(pid, signal.SIGKILL)
    await _until(lambda: not is_holder(pid))

    after = game.engine()  # as an agent restarted after it
    warned: list[str] = []
    from twisted.logger import globalLogPublisher

    def observe(event: dict[str, Any]) -> None:
        if "the process holding its stdin ended" in str(event.get("message", "")):
            warned.append(event["message"])

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(3):
            pipe = await after.open_stdin(cid)
            assert not pipe.connected
            with pytest.raises(StdinClosed) as caught:
                pipe.write_line("say lost")
            assert caught.value.code == "CONFLICT"
            assert "closed until the server restarts" in caught.value.message
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(warned) == 1
    await after.remove(cid)
    assert os.listdir(game.stdin_dir) == []


# -- attaches that reach a dead run ------------------------------------------
#
# Podman re-initializes a container that an attach reaches after its run ended
# (a new conmon and "runc init" wait for a start; inspect says "created" with
# no exit code; the compatible kill's wait for the exit never ends).


def _state(doc: dict[str, Any]) -> tuple[str, int, int]:
    state = doc["State"]
    return state["Status"], state["Pid"], state["ExitCode"]


@pytest.mark.parametrize("held", [True, False], ids=["holder", "in-process"])
@pytest_twisted.ensureDeferred
async def test_a_run_that_ends_between_the_look_and_the_attach_is_not_left_reinitialized(
    game: Game, held: bool,
) -> None:
    engine = game.engine() if held else PodmanEngine(game.client, reactor)
    cid = await game.started(engine)
    events = Events(engine.events(game.labels, since_ns=None, on_break=lambda e: None,
                                  on_resume=lambda: None))
    looked = engine.inspect

    async def look_then_die(ref: str) -> ContainerState:
        state = await looked(ref)
        # The compatible kill answers once the run has exited.
        await game.client.container_kill(cid)
        return state

    engine.inspect = look_then_die  # type: ignore[method-assign]
    try:
        with pytest.raises(Conflict) as caught:
            await engine.open_stdin(cid)
    finally:
        del engine.inspect
    assert caught.value.message.endswith("is not running: its console input cannot be opened")
    assert _state(await game.client.container_inspect(cid)) == ("exited", 0, 137)
    await _until(lambda: game.pids() == [])  # the dead run's holder ended

    # The next run is whole: started, its input open, and the one death seen.
    await engine.start(cid)
    await events.wait_for("start", cid)
    pipe = await engine.open_stdin(cid)
    pipe.write_line("say next run")
    await lines_until(engine, cid, "[Server] next run")
    await events.close()
    assert [(e.action, e.exit_code) for e in events.got] == [
        ("kill", None), ("die", 137), ("start", None)]


@pytest_twisted.ensureDeferred
async def test_the_input_of_a_container_that_does_not_run_is_refused_without_an_attach(
    game: Game,
) -> None:
    engine = game.engine()
    cid = await game.started(engine)
    await engine.kill(cid)
    await _until_status(game, cid, "exited")
    for _ in range(2):
        with pytest.raises(Conflict):
            await engine.open_stdin(cid)
    # Not re-initialized: the run's exit code is still there.
    assert _state(await game.client.container_inspect(cid)) == ("exited", 0, 137)
    assert game.pids() == []


async def _until_status(game: Game, cid: str, status: str) -> None:
    """Until the engine says the container is in ``status`` (bounded: 15 s)."""
    for _ in range(300):
        if _state(await game.client.container_inspect(cid))[0] == status:
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("container {} is not {}".format(cid[:12], status))


def _attach_once(socket_path: str, cid: str) -> bytes:
    """Another client's output attach (an operator's ``docker attach``), until it ends."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30.0)  # bounded: the test stops the container well before
    got = b""
    try:
        conn.connect(socket_path)
        conn.sendall("POST /containers/{}/attach?stream=1&stdout=1 HTTP/1.1\r\n"
                     "Host: podman\r\n\r\n".format(cid).encode("ascii"))
        while chunk := conn.recv(65536):
            got += chunk
    finally:
        conn.close()
    return got


@pytest_twisted.ensureDeferred
async def test_a_container_another_client_reinitialized_starts_with_its_data_directory_of_now(
    game: Game, podman_service: PrivatePodman, tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    engine = game.engine()
    cid = await game.started(engine, env={"DATA_FILE": "/data/commands"},
                             mounts=(Mount(str(data), "/data"),))
    await engine.kill(cid)
    await _until_status(game, cid, "exited")
    other = deferToThread(_attach_once, podman_service.socket_path, cid)
    await _until_status(game, cid, "created")  # re-initialized by that attach
    # The directory is replaced while the server is stopped (a restore, a
    # conversion to a subvolume): the next run must use the new one.
    data.rename(tmp_path / "data.old")
    data.mkdir()

    try:
        await engine.start(cid)
        await lines_until(engine, cid, "Done (0.1s)! For help, type help")
        pipe = await engine.open_stdin(cid)
        pipe.write_line("say where")
        await lines_until(engine, cid, "[Server] where")
        assert (data / "commands").read_text() == "say where\n"
        assert not (tmp_path / "data.old" / "commands").exists()
    finally:
        await engine.remove(cid)  # ends the other client's attach, whatever it reached
        await within(30, other)

