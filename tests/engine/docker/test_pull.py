"""
Pulling images from a real registry on loopback: progress events, pull
policies, per-registry credentials, and clear, fast errors for a missing image
or an unreachable registry.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.engine.docker import (
    DockerClient,
    ImageNotFound,
    NotFound,
    PullFailed,
    PullProgress,
    RegistryAuthFailed,
)
from tests.rig.registry import LocalRegistry, free_port

from .conftest import Registry, make_client, within

pytestmark = pytest.mark.docker


async def forget(client: DockerClient, ref: str) -> None:
    try:
        await client.image_remove(ref, force=True)
    except NotFound:
        pass


@pytest_twisted.ensureDeferred
async def test_pull_reports_layer_progress_and_policies_decide_when_to_pull(
    docker: DockerClient, local_registry: Registry
) -> None:
    ref = local_registry.image
    await forget(docker, ref)
    with pytest.raises(ImageNotFound, match="pull policy is 'never'"):
        await docker.ensure_image(ref, policy="never")
    events: list[PullProgress] = []
    try:
        pulling = docker.ensure_image(ref, policy="if-not-present", on_progress=events.append)
        await within(30, pulling)
        assert (await docker.image_inspect(ref))["Id"].startswith("sha256:")
        downloading = [e for e in events if e.status == "Downloading"]
        assert downloading, [e.status for e in events]
        layer = downloading[-1].layer
        assert layer and all(e.total > 0 for e in downloading)
        assert downloading[-1].total >= local_registry.layer_bytes // 2  # compressed
        assert 0 < downloading[-1].percent <= 100  # type: ignore[operator]
        assert any(e.status == "Pull complete" and e.layer == layer for e in events)
        # Present: if-not-present and never do not pull; always does.
        again: list[PullProgress] = []
        await docker.ensure_image(ref, policy="if-not-present", on_progress=again.append)
        await docker.ensure_image(ref, policy="never", on_progress=again.append)
        assert again == []
        await docker.ensure_image(ref, policy="always", on_progress=again.append)
        assert any("up to date" in e.status for e in again)
    finally:
        await forget(docker, ref)


@pytest_twisted.ensureDeferred
async def test_a_missing_image_is_a_clear_error_in_under_2_seconds(
    docker: DockerClient, local_registry: Registry
) -> None:
    ref = "{}/ctrlagent/absent:1".format(local_registry.server.address)
    started = time.monotonic()
    with pytest.raises(ImageNotFound) as e:
        await docker.image_pull(ref)
    assert time.monotonic() - started < 2.0
    assert ref in e.value.message and "not found" in e.value.message


@pytest_twisted.ensureDeferred
async def test_an_unreachable_registry_is_a_clear_error_in_under_2_seconds(
    docker: DockerClient,
) -> None:
    ref = "127.0.0.1:{}/ctrlagent/anything:1".format(free_port())
    started = time.monotonic()
    with pytest.raises(PullFailed) as e:
        await docker.image_pull(ref)
    assert time.monotonic() - started < 2.0
    assert "cannot pull" in e.value.message and "connection refused" in e.value.message


@pytest.fixture
def auth_registry(local_registry: Registry) -> Any:
    """A second registry on the same storage that requires a password."""
    server = LocalRegistry(
        storage_dir=str(local_registry.server.storage), credentials=("panel", "s3cret")
    ).start()
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_registry_credentials_from_config_are_used_for_their_registry(
    docker_engine: Any, local_registry: Registry, auth_registry: LocalRegistry
) -> None:
    ref = "{}/ctrlagent/pullme:1".format(auth_registry.address)
    anonymous = make_client(docker_engine.host)
    wrong = make_client(
        docker_engine.host,
        registry_auths={auth_registry.address: {"username": "panel", "password": "nope"}},
    )
    right = make_client(
        docker_engine.host,
        registry_auths={"http://" + auth_registry.address: {"username": "panel",
                                                            "password": "s3cret"}},
    )
    try:
        for client in (anonymous, wrong):
            with pytest.raises(RegistryAuthFailed) as e:
                await client.image_pull(ref)
            assert "credentials missing or wrong" in e.value.message
        await within(30, right.image_pull(ref))
        assert (await right.image_inspect(ref))["Id"].startswith("sha256:")
    finally:
        await forget(right, ref)
        for client in (anonymous, wrong, right):
            await client.close()
