"""
Console output and input against the real engine: logs (tail, since,
follow), attach, the raw stdin pipe, TTY and non-TTY containers, a flood of
100k lines, and over-long lines cut and marked.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted

from ctrlagent.engine.docker import ContainerGone, DockerClient

from .conftest import Containers, make_client, wait_for_line, within

pytestmark = pytest.mark.docker

STARTED = "Done (0.1s)! For help, type help"


async def collect(stream: object, seconds: float = 10.0) -> list[tuple[str, str]]:
    async def read() -> list[tuple[str, str]]:
        return [item async for item in stream]  # type: ignore[attr-defined]

    return list(await within(seconds, read()))


@pytest_twisted.ensureDeferred
async def test_stdin_round_trip_say_hello(docker: DockerClient, containers: Containers) -> None:
    cid = await containers.create()
    out = docker.attach_output(cid, logs=True)  # may open after the reply: its past too
    pipe = await docker.attach_stdin(cid)
    pipe.write_line("say hello")
    seen = await wait_for_line(out, "[Server] hello")
    assert ("stdout", "> say hello") in seen
    # Closing the pipe leaves the server running, and a new pipe works.
    await within(5, pipe.close())
    assert (await docker.container_inspect(cid))["State"]["Running"] is True
    again = await docker.attach_stdin(cid)
    again.write_line("say again")
    await wait_for_line(out, "[Server] again")
    again.write_line("stop")
    assert await within(10, docker.container_wait(cid)) == 0
    await within(5, again.closed)
    rest = await collect(out)  # the attach ends with the container
    assert ("stdout", "Stopping server (console)") in rest


@pytest_twisted.ensureDeferred
async def test_logs_tail_since_and_follow(docker: DockerClient, containers: Containers) -> None:
    cid = await containers.create({"FLOOD_LINES": "5"})
    follow = docker.logs(cid, follow=True)
    seen = await wait_for_line(follow, "flood done")
    assert [line for _, line in seen][1:] == [STARTED, "1", "2", "3", "4", "5", "flood done"]
    history = await collect(docker.logs(cid, follow=False))
    assert [line for _, line in history] == [line for _, line in seen]
    tail = await collect(docker.logs(cid, follow=False, tail=2))
    assert tail == [("stdout", "5"), ("stdout", "flood done")]
    stamped = await collect(docker.logs(cid, follow=False, tail=1, timestamps=True))
    assert stamped[0][1].endswith(" flood done") and stamped[0][1][:4].isdigit()
    later = time.time() + 0.5
    empty = await collect(docker.logs(cid, follow=False, since=later))
    assert empty == []
    # follow keeps delivering new lines, read with every other stream's
    # (``docker.stream_read_interval``) once its head is in.
    assert docker.pacer is not None and len(docker.pacer) >= 1
    reads = docker.pacer.reads
    pipe = await docker.attach_stdin(cid)
    pipe.write_line("say live")
    await wait_for_line(follow, "[Server] live")
    assert docker.pacer.reads > reads
    follow.close()
    assert len(docker.pacer) == 0
    await pipe.close()
    recent = await collect(docker.logs(cid, follow=False, since=later - 0.5))
    assert ("stdout", "[Server] live") in recent


@pytest_twisted.ensureDeferred
async def test_stderr_lines_are_tagged(docker: DockerClient, containers: Containers) -> None:
    cid = await containers.create(
        Cmd=["sh", "-c", "echo out; echo err >&2; echo out2; sleep 30"]
    )
    stream = docker.logs(cid, follow=True)
    seen: list[tuple[str, str]] = []

    async def read() -> None:
        # stdout and stderr are separate pipes: their relative order is not kept.
        async for item in stream:
            seen.append(item)
            if len(seen) == 3:
                return

    await within(10, read())
    stream.close()
    assert sorted(seen) == [("stderr", "err"), ("stdout", "out"), ("stdout", "out2")]


@pytest_twisted.ensureDeferred
async def test_tty_container_output_and_input(docker: DockerClient, containers: Containers) -> None:
    cid = await containers.create(Tty=True)
    out = docker.attach_output(cid, tty=True, logs=True)
    await wait_for_line(out, STARTED)
    pipe = await docker.attach_stdin(cid)
    pipe.write_line("say through a tty")
    seen = await wait_for_line(out, "[Server] through a tty")
    assert all(stream == "stdout" for stream, _ in seen)
    out.close()
    await pipe.close()
    history = await collect(docker.logs(cid, follow=False, tty=True))
    assert ("stdout", "[Server] through a tty") in history


@pytest_twisted.ensureDeferred
async def test_a_flood_of_100k_lines_arrives_complete_and_in_order(
    docker: DockerClient, containers: Containers
) -> None:
    cid = await containers.create({"FLOOD_LINES": "100000"})
    follow = docker.logs(cid, follow=True)
    numbers: list[int] = []

    async def read() -> None:
        async for batch in follow.batches():
            for _, line in batch:
                if line == "flood done":
                    return
                if line.isdigit():
                    numbers.append(int(line))

    await within(30, read())
    follow.close()
    assert numbers == list(range(1, 100_001))


@pytest_twisted.ensureDeferred
async def test_over_long_lines_are_cut_at_the_cap_and_marked(
    docker_engine: object, containers: Containers
) -> None:
    client = make_client(docker_engine.host, console_line_cap=1000)  # type: ignore[attr-defined]
    try:
        cid = await containers.create({"FLOOD_LINES": "3", "FLOOD_WIDTH": "40000"})
        # Through logs: the engine's log driver splits lines at 16 KiB.
        seen = await wait_for_line(client.logs(cid, follow=True), "flood done")
        long_lines = [line for _, line in seen if line.startswith("x")]
        assert long_lines == ["x" * 1000 + " [truncated 39000 bytes]"] * 3
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_console_of_a_missing_container_is_container_gone(docker: DockerClient) -> None:
    with pytest.raises(ContainerGone):
        await collect(docker.logs("ctrlagent-t-no-such-container", follow=True))
    with pytest.raises(ContainerGone):
        await docker.attach_stdin("ctrlagent-t-no-such-container")


@pytest_twisted.ensureDeferred
async def test_a_follow_of_a_removed_container_ends_as_container_gone(
    docker: DockerClient, containers: Containers
) -> None:
    cid = await containers.create()
    follow = docker.logs(cid, follow=True)
    attached = docker.attach_output(cid)
    await wait_for_line(follow, STARTED)
    await docker.container_remove(cid, force=True)
    for stream in (follow, attached):
        try:
            await collect(stream)  # a clean end is fine too: the server stopped
        except ContainerGone as e:
            assert "removed" in e.message
