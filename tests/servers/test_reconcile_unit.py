"""
Unit tests of the manager's reconcile at scale, on the in-memory engine:
servers are re-attached many at once, but never more than
``servers.reconcile_concurrency``.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from ctrlagent.engine.interface import ContainerState
from ctrlagent.servers.lifecycle import ServerState
from tests.servers.conftest import Unit, sleep, until

PARAMS = {"image": "img", "startup": "/game", "stop": "stop", "startupDone": "Done ("}


@pytest_twisted.ensureDeferred
async def test_reconcile_reattaches_at_most_the_configured_number_of_servers_at_once(
    unit: Unit,
) -> None:
    unit.config = replace(unit.config, servers=replace(unit.config.servers,
                                                       reconcile_concurrency=3))
    first = unit.manager()
    sids = ["s{}".format(i) for i in range(8)]
    for sid in sids:
        await first.create_server(sid, PARAMS)
        await first.start(sid)
    await until(lambda: all(first.get(s).state is ServerState.RUNNING for s in sids), 5,
                "all running")
    await first.stopService()

    # Every re-attach asks the engine about its running container first:
    # hold those answers and count how many are asked at once.
    held: list[Deferred[None]] = []
    in_flight = [0, 0]  # now, most
    real = unit.engine.inspect

    async def held_inspect(cid: str) -> ContainerState:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        gate: Deferred[None] = Deferred()
        held.append(gate)
        try:
            await gate
        finally:
            in_flight[0] -= 1
        return await real(cid)

    unit.engine.inspect = held_inspect  # type: ignore[method-assign]
    second = unit.manager()
    await until(lambda: len(held) == 3, 5, "three re-attaches")
    await sleep(0.05)
    assert len(held) == 3  # the others wait for a slot
    for released in range(len(sids)):
        await until(lambda n=released: len(held) > n, 5, "the next re-attach")  # type: ignore[misc]
        held[released].callback(None)
    await until(lambda: all(second.get(s).output_attached for s in sids), 5, "all re-attached")
    assert in_flight[1] == 3
    assert second.reconciled == 1


@pytest_twisted.ensureDeferred
async def test_the_first_disk_checks_wait_for_the_first_reconcile(unit: Unit) -> None:
    unit.config = replace(unit.config, servers=replace(unit.config.servers,
                                                       disk_check_interval=60.0))
    first = unit.manager()
    await first.create_server("s1", PARAMS)
    await first.stopService()
    gate: Deferred[None] = Deferred()
    real = unit.engine.list

    async def held_list(labels: Any) -> list[ContainerState]:
        await gate
        return await real(labels)

    unit.engine.list = held_list  # type: ignore[method-assign]
    second = unit.manager()
    await sleep(0.1)
    assert second.get("s1").disk_checked is None  # re-attaching first
    gate.callback(None)
    await until(lambda: second.get("s1").disk_checked is not None, 5, "the first disk check")


@pytest_twisted.ensureDeferred
async def test_stopping_during_a_round_of_disk_checks_ends_the_round(
    unit: Unit, fail_on_logged_errors: list[dict],
) -> None:
    unit.config = replace(unit.config, servers=replace(unit.config.servers,
                                                       disk_check_interval=60.0))
    first = unit.manager()
    for i in range(6):
        await first.create_server("s{}".format(i), PARAMS)
    await first.stopService()
    second = unit.manager()
    held: list[Deferred[Any]] = []

    def held_measure(server_id: str) -> Deferred[Any]:
        gate: Deferred[Any] = Deferred()
        held.append(gate)
        return gate

    second.data.measure = held_measure  # type: ignore[method-assign]
    await until(lambda: len(held) == 2, 5, "the round's first walks")
    await second.stopService()
    # The round's walks were cancelled and waited for: none goes on to the
    # next server after the manager stopped.
    assert all(gate.called for gate in held)
    await sleep(0.05)
    assert len(held) == 2
    gc.collect()
    await sleep(0)
    assert fail_on_logged_errors == []
