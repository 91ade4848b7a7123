"""
The server actions: create, power, suspend, reinstall, update, delete, status and metrics.
"""

from __future__ import annotations

from typing import Any

import pytest

from ctrlagent.wire.command import ActionResult
from ctrlagent.wire.json import to_json
from ctrlagent.wire.servers import coerce_metrics
from tests.actions.rig import PANEL_ID, UUID, Rig


def test_create_then_either_id_reaches_the_same_server(rig: Rig) -> None:
    data = rig.created()
    assert data["serverId"] == UUID
    assert data["status"] == "offline"
    assert rig.ok("get_server_status", PANEL_ID)["serverId"] == UUID
    assert rig.ok("get_status", UUID)["panelStatus"] == "OFFLINE"
    # the container name resolves as well
    assert rig.ok("get_status", "ctrl-alt-play-" + UUID)["serverId"] == UUID


def test_create_needs_a_server_id_and_an_image(rig: Rig) -> None:
    err = rig.error("create_server", None, image="x")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "serverId")
    err = rig.error("create_server", UUID, name="x")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "image")
    err = rig.error("create_server", UUID, image=42)
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "image")


@pytest.mark.parametrize(
    "field,value",
    [
        ("environment", "A=1"),
        ("limits", [512]),
        ("ports", {"internal": 1}),
        ("skipScripts", "maybe"),
        ("startup", 12),
        ("aliases", "abc"),
    ],
)
def test_create_names_the_wrongly_typed_field(rig: Rig, field: str, value: Any) -> None:
    err = rig.error("create_server", UUID, image="img", **{field: value})
    assert err.code == "INVALID_PAYLOAD"
    assert err.details["field"] == field


def test_second_create_of_the_same_id_or_alias_conflicts(rig: Rig) -> None:
    rig.created()
    assert rig.error("create_server", UUID, image="img").code == "CONFLICT"
    assert rig.error("create_server", PANEL_ID, image="img").code == "CONFLICT"


def test_slow_create_answers_installing_in_time_and_finishes_later(rig: Rig) -> None:
    gate = rig.servers.hold("create")
    d = rig.start("create_server", UUID, image="img", panelId=PANEL_ID)
    assert not d.called
    rig.clock.advance(24)
    assert not d.called
    rig.clock.advance(1)
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert isinstance(answered[0], ActionResult)
    assert answered[0].data["status"] == "installing"
    assert answered[0].data["pending"] is True
    assert rig.ok("get_status", PANEL_ID)["status"] == "installing"
    assert len(rig.tracker) == 1
    gate.callback(None)
    assert len(rig.tracker) == 0
    assert rig.ok("get_status", PANEL_ID)["status"] == "offline"


def test_power_cycle(rig: Rig) -> None:
    rig.created()
    assert rig.ok("start_server", UUID)["status"] == "running"
    assert rig.ok("get_server_status", PANEL_ID)["panelStatus"] == "RUNNING"
    assert rig.ok("restart_server", UUID)["status"] == "running"
    assert rig.ok("stop_server", UUID, signal="SIGTERM", timeout=30)["status"] == "offline"
    assert rig.ok("start_server", PANEL_ID)["status"] == "running"
    assert rig.ok("kill_server", UUID)["status"] == "offline"
    assert [c for c in rig.servers.calls if c[0] in ("start", "stop", "kill")] == [
        ("start", UUID),
        ("stop", UUID),
        ("start", UUID),
        ("stop", UUID),
        ("start", UUID),
        ("kill", UUID),
    ]


def test_stop_with_sigkill_kills(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    rig.servers.hold("stop")  # a graceful stop would hang; a kill must not
    assert rig.ok("stop_server", UUID, signal="SIGKILL", timeout=5)["status"] == "offline"
    assert ("kill", UUID) in rig.servers.calls


def test_stop_signal_is_normalised_and_checked(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    assert rig.ok("stop_server", UUID, signal="kill")["status"] == "offline"
    rig.ok("start_server", UUID)
    err = rig.error("stop_server", UUID, signal="SIG KILL; rm")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "signal")
    err = rig.error("stop_server", UUID, timeout="soon")
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "timeout")
    err = rig.error("stop_server", UUID, timeout=-1)
    assert err.details["field"] == "timeout"


def test_long_stop_answers_stopping_and_finishes_in_the_background(rig: Rig) -> None:
    events: list[Any] = []
    rig.servers.add_listener(events.append)
    rig.created()
    rig.ok("start_server", UUID)
    gate = rig.servers.hold("stop")
    d = rig.start("stop_server", UUID, timeout=600)
    rig.clock.advance(25)
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert answered[0].data["status"] == "stopping"
    assert answered[0].data["panelStatus"] == "STOPPING"
    # a second power action while the first is under way is a conflict
    assert rig.error("restart_server", UUID).code == "CONFLICT"
    gate.callback(None)
    assert rig.ok("get_status", UUID)["status"] == "offline"
    assert [e.current for e in events if hasattr(e, "current")][-2:] == ["stopping", "offline"]


def test_concurrent_power_action_conflicts(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    gate = rig.servers.hold("stop")
    d = rig.start("stop_server", UUID)
    assert rig.error("restart_server", PANEL_ID).code == "CONFLICT"
    gate.callback(None)
    assert d.called


def test_kill_never_removes_the_server(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    rig.ok("kill_server", PANEL_ID)
    assert rig.ok("list_servers")["count"] == 1


def test_delete_removes_and_optionally_purges(rig: Rig) -> None:
    rig.created()
    rig.created("other", panelId="other-panel")
    rig.ok("delete_server", PANEL_ID)
    assert rig.servers.purged == []
    assert rig.error("get_status", UUID).code == "SERVER_NOT_FOUND"
    rig.ok("delete_server", "other", purgeFiles=True)
    assert rig.servers.purged == ["other"]
    assert rig.ok("list_servers") == {"servers": [], "count": 0}


def test_delete_purge_flag_must_be_boolean(rig: Rig) -> None:
    rig.created()
    assert (
        rig.error("delete_server", UUID, purgeFiles="yes please").details["field"] == "purgeFiles"
    )


def test_power_server_maps_its_action(rig: Rig) -> None:
    rig.created()
    assert rig.ok("power_server", UUID, action="start")["status"] == "running"
    assert rig.ok("server_power", UUID, action="kill")["status"] == "offline"
    assert rig.error("power_server", UUID, action="explode").details["field"] == "action"


def test_suspend_refuses_starts_until_unsuspended(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    assert rig.ok("suspend_server", UUID)["status"] == "suspended"
    assert rig.error("start_server", UUID).code == "CONFLICT"
    rig.ok("unsuspend_server", UUID)
    assert rig.ok("start_server", UUID)["status"] == "running"


def test_reinstall_and_update(rig: Rig) -> None:
    rig.created()
    assert rig.ok("reinstall_server", UUID)["status"] == "offline"
    rig.ok("update_server", UUID, startup="./other.sh", limits={"memory": 1024})
    assert rig.servers.servers[UUID].params["limits"] == {"memory": 1024}
    assert rig.error("update_server", UUID, limits=5).details["field"] == "limits"


def test_list_servers_is_an_empty_list_not_null(rig: Rig) -> None:
    assert rig.ok("list_servers") == {"servers": [], "count": 0}
    rig.created()
    data = rig.ok("list_servers")
    assert data["count"] == 1
    assert data["servers"][0]["serverId"] == UUID


def test_metrics_are_zero_with_network_when_stopped(rig: Rig) -> None:
    rig.created()
    data = rig.ok("get_server_metrics", PANEL_ID)
    assert data["cpu"] == 0.0 and data["memory"] == 0.0 and data["disk"] == 0.0
    assert data["network"] == {"in": 0, "out": 0}
    assert data["players"] == 0 and isinstance(data["players"], int)
    assert data["timestamp"]


def test_metrics_coerce_to_the_panel_shape(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    rig.servers.set_metrics(
        UUID, {"cpu": "33.5", "memory": 256, "disk": 12.25, "players": 3.0, "network": None}
    )
    data = rig.ok("get_server_metrics", PANEL_ID)
    assert data["cpu"] == 33.5 and isinstance(data["cpu"], float)
    assert data["memory"] == 256.0 and isinstance(data["memory"], float)
    assert data["players"] == 3 and isinstance(data["players"], int)
    assert data["network"] == {"in": 0, "out": 0}


def test_metrics_coercion_never_drops_network() -> None:
    out = to_json(coerce_metrics({"network": {"in": "10", "out": 2.9}, "players": None}, 0.0))
    assert out["network"] == {"in": 10, "out": 2}
    assert out["players"] == 0
