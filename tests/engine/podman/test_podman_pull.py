"""
Pulling on Podman as on Docker: from a registry on loopback over plain HTTP
(Docker's default, which Podman's compat pull refuses), and short names from
Docker Hub (which this machine cannot reach: a clear pull error).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.docker.errors import ImageNotFound, PullFailed
from ctrlagent.engine.podman import PodmanEngine
from tests.rig.podman import PrivatePodman
from tests.rig.registry import LocalRegistry

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def pushed(docker_engine: Any, podman_scripted_image: str) -> Iterator[str]:
    """The scripted image pushed to a loopback registry under a name Podman lacks."""
    server = LocalRegistry().start()
    try:
        yield server.push(docker_engine.host, podman_scripted_image,
                          "ctrlagent/podpull:{}".format(secrets.token_hex(3)))
    finally:
        server.stop()


@pytest_twisted.async_yield_fixture
async def podman(podman_service: PrivatePodman) -> AsyncIterator[PodmanEngine]:
    client = DockerClient.from_config(reactor, DockerConfig(
        host=podman_service.host, call_timeout=30.0, pull_policy="if-not-present"))
    yield PodmanEngine(client, reactor)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_an_image_is_pulled_from_a_loopback_registry_without_tls(
    podman: PodmanEngine, pushed: str, podman_service: PrivatePodman
) -> None:
    assert podman_service.podman("image", "exists", pushed, check=False).returncode == 1
    await podman.ensure_image(pushed)
    assert podman_service.podman("image", "exists", pushed, check=False).returncode == 0
    await podman.ensure_image(pushed)  # present: nothing to do
    missing = pushed.rsplit(":", 1)[0] + ":absent"
    with pytest.raises(ImageNotFound):
        await podman.ensure_image(missing)


@pytest_twisted.ensureDeferred
async def test_a_short_name_is_pulled_from_docker_hub_and_fails_clearly_offline(
    podman: PodmanEngine,
) -> None:
    with pytest.raises(PullFailed) as info:
        await podman.ensure_image("ctrlagent-absent-{}:1".format(secrets.token_hex(3)))
    assert "docker.io" in info.value.message
