"""
The server domain's records on the wire (``ctrlagent.wire.servers``): each
one's JSON shape is exactly the keys the Panel reads, optional keys are left
out when they have nothing to say, and ``coerce_metrics`` turns any mapping
into a record the one encoder can write.
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.wire.json import encode, to_json
from ctrlagent.wire.servers import (
    Ack,
    ConsoleStatus,
    CrashReport,
    Created,
    Deleted,
    Metrics,
    ServerBrief,
    ServerStatus,
    Updated,
    coerce_metrics,
    coerced_as_is,
)

AT = 1_795_000_000.25  # 2026-11-18T11:06:40.250Z
METRICS = Metrics(cpu=12.5, memory_mb=50.0, memory_limit_mb=64.0, disk_mb=1.5, rx=100, tx=200,
                  blk_read=3, blk_write=4, pids=5, uptime=9.5, players=0, at=AT)


def test_metrics_have_the_panels_keys_and_a_millisecond_timestamp() -> None:
    assert to_json(METRICS) == {
        "cpu": 12.5, "memory": 50.0, "memoryLimit": 64.0, "disk": 1.5,
        "network": {"in": 100, "out": 200}, "blockIo": {"read": 3, "write": 4},
        "pids": 5, "uptime": 9.5, "players": 0, "timestamp": "2026-11-18T11:06:40.250Z",
    }


def test_a_status_leaves_out_what_it_has_nothing_to_say_about() -> None:
    status = ServerStatus("s1", "Survival", "offline", "OFFLINE", None, "offline", "img:1",
                          aliases=("panel-1",))
    assert to_json(status) == {
        "serverId": "s1", "name": "Survival", "status": "offline", "panelStatus": "OFFLINE",
        "containerId": None, "desiredState": "offline", "image": "img:1",
        "aliases": ["panel-1"],
    }


def test_a_status_carries_resources_uptime_error_crash_and_power_action_when_set() -> None:
    crash = CrashReport(at=AT, exit_code=2, oom_killed=False, lines=("> crash 2",),
                        restarted=True)
    status = ServerStatus("s1", "Survival", "running", "RUNNING", "c" * 64, "running", "img:1",
                          error="crashed with exit code 2", resources=METRICS, uptime=9.5,
                          last_crash=crash, power_action="stop")
    data = to_json(status)
    assert data["resources"] == to_json(METRICS)
    assert data["uptime"] == 9.5 and data["error"] == "crashed with exit code 2"
    assert data["powerAction"] == "stop"
    assert data["lastCrash"] == {"timestamp": "2026-11-18T11:06:40.250Z", "exitCode": 2,
                                 "oomKilled": False, "lines": ["> crash 2"], "restarted": True}


def test_the_answers_of_actions_have_todays_keys() -> None:
    brief = ServerBrief("s1", "stopping", "STOPPING", "c1")
    assert to_json(brief) == {"serverId": "s1", "status": "stopping", "panelStatus": "STOPPING",
                              "containerId": "c1"}
    assert to_json(Created("s1", None, "installing")) == {
        "serverId": "s1", "containerId": None, "status": "installing"}
    assert to_json(Deleted("s1", True)) == {"serverId": "s1", "status": "deleted",
                                            "purged": True}
    assert to_json(Updated(brief, True)) == {**to_json(brief), "limitsAppliedLive": True}
    assert to_json(Ack("s1")) == {"serverId": "s1"}
    assert to_json(ConsoleStatus(True, AT, 3)) == {
        "connected": True, "lastActivity": "2026-11-18T11:06:40.250Z", "bufferSize": 3}
    assert to_json(ConsoleStatus(False, None, 0))["lastActivity"] is None


def test_records_inside_lists_and_mappings_become_json_for_the_one_encoder() -> None:
    listing = {"servers": [ServerBrief("s1", "offline", "OFFLINE", None)], "count": 1}
    assert json.loads(encode(to_json(listing))) == {"servers": [{
        "serverId": "s1", "status": "offline", "panelStatus": "OFFLINE", "containerId": None}],
        "count": 1}


ODD = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                     st.integers(), max_size=2))
KEYS = st.sampled_from(["cpu", "memory", "memoryLimit", "disk", "network", "blockIo", "pids",
                        "uptime", "players", "timestamp", "other"])


@given(st.dictionaries(KEYS, ODD | st.fixed_dictionaries({"in": ODD, "out": ODD})))
def test_any_metrics_mapping_coerces_to_numbers_the_panel_parses(raw: dict[str, Any]) -> None:
    metrics = coerce_metrics(raw, AT)
    data = json.loads(encode(to_json(metrics)))
    assert set(data["network"]) == {"in", "out"} and set(data["blockIo"]) == {"read", "write"}
    assert isinstance(data["players"], int) and isinstance(data["network"]["in"], int)
    for key in ("cpu", "memory", "memoryLimit", "disk", "uptime"):
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
    assert data["timestamp"].endswith("Z")


def test_coercion_keeps_good_values_and_a_stamped_time() -> None:
    metrics = coerce_metrics({"cpu": "33.5", "memory": 256, "players": 3.0, "network": None,
                              "timestamp": "2026-11-18T11:06:40.250Z"}, 0.0)
    assert (metrics.cpu, metrics.memory_mb, metrics.players) == (33.5, 256.0, 3)
    assert (metrics.rx, metrics.tx) == (0, 0)
    assert metrics.at == AT
    assert coerce_metrics({}, AT) == Metrics(at=AT)


_FIGURE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**60), 2**60),
    st.booleans(),
    st.sampled_from([0.0, 1.5, 2**53 - 1, 2**53, -(2**53) + 1, 1e300]),
)
_WHEN = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 2**40),
    st.booleans(),
    st.floats(0, 253_402_300_799.0),
    st.sampled_from([0.0, 1_790_000_000.0005, 1_790_000_000.9995, 253_402_300_799.0]),
)


@given(st.lists(_FIGURE, min_size=11, max_size=11), _WHEN)
def test_a_record_said_to_coerce_as_is_has_the_very_shape_coercion_gives(
    figures: list[Any], at: float
) -> None:
    # What the metrics action relies on to skip the round trip: the answer
    # is byte for byte the one the round trip gives.
    record = Metrics(*figures, at=at)
    shape = to_json(record)
    if coerced_as_is(record):
        assert encode(shape) == encode(to_json(coerce_metrics(shape, 0.0)))


def test_the_agents_own_figures_coerce_as_is_and_odd_ones_do_not() -> None:
    own = Metrics(cpu=12.5, memory_mb=64.0, memory_limit_mb=128.0, disk_mb=0.5, rx=10, tx=20,
                  blk_read=0, blk_write=4096, pids=3, uptime=60.0, players=0, at=AT)
    assert coerced_as_is(own)
    assert not coerced_as_is(Metrics(cpu=math.nan, at=AT))
    assert not coerced_as_is(Metrics(cpu=1, at=AT))  # type: ignore[arg-type]
    assert not coerced_as_is(Metrics(rx=2**60, at=AT))
    assert not coerced_as_is(Metrics(pids=True, at=AT))
    assert not coerced_as_is(Metrics(at=-1.0))
    assert not coerced_as_is(Metrics(at="2026-01-01T00:00:00Z"))  # type: ignore[arg-type]
