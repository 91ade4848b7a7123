"""
The ``ctrlagent`` command (``python -m ctrlagent.cli``, what the console
script runs) as an operator uses it on the node: a subprocess reading the
agent's own configuration file, against a real agent process driving real
containers.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest

from tests.e2e.test_panel_http import create_payload, ok, wait_status
from tests.rig.agentproc import ROOT, AgentProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("AGENT_SECRET", "AGENT_SECRET_FILE", "DOCKER_HOST", "CTRLAGENT_CONFIG",
                         "CTRLAGENT_ENV_FILE")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli_args(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ctrlagent.cli", "--config", str(config), *args]


def run_cli(agent: AgentProcess, *args: str, stdin: str | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_args(agent.config_path, *args), input=stdin, capture_output=True, text=True,
        env=cli_env(**env), timeout=60, check=False,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("ctrlagent: error: ")
    assert "Traceback" not in done.stderr
    return lines[0]


def new_server(agent: AgentProcess, image: str, **extra: Any) -> str:
    sid = uuid.uuid4().hex
    payload = create_payload(image)
    payload["panelId"] = "clx" + uuid.uuid4().hex[:20]
    payload.update(extra)
    ok(agent, "create_server", sid, **payload)
    wait_status(agent, sid, "offline")
    return sid


def test_status_and_servers_show_the_node_and_its_servers(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    done = run_cli(agent, "status")
    assert done.returncode == 0, done.stderr
    assert "e2e-node" in done.stdout and "healthy" in done.stdout
    assert "engine      answers" in done.stdout

    sid = new_server(agent, scripted_image)
    done = run_cli(agent, "servers")
    assert done.returncode == 0, done.stderr
    row = [line for line in done.stdout.splitlines() if line.startswith(sid)]
    assert row and "offline" in row[0] and "E2E Survival" in row[0]
    assert done.stdout.rstrip().endswith("1 server")


def test_power_and_console_drive_a_server_and_leaving_the_console_keeps_it_running(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    sid = new_server(agent, scripted_image)
    done = run_cli(agent, "power", sid, "start")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("start {}: ".format(sid))
    wait_status(agent, sid, "running")

    console = subprocess.Popen(
        cli_args(agent.config_path, "console", sid, "--interval", "0.2"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=cli_env(),
        # Started as a shell's background job would be: Ctrl-C must still leave.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert console.stdin is not None and console.stdout is not None
    seen = b""
    try:
        console.stdin.write(b"say hello from the cli\n")
        console.stdin.flush()
        deadline = time.monotonic() + 20
        while b"[Server] hello from the cli" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([console.stdout], [], [], 0.5)
            if ready:
                seen += os.read(console.stdout.fileno(), 65536)
        assert b"[Server] hello from the cli" in seen, seen
        # The past lines came first: the startup line was printed before the command.
        assert seen.index(b"Done (") < seen.index(b"[Server] hello from the cli")
        console.send_signal(signal.SIGINT)  # Ctrl-C
        code = console.wait(timeout=10)
    finally:
        if console.poll() is None:
            console.kill()
            console.wait()
    assert code == 0
    assert console.stderr is not None
    err = console.stderr.read().decode()
    assert "the server keeps running" in err and "Traceback" not in err
    assert ok(agent, "get_server_status", sid)["status"] == "running"

    done = run_cli(agent, "power", sid, "kill")
    assert done.returncode == 0, done.stderr
    wait_status(agent, sid, "offline")
    # A server the agent does not know: one line, non-zero.
    done = run_cli(agent, "power", "no-such-server", "start")
    assert done.returncode == 1
    assert "SERVER_NOT_FOUND" in one_error_line(done)


def test_alias_teaches_the_agent_another_id(
    agent_process: AgentProcess, scripted_image: str
) -> None:
    agent = agent_process
    sid = new_server(agent, scripted_image)
    other = "clxalias" + uuid.uuid4().hex[:12]
    done = run_cli(agent, "alias", sid, other)
    if done.returncode != 0 and "NOT_FOUND: not found" in done.stderr:
        pytest.skip("this build has no POST /api/servers/{id}/aliases route yet")
    assert done.returncode == 0, done.stderr
    assert other in done.stdout
    assert ok(agent, "get_server_status", other)["serverId"] == sid


def test_sftp_sets_a_login_that_opens_a_session(
    make_agent: Callable[..., AgentProcess], scripted_image: str
) -> None:
    port = free_port()
    agent = make_agent(sftp_endpoint="tcp:{}:interface=127.0.0.1".format(port)).start()
    sid = new_server(agent, scripted_image)
    done = run_cli(agent, "sftp", sid, "--password-stdin", stdin="cli-password-123\n")
    assert done.returncode == 0, done.stderr
    assert "user {} port {}".format(sid, port) in done.stdout
    assert "cli-password-123" not in done.stdout
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.banner_timeout = 10
        transport.connect(username=sid, password="cli-password-123")
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        sftp.listdir(".")
    finally:
        transport.close()
    generated = run_cli(agent, "sftp", sid, "--generate")
    assert generated.returncode == 0, generated.stderr
    assert "password: " in generated.stdout


def test_diagnostics_report_everything_but_the_secrets(agent_process: AgentProcess) -> None:
    agent = agent_process
    done = run_cli(agent, "diagnostics", "--log", str(agent.log_path))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for heading in ("## versions", "## agent", "## engine", "## configuration",
                    "## directories", "## ports", "## log"):
        assert heading in text, heading
    assert "status.nodeId e2e-node" in text
    assert "secret = '<redacted>'" in text
    assert agent.secret not in text
    assert "state_dir {}: owner".format(agent.state_dir) in text
    assert "api 127.0.0.1:{}: listening".format(agent.port) in text
    assert "node e2e-node: http" in text  # the agent's start line, from its log
    assert "prometheus-client " in text and "twisted " in text


def test_a_stopped_agent_and_a_wrong_secret_are_one_clear_line(
    make_agent: Callable[..., AgentProcess],
) -> None:
    agent = make_agent().start()
    wrong = run_cli(agent, "status", AGENT_SECRET="not-the-secret")
    assert wrong.returncode == 4
    assert "refused the secret" in one_error_line(wrong)
    agent.stop()
    down = run_cli(agent, "servers")
    assert down.returncode == 3
    assert "the agent is not running" in one_error_line(down)
    assert "127.0.0.1:{}".format(agent.port) in down.stderr
    # Diagnostics still report, and say the agent does not answer.
    report = run_cli(agent, "diagnostics", "--log", str(agent.log_path))
    assert report.returncode == 0, report.stderr
    assert "not answering: the agent is not running" in report.stdout
    # A configuration the agent would refuse is refused the same way.
    broken = subprocess.run(
        cli_args(agent.workdir / "missing.toml", "status"), capture_output=True, text=True,
        env=cli_env(), timeout=60, check=False,
    )
    assert broken.returncode == 2
    assert "missing.toml" in one_error_line(broken)
