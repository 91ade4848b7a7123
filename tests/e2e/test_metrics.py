"""
``GET /metrics`` of a real agent (``twistd -n ctrlagent``) driving a real
container, read with ``prometheus_client``'s own text parser: the series
move as the server and the API do, a crash is counted, the token is asked
for, a deleted server's series are gone, and the Panel link's state and
reconnects are seen.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from ctrlagent.testing.panel import FakePanel
from tests.e2e.test_panel_http import create_payload, ok, post, wait_status
from tests.rig.agentproc import AgentProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = None) -> Samples:
    """Every sample of ``url`` as ``{(name, sorted labels): value}`` (prometheus_client parses)."""
    headers = {"Authorization": "Bearer " + token} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def server_ids(samples: Samples) -> set[str]:
    return {dict(labels).get("server_id", "") for _, labels in samples} - {""}


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError("timed out waiting for " + what)


def test_metrics_follow_a_server_and_the_api_and_forget_a_deleted_server(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    url = agent.base_url + "/metrics"
    before = scrape(url)
    assert value(before, "ctrlagent_background_tasks") >= 0
    # The agent process's own figures, from its registry (not the process-global one).
    assert value(before, "process_resident_memory_bytes") > 0
    assert value(before, "process_open_fds") > 0
    assert ("ctrlagent_panel_link_up", ()) not in before  # the link is disabled here

    sid = uuid.uuid4().hex
    payload = create_payload(scripted_image)
    payload["panelId"] = "clx" + uuid.uuid4().hex[:20]
    payload["crashRestart"] = False
    ok(agent, "create_server", sid, **payload)
    wait_status(agent, sid, "offline")
    ok(agent, "start_server", sid)
    wait_status(agent, sid, "running")

    # The state, limits and console figures of the running server.
    running = wait_for(
        lambda: (lambda s: s if value(
            s, "ctrlagent_server_console_lines_total", server_id=sid) > 0 else None)(scrape(url)),
        15, "console lines to be counted",
    )
    assert value(running, "ctrlagent_server_state", server_id=sid, state="running") == 1
    # One state series per server: its current state.
    assert [dict(labels)["state"] for name, labels in running
            if name == "ctrlagent_server_state" and dict(labels)["server_id"] == sid] == ["running"]
    assert value(running, "ctrlagent_server_memory_limit_bytes", server_id=sid) == 64 * 2**20
    assert value(running, "ctrlagent_server_disk_limit_bytes", server_id=sid) == 100 * 2**20
    assert value(running, "ctrlagent_server_crashes_total", server_id=sid) == 0
    # Every label is bounded: the server's name, image and panelId are nowhere.
    text = str(running)
    assert "E2E Survival" not in text and payload["panelId"] not in text
    assert scripted_image not in text

    # The requests above were counted by action, with their latency.
    assert value(running, "ctrlagent_http_requests_total", action="start_server",
                 outcome="ok") >= 1
    assert value(running, "ctrlagent_http_request_duration_seconds_count",
                 action="start_server") >= 1
    # An unknown action is counted as "unknown", never under its own (user-chosen) name.
    status, _ = post(agent, {"action": "no-such-action-" + sid[:6], "serverId": sid})
    assert status == 200
    after = scrape(url)
    assert value(after, "ctrlagent_http_requests_total", action="unknown",
                 outcome="error") >= 1
    assert not any("no-such-action" in str(labels) for _, labels in after)
    # The engine calls the agent made, by operation.
    assert value(after, "ctrlagent_engine_calls_total", operation="create", outcome="ok") >= 1
    assert value(after, "ctrlagent_engine_calls_total", operation="start", outcome="ok") >= 1
    assert value(after, "ctrlagent_engine_call_duration_seconds_count", operation="start") >= 1

    # A restart is counted once the server starts again.
    ok(agent, "restart_server", sid)
    wait_for(lambda: value(scrape(url), "ctrlagent_server_restarts_total", server_id=sid) == 1,
             30, "the restart to be counted")
    wait_for(lambda: value(scrape(url), "ctrlagent_server_state", server_id=sid,
                           state="running") == 1, 30, "the server to run again")

    # A crash (the scripted server exits 3 on "crash 3") is counted.
    ok(agent, "send_server_command", sid, command="crash 3")
    wait_status(agent, sid, "crashed")
    crashed = scrape(url)
    assert value(crashed, "ctrlagent_server_crashes_total", server_id=sid) == 1
    assert value(crashed, "ctrlagent_server_state", server_id=sid, state="crashed") == 1
    assert value(crashed, "ctrlagent_server_uptime_seconds", server_id=sid) == 0
    assert value(crashed, "ctrlagent_server_restarts_total", server_id=sid) == 1

    # A deleted server's series go away.
    ok(agent, "delete_server", sid)
    assert sid not in server_ids(scrape(url))


def test_metrics_ask_for_their_own_token_on_their_own_endpoint(
    make_agent: Callable[..., AgentProcess],
) -> None:
    port = free_port()
    agent = make_agent(
        extra_config='[metrics]\nendpoint = "tcp:{}:interface=127.0.0.1"\n'.format(port),
        env={"CTRLAGENT_METRICS_TOKEN": "scrape-me"},
    ).start()
    own = "http://127.0.0.1:{}/metrics".format(port)
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(own)
    assert refused.value.code == 401
    # The node's secret is not the metrics token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(own, token=agent.secret)
    assert refused.value.code == 401
    samples = scrape(own, token="scrape-me")
    assert ("ctrlagent_background_tasks", ()) in samples
    # Not on the API's port any more.
    with pytest.raises(urllib.error.HTTPError) as missing:
        scrape(agent.base_url + "/metrics", token="scrape-me")
    assert missing.value.code == 404
    # Only /metrics there, and no access log line per scrape.
    with pytest.raises(urllib.error.HTTPError) as other:
        scrape("http://127.0.0.1:{}/api/status".format(port), token="scrape-me")
    assert other.value.code == 404
    assert "GET /metrics" not in agent.log_text()


@pytest_twisted.ensureDeferred
async def test_the_panel_links_state_and_reconnects_are_scraped(
    make_agent: Callable[..., AgentProcess],
) -> None:
    agent = make_agent(
        panel_settings="heartbeat_interval = 0.5\nbackoff_initial = 0.2\nbackoff_max = 1.0"
    )
    panel = FakePanel(reactor, agent.secret)
    port = reactor.listenTCP(0, panel.factory, interface="127.0.0.1")
    try:
        agent.panel_url = "ws://127.0.0.1:{}/agent".format(port.getHost().port)
        agent.start()
        await panel.wait_for_frame("system_info")
        url = agent.base_url + "/metrics"
        first = await deferToThread(scrape, url)
        assert value(first, "ctrlagent_panel_link_up") == 1
        assert value(first, "ctrlagent_panel_link_connections_total") == 1
        assert value(first, "ctrlagent_panel_link_reconnects_total") == 0
        assert ("ctrlagent_panel_outbox_depth", ()) in first
        panel.drop()
        again: Samples = {}
        for _ in range(150):  # the link comes back within its backoff (at most 1 s here)
            again = await deferToThread(scrape, url)
            if value(again, "ctrlagent_panel_link_reconnects_total") >= 1:
                break
            await deferLater(reactor, 0.2, lambda: None)
        assert value(again, "ctrlagent_panel_link_reconnects_total") == 1
        assert value(again, "ctrlagent_panel_link_connections_total") == 2
        assert value(again, "ctrlagent_panel_link_up") == 1
    finally:
        agent.stop()
        await port.stopListening()


def test_console_lines_in_and_dropped_by_the_throttle_are_counted(
    make_agent: Callable[..., AgentProcess], scripted_image: str
) -> None:
    agent = make_agent(
        extra_config="[servers]\nconsole_throttle_lines = 50\nconsole_throttle_interval = 1.0\n"
    ).start()
    sid = uuid.uuid4().hex
    payload = create_payload(scripted_image)
    payload["panelId"] = "clx" + uuid.uuid4().hex[:20]
    payload["environment"] = dict(payload["environment"], FLOOD_LINES=3000)
    ok(agent, "create_server", sid, **payload)
    wait_status(agent, sid, "offline")
    ok(agent, "start_server", sid)
    url = agent.base_url + "/metrics"
    flooded = wait_for(
        lambda: (lambda s: s if value(
            s, "ctrlagent_server_console_lines_dropped_total", server_id=sid) > 0 else None)(
            scrape(url)),
        30, "dropped console lines to be counted",
    )
    read = value(flooded, "ctrlagent_server_console_lines_total", server_id=sid)
    dropped = value(flooded, "ctrlagent_server_console_lines_dropped_total", server_id=sid)
    # Every line read is counted (and kept in the buffer); the throttle's drops are among them.
    assert 0 < dropped < read <= 3000 + 20
