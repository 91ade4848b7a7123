"""
The metrics' parts in memory: bounded labels, the engine seam's wrapper over
the fake engine, the event-counted crashes and restarts, the token check.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from ctrlagent.api.metrics import MetricsResource
from ctrlagent.engine.interface import IContainerEngine
from ctrlagent.errors import NotFound
from ctrlagent.events import ServerRemoved, StatusChanged
from ctrlagent.metrics import AgentMetrics, MeteredEngine
from ctrlagent.metrics.servers import ServerCounters
from ctrlagent.testing.engine import FakeEngine


def samples(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_an_action_outside_the_fixed_table_is_counted_as_unknown() -> None:
    metrics = AgentMetrics(actions=["start_server"])
    metrics.observe_request("start_server", 0.01, True)
    metrics.observe_request("../../etc/passwd", 0.01, False)
    metrics.observe_request(None, 0.0, False)
    got = samples(metrics)
    assert got[("ctrlagent_http_requests_total",
                (("action", "start_server"), ("outcome", "ok")))] == 1
    unknown = (("action", "unknown"), ("outcome", "error"))
    assert got[("ctrlagent_http_requests_total", unknown)] == 2
    assert not any("passwd" in str(key) for key in got)


def test_each_label_set_is_looked_up_once_however_many_answers_it_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = AgentMetrics(actions=["get_server_status"])
    looked_up: list[tuple[str, ...]] = []
    for family in (metrics.http_requests, metrics.http_latency, metrics.engine_calls,
                   metrics.engine_latency):
        original = family.labels

        def counting(*values: str, _original: Any = original) -> Any:
            looked_up.append(values)
            return _original(*values)

        monkeypatch.setattr(family, "labels", counting)
    for _ in range(50):
        metrics.observe_request("get_server_status", 0.002, True)
        metrics.observe_engine("inspect", 0.003, True)
    metrics.observe_request("get_server_status", 0.5, False)
    assert sorted(looked_up) == sorted([
        ("get_server_status", "ok"), ("get_server_status",),
        ("inspect", "ok"), ("inspect",),
        ("get_server_status", "error"), ("get_server_status",),
    ])
    got = samples(metrics)
    status = (("action", "get_server_status"),)
    assert got[("ctrlagent_http_requests_total", status + (("outcome", "ok"),))] == 50
    assert got[("ctrlagent_http_requests_total", status + (("outcome", "error"),))] == 1
    assert got[("ctrlagent_http_request_duration_seconds_count", status)] == 51
    inspect = (("operation", "inspect"), ("outcome", "ok"))
    assert got[("ctrlagent_engine_calls_total", inspect)] == 50


def test_two_agents_never_share_series() -> None:
    one, two = AgentMetrics(actions=["a"]), AgentMetrics(actions=["a"])
    one.observe_request("a", 0.1, True)
    assert ("ctrlagent_http_requests_total", (("action", "a"), ("outcome", "ok"))) not in samples(
        two
    )


@pytest_twisted.ensureDeferred
async def test_the_engine_wrapper_counts_and_times_every_call_and_its_failures() -> None:
    clock = Clock()
    seen: list[tuple[str, float, bool]] = []
    engine = MeteredEngine(FakeEngine(clock), lambda *call: seen.append(call), clock)
    verifyObject(IContainerEngine, engine)
    assert engine.name == FakeEngine(clock).name
    assert await engine.ping() is True
    with pytest.raises(NotFound):
        await engine.inspect("no-such-container")
    assert [(op, ok) for op, _, ok in seen] == [("ping", True), ("inspect", False)]


def test_crashes_and_restarts_are_counted_and_forgotten_with_the_server() -> None:
    server = SimpleNamespace(power=None)
    manager: Any = SimpleNamespace(servers={"s1": server})
    counters = ServerCounters(manager)
    counters(StatusChanged("s1", "running", "crashed", 0.0))
    server.power = "crash-restart"
    counters(StatusChanged("s1", "crashed", "starting", 1.0))
    server.power = None
    counters(StatusChanged("s1", "offline", "starting", 2.0))  # a plain start
    assert (counters.crashes, counters.restarts) == ({"s1": 1}, {"s1": 1})
    counters(ServerRemoved("s1"))
    assert (counters.crashes, counters.restarts) == ({}, {})


@pytest.mark.parametrize(
    ("token", "header", "status"),
    [
        ("", None, 200),
        ("t0ken", None, 401),
        ("t0ken", b"Bearer wrong", 401),
        ("t0ken", b"Basic t0ken", 401),
        ("t0ken", b"Bearer t0ken", 200),
    ],
)
def test_the_metrics_page_asks_for_its_token_when_one_is_set(
    token: str, header: bytes | None, status: int
) -> None:
    metrics = AgentMetrics()
    page = MetricsResource(metrics.registry, token)
    request = DummyRequest([b"metrics"])
    if header is not None:
        request.requestHeaders.addRawHeader(b"authorization", header)
    body = page.render_GET(request)  # type: ignore[arg-type]
    assert (request.responseCode or 200) == status
    if status == 200:
        assert b"ctrlagent_http_requests" in body
