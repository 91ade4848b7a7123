"""
The SFTP server in the agent's service tree: built by ``tap.build_service``
after the servers and before the transports, reached by the actions, absent
when disabled (the actions then answer ``CONFLICT``); an SFTP port in use
ends the start with one critical line naming SFTP and the port.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel

from ctrlagent.config import AgentConfig, PanelConfig, RuntimeConfig, SftpConfig, load_config
from ctrlagent.errors import ConfigInvalid, CtrlAgentError
from ctrlagent.sftp.service import SftpService
from ctrlagent.startup import StartupError
from ctrlagent.tap import AgentService, build_service
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.wire.command import Command
from tests.startup.test_manager_start import Logged, _Failing


def config_for(tmp_path: Path, **sftp: Any) -> AgentConfig:
    (tmp_path / "state").mkdir(exist_ok=True)
    return AgentConfig(
        development=True,
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        sftp=SftpConfig(endpoint="tcp:0:interface=127.0.0.1", **sftp),
        panel=PanelConfig(url="ws://127.0.0.1:1/agent"),  # a link to build (never started)
    )


async def _answer(top: AgentService, action: str) -> str:
    dispatcher = top.getServiceNamed("http")._api._dispatcher  # type: ignore[attr-defined]
    with pytest.raises(CtrlAgentError) as e:
        await dispatcher.dispatch(Command(action, "no-such-server", {"password": "x" * 12}))
    return str(e.value.code)


@pytest_twisted.ensureDeferred
async def test_the_agent_serves_sftp_between_the_servers_and_the_transports(
    tmp_path: Path,
) -> None:
    top = build_service(reactor, config_for(tmp_path))  # built, not started
    try:
        assert [child.name for child in top] == [
            "banner", "servers", "sftp", "backups", "panel", "http"]
        sftp = top.getServiceNamed("sftp")
        assert isinstance(sftp, SftpService)
        assert sftp.servers is top.getServiceNamed("servers")
        assert sftp.state_dir == str(tmp_path / "state")
        # The actions reach it: an unknown server, not a disabled SFTP.
        assert await _answer(top, "set_sftp_credentials") == "SERVER_NOT_FOUND"
    finally:
        await top.getServiceNamed("servers").store.close()  # type: ignore[attr-defined]
        await top.getServiceNamed("backups").store.close()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_a_disabled_sftp_is_no_service_and_its_actions_answer_conflict(
    tmp_path: Path,
) -> None:
    top = build_service(reactor, config_for(tmp_path, enabled=False))
    try:
        assert "sftp" not in [child.name for child in top]
        for action in ("set_sftp_credentials", "revoke_sftp_credentials", "list_sftp_sessions"):
            assert await _answer(top, action) == "CONFLICT"
    finally:
        await top.getServiceNamed("servers").store.close()  # type: ignore[attr-defined]
        await top.getServiceNamed("backups").store.close()  # type: ignore[attr-defined]


def test_an_sftp_port_in_use_exits_with_one_critical_line(
    tmp_path: Path, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = dataclasses.replace(
            SftpConfig(), endpoint="tcp:{}:interface=127.0.0.1".format(port)
        )
        top = AgentService()
        sftp = SftpService(reactor, config, str(tmp_path), servers=FakeServerManager())
        sftp.setServiceParent(top)
        with Logged() as logged, pytest.raises(SystemExit) as exited:
            top.privilegedStartService()
            top.startService()
    assert exited.value.code == 1
    [line] = logged.at(LogLevel.critical)
    assert line["problem"] == (
        "cannot listen for SFTP on tcp:{}:interface=127.0.0.1 (address already in use);"
        " is another agent or program using it?".format(port)
    )
    assert sftp.port is None
    fail_on_logged_errors.clear()



@pytest_twisted.ensureDeferred
async def test_a_failing_start_after_sftp_bound_its_port_releases_it(
    tmp_path: Path, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    # The API's port fails in the privileged phase, after SFTP bound its own:
    # the agent exits, and SFTP's port is free again on the way out.
    top = AgentService()
    config = SftpConfig(endpoint="tcp:0:interface=127.0.0.1")
    sftp = SftpService(reactor, config, str(tmp_path), servers=FakeServerManager())
    sftp.setServiceParent(top)
    _Failing(StartupError("cannot listen for the HTTP API"), "privileged").setServiceParent(top)
    with Logged() as logged, pytest.raises(SystemExit):
        top.privilegedStartService()
    [port] = [e["port"] for e in logged.events if e.get("log_format", "").startswith(
        "sftp: listening on")]
    assert sftp.port is None  # released by abort_start
    await deferLater(reactor, 0.05, lambda: None)  # the socket closes on the next turn
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
    fail_on_logged_errors.clear()


@pytest.mark.parametrize(
    ("kind", "engine", "socket_path"),
    [("docker", "DockerEngine", "/var/run/docker.sock"),
     ("podman", "PodmanEngine", "/run/user/podman.sock")],
)
@pytest_twisted.ensureDeferred
async def test_the_runtime_section_picks_the_engine_and_its_socket(
    tmp_path: Path, kind: str, engine: str, socket_path: str
) -> None:
    config = dataclasses.replace(
        config_for(tmp_path),
        runtime=RuntimeConfig(kind=kind, podman_host="unix:///run/user/podman.sock"),
    )
    top = build_service(reactor, config)  # built, not started
    try:
        servers = top.getServiceNamed("servers")
        # Every call is metered at the seam (metrics are on by default), over the runtime's engine.
        assert type(servers.engine).__name__ == "MeteredEngine"  # type: ignore[attr-defined]
        runtime = servers.engine.wrapped  # type: ignore[attr-defined]
        assert type(runtime).__name__ == engine
        assert runtime.client.host.path == socket_path
    finally:
        await servers.store.close()  # type: ignore[attr-defined]
        await top.getServiceNamed("backups").store.close()  # type: ignore[attr-defined]


def test_an_unknown_runtime_is_refused_by_name() -> None:
    with pytest.raises(ConfigInvalid, match="runtime.kind 'lxc' must be one of docker, podman"):
        load_config(None, {"AGENT_SECRET": "s", "CTRLAGENT_RUNTIME": "lxc"}, {})
    podman = load_config(None, {"AGENT_SECRET": "s", "CTRLAGENT_RUNTIME": "podman"}, {})
    assert podman.runtime.kind == "podman"
