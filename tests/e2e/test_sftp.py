"""
SFTP in the real agent: ``twistd -n ctrlagent`` with SFTP on a free loopback
port, a server created over the API with the scripted image, its login set
with ``set_sftp_credentials`` through ``POST /api/command`` as the Panel
does, then a paramiko SFTP session (logged in by the Panel's alias) uploads
a file that appears in the server's data directory.  Deleting the server
ends a live session within a second; the password is nowhere in the log.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import paramiko
import pytest

from tests.e2e.test_panel_http import PANEL_ID, UUID, create_payload, ok, wait_status
from tests.rig.agentproc import AgentProcess, free_port

# Docker only: SFTP works on the data directory: the runtime only runs the game
pytestmark = [pytest.mark.e2e, pytest.mark.runtimes("docker")]

PASSWORD = "e2e sftp password, never logged"


def _connect(port: int, username: str) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    transport = paramiko.Transport(("127.0.0.1", port))
    transport.banner_timeout = 10
    try:
        transport.connect(username=username, password=PASSWORD)
        sftp = paramiko.SFTPClient.from_transport(transport)
    except BaseException:
        transport.close()
        raise
    assert sftp is not None
    return transport, sftp


def test_a_file_uploaded_over_sftp_lands_in_the_servers_directory(
    make_agent: Callable[..., AgentProcess], scripted_image: str
) -> None:
    port = free_port()
    agent = make_agent(sftp_endpoint="tcp:{}:interface=127.0.0.1".format(port)).start()
    ok(agent, "create_server", UUID, **create_payload(scripted_image))
    wait_status(agent, PANEL_ID, "offline")

    login = ok(agent, "set_sftp_credentials", PANEL_ID, password=PASSWORD)
    assert login == {"username": UUID, "port": port}

    content = b"level-name=world\n" * 1000
    transport, sftp = _connect(port, PANEL_ID)
    try:
        sftp.putfo(io.BytesIO(content), "/server.properties.new")
        assert "server.properties.new" in sftp.listdir("/")
        (session,) = ok(agent, "list_sftp_sessions", PANEL_ID)["sessions"]
        assert session["serverId"] == UUID and session["username"] == PANEL_ID
        assert session["bytesWritten"] == len(content)
    finally:
        transport.close()
    landed = agent.data_dir / UUID / "server.properties.new"
    assert landed.read_bytes() == content

    # Deleting the server (no event announces it) ends a live session within a second.
    transport, sftp = _connect(port, UUID)
    try:
        assert sftp.listdir("/")
        ok(agent, "delete_server", UUID)
        start = time.monotonic()
        while transport.is_active() and time.monotonic() - start < 3.0:
            time.sleep(0.02)
        assert time.monotonic() - start < 1.0
        assert not transport.is_active()
    finally:
        transport.close()

    log = agent.log_path.read_text(errors="replace")
    assert "sftp: listening on 127.0.0.1:{}".format(port) in log
    assert "closing session" in log and "server deleted" in log
    assert PASSWORD not in log
    assert "Traceback" not in log
