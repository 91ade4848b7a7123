"""
The Podman service restarted under a running game and an open event stream:
the game keeps running (conmon holds it, not the service), the stream reports
the break, resumes, and delivers once what happened while the service was
down (Podman's file event log keeps it).

Uses a private service of its own, never the session's.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.interface import ContainerSpec, EngineEvent
from ctrlagent.engine.podman import PodmanEngine
from ctrlagent.errors import EngineError
from tests.rig.podman import PrivatePodman

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def restartable(docker_engine: Any, scripted_image: str) -> Iterator[tuple[PrivatePodman, str]]:
    service = PrivatePodman().start()
    try:
        yield service, service.load_from_docker(docker_engine.host, scripted_image)
    finally:
        service.stop()


async def _until(check: Any, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("still false after {}s".format(seconds))


@pytest_twisted.ensureDeferred
async def test_events_resume_after_a_service_restart_with_what_happened_meanwhile(
    restartable: tuple[PrivatePodman, str],
) -> None:
    service, image = restartable
    client = DockerClient.from_config(reactor, DockerConfig(
        host=service.host, call_timeout=5.0, pull_policy="never"))
    engine = PodmanEngine(client, reactor, events_retry=0.1, events_retry_max=0.5)
    labels = {"ctrlagent.test": secrets.token_hex(4)}
    breaks: list[EngineError] = []
    resumes: list[bool] = []
    got: list[EngineEvent] = []
    stream = engine.events(labels, since_ns=None, on_break=breaks.append,
                           on_resume=lambda: resumes.append(True))

    async def consume() -> None:
        async for event in stream:
            got.append(event)

    done = ensureDeferred(consume())
    try:
        cid = await engine.create(ContainerSpec(
            name="ctrlagent-t-restart-{}".format(labels["ctrlagent.test"]), image=image,
            labels=labels, env={}, interactive=True, output_max_bytes=1024 * 1024,
            ulimits={"nofile": (1024, 1024), "nproc": (4096, 4096)}))
        await engine.start(cid)
        await _until(lambda: [e.action for e in got] == ["start"])
        started = (await engine.inspect(cid)).started_at_ns

        await deferToThread(service.kill_service)
        await _until(lambda: bool(breaks))
        # While the service is down the game runs on, and is killed.
        await deferToThread(service.podman, "kill", cid)
        await deferToThread(service.start)

        await _until(lambda: any(e.action == "die" for e in got))
        assert resumes
        ours = [(e.action, e.exit_code) for e in got]
        assert ours == [("start", None), ("kill", None), ("die", 137)], ours
        state = await engine.inspect(cid)
        assert (state.running, state.exit_code, state.started_at_ns) == (False, 137, started)
    finally:
        stream.close()
        await done
        await client.close()
