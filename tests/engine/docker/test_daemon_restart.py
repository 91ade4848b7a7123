"""
The engine stopped and restarted under open streams: typed errors at once,
fast failures while it is down, and recovery without a new client.

Uses a private, restartable engine (``private_docker``), never the shared one.
Only a graceful stop (SIGTERM) is exercised: a SIGKILLed engine leaves its
pid file and shims behind and ``PrivateDockerd`` cannot restart it.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from ctrlagent.engine.docker import DockerClient, DockerEvent, DockerUnavailable
from tests.rig.images import build_scripted_image

from .conftest import make_client, unique_name, until, wait_for_line, within

pytestmark = [pytest.mark.docker, pytest.mark.slow]

STARTED = "Done (0.1s)! For help, type help"


@pytest_twisted.ensureDeferred
async def test_engine_restart_during_follow_and_events_then_recovery(
    private_docker: Any, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    engine = await deferToThread(private_docker)
    image = await deferToThread(build_scripted_image, engine.host)
    client: DockerClient = make_client(engine.host, call_timeout=5.0)
    marker = secrets.token_hex(4)
    labels = {"ctrlagent.test": marker}
    breaks: list[Exception] = []
    resumes: list[float] = []
    resumable = client.resumable_events(
        labels,
        retry_delay=0.1,
        max_retry_delay=0.5,
        on_break=breaks.append,
        on_resume=lambda: resumes.append(time.monotonic()),
    )
    resumed_events: list[DockerEvent] = []

    async def consume_resumable() -> None:
        async for event in resumable:
            resumed_events.append(event)

    consuming = Deferred.fromCoroutine(consume_resumable())
    try:
        spec = {"Image": image, "OpenStdin": True, "Labels": labels}
        cid = await client.container_create(unique_name("restart"), spec)
        await client.container_start(cid)
        follow = client.logs(cid, follow=True)
        await wait_for_line(follow, STARTED)
        raw_events = client.events(labels=labels)
        await until(lambda: any(e.action == "start" for e in resumed_events), 5)

        # -- the engine goes away ---------------------------------------------
        await deferToThread(engine.kill_engine)
        # A stopping engine first stops the server, which ends its log cleanly
        # (or, if the API is already gone when the end is checked, with
        # DockerUnavailable); everything after that fails fast and typed.
        try:
            await within(10, _drain(follow))
        except DockerUnavailable:
            pass
        with pytest.raises(DockerUnavailable):
            await within(10, _drain(raw_events))
        started = time.monotonic()
        with pytest.raises(DockerUnavailable):
            await client.ping()
        with pytest.raises(DockerUnavailable):
            await client.container_inspect(cid)
        with pytest.raises(DockerUnavailable):
            await client.attach_stdin(cid)
        with pytest.raises(DockerUnavailable):
            await _drain(client.logs(cid, follow=True))
        assert time.monotonic() - started < 1.0  # fast, never hanging
        await until(lambda: bool(breaks), 5)
        assert isinstance(breaks[0], DockerUnavailable)

        # -- it comes back: same client, new calls and streams work -----------
        await deferToThread(engine.start)
        assert await client.ping() is True
        await until(lambda: bool(resumes), 5)
        await client.container_start(cid)
        follow = client.logs(cid, follow=True, tail=0)
        pipe = await client.attach_stdin(cid)
        pipe.write_line("say back")
        await wait_for_line(follow, "[Server] back")
        # (Not "crash N": the script writes its exit code after signalling itself.)
        await client.container_kill(cid, "SIGKILL")
        await until(lambda: any(e.exit_code == 137 for e in resumed_events), 10)
        follow.close()
        await within(5, pipe.closed)
        die = [e for e in resumed_events if e.action == "die"]
        assert die[-1].exit_code == 137 and die[-1].container_id == cid
        assert any(e.action == "kill" for e in resumed_events)
        keys = [(e.time_nano, e.action) for e in resumed_events]
        assert len(keys) == len(set(keys))  # resumed with since, without duplicates
    finally:
        resumable.close()
        await within(5, consuming)
        await client.close()
    # The break was logged as a warning, not an error.
    assert fail_on_logged_errors == []


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass

