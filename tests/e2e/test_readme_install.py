"""
The README's install steps, followed literally, give a node the current Panel
reports online (issue 12, item 3).

The test reads the steps from README.md ("Installing on a node"): the
environment file its ``printf`` writes, the ``agent.toml`` it copies from
``packaging/agent.toml.example`` and the command line of the systemd unit it
installs (``packaging/ctrlagent.service``), and runs that ``twistd`` as a
subprocess.  The only changes are the ones this shared test machine needs:
paths under a temp directory instead of ``/etc`` and ``/var/lib``, the
session's Docker engine, and loopback ports nobody else uses (``HEALTH_PORT``,
``--bind``, the SFTP endpoint).  Then it judges ``/health`` exactly as the
Panel's discovery does (``agentDiscoveryService.ts``): accepted when the answer
is 2xx JSON with ``nodeId`` truthy or ``status == "healthy"``, online when
``status == "healthy" && connected !== false``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.rig.agentproc import ROOT, _twistd, free_port, remove_containers_under
from tests.rig.processes import spawn_logged, stop_process, wait_until_ready

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
UNIT = ROOT / "packaging" / "ctrlagent.service"
EXAMPLE = ROOT / "packaging" / "agent.toml.example"


def install_steps() -> list[str]:
    """The shell lines of the README's install block."""
    text = README.read_text()
    section = text.split("## Installing on a node", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def readme_environment() -> dict[str, str]:
    """What the README's ``printf ... > /etc/ctrlagent/env`` writes, as KEY=VALUE pairs."""
    (line,) = [line for line in install_steps() if line.rstrip().endswith("> /etc/ctrlagent/env")]
    words = shlex.split(line)
    assert words[0] == "printf", line
    written = words[1].replace("\\n", "\n")
    env: dict[str, str] = {}
    for entry in written.splitlines():
        if entry.strip():
            key, _, value = entry.partition("=")
            env[key] = value
    return env


def unit_command() -> list[str]:
    """The systemd unit's ``ExecStart``, split as systemd does for these plain words."""
    assert any("packaging/ctrlagent.service" in line for line in install_steps())
    (line,) = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.partition("=")[2])


def panel_discovery(url: str) -> tuple[bool, bool, dict[str, Any]]:
    """``(accepted, online, body)`` as the Panel's discovery judges ``GET /health``."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            code, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        return False, False, {"httpStatus": e.code}
    body = json.loads(raw)
    accepted = 200 <= code < 300 and bool(body.get("nodeId") or body.get("status") == "healthy")
    online = accepted and body.get("status") == "healthy" and body.get("connected") is not False
    return accepted, online, body


class ReadmeAgent:
    """The agent installed the README's way, under ``workdir``."""

    def __init__(self, workdir: Path, docker_host: str, extra_env: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.node_id = "3f1c2a9e-7b7d-4d2b-9a51-0c7e5d1e8a42"
        self.secret = secrets.token_urlsafe(24)
        self.log_path = workdir / "agent.log"
        etc = workdir / "etc"
        etc.mkdir(parents=True)
        state = workdir / "var-lib-ctrlagent"
        self.data_dir = state / "servers"
        secret_file = etc / "secret"
        secret_file.write_text(self.secret + "\n")
        secret_file.chmod(0o600)
        config = etc / "agent.toml"
        shutil.copy(EXAMPLE, config)  # cp packaging/agent.toml.example /etc/ctrlagent/agent.toml

        env = {
            key: value.replace("/etc/ctrlagent/secret", str(secret_file)).replace(
                "<node uuid>", self.node_id
            )
            for key, value in readme_environment().items()
        }
        env.update(extra_env)
        # This machine's share: its own engine and ports, never 8081/2022 of others.
        env.update(
            DOCKER_HOST=docker_host,
            HEALTH_PORT=str(self.port),
            CTRLAGENT_SFTP_ENDPOINT="tcp:0:interface=127.0.0.1",
            PYTHONPATH=str(ROOT),
            PATH=os.environ.get("PATH", "/usr/bin:/bin"),
        )
        self.env = env
        argv = [
            word.replace("/etc/ctrlagent/agent.toml", str(config))
            .replace("/var/lib/ctrlagent/servers", str(state / "servers"))
            .replace("/var/lib/ctrlagent", str(state))
            for word in unit_command()
        ]
        assert argv[0] == "/opt/ctrlagent/bin/twistd"
        self.argv = [_twistd(), *argv[1:], "--bind", "127.0.0.1"]
        self.process: Any = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:{}".format(self.port)

    def start(self) -> ReadmeAgent:
        self.process = spawn_logged(self.argv, self.log_path, cwd=str(self.workdir), env=self.env)

        def answers() -> bool:
            try:
                panel_discovery(self.url)
            except (OSError, ValueError):
                return False
            return True

        wait_until_ready(self.process, answers, 30, "the agent", self.log_path)
        return self

    def call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """An authenticated call as the Panel makes it (Bearer daemon token)."""
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/plain, */*",
                "Authorization": "Bearer " + self.secret,
            },
            method="GET" if body is None else "POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        stop_process(self.process, timeout=30)
        self.process = None


@pytest.fixture
def readme_agent(tmp_path: Path, docker_engine: Any) -> Any:
    agents: list[ReadmeAgent] = []

    def make(**extra_env: str) -> ReadmeAgent:
        agent = ReadmeAgent(tmp_path / "agent{}".format(len(agents)), docker_engine.host, extra_env)
        agents.append(agent)
        return agent.start()

    yield make
    for agent in agents:
        if agent.process is not None:
            agent.stop()
        remove_containers_under(docker_engine.host, agent.data_dir)


def test_the_readme_install_sets_no_panel_websocket_the_current_panel_lacks() -> None:
    env = readme_environment()
    assert set(env) >= {"AGENT_SECRET_FILE", "NODE_ID"}
    assert "PANEL_URL" not in env
    example = EXAMPLE.read_text()
    assert re.search(r'^url = "', example, re.M) is None  # the example dials nothing


def test_installed_the_readme_way_the_panel_discovers_the_node_online(readme_agent: Any) -> None:
    agent = readme_agent()
    accepted, online, health = panel_discovery(agent.url)
    assert (accepted, online) == (True, True), health
    assert health["nodeId"] == agent.node_id
    assert health["panelLink"]["enabled"] is False and health["panelLink"]["state"] == "disabled"
    status = agent.call("/api/status")
    assert status["online"] is True and status["panelLink"]["enabled"] is False
    # And the Panel can command it: a command answers over HTTP.
    listed = agent.call("/api/command", {"action": "list_servers"})
    assert listed["success"] is True and listed["data"]["servers"] == []
    assert "no WebSocket link" in agent.log_path.read_text()


def readme_alias_call() -> str:
    """The README's curl call that records a server's second id (its "Connecting the Panel")."""
    section = README.read_text().split("## Connecting the Panel", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    assert "/aliases" in block and block.lstrip().startswith("curl ")
    return block.replace("\\\n", " ")


def test_the_readme_alias_call_makes_the_panels_second_id_work(
    readme_agent: Any, scripted_image: str
) -> None:
    agent = readme_agent()
    uuid, panel_id = "3f2b8c1e9d4a4b7f8e6c5d4b3a291807", "clx9k2m4p0000abcd1234efgh"
    created = agent.call("/api/command", {
        "action": "create_server", "serverId": uuid,
        "payload": {"name": "Survival", "image": scripted_image, "startup": "./run.sh",
                    "environment": {}, "limits": {"memory": 64, "swap": 0, "disk": 100,
                                                  "cpu": 50, "io": 500}, "skipScripts": True},
    })
    assert created["success"] is True, created
    try:
        before = agent.call("/api/command", {"action": "list_files", "serverId": panel_id})
        assert before["code"] == "SERVER_NOT_FOUND"
        # The README's command, word for word but for its placeholders and this agent's port.
        command = (
            readme_alias_call()
            .replace("<server uuid>", uuid)
            .replace("<server id>", panel_id)
            .replace("/etc/ctrlagent/secret", str(agent.workdir / "etc" / "secret"))
            .replace("127.0.0.1:8081", "127.0.0.1:{}".format(agent.port))
        )
        out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        answer = json.loads(out)
        assert answer["success"] is True and answer["data"]["aliases"] == [panel_id], answer
        files = agent.call("/api/command", {"action": "list_files", "serverId": panel_id})
        assert files["success"] is True and files["data"]["serverId"] == uuid
        again = json.loads(subprocess.run(["sh", "-c", command.replace(uuid, "nobody")],
                                          capture_output=True, text=True, timeout=30).stdout)
        assert again["code"] == "SERVER_NOT_FOUND"
    finally:
        agent.call("/api/command", {"action": "delete_server", "serverId": uuid,
                                    "payload": {"purgeFiles": True}})


def test_with_an_unreachable_panel_websocket_the_node_stays_online_and_shows_the_link(
    readme_agent: Any,
) -> None:
    # An operator who also set PANEL_URL (an older Panel's WebSocket) that nothing answers.
    dead = "ws://127.0.0.1:{}/agent".format(free_port())
    agent = readme_agent(PANEL_URL=dead)
    accepted, online, health = panel_discovery(agent.url)
    assert (accepted, online) == (True, True), health
    link = health["panelLink"]
    for _ in range(100):
        if link["lastError"] is not None:
            break
        time.sleep(0.1)
        link = panel_discovery(agent.url)[2]["panelLink"]
    assert (link["enabled"], link["connected"], link["state"]) == (True, False, "disconnected")
    assert link["url"] == dead and link["lastError"].startswith("could not connect")
    assert link["since"].endswith("Z")
    status = agent.call("/api/status")
    assert status["online"] is True and status["panelLink"]["state"] == "disconnected"
    listed = agent.call("/api/command", {"action": "list_servers"})
    assert listed["success"] is True
