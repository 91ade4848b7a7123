"""
The service as the agent runs it: a named child service that generates its
host key on first start and logs the fingerprint, refuses a bad endpoint as
configuration, keeps the reactor free while passwords are checked, and
frees its port on stop.
"""

from __future__ import annotations

import os
import socket
import stat
import time

import pytest
import pytest_twisted
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from ctrlagent.errors import ConfigInvalid
from ctrlagent.sftp.service import make_sftp_service
from ctrlagent.testing.servers import FakeServerManager
from tests.sftp.clients import connect
from tests.sftp.conftest import PASSWORD, make_config


def test_the_service_is_named_sftp_and_needs_a_usable_endpoint(tmp_path):
    servers = FakeServerManager(data_dir=str(tmp_path))
    svc = make_sftp_service(reactor, make_config(), str(tmp_path), servers=servers)
    assert IService.providedBy(svc) and svc.name == "sftp"
    with pytest.raises(ConfigInvalid):
        make_sftp_service(reactor, make_config(endpoint="nosuch:1"), str(tmp_path),
                          servers=servers)


@pytest_twisted.ensureDeferred
async def test_first_start_generates_a_private_host_key_and_logs_its_fingerprint(rig, log_lines):
    key = rig.state_dir / "sftp_host_ed25519_key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    # The rig started before log_lines observed; a restart logs again, same key.
    before = key.read_bytes()
    await rig.service.stopService()
    rig.service.startService()
    assert key.read_bytes() == before
    started = [line for line in log_lines if "sftp: host key ssh-ed25519 SHA256:" in line]
    assert len(started) == 1


# A second or more per check at cost 13: run on the reactor, it would stall it that long.
@pytest.mark.parametrize("sftp_config", [make_config(bcrypt_rounds=13)])
@pytest_twisted.ensureDeferred
async def test_password_checks_never_block_the_reactor(rig):
    await rig.set_login()
    gaps: list[float] = []
    last = [time.monotonic()]

    def tick():
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now

    loop = LoopingCall(tick)
    loop.start(0.01)
    try:
        for _ in range(2):
            t, s = await rig.in_thread(connect, rig.port, "srv1", PASSWORD)
            t.close()
    finally:
        loop.stop()
    assert len(gaps) > 20
    assert max(gaps) < 0.5


@pytest_twisted.ensureDeferred
async def test_stopping_frees_the_port(rig):
    port = rig.port
    await rig.service.stopService()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    rig.service.startService()


def test_a_port_in_use_fails_the_start_at_once(tmp_path):
    # A StartupError: the agent prints its text as its one line and exits 1.
    from ctrlagent.startup import StartupError

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = holder.getsockname()[1]
        config = make_config(endpoint="tcp:{}:interface=127.0.0.1".format(port))
        svc = make_sftp_service(reactor, config, str(tmp_path),
                                servers=FakeServerManager(data_dir=str(tmp_path)))
        with pytest.raises(StartupError) as e:
            svc.privilegedStartService()
        assert str(e.value) == (
            "cannot listen for SFTP on tcp:{}:interface=127.0.0.1 (address already in use);"
            " is another agent or program using it?".format(port))
    finally:
        holder.close()


@pytest_twisted.ensureDeferred
async def test_abort_start_releases_the_port(rig):
    from twisted.internet.task import deferLater

    port = rig.port
    rig.service.abort_start()
    await deferLater(reactor, 0.1, lambda: None)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    await rig.service.stopService()
    rig.service.startService()
