"""
Unit tests of the pure create_server parser, and of the Docker create body a
parsed spec ends as (``servers.containers`` then ``engine/docker/bodies``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.config import ServersConfig
from ctrlagent.engine.docker.bodies import create_body, resources_body
from ctrlagent.errors import InvalidInput
from ctrlagent.servers import containers
from ctrlagent.servers import spec as specs
from ctrlagent.servers.spec import ServerSpec, parse_spec, spec_from_json

DEFAULTS = ServersConfig()
MB = 1024 * 1024


class bodies:  # noqa: N801 (reads as the module the Docker bodies used to come from)
    """A spec's Docker bodies, through the engine seam."""

    @staticmethod
    def resources(spec: ServerSpec, defaults: ServersConfig) -> dict[str, Any]:
        return resources_body(containers.limits(spec, defaults))

    @staticmethod
    def container_body(
        spec: ServerSpec, data_path: str, defaults: ServersConfig, network: str = "bridge"
    ) -> dict[str, Any]:
        return create_body(containers.server_container(spec, data_path, defaults, network))

    @staticmethod
    def install_body(
        spec: ServerSpec, data_path: str, script_dir: str, defaults: ServersConfig,
        network: str = "bridge",
    ) -> dict[str, Any]:
        return create_body(
            containers.install_container(spec, data_path, script_dir, defaults, network)
        )


def parse(**params: object) -> ServerSpec:
    base: dict[str, object] = {"image": "img:1"}
    base.update(params)
    return parse_spec("srv-1", base, DEFAULTS)


def field_of(**params: object) -> str | None:
    with pytest.raises(InvalidInput) as info:
        parse(**params)
    assert info.value.code == "INVALID_PAYLOAD"
    return info.value.field


def test_invalid_fields_are_named() -> None:
    assert field_of(image="") == "image"
    assert field_of(limits={"memory": "lots"}) == "limits.memory"
    assert field_of(limits={"cpu": -1}) == "limits.cpu"
    assert field_of(limits={"swap": -2}) == "limits.swap"
    assert field_of(ports=[{"internal": 1}, {"internal": 70000}]) == "ports[1].internal"
    assert field_of(environment={"A": {"x": 1}}) == "environment.A"
    assert field_of(environment={"1BAD": "x"}) == "environment"
    assert field_of(stop={"type": "signal", "value": "TERM"}) == "stop"
    assert field_of(startupDone={"pattern": "(", "regex": True}) == "startupDone.pattern"
    assert field_of(install={"script": ""}) == "install.script"
    assert field_of(user="root") == "user"
    with pytest.raises(InvalidInput) as info:
        parse_spec("../etc", {"image": "x"}, DEFAULTS)
    assert info.value.field == "serverId"


def test_environment_values_are_stringified() -> None:
    spec = parse(environment={"A": 1, "B": True, "C": False, "D": 2.5, "E": 3.0, "F": None})
    assert dict(spec.environment) == {"A": "1", "B": "true", "C": "false", "D": "2.5",
                                      "E": "3", "F": ""}


def test_startup_placeholders_are_filled_from_environment_and_allocation() -> None:
    spec = parse(
        startup="java -Xmx{{SERVER_MEMORY}}M -jar {{JAR}} --port {{SERVER_PORT}} "
                "--ip {{SERVER_IP}} {{env.EXTRA}} {{UNKNOWN}}",
        environment={"JAR": "server.jar", "EXTRA": "nogui"},
        limits={"memory": 2048},
        ports=[{"internal": 25565, "external": 25570, "ip": "10.0.0.5"}],
    )
    assert specs.fill_startup(spec) == (
        "java -Xmx2048M -jar server.jar --port 25565 --ip 10.0.0.5 nogui "
    )


def test_plain_startup_runs_directly_and_shell_lines_under_sh() -> None:
    assert specs.startup_command("/usr/games/minetestserver --port 30000") == [
        "/usr/games/minetestserver", "--port", "30000"]
    assert specs.startup_command("cd x && ./run") == ["/bin/sh", "-c", "cd x && ./run"]
    assert specs.startup_command("echo $HOME") == ["/bin/sh", "-c", "echo $HOME"]
    assert specs.startup_command("  ") is None


def test_create_body_limits_labels_ports_mount() -> None:
    spec = parse(
        startup="/bin/game",
        limits={"memory": 1024, "swap": 0, "cpu": 250, "io": 2000, "disk": 5000},
        ports=[{"internal": 27015, "external": 27016, "protocol": "udp"},
               {"internal": 27015, "external": 27016, "protocol": "tcp"}],
    )
    body = bodies.container_body(spec, "/data/srv-1", DEFAULTS)
    host = body["HostConfig"]
    assert host["Memory"] == 1024 * MB and host["MemorySwap"] == 1024 * MB
    assert host["NanoCpus"] == 2_500_000_000
    assert host["BlkioWeight"] == 1000
    assert host["PidsLimit"] == DEFAULTS.pids_limit
    assert host["Tmpfs"] == {"/tmp": "rw,exec,nosuid,nodev,size=100m"}
    assert host["Binds"] == ["/data/srv-1:/home/container"]
    assert host["RestartPolicy"] == {"Name": "no"}
    assert host["PortBindings"] == {
        "27015/tcp": [{"HostIp": "0.0.0.0", "HostPort": "27016"}],
        "27015/udp": [{"HostIp": "0.0.0.0", "HostPort": "27016"}],
    }
    assert body["Labels"]["ctrl-alt-play.managed"] == "true"
    assert body["Labels"]["ctrl-alt-play.server-id"] == "srv-1"
    assert body["OpenStdin"] is True and body["StdinOnce"] is False
    assert body["Cmd"] == ["/bin/game"]
    assert body["User"] == "1000:1000"
    assert "STARTUP=/bin/game" in body["Env"]
    assert spec.container_name == "ctrl-alt-play-srv-1"


def test_image_user_and_unlimited() -> None:
    spec = parse(user="image", limits={"memory": 0, "cpu": 0, "io": 1})
    body = bodies.container_body(spec, "/d", DEFAULTS)
    assert "User" not in body and "Cmd" not in body
    host = body["HostConfig"]
    assert "Memory" not in host and host["NanoCpus"] == 0 and host["BlkioWeight"] == 10
    assert specs.uid_gid(spec) is None
    assert specs.uid_gid(parse(user="1234")) == (1234, 1234)


@given(
    memory=st.integers(min_value=1, max_value=1 << 20),
    swap=st.integers(min_value=-1, max_value=1 << 20),
    cpu=st.integers(min_value=0, max_value=6400),
    io=st.integers(min_value=0, max_value=specs.MAX_IO_WEIGHT),
)
def test_limit_conversions(memory: int, swap: int, cpu: int, io: int) -> None:
    spec = parse(limits={"memory": memory, "swap": swap, "cpu": cpu, "io": io})
    res = bodies.resources(spec, DEFAULTS)
    assert res["Memory"] == memory * MB
    if swap == -1:
        assert res["MemorySwap"] == -1
    else:
        assert res["MemorySwap"] == (memory + swap) * MB >= res["Memory"]
    assert res["NanoCpus"] == cpu * 10_000_000
    assert 10 <= res["BlkioWeight"] <= 1000
    assert res["BlkioWeight"] == min(1000, max(10, io))


def test_stop_methods() -> None:
    assert parse().stop == specs.StopMethod("signal", "SIGTERM", None)
    assert parse(stop="stop").stop == specs.StopMethod("command", "stop", None)
    assert parse(stop="^C").stop == specs.StopMethod("signal", "SIGINT", None)
    assert parse(stop={"type": "command", "value": "quit", "timeout": 5}).stop == (
        specs.StopMethod("command", "quit", 5.0))


def test_startup_done_plain_and_regex() -> None:
    plain = parse(startupDone="Done (").startup_done
    assert plain is not None and plain.matches("[12:00] Done (1.2s)!")
    assert not plain.matches("Done")
    regex = parse(startupDone={"pattern": r"listening on \S+:\d+", "regex": True}).startup_done
    assert regex is not None and regex.matches("Server listening on [::]:30000.")
    assert not regex.matches("Server listening on nothing")
    # Compiled once, and not a part of the spec's JSON or of its equality.
    # (re's own cache would hand back the same object anyway: the compiled
    # pattern is kept on the instance itself.)
    assert vars(regex)["_compiled"].pattern == regex.pattern
    spec = parse(startupDone={"pattern": r"listening on \S+:\d+", "regex": True})
    assert spec_from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["startup_done"] == {
        "pattern": r"listening on \S+:\d+", "regex": True}


def test_aliases_from_list_and_panel_id() -> None:
    spec = parse(aliases=["a", "b", "srv-1"], panelId="c")
    assert spec.aliases == ("a", "b", "c")


def test_json_round_trip_and_digest() -> None:
    spec = parse(
        startup="x", environment={"A": "1"}, ports=[{"internal": 1, "external": 2}],
        install={"script": "echo", "timeout": 3}, startupDone="ok", stop="stop", aliases=["z"],
    )
    again = spec_from_json(spec.to_json())
    assert again == spec and again.digest() == spec.digest()
    assert parse(startup="y").digest() != parse(startup="x").digest()


def test_merge_update_changes_only_named_fields() -> None:
    spec = parse(limits={"memory": 512, "cpu": 100}, environment={"A": "1"}, startup="a")
    new = specs.merge_update(spec, {"limits": {"memory": 1024}, "environment": {"B": 2}},
                             DEFAULTS)
    assert new.limits.memory_mb == 1024 and new.limits.cpu_percent == 100
    assert dict(new.environment) == {"A": "1", "B": "2"}
    assert new.startup == "a" and new.user == spec.user


# -- numbers: finite, bounded, never booleans ---------------------------------

NUMERIC_FIELDS = {
    "limits.memory": lambda v: {"limits": {"memory": v}},
    "limits.swap": lambda v: {"limits": {"swap": v}},
    "limits.disk": lambda v: {"limits": {"disk": v}},
    "limits.cpu": lambda v: {"limits": {"cpu": v}},
    "limits.io": lambda v: {"limits": {"io": v}},
    "limits.pids": lambda v: {"limits": {"pids": v}},
    "ports[0].internal": lambda v: {"ports": [{"internal": v, "external": 25565}]},
    "ports[0].external": lambda v: {"ports": [{"internal": 25565, "external": v}]},
    "stop.timeout": lambda v: {"stop": {"type": "signal", "value": "SIGTERM", "timeout": v}},
    "install.timeout": lambda v: {"install": {"script": "true", "timeout": v}},
}
NOT_FINITE_OR_ABSURD = [
    float("inf"), float("-inf"), float("nan"), "inf", "-Infinity", "Infinity", "NaN", "nan",
    "1e999", "-1e999", 10**400, -(10**400), 1e300, "1e300", True, False, "0x10", "1_000",
    "12abc", "", [], {}, "9" * 70,
]


@pytest.mark.parametrize("name", sorted(NUMERIC_FIELDS))
@pytest.mark.parametrize("value", NOT_FINITE_OR_ABSURD, ids=repr)
def test_non_finite_absurd_and_boolean_numbers_are_invalid_payload_naming_the_field(
    name: str, value: object
) -> None:
    if value == "":
        return  # "" means "absent" (the default) for every number
    assert field_of(**NUMERIC_FIELDS[name](value)) == name


def test_numbers_from_json_text_like_the_wire_carries_them() -> None:
    import json

    for text in ('{"cpu": 1e999}', '{"cpu": -1e999}', '{"cpu": Infinity}', '{"cpu": NaN}',
                 '{"cpu": "inf"}', '{"memory": 1' + "0" * 400 + "}"):
        limits = json.loads(text)
        assert field_of(limits=limits) == "limits." + next(iter(limits))
    # decimal strings and whole floats are still numbers
    spec = parse(limits={"cpu": "150.5", "memory": 1024.0, "disk": " 2048 "})
    assert spec.limits.cpu_percent == 150.5 and spec.limits.memory_mb == 1024
    assert spec.limits.disk_mb == 2048


def test_upper_bounds_are_inclusive_and_one_more_is_refused() -> None:
    spec = parse(limits={"memory": specs.MAX_MEMORY_MB, "swap": specs.MAX_MEMORY_MB,
                         "disk": specs.MAX_DISK_MB, "cpu": specs.MAX_CPU_PERCENT,
                         "io": specs.MAX_IO_WEIGHT, "pids": specs.MAX_PIDS})
    res = bodies.resources(spec, DEFAULTS)
    assert res["Memory"] == specs.MAX_MEMORY_MB * MB < 2**63
    assert res["NanoCpus"] == specs.MAX_CPU_PERCENT * 10**7 < 2**63
    assert res["PidsLimit"] == specs.MAX_PIDS
    for key, top in (("memory", specs.MAX_MEMORY_MB), ("swap", specs.MAX_MEMORY_MB),
                     ("disk", specs.MAX_DISK_MB), ("cpu", specs.MAX_CPU_PERCENT),
                     ("io", specs.MAX_IO_WEIGHT), ("pids", specs.MAX_PIDS)):
        assert field_of(limits={key: top + 1}) == "limits." + key


def test_environment_numbers_must_be_finite() -> None:
    assert field_of(environment={"A": float("inf")}) == "environment.A"
    assert field_of(environment={"B": float("nan")}) == "environment.B"
    assert field_of(environment={"C": "a\x00b"}) == "environment.C"
    assert dict(parse(environment={"D": 1e20}).environment) == {"D": str(10**20)}


def test_the_update_path_refuses_what_create_refuses() -> None:
    spec = parse(limits={"cpu": 100})
    for bad in (float("inf"), "Infinity", True, 10**400):
        with pytest.raises(InvalidInput) as info:
            specs.merge_update(spec, {"limits": {"cpu": bad}}, DEFAULTS)
        assert info.value.field == "limits.cpu"


def test_a_stored_definition_with_an_infinite_limit_is_refused_at_load() -> None:
    import json

    spec = parse(limits={"cpu": 100})
    raw = json.loads(spec.to_json())
    raw["limits"]["cpu_percent"] = float("inf")
    with pytest.raises(ValueError):
        spec_from_json(json.dumps(raw))
    # and a spec built around the parser never overflows into the engine's units
    from dataclasses import replace

    bad = replace(spec, limits=replace(spec.limits, cpu_percent=float("inf")))
    with pytest.raises(InvalidInput) as info:
        bodies.resources(bad, DEFAULTS)
    assert info.value.field == "limits.cpu"


@given(
    cpu=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                  st.text(max_size=12), st.booleans(), st.none()),
    memory=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                     st.text(max_size=12), st.none()),
    pids=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.none()),
)
def test_any_number_either_is_refused_by_name_or_converts_within_int64(
    cpu: object, memory: object, pids: object
) -> None:
    try:
        spec = parse(limits={"cpu": cpu, "memory": memory, "pids": pids})
    except InvalidInput as e:
        assert e.code == "INVALID_PAYLOAD" and e.field in ("limits.cpu", "limits.memory",
                                                           "limits.pids")
        return
    res = bodies.resources(spec, DEFAULTS)
    assert all(isinstance(v, int) and -1 <= v < 2**63 for v in res.values())
    assert res["PidsLimit"] > 0


# -- pids: never "off" from a payload -------------------------------------------


@pytest.mark.parametrize("value", [0, None, -1, -5, "0", "-3", 0.0])
def test_zero_null_or_negative_pids_keep_the_configured_default(value: object) -> None:
    spec = parse(limits={"pids": value})
    assert spec.limits.pids == DEFAULTS.pids_limit
    assert bodies.resources(spec, DEFAULTS)["PidsLimit"] == DEFAULTS.pids_limit
    assert parse(limits={"pids": 64}).limits.pids == 64


def test_a_stored_pids_zero_still_gets_the_default_limit() -> None:
    from dataclasses import replace

    spec = parse()
    legacy = replace(spec, limits=replace(spec.limits, pids=0))
    assert bodies.resources(legacy, DEFAULTS)["PidsLimit"] == DEFAULTS.pids_limit
    assert "PidsLimit" not in bodies.resources(legacy, ServersConfig(pids_limit=0))


# -- names are matched whole ----------------------------------------------------


@pytest.mark.parametrize("server_id", ["srv\n", "srv\r\n", "\nsrv", "srv\x00", "a" * 129, "",
                                       ".hidden", "-x", "a/b", "..", "s\u0661"])
def test_server_ids_with_a_trailing_newline_or_other_junk_are_refused(server_id: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_spec(server_id, {"image": "x"}, DEFAULTS)
    assert info.value.field == "serverId"


def test_every_name_in_the_payload_is_matched_whole() -> None:
    assert field_of(aliases=["panel-1\n"]) == "aliases"
    assert field_of(panelId="cuid\n") == "aliases"
    assert field_of(aliases=["../x"]) == "aliases"
    assert field_of(environment={"A\n": "x"}) == "environment"
    assert field_of(stop={"type": "signal", "value": "SIGTERM\n"}) == "stop"
    assert field_of(user="1000\n") == "user"
    assert field_of(user="1000:1000\n") == "user"
    assert field_of(user="\u0661\u0660") == "user"  # non-ASCII digits
    assert field_of(user="99999999999") == "user"
    assert field_of(ports=[{"internal": 1, "ip": "127.0.0.1\n"}]) == "ports[0].ip"
    assert field_of(image="img\n") == "image"
    assert field_of(install={"script": "x", "image": "img\n"}) == "install.image"
    assert parse(aliases=["cuid-1"], panelId=42).aliases == ("cuid-1", "42")


def test_flags_must_be_booleans() -> None:
    assert parse(skipScripts=True).skip_scripts is True
    assert parse(crashRestart="false").crash_restart is False
    assert field_of(crashRestart="maybe") == "crashRestart"
    assert field_of(skipScripts=2) == "skipScripts"


# -- the install container ------------------------------------------------------


def test_install_container_is_confined_with_the_games_limits() -> None:
    spec = parse(limits={"memory": 512, "cpu": 50, "pids": 0},
                 install={"script": "apt-get install -y curl"})
    body = bodies.install_body(spec, "/data/srv-1", "/state/install/srv-1", DEFAULTS)
    host = body["HostConfig"]
    assert host["CapDrop"] == ["ALL"]
    assert host["CapAdd"] == ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"]
    assert "MKNOD" not in host["CapAdd"] and "FSETID" not in host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False and host["Devices"] == []
    assert "nosuid" in host["Tmpfs"]["/tmp"] and "nodev" in host["Tmpfs"]["/tmp"]
    game = bodies.resources(spec, DEFAULTS)
    assert {k: host[k] for k in game} == game
    assert host["PidsLimit"] == DEFAULTS.pids_limit
    assert host["LogConfig"]["Config"]["max-size"]
    assert body["User"] == "0:0"
    assert host["Binds"] == ["/data/srv-1:/mnt/server", "/state/install/srv-1:/mnt/install:ro"]


def test_install_user_and_capabilities_come_from_the_config() -> None:
    spec = parse(user="1234:5678", install={"script": "true"})
    own = ServersConfig(install_user="server", install_capabilities=("CHOWN",))
    body = bodies.install_body(spec, "/d", "/s", own)
    assert body["User"] == "1234:5678"
    assert body["HostConfig"]["CapAdd"] == ["CHOWN"]
    image_user = parse(user="image", install={"script": "true"})
    assert bodies.install_body(image_user, "/d", "/s", own)["User"] == "1000:1000"
    assert bodies.install_body(spec, "/d", "/s", ServersConfig(install_user="7:8"))["User"] == "7:8"


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"install_capabilities": ["CHOWN", "MKNOD"]}, "MKNOD"),
        ({"install_capabilities": ["CAP_SYS_ADMIN"]}, "SYS_ADMIN"),
        ({"install_capabilities": ["ALL"]}, "ALL"),
        ({"install_capabilities": ["chown; rm"]}, "capability name"),
        ({"install_capabilities": "CHOWN,MKNOD"}, "MKNOD"),
        ({"install_user": "root"}, "install_user"),
        ({"install_user": "0\n"}, "install_user"),
    ],
)
def test_install_settings_are_validated(settings: dict[str, object], problem: str) -> None:
    from ctrlagent.config import load_config
    from ctrlagent.errors import ConfigInvalid

    with pytest.raises(ConfigInvalid) as info:
        load_config(overrides={"development": True,
                               **{"servers." + k: v for k, v in settings.items()}})
    assert problem in str(info.value)


def test_install_settings_from_toml_and_environment_strings(tmp_path: object) -> None:
    import os

    from ctrlagent.config import load_config

    path = os.path.join(str(tmp_path), "agent.toml")
    with open(path, "w") as f:
        f.write('development = true\n[servers]\ninstall_user = "server"\n'
                'install_capabilities = ["CHOWN", "FOWNER"]\n')
    config = load_config(path)
    assert config.servers.install_user == "server"
    assert config.servers.install_capabilities == ("CHOWN", "FOWNER")
    again = load_config(overrides={"development": True,
                                   "servers.install_capabilities": "CHOWN, SETUID"})
    assert again.servers.install_capabilities == ("CHOWN", "SETUID")
