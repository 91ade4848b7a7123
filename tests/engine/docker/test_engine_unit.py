"""Unit tests of DockerEngine's translations (engine/docker/engine.py) and make_engine."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from ctrlagent.config import AgentConfig, RuntimeConfig, TimeoutsConfig
from ctrlagent.engine import make_engine
from ctrlagent.engine.docker.engine import (
    DockerEngine,
    container_state,
    engine_event,
    log_lines,
    stats_sample,
    summary_state,
)
from ctrlagent.engine.docker.models import parse_event
from ctrlagent.engine.docker.stats import ContainerStats
from ctrlagent.engine.interface import IContainerEngine, LogLine, ResourceLimits
from ctrlagent.errors import ConfigInvalid

MB = 1024 * 1024


def test_inspect_of_an_exited_container() -> None:
    state = container_state({
        "Id": "abc",
        "Name": "/ctrl-alt-play-s1",
        "Config": {"Labels": {"a": "b"}},
        "State": {"Running": False, "Status": "exited", "ExitCode": 3, "OOMKilled": True,
                  "StartedAt": "2026-01-02T03:04:05.000000007Z"},
        "HostConfig": {"Memory": 64 * MB, "MemorySwap": -1, "NanoCpus": 1_500_000_000,
                       "BlkioWeight": 300, "PidsLimit": 512},
    })
    assert state.names == ("ctrl-alt-play-s1",)
    assert (state.running, state.status, state.exit_code, state.oom_killed) == (
        False, "exited", 3, True)
    assert state.started_at_ns is not None and state.started_at_ns % 10**9 == 7
    assert state.limits == ResourceLimits(64 * MB, -1, 150.0, 300, 512)


def test_inspect_of_a_container_never_started_or_running_has_no_exit_code() -> None:
    created = container_state({"Id": "x", "State": {"Status": "created", "ExitCode": 0,
                                                    "StartedAt": "0001-01-01T00:00:00Z"}})
    assert (created.exit_code, created.started_at_ns, created.running) == (None, None, False)
    running = container_state({"Id": "x", "State": {"Running": True, "ExitCode": 0}})
    assert (running.status, running.exit_code) == ("running", None)
    # No limits set: all zero (PidsLimit null or -1 read as none).
    assert container_state({"HostConfig": {"PidsLimit": -1}}).limits == ResourceLimits(
        0, 0, 0.0, 0, 0)


def test_create_and_update_warnings_are_kept_per_container_bounded() -> None:
    from ctrlagent.engine.docker import engine as module

    engine = DockerEngine(None, Clock())  # type: ignore[arg-type]
    engine._remember("a", ["dropped"])
    engine._remember("b", [])
    assert (engine.last_warnings("a"), engine.last_warnings("b")) == (("dropped",), ())
    engine._remember("a", [])
    assert engine.last_warnings("a") == ()
    for n in range(module._WARNINGS_KEPT + 5):
        engine._remember(str(n), ["w{}".format(n)])
    assert engine.last_warnings("0") == ()
    last = str(module._WARNINGS_KEPT + 4)
    assert engine.last_warnings(last) == ("w" + last,)
    assert len(engine._warnings) == module._WARNINGS_KEPT


def test_list_entries() -> None:
    state = summary_state({"Id": "y", "Names": ["/a", "/b"], "State": "running",
                           "Labels": {"k": "v"}})
    assert (state.id, state.names, state.running, state.labels) == (
        "y", ("a", "b"), True, {"k": "v"})
    assert not summary_state({"State": "exited"}).running
    # An exited container's code, as the list words it (Docker and Podman).
    exited = {"State": "exited", "Status": "Exited (137) 5 seconds ago"}
    assert summary_state(exited).exit_code == 137
    assert summary_state({"State": "exited", "Status": "Exited (-1) 2 hours ago"}).exit_code == -1
    for doc in ({"State": "exited"}, {"State": "exited", "Status": "Exited (x)"},
                {"State": "running", "Status": "Up 5 seconds"},
                {"State": "created", "Status": "Exited (3) ago"},
                {"State": "exited", "Status": "Exited (" + "9" * 400 + ")"}):
        assert summary_state(doc).exit_code is None, doc


def test_log_lines_keep_lines_after_since_and_lines_without_a_stamp() -> None:
    batch = [
        ("stdout", "2026-01-02T03:04:05.000000001Z one"),
        ("stderr", "2026-01-02T03:04:05.000000002Z two"),
        ("stdout", "no stamp"),
    ]
    everything = log_lines(batch, 0)
    assert [(x.stream, x.text) for x in everything] == [
        ("stdout", "one"), ("stderr", "two"), ("stdout", "no stamp")]
    first = everything[0].ns
    assert log_lines(batch, first) == [everything[1], LogLine(0, "stdout", "no stamp")]


def test_events_and_stats_in_neutral_form() -> None:
    docker = parse_event({"Action": "die", "Actor": {"ID": "c1", "Attributes": {
        "exitCode": "137", "x": "y"}}, "timeNano": 1_700_000_000_000_000_123})
    event = engine_event(docker)
    assert (event.action, event.container_id, event.exit_code, event.at_ns) == (
        "die", "c1", 137, 1_700_000_000_000_000_123)
    assert event.labels["x"] == "y"
    sample = stats_sample(ContainerStats(1.5, 2, 3, 4, 5, 6, 7, 8, "now"))
    assert (sample.cpu_percent, sample.memory_bytes, sample.pids) == (1.5, 2, 8)


def test_make_engine_builds_the_docker_engine_with_the_event_retry_pauses() -> None:
    config = AgentConfig(timeouts=TimeoutsConfig(events_retry=0.5, events_retry_max=4.0))
    engine = make_engine(Clock(), config)
    assert isinstance(engine, DockerEngine)
    assert verifyObject(IContainerEngine, engine)
    assert (engine._events_retry, engine._events_retry_max) == (0.5, 4.0)


def test_make_engine_refuses_an_unknown_engine() -> None:
    odd = dataclasses.replace(AgentConfig(), runtime=RuntimeConfig(kind="lxc"))
    with pytest.raises(ConfigInvalid, match="unknown container runtime 'lxc'"):
        make_engine(Clock(), odd)
