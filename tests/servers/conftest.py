"""
Fixtures of the server-lifecycle tests: a ``ServerManager`` on a real engine.

``rig`` builds managers on the test's runtime (``runtime``: the
``docker_engine``, or the private Podman service through ``PodmanEngine``)
with a temporary state and data directory and short timeouts; every
container a test's servers own is removed by id afterwards, whatever the
test did.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from ctrlagent.config import AgentConfig, DockerConfig, RuntimeConfig, ServersConfig
from ctrlagent.engine import engine_client_config, make_engine
from ctrlagent.engine.docker.client import DockerClient
from ctrlagent.events import ConsoleOutput, ServerEvent, StatusChanged
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
from ctrlagent.testing.engine import FakeEngine
from tests.rig.holders import end_holders
from tests.rig.runtime import Runtime
from tests.rig.waiting import sleep, until  # noqa: F401 - shared with the servers tests


def new_id() -> str:
    """A unique server id for one test."""
    return "t-" + uuid.uuid4().hex[:8]


def remove_containers(host: str, server_ids: list[str]) -> None:
    """Force-remove every container labelled with one of ``server_ids``, by id."""
    env = dict(os.environ, DOCKER_HOST=host)
    for sid in server_ids:
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", "label=ctrl-alt-play.server-id=" + sid],
            capture_output=True, text=True, env=env, check=False,
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, env=env, check=False)


class Recorder:
    """Collects a manager's events."""

    def __init__(self) -> None:
        self.events: list[ServerEvent] = []

    def __call__(self, event: ServerEvent) -> None:
        self.events.append(event)

    def statuses(self, server_id: str) -> list[tuple[str, str]]:
        return [
            (e.previous, e.current)
            for e in self.events
            if isinstance(e, StatusChanged) and e.server_id == server_id
        ]

    def lines(self, server_id: str) -> list[str]:
        return [
            line
            for e in self.events
            if isinstance(e, ConsoleOutput) and e.server_id == server_id and e.stream != "agent"
            for line in e.lines
        ]


class Rig:
    """Managers on one engine, with their config and cleanup."""

    def __init__(self, host: str, tmp: str, runtime: RuntimeConfig | None = None) -> None:
        self.host = host
        self.config = AgentConfig(
            development=True,
            runtime=runtime or RuntimeConfig(),
            state_dir=os.path.join(tmp, "state"),
            data_dir=os.path.join(tmp, "data"),
            docker=DockerConfig(host=host, call_timeout=10.0),
            servers=ServersConfig(
                stop_timeout=2.0,
                stats_interval=0.5,
                disk_check_interval=0.0,
                console_throttle_interval=1.0,
                install_timeout=20.0,
                create_answer_timeout=15.0,
            ),
        )
        self.server_ids: list[str] = []
        self.managers: list[ServerManager] = []
        self.clients: list[DockerClient] = []
        self.recorder = Recorder()

    def servers_config(self, **kw: Any) -> None:
        """Change ServersConfig fields for managers built afterwards."""
        self.config = replace(self.config, servers=replace(self.config.servers, **kw))

    def new_id(self) -> str:
        sid = new_id()
        self.server_ids.append(sid)
        return sid

    def manager(self, docker_host: str | None = None) -> ServerManager:
        """A started manager on the rig's store (a fresh one each call)."""
        config = self.config
        if docker_host is not None:
            # Another Docker engine (a private one a test restarts).
            config = replace(config, docker=replace(config.docker, host=docker_host),
                             runtime=RuntimeConfig())
        client = DockerClient.from_config(global_reactor, engine_client_config(config))
        self.clients.append(client)
        store = open_store(global_reactor, config.state_dir)
        manager = ServerManager(global_reactor, config, make_engine(global_reactor, config, client),
                                store)
        manager.add_listener(self.recorder)
        manager.startService()
        self.managers.append(manager)
        return manager

    async def close(self) -> None:
        for manager in self.managers:
            if manager.running:
                await manager.stopService()
            elif manager.crashed is not None:
                await manager.crashed
        for client in self.clients:
            await client.close()


@pytest_twisted.async_yield_fixture
async def rig(runtime: Runtime, scripted_image: str, tmp_path: Any) -> AsyncIterator[Rig]:
    r = Rig(runtime.host, str(tmp_path), runtime.config())
    try:
        yield r
    finally:
        try:
            await r.close()
        finally:
            remove_containers(runtime.host, r.server_ids)
            # Podman's stdin holders end with their containers (and are killed if not).
            left = end_holders(os.path.join(r.config.state_dir, "stdin"))
            assert left == [], "stdin holders outlived their containers"


def scripted(image: str, **env: Any) -> dict[str, Any]:
    """A create_server payload for the scripted game server."""
    return {
        "name": "scripted",
        "image": image,
        "startup": "/usr/local/bin/gameserver",
        "environment": env,
        "limits": {"memory": 64, "swap": 0, "cpu": 50, "io": 500, "disk": 100},
        "stop": {"type": "command", "value": "stop", "timeout": 2},
        "startupDone": "Done (",
        "crashRestart": True,
    }


async def until_state(
    manager: ServerManager, server_id: str, state: ServerState | str, timeout: float = 10.0
) -> None:
    """Wait until the server reports ``state``."""
    want = ServerState(state)
    await until(
        lambda: manager.get(server_id).state is want,
        timeout,
        "{} to be {} (is {})".format(server_id, want, manager.get(server_id).state),
    )


def fired(d: Deferred[Any]) -> bool:
    return d.called


# -- the manager on the in-memory engine (unit tests) -------------------------


class Unit:
    """Managers on the in-memory engine with a ``Clock`` (store and disk on real threads)."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.clock = Clock()
        # Today, not 1970: the engine stamps lines on this clock, and a stored
        # console mark must be older than what a new run prints.
        self.clock.advance(1_790_000_000)
        self.engine = FakeEngine(self.clock)
        self.events: list[Any] = []
        self.config = AgentConfig(
            development=True,
            state_dir=os.path.join(tmp, "state"),
            data_dir=os.path.join(tmp, "data"),
            servers=ServersConfig(stop_timeout=5.0, crash_restart_window=30.0,
                                  disk_check_interval=0.0, stats_interval=2.0,
                                  stats_mode="poll"),
        )
        self.managers: list[ServerManager] = []

    def manager(self) -> ServerManager:
        store = open_store(global_reactor, self.config.state_dir)
        m = ServerManager(global_reactor, self.config, self.engine, store, clock=self.clock)
        m.add_listener(self.events.append)
        m.startService()
        self.managers.append(m)
        return m

    def statuses(self, sid: str) -> list[tuple[str, str]]:
        return [(e.previous, e.current) for e in self.events
                if isinstance(e, StatusChanged) and e.server_id == sid]

    def lines(self, sid: str) -> list[str]:
        return [line for e in self.events if isinstance(e, ConsoleOutput)
                and e.server_id == sid and e.stream != "agent" for line in e.lines]


@pytest_twisted.async_yield_fixture
async def unit(tmp_path: Any) -> AsyncIterator[Unit]:
    u = Unit(str(tmp_path))
    yield u
    for m in u.managers:
        if m.running:
            await m.stopService()
        elif m.crashed is not None:
            await m.crashed
