"""Unit tests of the pure create_server parser and Docker create body."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.config import ServersConfig
from ctrlagent.errors import InvalidInput
from ctrlagent.servers import spec as specs
from ctrlagent.servers.spec import ServerSpec, parse_spec, spec_from_json

DEFAULTS = ServersConfig()
MB = 1024 * 1024


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
    body = specs.container_body(spec, "/data/srv-1", DEFAULTS)
    host = body["HostConfig"]
    assert host["Memory"] == 1024 * MB and host["MemorySwap"] == 1024 * MB
    assert host["NanoCpus"] == 2_500_000_000
    assert host["BlkioWeight"] == 1000
    assert host["PidsLimit"] == DEFAULTS.pids_limit
    assert host["Tmpfs"] == {"/tmp": "rw,exec,nosuid,size=100m"}
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
    body = specs.container_body(spec, "/d", DEFAULTS)
    assert "User" not in body and "Cmd" not in body
    host = body["HostConfig"]
    assert "Memory" not in host and host["NanoCpus"] == 0 and host["BlkioWeight"] == 10
    assert specs.uid_gid(spec) is None
    assert specs.uid_gid(parse(user="1234")) == (1234, 1234)


@given(
    memory=st.integers(min_value=1, max_value=1 << 20),
    swap=st.integers(min_value=-1, max_value=1 << 20),
    cpu=st.integers(min_value=0, max_value=6400),
    io=st.integers(min_value=0, max_value=100_000),
)
def test_limit_conversions(memory: int, swap: int, cpu: int, io: int) -> None:
    spec = parse(limits={"memory": memory, "swap": swap, "cpu": cpu, "io": io})
    res = specs.resources(spec, DEFAULTS)
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
