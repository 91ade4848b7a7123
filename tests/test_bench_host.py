"""
``bench/scale.py``'s account of the host's CPU: how busy all its cores were,
and how much the hypervisor took, over the spans the benchmark measured.
"""

from __future__ import annotations

import time
from typing import Any

from tests.rig.benchmods import load


def test_the_host_ticks_only_grow_and_busy_is_within_the_whole() -> None:
    scale = load("scale")
    before = scale.host_ticks()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # some work of our own, bounded
        pass
    time.sleep(0.05)
    after = scale.host_ticks()
    busy, steal, total = (b - a for a, b in zip(before, after, strict=True))
    assert total > 0
    assert 0 <= steal <= busy <= total


def test_spans_add_up_in_percent_of_all_cores() -> None:
    scale = load("scale")
    share = scale.HostShare()
    assert share.percent() == {"busy": 0.0, "steal": 0.0}
    share.span((100, 0, 1000), (150, 1, 1100))  # 50 of 100 busy, 1 stolen
    share.span((0, 0, 0), (30, 1, 100))  # 30 of 100, 1 stolen
    assert share.percent() == {"busy": 40.0, "steal": 1.0}
    assert scale._host_note({"host": share.percent()}) == (
        "; the host's cores 40 % busy, 1.0 % stolen")
    assert scale._host_note({}) == ""


def test_latency_runs_pool_each_read_and_client_count_with_its_floor(monkeypatch: Any) -> None:
    scale = load("scale")
    http_latency = load("http_latency")
    monkeypatch.setattr(scale, "BATCH_GAP_SECONDS", 0.0)
    asked: list[tuple[str, int]] = []

    def batch(action: str, clients: int) -> dict[str, Any]:
        asked.append((action, clients))
        return http_latency.figures(
            action, clients, [1.0, 2.0, float(clients)], per_s=100.0, user_ms=3.0,
            system_ms=0.0, client_ms=1.5, window=[0.0, 0.03], keep=True)

    def floor(clients: int) -> dict[str, Any]:
        asked.append(("floor", clients))
        return {**batch("floor", clients), "action": "floor"}

    runs, floors = scale.latency_runs(batch, floor, 2)
    reads = [a for a in asked if a[0] != "floor"]
    assert reads == [(a, c) for c in (1, 16) for _ in range(2) for a in scale.ACTIONS]
    assert [(r["action"], r["clients"], r["requests"], r["batches"]) for r in runs] == [
        (a, c, 6, 2) for c in (1, 16) for a in scale.ACTIONS]
    assert all(set(r["host"]) == {"busy", "steal"} for r in runs)
    assert [(f["clients"], f["requests"]) for f in floors] == [(1, 6), (16, 6)]
    assert runs[0]["cpu_ms_per_request"] == 1.0 and runs[0]["client_cpu_ms_per_request"] == 0.5
