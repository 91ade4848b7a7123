"""
``bench/http_latency.py``'s ``pooled``: several latency batches of one action
read as one run (the percentiles of all their requests together, the rates
and CPU over all of them), with each batch's own p99 kept beside.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tests.rig.benchmods import load


def _http_latency() -> ModuleType:
    return load("http_latency")


def _batch(latencies: list[float], seconds: float, cpu_ms: float, window: list[float]) -> Any:
    bench = _http_latency()
    return {
        "action": "get_server_status",
        "clients": 16,
        "requests": len(latencies),
        "p99_ms": bench.percentile(latencies, 99),
        "per_s": len(latencies) / seconds,
        "cpu_ms_per_request": cpu_ms,
        "cpu_user_ms_per_request": cpu_ms * 0.75,
        "cpu_system_ms_per_request": cpu_ms * 0.25,
        "client_cpu_ms_per_request": 0.05,
        "window": window,
        "latencies_ms": latencies,
    }


def test_the_percentiles_are_over_every_request_of_every_batch() -> None:
    bench = _http_latency()
    # A calm batch, and one where the host stalled for its last 3 requests.
    calm = _batch([1.0] * 100, 0.1, 0.1, [10.0, 10.1])
    stalled = _batch([1.0] * 97 + [20.0] * 3, 0.3, 0.3, [12.0, 12.3])
    run = bench.pooled([calm, stalled])
    assert run["requests"] == 200 and run["batches"] == 2
    assert run["batch_p99_ms"] == [1.0, 20.0]
    # 3 slow requests in 200 are 1.5 %: the pooled p99 is one of them.
    assert run["p99_ms"] == 20.0
    assert run["p50_ms"] == 1.0 and run["max_ms"] == 20.0
    # Rates and CPU over all requests, not averages of the batches' own.
    assert abs(run["per_s"] - 200 / 0.4) < 1e-9
    assert abs(run["cpu_ms_per_request"] - 0.2) < 1e-9
    assert abs(run["cpu_user_ms_per_request"] - 0.15) < 1e-9
    assert run["window"] == [10.0, 12.3]
    assert "latencies_ms" not in run


def test_one_slow_moment_in_many_calm_batches_is_below_the_p99() -> None:
    bench = _http_latency()
    batches = [_batch([1.0] * 100, 0.1, 0.1, [float(i), i + 0.1]) for i in range(4)]
    batches.append(_batch([1.0] * 98 + [20.0] * 2, 0.1, 0.1, [5.0, 5.1]))
    run = bench.pooled(batches)
    # That batch's own p99 is the stall; over 500 requests 2 slow ones are 0.4 %.
    assert run["batch_p99_ms"][-1] == 20.0
    assert run["p99_ms"] == 1.0
