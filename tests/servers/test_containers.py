"""Unit tests of the engine-neutral containers of a server (servers/containers.py)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ctrlagent import config
from ctrlagent.config import ServersConfig, load_config, parse_ulimits
from ctrlagent.engine.interface import ULIMIT_NAMES, Mount, PortBinding, ResourceLimits
from ctrlagent.errors import ConfigInvalid, InvalidInput
from ctrlagent.servers import containers
from ctrlagent.servers import spec as specs
from ctrlagent.servers.spec import ServerSpec, parse_spec

DEFAULTS = ServersConfig()
MB = 1024 * 1024


def parse(**params: object) -> ServerSpec:
    base: dict[str, object] = {"image": "img:1"}
    base.update(params)
    return parse_spec("srv-1", base, DEFAULTS)


def test_labels_name_the_agent_the_server_its_role_and_its_definition() -> None:
    spec = parse()
    assert containers.labels(spec) == {
        "ctrl-alt-play.managed": "true",
        "ctrl-alt-play.server-id": "srv-1",
        "ctrl-alt-play.role": "server",
        "ctrl-alt-play.spec-hash": spec.digest(),
    }
    assert containers.labels(spec, role="install")[containers.ROLE_LABEL] == "install"
    assert not hasattr(specs, "MANAGED_LABEL")  # the labels live in servers.containers only


def test_server_container_runs_the_filled_startup_line_directly_with_its_data_and_ports() -> None:
    spec = parse(
        startup="./srv --port {{SERVER_PORT}}",
        ports=[{"internal": 25565, "external": 30000, "ip": "10.0.0.5"}],
        environment={"A": "1"},
    )
    c = containers.server_container(spec, "/data/srv-1", DEFAULTS, "ctrl-alt-play")
    assert c.name == "ctrl-alt-play-srv-1"
    assert c.command == ("./srv", "--port", "25565")
    assert c.entrypoint is None
    assert c.env["STARTUP"] == "./srv --port 25565" and c.env["A"] == "1"
    assert c.mounts == (Mount("/data/srv-1", "/home/container"),)
    assert c.working_dir == "/home/container"
    assert c.ports == (PortBinding(25565, 30000, "10.0.0.5"),)
    assert c.network == "ctrl-alt-play"
    assert c.interactive and c.user == "1000:1000"
    assert c.confinement.no_new_privileges and "net_raw" in c.confinement.cap_drop
    assert c.tmpfs == {"/tmp": "rw,exec,nosuid,nodev,size=100m"}


def test_server_container_keeps_the_image_command_and_user_when_asked() -> None:
    c = containers.server_container(parse(user="image"), "/d", DEFAULTS, "bridge")
    assert c.command is None and c.user is None


def test_limits_are_bytes_with_swap_on_top_of_memory() -> None:
    got = containers.limits(parse(limits={"memory": 1024, "swap": 512, "cpu": 150, "io": 5000}),
                            DEFAULTS)
    assert got == ResourceLimits(
        memory_bytes=1024 * MB, memory_swap_bytes=1536 * MB, cpu_percent=150.0,
        io_weight=5000, pids=DEFAULTS.pids_limit,
    )


def test_unlimited_swap_and_unlimited_memory() -> None:
    assert containers.limits(parse(limits={"memory": 64, "swap": -1}), DEFAULTS) \
        .memory_swap_bytes == -1
    no_memory = containers.limits(parse(limits={"swap": 512}), DEFAULTS)
    assert (no_memory.memory_bytes, no_memory.memory_swap_bytes) == (0, 0)


def test_pids_default_comes_from_the_operator_and_only_the_operator_lifts_it() -> None:
    legacy = dataclasses.replace(parse(), limits=specs.Limits(pids=0))
    assert containers.limits(legacy, DEFAULTS).pids == DEFAULTS.pids_limit
    assert containers.limits(legacy, ServersConfig(pids_limit=0)).pids == 0
    huge = dataclasses.replace(parse(), limits=specs.Limits(pids=10 * specs.MAX_PIDS))
    assert containers.limits(huge, DEFAULTS).pids == specs.MAX_PIDS


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (specs.Limits(memory_mb=specs.MAX_MEMORY_MB + 1), "limits.memory"),
        (specs.Limits(swap_mb=-2), "limits.swap"),
        (specs.Limits(cpu_percent=float("inf")), "limits.cpu"),
        (specs.Limits(cpu_percent=float("nan")), "limits.cpu"),
    ],
)
def test_limits_out_of_bounds_are_refused_naming_the_field(
    limits: specs.Limits, field: str
) -> None:
    bad = dataclasses.replace(parse(), limits=limits)
    with pytest.raises(InvalidInput) as info:
        containers.limits(bad, DEFAULTS)
    assert info.value.field == field


def test_install_container_is_confined_and_sees_data_and_script() -> None:
    spec = parse(install={"script": "echo", "image": "inst:1", "entrypoint": "/bin/bash"},
                 limits={"memory": 256})
    c = containers.install_container(spec, "/data/srv-1", "/state/install/srv-1", DEFAULTS,
                                     "bridge")
    assert c.name == "ctrl-alt-play-srv-1-install"
    assert c.image == "inst:1"
    assert c.entrypoint == ("/bin/bash",) and c.command == ("/mnt/install/install.sh",)
    assert c.mounts == (
        Mount("/data/srv-1", "/mnt/server"),
        Mount("/state/install/srv-1", "/mnt/install", read_only=True),
    )
    assert c.labels[containers.ROLE_LABEL] == "install"
    assert not c.interactive and c.ports == ()
    assert c.confinement.cap_drop == ("ALL",)
    assert c.confinement.cap_add == DEFAULTS.install_capabilities
    assert c.confinement.no_devices and not c.confinement.privileged
    assert c.limits == containers.limits(spec, DEFAULTS)
    assert c.user == "0:0"


def test_install_user_server_takes_the_servers_user_or_the_agents_uid() -> None:
    own = ServersConfig(install_user="server", container_uid=7, container_gid=8)
    assert containers.install_user(parse(user="5:6"), own) == "5:6"
    assert containers.install_user(parse(user="image"), own) == "7:8"
    assert containers.install_user(parse(), ServersConfig(install_user="3:4")) == "3:4"


def test_install_container_of_a_server_without_script_is_refused() -> None:
    with pytest.raises(InvalidInput):
        containers.install_container(parse(), "/d", "/s", DEFAULTS, "bridge")


def test_both_containers_get_the_default_process_limits() -> None:
    spec = parse(install="true")
    server = containers.server_container(spec, "/d", DEFAULTS, "bridge")
    install = containers.install_container(spec, "/d", "/s", DEFAULTS, "bridge")
    assert server.ulimits == install.ulimits == dict(containers.DEFAULT_ULIMITS)
    assert containers.DEFAULT_ULIMITS["nofile"][0] <= containers.DEFAULT_ULIMITS["nofile"][1]


def test_the_operators_process_limits_replace_the_defaults() -> None:
    servers = ServersConfig(ulimits={"nofile": [1024, 4096], "nproc": 2048})
    c = containers.server_container(parse(install="true"), "/d", servers, "bridge")
    i = containers.install_container(parse(install="true"), "/d", "/s", servers, "bridge")
    assert c.ulimits == i.ulimits == {"nofile": (1024, 4096), "nproc": (2048, 2048)}
    assert containers.ulimits(ServersConfig(ulimits={})) == {}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"files": 10}, "servers.ulimits.files: unknown limit"),
        ({"nofile": -1}, "servers.ulimits.nofile"),
        ({"nofile": [10, 5]}, "soft limit 10 is above the hard limit 5"),
        ({"nofile": [1, 2, 3]}, "pair"),
        ({"nofile": True}, "servers.ulimits.nofile"),
        ({"nofile": "1024"}, "servers.ulimits.nofile"),
        ({"nofile": 2**64}, "servers.ulimits.nofile"),
        (["nofile"], "a table"),
    ],
)
def test_process_limits_that_are_not_limits_are_refused_naming_the_entry(
    value: object, words: str
) -> None:
    with pytest.raises(ConfigInvalid, match=re.escape(words)):
        parse_ulimits(value)
    with pytest.raises(ConfigInvalid, match=re.escape(words)):
        containers.ulimits(ServersConfig(ulimits=value))  # type: ignore[arg-type]
    with pytest.raises(ConfigInvalid, match=re.escape(words)):
        load_config(environ={}, overrides={"development": True, "servers.ulimits": value})


def test_the_configs_limit_names_are_the_engine_seams() -> None:
    assert config.ULIMIT_NAMES == ULIMIT_NAMES


def test_the_default_process_limits_are_eight_thousand_open_files() -> None:
    assert containers.DEFAULT_ULIMITS == {"nofile": (8192, 8192)}
    assert load_config(environ={}, overrides={"development": True}).servers.ulimits == {
        "nofile": [8192, 8192]}
