"""
The node actions: ping, the host's figures and status.
"""

from __future__ import annotations

from tests.actions.rig import Rig


def test_ping_answers_pong_with_a_timestamp(rig: Rig) -> None:
    data = rig.ok("system.ping")
    assert data["message"] == "pong"
    assert data["timestamp"].endswith("Z")


def test_system_metrics_and_status(rig: Rig) -> None:
    rig.created()
    data = rig.ok("get_system_metrics")
    assert data["cpu"] == 12.5
    assert data["memory"]["total"] > data["memory"]["used"]
    assert data["serverCount"] == 1
    assert data["timestamp"]
    status = rig.ok("system.status")
    assert status["status"] == "online" and status["serverCount"] == 1
    assert rig.ok("system.info")["nodeId"] == "node-1"
