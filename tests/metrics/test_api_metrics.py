"""
The API's side of the metrics, in memory: every command answered over HTTP
is observed once (REST and ``/api/command``, a body that does not parse as
``unknown``), and ``GET /metrics`` is served only when it is given a page.
"""

from __future__ import annotations

import json

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq

from ctrlagent import __version__
from ctrlagent.api import AgentApi
from ctrlagent.api.metrics import MetricsResource
from ctrlagent.metrics import AgentMetrics
from tests.api.conftest import UUID, ApiRig, panel_headers


def api_with(rig: ApiRig, metrics: AgentMetrics, page: bool = True) -> StubTreq:
    api = AgentApi(
        config=rig.config,
        dispatcher=rig.dispatcher,
        servers=rig.servers,
        link_connected=lambda: True,
        docker_ping=rig.docker.ping,
        clock=rig.clock,
        version=__version__,
        tracker=rig.tracker.scope("http"),
        deadlines=rig.deadlines,
        metrics=MetricsResource(metrics.registry, "tok") if page else None,
        observe_command=metrics.observe_request,
    )
    return StubTreq(api.app.resource())


async def scrape(http: StubTreq) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await http.get(
        "http://node.test:8081/metrics", headers={"Authorization": "Bearer tok"}
    )
    assert response.code == 200
    text = (await response.content()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_every_answered_command_is_observed_once_by_action() -> None:
    rig = ApiRig()
    metrics = AgentMetrics(actions=rig.dispatcher.actions())
    http = api_with(rig, metrics)
    base = "http://node.test:8081"
    await http.get(base + "/api/servers", headers=panel_headers())
    await http.post(base + "/api/command", data=json.dumps(
        {"action": "get_server_status", "serverId": UUID}).encode(), headers=panel_headers())
    await http.post(base + "/api/command", data=b"{not json", headers=panel_headers())
    await http.post(base + "/api/servers/{}/power".format(UUID),
                    data=json.dumps({"action": "dance"}).encode(), headers=panel_headers())
    got = await scrape(http)

    def count(action: str, outcome: str) -> float:
        key = (("action", action), ("outcome", outcome))
        return got.get(("ctrlagent_http_requests_total", key), 0.0)

    assert count("list_servers", "ok") == 1
    assert count("get_server_status", "error") == 1  # SERVER_NOT_FOUND: answered, not ok
    assert count("unknown", "error") == 2  # the unparseable body and the bad power word
    assert got[("ctrlagent_http_request_duration_seconds_count",
                (("action", "list_servers"),))] == 1


@pytest_twisted.ensureDeferred
async def test_metrics_are_not_found_on_the_api_when_served_elsewhere() -> None:
    rig = ApiRig()
    http = api_with(rig, AgentMetrics(), page=False)
    response = await http.get("http://node.test:8081/metrics")
    assert response.code == 404
    assert json.loads(await response.content())["code"] == "NOT_FOUND"
