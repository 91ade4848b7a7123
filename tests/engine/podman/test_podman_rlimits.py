"""
A container whose spec names no ``nofile``/``nproc`` starts on Podman as on
Docker: the engine gives it the service's own hard limits where rootful
Podman would ask for 1 048 576 and runc would refuse ("error setting
rlimits").
"""

from __future__ import annotations

import resource
import secrets
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker import DockerClient
from ctrlagent.engine.interface import ContainerSpec
from ctrlagent.engine.podman import PodmanEngine
from ctrlagent.engine.podman.engine import service_rlimits, with_host_rlimits

INF = resource.RLIM_INFINITY


def limits(table: dict[int, tuple[int, int]]) -> Any:
    return lambda which: table[which]


def test_unnamed_limits_get_the_services_hard_limit_else_this_processs() -> None:
    own = limits({resource.RLIMIT_NOFILE: (1024, 20000), resource.RLIMIT_NPROC: (500, 96363)})
    got = with_host_rlimits({}, {"nproc": 32768}, own)
    assert got == {"nofile": (20000, 20000), "nproc": (32768, 32768)}
    got = with_host_rlimits({}, None, limits({resource.RLIMIT_NOFILE: (1024, 20000),
                                        resource.RLIMIT_NPROC: (500, 96363)}))
    assert got == {"nofile": (20000, 20000), "nproc": (96363, 96363)}


def test_named_limits_are_kept_and_others_untouched() -> None:
    asked = {"nofile": (1024, 2048), "core": (0, 0)}
    got = with_host_rlimits(asked, {}, limits({resource.RLIMIT_NOFILE: (1, 1),
                                           resource.RLIMIT_NPROC: (7, 9)}))
    assert got == {"nofile": (1024, 2048), "core": (0, 0), "nproc": (9, 9)}
    assert asked == {"nofile": (1024, 2048), "core": (0, 0)}


def test_an_unlimited_host_limit_is_left_to_podman() -> None:
    got = with_host_rlimits({}, None, limits({resource.RLIMIT_NOFILE: (INF, INF),
                                              resource.RLIMIT_NPROC: (INF, INF)}))
    assert got == {}
    assert with_host_rlimits({}, {"nofile": INF, "nproc": INF}, limits({})) == {}


def test_no_service_behind_a_socket_path_is_none(tmp_path: Any) -> None:
    assert service_rlimits(str(tmp_path / "absent.sock")) is None


@pytest.mark.docker
def test_the_services_limits_are_read_through_its_socket(podman_service: Any) -> None:
    with open("/proc/{}/limits".format(podman_service.process.pid)) as f:
        text = f.read()
    want = {}
    for name, label in (("nofile", "Max open files"), ("nproc", "Max processes")):
        hard = next(line for line in text.splitlines() if line.startswith(label)).split()[-2]
        want[name] = INF if hard == "unlimited" else int(hard)
    assert service_rlimits(podman_service.socket_path) == want


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_a_container_without_rlimits_starts_with_the_hosts(
    podman_service: Any, podman_scripted_image: str
) -> None:
    client = DockerClient.from_config(reactor, DockerConfig(
        host=podman_service.host, call_timeout=15.0, pull_policy="never"))
    engine = PodmanEngine(client, reactor)
    spec = ContainerSpec(name="ctrlagent-t-rl-" + secrets.token_hex(3),
                         image=podman_scripted_image,
                         labels={"ctrlagent.test": secrets.token_hex(4)}, env={})
    cid = await engine.create(spec)
    try:
        await engine.start(cid)
        state = await engine.inspect(cid)
        assert state.running, state
        raw = await client.container_inspect(cid)
        got = {u["Name"]: (u["Soft"], u["Hard"]) for u in raw["HostConfig"]["Ulimits"] or ()}
        want = service_rlimits(podman_service.socket_path)
        assert want
        for name, hard in want.items():
            if hard != INF:
                assert (hard, hard) in (got.get(name), got.get("RLIMIT_" + name.upper())), got
    finally:
        await client.container_remove(cid, force=True)
        await client.close()
