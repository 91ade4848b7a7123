"""
A server the Panel creates without ports, on the real engine: its allocated
port is published on tcp and udp, reaches the game through the host's
loopback, is the game's ``{{SERVER_PORT}}``, and is free again once the
server is deleted; the engine's warnings (a limit this kernel drops) are
in the create answer.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.ports import port_is_free
from ctrlagent.wire.json import to_json
from tests.e2e.test_panel_http import create_payload
from tests.servers.conftest import Rig, until, until_state
from tests.servers.test_lifecycle_docker import inspect
from tests.servers.test_ports_unit import free_block

pytestmark = pytest.mark.docker

# The game answers "pong-<its port>" on its own port (busybox nc), then runs.
STARTUP = (
    "(while :; do echo pong-{{SERVER_PORT}} | nc -l -p {{SERVER_PORT}}; done) &"
    " exec /usr/local/bin/gameserver"
)


def pong(port: int) -> str:
    """What the game answers at 127.0.0.1:``port`` ("" when nothing yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.settimeout(0.5)
            return conn.recv(64).decode(errors="replace").strip()
    except OSError:
        return ""


@pytest.mark.runtimes(
    "docker",
    reason="the rig's servers on Podman share the session network, where a published port is"
    " not reached from the host; tests/engine/podman/test_podman_allocations.py runs this"
    " same path on Podman on an agent network of its own",
)
@pytest_twisted.ensureDeferred
async def test_the_panels_server_gets_a_published_port_released_on_delete(
    rig: Rig, scripted_image: str
) -> None:
    first, _ = free_block(1)
    # Published on loopback: Podman's port forwarding (CNI portmap) does not
    # answer a loopback client on a port published at 0.0.0.0.
    rig.servers_config(port_range="{}-{}".format(first, first), default_bind_ip="127.0.0.1")
    manager = rig.manager()
    sid = rig.new_id()
    payload: dict[str, Any] = {**create_payload(scripted_image), "startup": STARTUP,
                               "panelId": "p-" + sid}
    created = to_json(await manager.create_server(sid, payload))
    assert [(a["ip"], a["port"], a["protocols"]) for a in created["allocations"]] == [
        ("127.0.0.1", first, ["tcp", "udp"])]
    doc = inspect(rig.host, created["containerId"])
    assert doc["HostConfig"]["PortBindings"] == {
        "{}/{}".format(first, proto): [{"HostIp": "127.0.0.1", "HostPort": str(first)}]
        for proto in ("tcp", "udp")
    }
    assert "SERVER_PORT={}".format(first) in doc["Config"]["Env"]
    # What the engine did not apply is said, and only then.
    if doc["HostConfig"].get("BlkioWeight") == 0:
        assert any("I/O weight" in w for w in created["warnings"]), created
    else:
        assert "warnings" not in created, created

    await manager.start(sid)
    await until_state(manager, sid, ServerState.RUNNING, timeout=20)
    answers: list[str] = []

    def answered() -> bool:
        answers.append(pong(first))
        return answers[-1] == "pong-{}".format(first)

    await until(answered, 20, "the game to answer on its port", interval=0.2)
    assert not port_is_free("127.0.0.1", first)  # the engine holds it on the host
    assert to_json(manager.status(sid))["allocations"] == created["allocations"]

    await manager.delete(sid)
    await until(lambda: port_is_free("127.0.0.1", first), 10, "the port to be free on the host")
    again = rig.new_id()
    second = to_json(await manager.create_server(
        again, {**create_payload(scripted_image), "panelId": "p-" + again}))
    assert [a["port"] for a in second["allocations"]] == [first]
