"""
The Panel's server on Podman: the same allocation (published on the
configured IP, reaching the game), the operator's ``servers.ulimits`` in the
game's own process, and the engine's warnings in the create answer, through
the real ``ServerManager`` over ``PodmanEngine``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from ctrlagent.config import AgentConfig, DockerConfig, RuntimeConfig, ServersConfig
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.podman import PodmanEngine
from ctrlagent.errors import NotFound
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
from ctrlagent.wire.json import to_json
from tests.e2e.test_panel_http import create_payload
from tests.rig.podman import PrivatePodman
from tests.servers.conftest import until, until_state
from tests.servers.test_ports_docker import pong
from tests.servers.test_ports_unit import free_block

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# The game prints its open-file limits, answers "pong-<port>" on its port, then runs.
STARTUP = (
    "echo nofile $(ulimit -Sn) $(ulimit -Hn);"
    " (while :; do echo pong-{{SERVER_PORT}} | nc -l -p {{SERVER_PORT}}; done) &"
    " exec /usr/local/bin/gameserver"
)


@pytest_twisted.async_yield_fixture
async def podman_manager(
    podman_service: PrivatePodman, tmp_path: Any
) -> AsyncIterator[tuple[ServerManager, PodmanEngine, int]]:
    first, _ = free_block(1)
    tag = secrets.token_hex(3)
    config = AgentConfig(
        development=True,
        state_dir=os.path.join(str(tmp_path), "state"),
        data_dir=os.path.join(str(tmp_path), "data"),
        runtime=RuntimeConfig(kind="podman", podman_host=podman_service.host),
        servers=ServersConfig(
            stop_timeout=2.0, disk_check_interval=0.0, create_answer_timeout=30.0,
            port_range="{}-{}".format(first, first), default_bind_ip="127.0.0.1",
            ulimits={"nofile": [1024, 2048], "nproc": [4096, 4096]},
        ),
    )
    client = DockerClient.from_config(reactor, DockerConfig(
        host=podman_service.host, call_timeout=30.0, pull_policy="never"))
    engine = PodmanEngine(client, reactor)
    network = "ctrlagent-t-alloc-{}".format(tag)
    manager = ServerManager(reactor, config, engine, open_store(reactor, config.state_dir),
                            network_mode=network)
    manager.startService()
    try:
        yield manager, engine, first
    finally:
        for sid in list(manager.servers):
            await manager.delete(sid)
        await manager.stopService()
        try:
            await client.network_remove(network)
        except NotFound:
            pass
        await client.close()


@pytest_twisted.ensureDeferred
async def test_the_panels_server_on_podman_gets_its_port_limits_and_warnings(
    podman_manager: tuple[ServerManager, PodmanEngine, int], podman_scripted_image: str
) -> None:
    manager, engine, port = podman_manager
    payload = {**create_payload(podman_scripted_image), "startup": STARTUP, "panelId": "p-pod"}
    created = to_json(await manager.create_server("pod-1", payload))
    assert [(a["ip"], a["port"]) for a in created["allocations"]] == [("127.0.0.1", port)]
    state = await engine.inspect(created["containerId"])
    assert state.limits is not None
    if state.limits.io_weight != 500:
        # Podman kept no block I/O weight (this kernel has none): the answer says so.
        assert any("I/O weight" in w for w in created["warnings"]), created
    else:
        assert "warnings" not in created, created
    await manager.start("pod-1")
    await until_state(manager, "pod-1", ServerState.RUNNING, timeout=30)
    assert "nofile 1024 2048" in manager.console_history("pod-1", 20)
    for _ in range(60):
        if pong(port) == "pong-{}".format(port):
            break
        await deferLater(reactor, 0.25, lambda: None)
    else:
        raise AssertionError("the game never answered on 127.0.0.1:{}".format(port))
    await manager.delete("pod-1")
    await until(lambda: "pod-1" not in manager.servers, 5, "the server to be gone")
    again = to_json(await manager.create_server(
        "pod-2", {**create_payload(podman_scripted_image), "panelId": "p-pod2"}))
    assert [a["port"] for a in again["allocations"]] == [port]
