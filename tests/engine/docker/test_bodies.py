"""
The Docker create/update bodies of the agent's containers, pinned.

``golden_bodies.json`` holds the bodies the agent sent before the engine seam
(``servers.spec.container_body``/``install_body``/``resources`` of issue 10,
since removed) for a set of varied servers; the neutral ``ContainerSpec``
turned into a Docker body must give exactly the same, so the seam changed
nothing the engine sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ctrlagent.config import ServersConfig
from ctrlagent.engine.docker.bodies import create_body, resources_body
from ctrlagent.servers.containers import install_container, limits, server_container
from ctrlagent.servers.spec import ServerSpec, parse_spec

GOLDEN = Path(__file__).with_name("golden_bodies.json")

# name -> (role, payload, ServersConfig overrides, network)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "minimal": ("server", {"image": "img:1"}, {}, "bridge"),
    "ports_and_memory": (
        "server",
        {
            "image": "ghcr.io/games/mc:1.20",
            "startup": "java -Xmx{{SERVER_MEMORY}}M -jar server.jar --port {{SERVER_PORT}}",
            "environment": {"EULA": True, "LEVEL": "world", "SEED": 42},
            "limits": {"memory": 2048, "swap": 512, "cpu": 150, "io": 700, "pids": 300},
            "ports": [
                {"internal": 25565, "external": 25565, "ip": "10.0.0.5"},
                {"internal": 25575, "external": 30000},
            ],
        },
        {},
        "ctrl-alt-play",
    ),
    "swap_unlimited": (
        "server", {"image": "img:1", "limits": {"memory": 1024, "swap": -1}}, {}, "bridge",
    ),
    "no_memory_limit_swap_ignored": (
        "server", {"image": "img:1", "limits": {"memory": 0, "swap": 256}}, {}, "host",
    ),
    "cpu_fraction_io_clamped_low": (
        "server", {"image": "img:1", "limits": {"cpu": 33.3333, "io": 3}}, {}, "bridge",
    ),
    "io_clamped_high_pids_default": (
        "server", {"image": "img:1", "limits": {"io": 5000, "pids": 0}}, {}, "bridge",
    ),
    "pids_off_by_operator": (
        "server", {"image": "img:1", "limits": {"pids": -5}}, {"pids_limit": 0}, "none",
    ),
    "user_image_shell_startup": (
        "server",
        {
            "image": "img:1",
            "user": "image",
            "startup": "./run.sh && echo done > {{env.OUT}}",
            "environment": {"OUT": "/tmp/x"},
        },
        {"tmpfs_size_mb": 64},
        "bridge",
    ),
    "user_numeric": (
        "server", {"image": "img:1", "user": "1234", "startup": "./srv --flag"}, {}, "bridge",
    ),
    "install_default": (
        "install",
        {"image": "img:1", "install": "apt-get install -y x", "limits": {"memory": 512}},
        {},
        "ctrl-alt-play",
    ),
    "install_image_entrypoint_timeout": (
        "install",
        {
            "image": "img:1",
            "install": {
                "script": "echo hi",
                "image": "ghcr.io/pterodactyl/installers:debian",
                "entrypoint": "/bin/bash",
                "timeout": 120,
            },
            "ports": [{"internal": 27015, "external": 27015}],
            "limits": {"cpu": 200, "swap": -1, "memory": 256},
        },
        {"install_capabilities": ("CHOWN",)},
        "bridge",
    ),
    "install_user_server": (
        "install",
        {"image": "img:1", "install": "true", "user": "2000:3000"},
        {"install_user": "server", "install_capabilities": ()},
        "bridge",
    ),
    "install_user_server_image_user": (
        "install",
        {"image": "img:1", "install": "true", "user": "image"},
        {"install_user": "server", "container_uid": 1500, "container_gid": 1600},
        "host",
    ),
}


def case_spec(name: str) -> tuple[str, ServerSpec, ServersConfig, str]:
    role, payload, overrides, network = CASES[name]
    config = ServersConfig(**overrides)
    return role, parse_spec("srv-" + name.replace("_", "-"), payload, config), config, network


def record() -> None:
    """Write the golden file from the current builders (run once, by hand)."""
    golden = {name: neutral_bodies(name) for name in CASES}
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


def golden() -> dict[str, Any]:
    return dict(json.loads(GOLDEN.read_text()))


def test_golden_file_covers_every_case() -> None:
    assert sorted(golden()) == sorted(CASES)


def neutral_bodies(name: str) -> dict[str, Any]:
    """The bodies through the seam: ServerSpec -> ContainerSpec -> Docker body."""
    role, spec, config, network = case_spec(name)
    if role == "install":
        container = install_container(spec, "/data/" + name, "/state/install/" + name, config,
                                      network)
        assert container.name == spec.container_name + "-install"
    else:
        container = server_container(spec, "/data/" + name, config, network)
        assert container.name == spec.container_name
    return {"create": create_body(container), "update": resources_body(limits(spec, config))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_docker_body_of_the_neutral_spec_is_the_golden_body(name: str) -> None:
    assert json.loads(json.dumps(neutral_bodies(name))) == golden()[name]


def test_golden_bodies_are_compared_byte_for_byte() -> None:
    for name in CASES:
        ours = json.dumps(neutral_bodies(name), sort_keys=True)
        assert ours == json.dumps(golden()[name], sort_keys=True), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_live_update_sets_the_limits_the_container_was_created_with(name: str) -> None:
    bodies = golden()[name]
    assert {k: bodies["create"]["HostConfig"].get(k) for k in bodies["update"]} == bodies["update"]


def test_ulimits_become_host_config_ulimits_by_name_and_none_leave_the_engines() -> None:
    from ctrlagent.engine.interface import ContainerSpec

    bare = ContainerSpec(name="c", image="img:1", labels={}, env={})
    assert "Ulimits" not in create_body(bare)["HostConfig"]
    limited = ContainerSpec(name="c", image="img:1", labels={}, env={},
                            ulimits={"nproc": (4096, 4096), "nofile": (1024, 2048)})
    assert create_body(limited)["HostConfig"]["Ulimits"] == [
        {"Name": "nofile", "Soft": 1024, "Hard": 2048},
        {"Name": "nproc", "Soft": 4096, "Hard": 4096},
    ]


if __name__ == "__main__":
    record()
