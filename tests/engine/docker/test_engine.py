"""
The client against the real engine: engine calls, images, the container
lifecycle with a full HostConfig, labels, live updates, wait, rename and the
agent's network.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from ctrlagent.engine.docker import (
    Conflict,
    ContainerGone,
    DockerClient,
    DockerError,
    ImageNotFound,
    NotFound,
)

from .conftest import Containers, make_client, unique_name, wait_for_line

pytestmark = pytest.mark.docker


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_engine_ping_version_info_and_disk_usage(docker: DockerClient) -> None:
    assert await docker.ping() is True
    version = await docker.version()
    assert version["ApiVersion"] >= "1.41"
    assert docker.api_version is not None
    info = await docker.info()
    assert "Containers" in info and "MemTotal" in info
    df = await docker.disk_usage()
    assert "Images" in df and "LayersSize" in df


@pytest_twisted.ensureDeferred
async def test_image_inspect_list_and_missing(docker: DockerClient, scripted_image: str) -> None:
    doc = await docker.image_inspect(scripted_image)
    assert doc["Id"].startswith("sha256:")
    tags = [t for image in await docker.image_list() for t in image.get("RepoTags") or ()]
    assert scripted_image in tags
    with pytest.raises(ImageNotFound):
        await docker.image_inspect("ctrlagent-test/absent:{}".format(secrets.token_hex(3)))


@pytest_twisted.ensureDeferred
async def test_create_with_a_full_host_config_is_honoured(
    docker: DockerClient, containers: Containers, tmp_path: Any
) -> None:
    tcp_port, udp_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    marker = "label-{}".format(secrets.token_hex(3))
    cid = await containers.create(
        {"DATA_FILE": "/home/container/data/console.log", "GREETING": "hi there"},
        User="1000:1000",
        StopSignal="SIGINT",
        StopTimeout=7,
        Labels={"ctrlagent.test": marker},
        ExposedPorts={"25565/tcp": {}, "25565/udp": {}},
        HostConfig={
            "Memory": 128 * 2**20,
            "MemorySwap": 256 * 2**20,
            "NanoCpus": 500_000_000,
            "CpusetCpus": "0",
            "BlkioWeight": 300,
            "PidsLimit": 64,
            "PortBindings": {
                "25565/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(tcp_port)}],
                "25565/udp": [{"HostIp": "127.0.0.1", "HostPort": str(udp_port)}],
            },
            "Binds": ["{}:/home/container/data".format(data)],
            "Tmpfs": {"/tmp": "rw,size=16m"},
            "Init": True,
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}},
            "SecurityOpt": ["no-new-privileges"],
            "CapDrop": ["NET_RAW"],
        },
    )
    doc = await docker.container_inspect(cid)
    host = doc["HostConfig"]
    assert doc["State"]["Running"] is True
    assert (host["Memory"], host["MemorySwap"]) == (128 * 2**20, 256 * 2**20)
    assert (host["NanoCpus"], host["CpusetCpus"], host["PidsLimit"]) == (500_000_000, "0", 64)
    assert host["BlkioWeight"] in (300, 0)  # 0: the kernel has no blkio weight (a warning)
    udp = host["PortBindings"]["25565/udp"][0]
    assert udp == {"HostIp": "127.0.0.1", "HostPort": str(udp_port)}
    assert host["Tmpfs"] == {"/tmp": "rw,size=16m"}
    assert host["Init"] is True and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["LogConfig"]["Config"]["max-size"] == "1m"
    assert doc["Config"]["User"] == "1000:1000"
    assert (doc["Config"]["StopSignal"], doc["Config"]["StopTimeout"]) == ("SIGINT", 7)
    assert "GREETING=hi there" in doc["Config"]["Env"]
    ports = doc["NetworkSettings"]["Ports"]
    assert ports["25565/tcp"][0]["HostPort"] == str(tcp_port)
    # The bind mount is the server's data directory, written as uid 1000.
    # (The output attach may open after the reply is printed: with its past
    # output, so that the reply is read either way.)
    out = docker.attach_output(cid, logs=True)
    pipe = await docker.attach_stdin(cid)
    pipe.write_line("say persisted")
    await wait_for_line(out, "[Server] persisted")
    out.close()
    await pipe.close()
    assert (data / "console.log").read_text() == "say persisted\n"
    listed = await docker.container_list({"ctrlagent.test": marker})
    assert [c["Id"] for c in listed] == [cid]


@pytest_twisted.ensureDeferred
async def test_lifecycle_stop_kill_restart_wait_rename_remove(
    docker: DockerClient, containers: Containers
) -> None:
    cid = await containers.create({"IGNORE_SIGTERM": "1"})
    await docker.container_start(cid)  # already running: 304 is fine
    # SIGTERM is ignored: stop escalates to SIGKILL after the timeout.
    await docker.container_stop(cid, timeout=1)
    state = (await docker.container_inspect(cid))["State"]
    assert state["Running"] is False and state["ExitCode"] == 137
    await docker.container_stop(cid, timeout=1)  # already stopped: 304 is fine
    await docker.container_restart(cid, timeout=1)
    assert (await docker.container_inspect(cid))["State"]["Running"] is True
    # The signal we name is the one delivered: SIGINT makes the script exit 0.
    exit_code = Deferred.fromCoroutine(docker.container_wait(cid))
    await docker.container_kill(cid, "SIGINT")
    assert await exit_code == 0
    await docker.container_start(cid)
    await docker.container_kill(cid)
    assert (await docker.container_inspect(cid))["State"]["ExitCode"] == 137
    with pytest.raises(Conflict):
        await docker.container_kill(cid)  # not running
    new_name = unique_name("renamed")
    await docker.container_rename(cid, new_name)
    assert (await docker.container_inspect(new_name))["Id"] == cid
    other = await containers.create(start=False)
    with pytest.raises(Conflict):
        await docker.container_rename(other, new_name)
    await docker.container_remove(cid, force=True, volumes=True)
    with pytest.raises(ContainerGone):
        await docker.container_inspect(cid)
    with pytest.raises(NotFound):
        await docker.container_kill(cid)


@pytest_twisted.ensureDeferred
async def test_wait_returns_the_exit_code_of_a_crash(
    docker: DockerClient, containers: Containers
) -> None:
    cid = await containers.create({"CRASH_AFTER": "0.2", "CRASH_CODE": "42"})
    assert await docker.container_wait(cid, timeout=10) == 42


@pytest_twisted.ensureDeferred
async def test_update_changes_limits_of_a_running_container(
    docker: DockerClient, containers: Containers
) -> None:
    cid = await containers.create(HostConfig={"Memory": 64 * 2**20, "MemorySwap": 64 * 2**20})
    await docker.container_update(
        cid, {"Memory": 96 * 2**20, "MemorySwap": 96 * 2**20, "CpuQuota": 50_000, "PidsLimit": 32}
    )
    host = (await docker.container_inspect(cid))["HostConfig"]
    assert (host["Memory"], host["CpuQuota"], host["PidsLimit"]) == (96 * 2**20, 50_000, 32)


@pytest_twisted.ensureDeferred
async def test_list_by_label_and_running_only(docker: DockerClient, containers: Containers) -> None:
    marker = secrets.token_hex(3)
    labels = {"ctrlagent.test": marker, "ctrlagent.kind": "list"}
    running = await containers.create(Labels=labels)
    stopped = await containers.create(start=False, Labels=labels)
    assert {c["Id"] for c in await docker.container_list(labels)} == {running, stopped}
    assert [c["Id"] for c in await docker.container_list(labels, all=False)] == [running]
    as_list = ["ctrlagent.test={}".format(marker)]
    assert len(await docker.container_list(as_list)) == 2


@pytest_twisted.ensureDeferred
async def test_create_conflicts_and_missing_images_are_typed(
    docker: DockerClient, containers: Containers
) -> None:
    cid = await containers.create(start=False)
    name = (await docker.container_inspect(cid))["Name"].lstrip("/")
    with pytest.raises(Conflict):
        await docker.container_create(name, {"Image": containers.image})
    with pytest.raises(ImageNotFound):
        await docker.container_create(None, {"Image": "ctrlagent-test/absent:nope"})


def _routes() -> str:
    return subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout


def _free_subnet() -> str:
    routes = _routes()
    return next(
        "10.{}.{}.0/24".format(a, b)
        for a in range(200, 250)
        for b in (7, 77, 177)
        if "10.{}.".format(a) not in routes
    )


@pytest_twisted.ensureDeferred
async def test_network_ensure_creates_once_with_subnet_and_labels(docker: DockerClient) -> None:
    name = unique_name("net")
    subnet = _free_subnet()
    try:
        net = await docker.network_ensure(name, subnet, labels={"ctrl-alt-play.managed": "true"})
        assert net["Name"] == name and net["Driver"] == "bridge"
        assert net["IPAM"]["Config"][0]["Subnet"] == subnet
        assert net["Labels"] == {"ctrl-alt-play.managed": "true"}
        again = await docker.network_ensure(name, subnet)
        assert again["Id"] == net["Id"]
        assert (await docker.network_inspect(name))["Id"] == net["Id"]
    finally:
        try:
            await docker.network_remove(name)
        except NotFound:
            pass
    with pytest.raises(NotFound):
        await docker.network_inspect(name)


@pytest_twisted.ensureDeferred
async def test_network_ensure_at_once_with_a_subnet_gives_every_caller_the_one_network(
    docker: DockerClient, docker_engine: Any,
) -> None:
    # Callers of one client wait for each other.  Another client's create
    # (another agent on the engine) is refused as a pool overlapping the
    # first's, not as a taken name, and may come before the name shows: each
    # caller still gets the network made.
    others = [make_client(docker_engine.host) for _ in range(3)]
    name = unique_name("net")
    subnet = _free_subnet()
    try:
        nets = await gatherResults([
            Deferred.fromCoroutine(client.network_ensure(name, subnet))
            for client in [docker, docker, *others]
        ])
        assert len({net["Id"] for net in nets}) == 1
        assert nets[0]["IPAM"]["Config"][0]["Subnet"] == subnet
        assert docker._network_locks == {}  # nothing kept once the creates are done
    finally:
        for client in others:
            await client.close()
        try:
            await docker.network_remove(name)
        except NotFound:
            pass


@pytest_twisted.ensureDeferred
async def test_network_ensure_refused_for_a_subnet_another_network_holds(
    docker: DockerClient,
) -> None:
    # A refusal that no concurrent create explains is the engine's own error.
    first, second = unique_name("net"), unique_name("net")
    subnet = _free_subnet()
    try:
        await docker.network_ensure(first, subnet)
        with pytest.raises(DockerError) as refused:
            await docker.network_ensure(second, subnet)
        assert not isinstance(refused.value, NotFound)
        with pytest.raises(NotFound):
            await docker.network_inspect(second)
    finally:
        for name in (first, second):
            try:
                await docker.network_remove(name)
            except NotFound:
                pass
