"""
Node ports for servers the Panel creates without any (issue 12, item 4), and
the engine's warnings in the create/update answers (issue 13), on the
in-memory engine: the allocation's choice (free on the host, held by no
other server, stopped ones included), its place in the container and the
startup line, its life (kept across a manager restart, released on delete),
exhaustion, two creates at once, and ``servers.port_range`` itself.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.logger import globalLogPublisher

from ctrlagent.config import ServersConfig, load_config, parse_port_range
from ctrlagent.engine.interface import PortBinding
from ctrlagent.errors import ConfigInvalid, InsufficientResources, PortConflict, ServerNotFound
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.ports import PortPool, Untried, port_is_free
from ctrlagent.tap import Options
from ctrlagent.wire.json import to_json
from tests.e2e.test_panel_http import create_payload
from tests.servers.conftest import Unit

IMAGE = "img"
DROPPED = ("Your kernel does not support Block I/O weight or the cgroup is not mounted."
           " Weight discarded.")


def panel_payload(**extra: Any) -> dict[str, Any]:
    """The Panel's create_server payload (no ``ports``), plus ``extra``."""
    payload = {**create_payload(IMAGE), **extra}
    assert "ports" not in create_payload(IMAGE)
    return payload


def free_block(size: int) -> tuple[int, int]:
    """``size`` consecutive ports free on the host (tcp and udp) right now."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 60000 - size)
        if all(port_is_free("0.0.0.0", p) for p in range(first, first + size)):
            return first, first + size - 1
    raise AssertionError("no block of {} free ports found".format(size))


def with_range(unit: Unit, first: int, last: int, **servers: Any) -> None:
    unit.config = replace(
        unit.config,
        servers=replace(unit.config.servers, port_range="{}-{}".format(first, last), **servers),
    )


def ports_of(data: dict[str, Any]) -> list[int]:
    return [a["port"] for a in data.get("allocations", [])]


@pytest.fixture
def seen_warnings() -> Iterator[list[str]]:
    """The text of every warning-level event the agent logs during the test."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            seen.append(str(event.get("warning", "")))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# -- the allocation and where it shows ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_panel_create_without_ports_gets_a_port_of_the_range_everywhere(
    unit: Unit,
) -> None:
    first, last = free_block(4)
    with_range(unit, first, last)
    m = unit.manager()
    payload = panel_payload(startup="/game --port {{SERVER_PORT}} --ip {{SERVER_IP}}")
    created = to_json(await m.create_server("s1", payload))
    [port] = ports_of(created)
    assert first <= port <= last
    assert created["allocations"] == [{"ip": "0.0.0.0", "port": port, "internal": port,
                                       "protocol": "tcp/udp", "protocols": ["tcp", "udp"],
                                       "primary": True}]
    status = to_json(m.status("s1"))
    assert status["allocations"] == created["allocations"]
    assert [to_json(s)["allocations"] for s in m.list_servers()] == [created["allocations"]]
    # Published on tcp and udp, filled into the startup line and the environment.
    await m.start("s1")
    [spec] = [s for s in unit.engine.created if not s.name.endswith("-install")]
    assert spec.ports == (PortBinding(port, port, "0.0.0.0", ("tcp", "udp")),)
    assert spec.env["SERVER_PORT"] == str(port)
    assert spec.command == ("/game", "--port", str(port), "--ip", "0.0.0.0")


@pytest_twisted.ensureDeferred
async def test_explicit_ports_are_kept_and_allocate_nothing(unit: Unit) -> None:
    first, last = free_block(2)
    with_range(unit, first, last)
    m = unit.manager()
    created = to_json(await m.create_server(
        "s1", panel_payload(ports=[{"internal": 25565, "external": 30001}])))
    assert created["allocations"][0]["port"] == 30001
    assert created["allocations"][0]["internal"] == 25565
    assert m.get("s1").spec.ports[0].external == 30001


@pytest_twisted.ensureDeferred
async def test_an_empty_port_range_allocates_nothing_as_before(unit: Unit) -> None:
    unit.config = replace(unit.config, servers=replace(unit.config.servers, port_range=""))
    m = unit.manager()
    created = to_json(await m.create_server("s1", panel_payload()))
    assert "allocations" not in created
    assert m.get("s1").spec.ports == ()


@pytest_twisted.ensureDeferred
async def test_a_port_bound_on_the_host_by_tcp_or_udp_is_never_allocated(unit: Unit) -> None:
    first, last = free_block(3)
    with_range(unit, first, last)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", first))
        tcp.listen(1)
        udp.bind(("127.0.0.1", first + 1))
        m = unit.manager()
        created = to_json(await m.create_server("s1", panel_payload(panelId="p1")))
        assert ports_of(created) == [last]
        with pytest.raises(InsufficientResources, match="servers.port_range"):
            await m.create_server("s2", panel_payload(panelId="p2"))
    finally:
        tcp.close()
        udp.close()


def test_the_pool_tries_every_port_of_the_range_before_giving_up() -> None:
    tried: list[int] = []

    def taken_on_host(ip: str, port: int) -> bool:
        tried.append(port)
        return False

    pool = PortPool(ServersConfig(port_range="100-104"), is_free=taken_on_host)
    with pytest.raises(InsufficientResources) as refused:
        pool.allocate(taken=[102])
    assert refused.value.code == "INSUFFICIENT_RESOURCES"
    assert sorted(tried) == [100, 101, 103, 104]
    assert PortPool(ServersConfig(port_range="100-104"), is_free=lambda ip, port: True,
                    choose=min).allocate([100]).external == 101


def _list_allocate(first: int, last: int, held: set[int], is_free: Any, choose: Any) -> int | None:
    """The pool's pick as it was (a list, ``list.remove``): the reference order."""
    candidates = [p for p in range(first, last + 1) if p not in held]
    while candidates:
        port = choose(candidates)
        candidates.remove(port)
        if is_free("0.0.0.0", port):
            return int(port)
    return None


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300),
    held=st.sets(st.integers(0, 299), max_size=100),
    free=st.sets(st.integers(0, 299), max_size=20),
    seed=st.integers(0, 2**32),
)
def test_the_pool_tries_and_hands_out_the_ports_the_list_did(
    size: int, held: set[int], free: set[int], seed: int
) -> None:
    first = 20000
    held_ports = {first + h for h in held}
    runs: list[tuple[list[int], int | None]] = []
    for way in ("list", "pool"):
        tried: list[int] = []

        def is_free(ip: str, port: int, tried: list[int] = tried) -> bool:
            tried.append(port)
            return port - first in free

        choose = random.Random(seed).choice
        if way == "list":
            got = _list_allocate(first, first + size - 1, held_ports, is_free, choose)
        else:
            pool = PortPool(ServersConfig(port_range="{}-{}".format(first, first + size - 1)),
                            is_free=is_free, choose=choose)
            try:
                got = pool.allocate(held_ports).external
            except InsufficientResources:
                got = None
        runs.append((tried, got))
    assert runs[0] == runs[1]


def test_a_large_mostly_bound_range_costs_one_probe_a_port_and_n_log_n_steps() -> None:
    # 60,000 ports, 1,000 held by servers, every other one bound on the host
    # but the last one tried: each port is probed once, and keeping the
    # untried ones takes O(log n) steps a try (a list's remove took O(n):
    # 1.8e9 steps here, seconds of a blocked reactor).
    first, last = 2000, 61999
    held = set(range(first, first + 1000))
    probes: list[int] = []
    seen: list[Untried] = []

    def choose(candidates: Sequence[int]) -> int:
        assert isinstance(candidates, Untried)
        seen.append(candidates)
        return candidates[len(candidates) // 2]

    def is_free(ip: str, port: int) -> bool:
        probes.append(port)
        return len(seen[0]) == 0

    pool = PortPool(ServersConfig(port_range="{}-{}".format(first, last)),
                    is_free=is_free, choose=choose)
    n = last - first + 1 - len(held)
    assert pool.allocate(held).external == probes[-1]
    assert len(probes) == len(set(probes)) == n
    assert not held & set(probes)
    steps = seen[0].steps
    assert steps <= 4 * n * n.bit_length(), steps
    assert steps >= n  # it counted something
    # Exhausted: the same n probes, and the error's count of held ports.
    probes.clear()
    seen.clear()

    def bound(ip: str, port: int) -> bool:
        probes.append(port)
        return False

    pool = PortPool(ServersConfig(port_range="{}-{}".format(first, last)),
                    is_free=bound, choose=choose)
    with pytest.raises(InsufficientResources, match="1000 held by servers"):
        pool.allocate(held | {1, 70000})
    assert len(probes) == len(set(probes)) == n
    assert seen[0].steps <= 4 * n * n.bit_length()


def test_the_untried_ports_index_and_remove_as_a_list_does() -> None:
    ports = list(range(10, 30))
    left = Untried(list(ports))
    for port in (10, 29, 17, 18, 11):
        left.remove(port)
        ports.remove(port)
        assert list(left) == ports and len(left) == len(ports)
        assert [left[i] for i in range(-len(ports), 0)] == ports
        assert left[2:5] == ports[2:5]
    with pytest.raises(ValueError):
        left.remove(10)
    with pytest.raises(IndexError):
        left[len(ports)]
    assert min(left) == min(ports)


def test_an_address_that_is_not_the_hosts_is_a_clear_error_not_an_exhausted_range() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this host.
    with pytest.raises(PortConflict, match="default_bind_ip"):
        port_is_free("192.0.2.1", 25565)


# -- the allocation's life --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_allocations_survive_a_manager_restart_and_stopped_servers_keep_theirs(
    unit: Unit,
) -> None:
    first, last = free_block(2)
    with_range(unit, first, last)
    m = unit.manager()
    a = ports_of(to_json(await m.create_server("a", panel_payload(panelId="pa"))))
    await m.stopService()
    # A new agent on the same store: "a" (never started, nothing bound on the
    # host) still holds its port; the next server gets the other one.
    m2 = unit.manager()
    assert ports_of(to_json(m2.status("a"))) == a
    b = ports_of(to_json(await m2.create_server("b", panel_payload(panelId="pb"))))
    assert sorted(a + b) == [first, last]
    with pytest.raises(InsufficientResources):
        await m2.create_server("c", panel_payload(panelId="pc"))
    with pytest.raises(ServerNotFound):
        m2.status("c")


@pytest_twisted.ensureDeferred
async def test_a_deleted_servers_port_is_released(unit: Unit) -> None:
    first, _ = free_block(1)
    with_range(unit, first, first)
    m = unit.manager()
    assert ports_of(to_json(await m.create_server("a", panel_payload(panelId="pa")))) == [first]
    with pytest.raises(InsufficientResources, match="no free port left"):
        await m.create_server("b", panel_payload(panelId="pb"))
    await m.delete("a")
    assert ports_of(to_json(await m.create_server("b", panel_payload(panelId="pb")))) == [first]


@pytest_twisted.ensureDeferred
async def test_a_refused_create_holds_no_port(unit: Unit) -> None:
    first, _ = free_block(1)
    with_range(unit, first, first)
    m = unit.manager()
    await m.create_server("a", panel_payload(panelId="pa"))
    # Refused after the payload is read (alias taken): nothing allocated for it.
    with pytest.raises(Exception, match="alias"):
        await m.create_server("b", panel_payload(panelId="pa"))
    await m.delete("a")
    assert ports_of(to_json(await m.create_server("b", panel_payload(panelId="pb")))) == [first]


@pytest_twisted.ensureDeferred
async def test_creates_at_once_never_share_a_port(unit: Unit) -> None:
    first, last = free_block(3)
    with_range(unit, first, last)
    m = unit.manager()
    for round_ in range(3):
        ids = ["r{}-{}".format(round_, n) for n in range(4)]
        results = await DeferredList(
            [ensureDeferred(_create(m, sid)) for sid in ids], consumeErrors=True
        )
        ports = [ports_of(to_json(value))[0] for ok, value in results if ok]
        failures = [value.value for ok, value in results if not ok]
        assert sorted(ports) == [first, first + 1, last]
        assert [type(f) for f in failures] == [InsufficientResources]
        for sid in ids:
            if sid in m.servers:
                await m.delete(sid)


async def _create(m: ServerManager, sid: str) -> Any:
    return await m.create_server(sid, panel_payload(panelId="p" + sid))


# -- the engine's warnings ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_limit_the_engine_drops_is_in_the_answers_and_logged_once(
    unit: Unit, seen_warnings: list[str]
) -> None:
    unit.engine.warns = (DROPPED,)
    m = unit.manager()
    first = to_json(await m.create_server("a", panel_payload(panelId="pa")))
    second = to_json(await m.create_server("b", panel_payload(panelId="pb")))
    assert first["warnings"] == second["warnings"] == [DROPPED]
    updated = to_json(await m.update("a", {"limits": {"io": 300}}))
    assert updated["limitsAppliedLive"] is True and updated["warnings"] == [DROPPED]
    assert seen_warnings.count(DROPPED) == 1
    unit.engine.warns = ()
    assert "warnings" not in to_json(await m.update("a", {"limits": {"io": 200}}))
    assert "warnings" not in to_json(await m.create_server("c", panel_payload(panelId="pc")))


# -- servers.port_range ----------------------------------------------------------


@pytest.mark.parametrize("value", ["25565", "a-b", "0-10", "10-5", "1-70000", "1-2-3"])
def test_a_port_range_that_is_not_one_is_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigInvalid, match="servers.port_range"):
        parse_port_range(value)
    with pytest.raises(ConfigInvalid, match="servers.port_range"):
        load_config(environ={}, overrides={"development": True, "servers.port_range": value})


def test_the_default_port_range_is_a_hundred_and_one_game_ports() -> None:
    assert parse_port_range(ServersConfig().port_range) == (25565, 25665)
    assert parse_port_range(" 30000 - 30000 ") == (30000, 30000)
    assert parse_port_range("") is None


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('port_range = "25565"', "servers.port_range"),
        ("ulimits = { nofile = [10, 5] }", "servers.ulimits.nofile: soft limit 10"),
        ("ulimits = { files = 10 }", "servers.ulimits.files: unknown limit"),
    ],
)
def test_the_agent_refuses_to_start_on_bad_node_settings_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    toml: str, words: str,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[servers]\n{}\n".format(toml))
    monkeypatch.setattr(os, "environ", {"AGENT_SECRET": "s"})
    with pytest.raises(SystemExit) as exit_info:
        Options().parseOptions(["--config", str(config)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


# -- updates ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_update_keeps_the_allocation_even_when_it_clears_the_ports(unit: Unit) -> None:
    first, last = free_block(2)
    with_range(unit, first, last)
    m = unit.manager()
    created = to_json(await m.create_server("a", panel_payload(panelId="pa")))
    await m.update("a", {"ports": [], "limits": {"memory": 128}})
    assert to_json(m.status("a"))["allocations"] == created["allocations"]
    await m.update("a", {"ports": [{"internal": 7777, "external": 30777}]})
    assert ports_of(to_json(m.status("a"))) == [30777]


@pytest_twisted.ensureDeferred
async def test_a_server_defined_before_the_range_gets_a_port_at_its_next_update_not_twice(
    unit: Unit,
) -> None:
    unit.config = replace(unit.config, servers=replace(unit.config.servers, port_range=""))
    m = unit.manager()
    await m.create_server("old", panel_payload(panelId="p-old"))
    await m.stopService()
    first, _ = free_block(1)
    with_range(unit, first, first)
    m2 = unit.manager()
    assert "allocations" not in to_json(m2.status("old"))
    # The update's pick is held while its store write is in flight: a create
    # at the same time does not get the same port.
    updating = ensureDeferred(_update(m2, "old"))
    with pytest.raises(InsufficientResources):
        await m2.create_server("new", panel_payload(panelId="p-new"))
    await updating
    assert ports_of(to_json(m2.status("old"))) == [first]


async def _update(m: ServerManager, sid: str) -> Any:
    return await m.update(sid, {"limits": {"memory": 256}})
