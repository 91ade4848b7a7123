"""
Fixtures of the Docker client tests.

- ``local_registry`` (session): a ``docker-registry`` on loopback holding a
  freshly built image that the engine does not have, so pulling it downloads
  a real layer with progress.
- ``docker`` : a ``DockerClient`` on the test engine (``docker_engine``).
- ``containers``: creates containers named ``ctrlagent-t-...`` and removes
  them, by id, after the test.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import DockerClient, NotFound
from tests.rig.registry import LocalRegistry

# Labels every container of this test run, for label filters (events, lists).
RUN_ID = secrets.token_hex(6)


def unique_name(tag: str = "") -> str:
    """A container/network name of this test run."""
    return "ctrlagent-t-{}{}".format(tag + "-" if tag else "", secrets.token_hex(4))


def _docker_cli(host: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, DOCKER_HOST=host)
    return subprocess.run(["docker", *args], capture_output=True, env=env, check=False)


@dataclass
class Registry:
    """The running registry and what was pushed to it."""

    server: LocalRegistry
    image: str  # pushed, absent from the engine: pulling downloads it
    layer_bytes: int
    pulled: list[str] = field(default_factory=list)


def _make_pull_image(host: str, tag: str) -> int:
    """Import a one-layer image with 2 MiB of random data; return its size."""
    payload = os.urandom(2 * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="ctrlagent-pullimg-") as tmp:
        data = os.path.join(tmp, "blob.bin")
        with open(data, "wb") as f:
            f.write(payload)
        tarball = os.path.join(tmp, "rootfs.tar")
        with tarfile.open(tarball, "w") as tar:
            tar.add(data, arcname="blob.bin")
        proc = _docker_cli(host, "import", tarball, tag)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.decode(errors="replace"))
    return len(payload)


@pytest.fixture(scope="session")
def local_registry(docker_engine: Any) -> Iterator[Registry]:
    server = LocalRegistry().start()
    local = "ctrlagent-test/pullme:{}".format(secrets.token_hex(4))
    try:
        size = _make_pull_image(docker_engine.host, local)
        target = server.push(docker_engine.host, local, "ctrlagent/pullme:1")
        # Remove both names so that the engine no longer has the layer.
        _docker_cli(docker_engine.host, "rmi", target, local)
        registry = Registry(server=server, image=target, layer_bytes=size)
        yield registry
    finally:
        for ref in (local, "{}/ctrlagent/pullme:1".format(server.address)):
            _docker_cli(docker_engine.host, "rmi", "-f", ref)
        server.stop()


def make_client(host: str, **overrides: Any) -> DockerClient:
    from twisted.internet import reactor

    settings: dict[str, Any] = {"host": host, "call_timeout": 15.0}
    settings.update(overrides)
    return DockerClient.from_config(reactor, DockerConfig(**settings))


@pytest_twisted.async_yield_fixture
async def docker(docker_engine: Any) -> AsyncIterator[DockerClient]:
    client = make_client(docker_engine.host)
    yield client
    await client.close()


class Containers:
    """Creates test containers and removes every one of them afterwards."""

    def __init__(self, client: DockerClient, image: str) -> None:
        self.client = client
        self.image = image
        self.ids: list[str] = []

    async def create(
        self, env: dict[str, str] | None = None, *, start: bool = True, tag: str = "",
        **spec: Any,
    ) -> str:
        body: dict[str, Any] = {
            "Image": self.image,
            "OpenStdin": True,
            "StdinOnce": False,
            "AttachStdin": False,
            "Env": ["{}={}".format(k, v) for k, v in (env or {}).items()],
            # Not the agent's managed label: another suite may sweep those away.
            "Labels": {"ctrlagent.test": RUN_ID},
        }
        body.update(spec)
        cid = await self.client.container_create(unique_name(tag), body)
        self.ids.append(cid)
        if start:
            await self.client.container_start(cid)
        return cid

    async def remove_all(self) -> None:
        for cid in self.ids:
            try:
                await self.client.container_remove(cid, force=True, volumes=True)
            except NotFound:
                pass


@pytest_twisted.async_yield_fixture
async def containers(docker: DockerClient, scripted_image: str) -> AsyncIterator[Containers]:
    made = Containers(docker, scripted_image)
    yield made
    await made.remove_all()


async def within(seconds: float, awaitable: Any) -> Any:
    """Await ``awaitable`` (a coroutine or Deferred), failing the test after ``seconds``."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred

    d: Deferred[Any] = ensureDeferred(awaitable)
    d.addTimeout(seconds, reactor)
    return await d


async def wait_for_line(stream: Any, wanted: str, seconds: float = 10.0) -> list[tuple[str, str]]:
    """Read ``(stream, line)`` items until ``wanted``; return them all."""

    async def read() -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        async for item in stream:
            seen.append(item)
            if item[1] == wanted:
                return seen
        raise AssertionError("stream ended before {!r}; got {!r}".format(wanted, seen[-20:]))

    return await within(seconds, read())


async def until(check: Any, seconds: float = 10.0, step: float = 0.05) -> None:
    """Poll ``check()`` until it is true; fail the test after ``seconds``."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(max(1, int(seconds / step))):
        if check():
            return
        await deferLater(reactor, step, lambda: None)
    raise AssertionError("condition still false after {}s".format(seconds))
