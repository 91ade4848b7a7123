"""
A published port on Podman reaches the real game: Minetest in a container on
a Podman network, its UDP port published on loopback (CNI's portmap: an
iptables DNAT, where Docker uses a userland proxy), answering the one-packet
handshake of DOCKER-IN-TESTS.md.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.interface import ContainerSpec, PortBinding
from ctrlagent.engine.podman import PodmanEngine
from ctrlagent.errors import NotFound
from tests.rig.podman import PrivatePodman

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HANDSHAKE = bytes.fromhex("4f457403" "0000" "00" "03ffdc01")
PROTOCOL_ID = bytes.fromhex("4f457403")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.async_yield_fixture
async def podman(podman_service: PrivatePodman) -> AsyncIterator[PodmanEngine]:
    client = DockerClient.from_config(reactor, DockerConfig(
        host=podman_service.host, call_timeout=30.0, pull_policy="never"))
    yield PodmanEngine(client, reactor)
    await client.close()


async def _answer(port: int, tries: int = 20) -> bytes | None:
    """Send the handshake until the game answers (bounded); its first datagram."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for _ in range(tries):
            s.sendto(HANDSHAKE, ("127.0.0.1", port))
            await deferLater(reactor, 0.25, lambda: None)
            try:
                return s.recv(512)
            except BlockingIOError:
                continue
    return None


@pytest_twisted.ensureDeferred
async def test_a_published_udp_port_reaches_the_game(
    podman: PodmanEngine, podman_minetest_image: str
) -> None:
    tag = secrets.token_hex(3)
    network = "ctrlagent-t-ports-{}".format(tag)
    port = free_udp_port()
    spec = ContainerSpec(
        name="ctrlagent-t-minetest-{}".format(tag),
        image=podman_minetest_image,
        labels={"ctrlagent.test": tag},
        env={},
        ports=(PortBinding(30000, port, "127.0.0.1", ("udp",)),),
        network=network,
        interactive=True,
        output_max_bytes=1024 * 1024,
        ulimits={"nofile": (1024, 1024), "nproc": (4096, 4096)},
    )
    await podman.ensure_network(network, None, {"ctrlagent.test": tag})
    cid = await podman.create(spec)
    try:
        await podman.start(cid)
        await _listening(podman, cid)
        answer = await _answer(port)
        assert answer is not None and answer.startswith(PROTOCOL_ID), answer
    finally:
        await podman.remove(cid)
        try:
            await podman.client.network_remove(network)
        except NotFound:
            pass


async def _listening(engine: PodmanEngine, cid: str) -> None:
    async def follow() -> None:
        stream = engine.output(cid, follow=True)
        try:
            async for batch in stream.batches():
                if any("listening on [::]:30000" in line.text for line in batch):
                    return
        finally:
            stream.close()
        raise AssertionError("the game ended before it listened")

    d: Deferred[Any] = ensureDeferred(follow())
    d.addTimeout(30, reactor)
    await d
