"""
The agent as a whole: ``twistd -n ctrlagent`` started as the operator does.

These tests only use what an operator or the Panel can see: the process, its
exit code, its log and its HTTP answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from ctrlagent.tap import Options
from tests.rig.agentproc import ROOT, AgentProcess, _twistd

pytestmark = pytest.mark.e2e


def test_health_answers_the_panel_probe(agent_process: AgentProcess) -> None:
    health = agent_process.health()
    assert health["status"] == "healthy"
    assert health["docker"] is True
    assert health["nodeId"] == "e2e-node"
    # The WebSocket link is disabled here, so the Panel must see it as connected.
    assert health["connected"] is True
    assert isinstance(health["uptimeSeconds"], (int, float))
    assert isinstance(health["uptime"], str)
    assert health["version"]


def test_status_needs_the_secret(agent_process: AgentProcess) -> None:
    request = urllib.request.Request(agent_process.base_url + "/api/status")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401
    assert "error" in json.loads(refused.value.read())
    request = urllib.request.Request(
        agent_process.base_url + "/api/status", headers=agent_process.headers()
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        status = json.loads(response.read())
    assert status["online"] is True
    assert status["serverCount"] == 0


def test_sigterm_shuts_down_cleanly(agent_process: AgentProcess) -> None:
    # twistd re-raises SIGTERM after a clean shutdown, so the exit status is
    # "killed by SIGTERM", which systemd counts as a clean stop.
    assert agent_process.stop() in (0, -15)
    log = agent_process.log_text()
    assert "Server Shut Down." in log
    assert "Traceback" not in log
    assert "Main loop terminated." in log


def test_health_reports_a_dead_docker_engine_with_503(
    make_agent: Callable[..., AgentProcess], private_docker: Callable[[], object]
) -> None:
    engine = private_docker()
    agent = make_agent()
    agent.docker_host = engine.host  # type: ignore[attr-defined]
    agent.start()
    assert agent.health()["docker"] is True
    engine.kill_engine()  # type: ignore[attr-defined]
    # /health caches the engine probe briefly; within a few seconds it must tell.
    import time

    deadline = time.monotonic() + 10
    health = agent.health()
    while health["docker"] and time.monotonic() < deadline:
        time.sleep(0.2)
        health = agent.health()
    assert health["docker"] is False
    with pytest.raises(urllib.error.HTTPError) as unavailable:
        urllib.request.urlopen(agent.base_url + "/health", timeout=5)
    assert unavailable.value.code == 503
    # ...and the agent keeps serving: the engine comes back, so does health.
    engine.start()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15
    while not agent.health()["docker"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent.health()["docker"] is True


def test_help_lists_every_option() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [_twistd(), "-n", "ctrlagent", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    for long_name, *_ in Options.optParameters + Options.optFlags:
        assert "--" + long_name in out


def test_bad_option_value_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), AGENT_SECRET="s")
    result = subprocess.run(
        [_twistd(), "-n", "--pidfile=", "ctrlagent", "--docker-host", "nonsense"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        check=False,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "docker.host" in result.stderr
