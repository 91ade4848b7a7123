"""
Logins: wrong passwords are throttled per address and per username with
growing, capped delays and logged with the address (never the password);
unknown servers, bad keys and non-SFTP requests are refused politely.
"""

from __future__ import annotations

import socket
import time

import paramiko
import pytest
import pytest_twisted

from tests.sftp.clients import connect
from tests.sftp.conftest import PASSWORD


def _attempts(port, username, passwords):
    """Each password on one connection; the seconds each answer took."""
    t = paramiko.Transport(("127.0.0.1", port))
    times = []
    try:
        t.start_client(timeout=10)
        for password in passwords:
            start = time.monotonic()
            try:
                t.auth_password(username, password)
                times.append((time.monotonic() - start, True))
            except paramiko.AuthenticationException:
                times.append((time.monotonic() - start, False))
    finally:
        t.close()
    return times


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_get_growing_capped_delays_and_are_logged(rig, log_lines):
    await rig.set_login()
    wrong = ["guess-number-{}".format(i) for i in range(6)]
    times = await rig.in_thread(_attempts, rig.port, "srv1", wrong)
    delays = [d for d, ok in times]
    assert not any(ok for _, ok in times)
    # base 0.05 s doubling, cap 0.4 s: 0.05, 0.1, 0.2, 0.4, 0.4(+wait), ...
    assert delays[0] < 0.3
    assert delays[3] >= 0.35
    assert all(d < 2.0 for d in delays)  # capped
    assert delays[2] > delays[0]
    failed = [line for line in log_lines if "failed password login" in line]
    assert len(failed) == 6 and all("127.0.0.1" in line for line in failed)
    assert not any(w in line for w in wrong for line in log_lines)
    # The right password still gets in (after the current delay), and clears the count.
    ok = await rig.in_thread(_attempts, rig.port, "srv1", [PASSWORD])
    assert ok[0][1] is True
    assert rig.service.throttle.failures("127.0.0.1", "server:srv1") == 0


@pytest_twisted.ensureDeferred
async def test_guessing_through_a_servers_aliases_counts_once(rig):
    await rig.set_login()

    def run():
        return [_attempts(rig.port, name, ["x-password"])[0][0]
                for name in ("srv1", "panel-uuid-1", "ctrl-alt-play-srv1", "srv1")]

    await rig.in_thread(run)
    assert rig.service.throttle.failures("10.9.9.9", "server:srv1") == 4


@pytest_twisted.ensureDeferred
async def test_many_usernames_from_one_address_are_throttled_too(rig):
    await rig.set_login()
    names = ["nobody{}".format(i) for i in range(5)]

    def run():
        return [_attempts(rig.port, n, ["x-password"])[0][0] for n in names]

    delays = await rig.in_thread(run)
    assert delays[-1] >= 0.35  # the address's count grew across usernames


@pytest_twisted.ensureDeferred
async def test_unknown_servers_and_missing_credentials_are_refused(rig):
    rig.add_server("nologin")
    for username in ("no-such-server", "nologin", "\udcff"):
        with pytest.raises(paramiko.AuthenticationException):
            await rig.in_thread(connect, rig.port, username.encode("utf-8", "surrogateescape")
                                .decode("latin-1"), PASSWORD)


def _channel_request(port, request):
    t, s = connect(port, "srv1", PASSWORD)
    try:
        chan = t.open_session()
        chan.settimeout(10)
        try:
            if request == "exec":
                chan.exec_command("cat /etc/passwd")
            elif request == "shell":
                chan.invoke_shell()
            elif request == "pty":
                chan.get_pty()
            else:
                chan.invoke_subsystem("netconf")
        except paramiko.SSHException as e:
            return "refused: {}".format(e), b"", None
        status = chan.recv_exit_status()
        out = chan.recv(1000)
        err = chan.recv_stderr(1000)
        return "answered", out + b"|" + err, status
    finally:
        t.close()


@pytest.mark.parametrize("request_", ["exec", "shell"])
@pytest_twisted.ensureDeferred
async def test_shell_and_exec_say_sftp_only_and_run_nothing(rig, request_):
    await rig.set_login()
    outcome, output, status = await rig.in_thread(_channel_request, rig.port, request_)
    assert outcome == "answered"
    assert output == b"|This account is for SFTP only.\r\n"
    assert status == 1


@pytest.mark.parametrize("request_", ["pty", "subsystem"])
@pytest_twisted.ensureDeferred
async def test_other_session_requests_are_refused(rig, request_):
    await rig.set_login()
    outcome, _, _ = await rig.in_thread(_channel_request, rig.port, request_)
    assert outcome.startswith("refused")


def _forward(port):
    t, s = connect(port, "srv1", PASSWORD)
    results = {}
    try:
        try:
            t.request_port_forward("127.0.0.1", 0)
            results["remote"] = "accepted"
        except paramiko.SSHException:
            results["remote"] = "refused"
        try:
            t.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 1))
            results["local"] = "accepted"
        except paramiko.ChannelException:
            results["local"] = "refused"
        # The SFTP session on the same connection still works.
        results["sftp"] = s.listdir("/")
    finally:
        t.close()
    return results


@pytest_twisted.ensureDeferred
async def test_port_forwarding_is_refused(rig):
    await rig.set_login()
    assert await rig.in_thread(_forward, rig.port) == {
        "remote": "refused", "local": "refused", "sftp": []}


def _raw_banner(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(200)


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_per_address_limit_are_refused(rig):
    rig.service.config = type(rig.service.config)(**{
        **rig.service.config.__dict__, "max_sessions_per_address": 2})
    await rig.set_login()
    first = await rig.in_thread(connect, rig.port, "srv1", PASSWORD)
    second = await rig.in_thread(connect, rig.port, "srv1", PASSWORD)
    try:
        assert await rig.in_thread(_raw_banner, rig.port) == b""
    finally:
        first[0].close()
        second[0].close()


def _many_channels(port):
    t, s = connect(port, "srv1", PASSWORD)  # s holds one channel already
    opened, refused = 0, 0
    kept = []  # paramiko closes a channel it no longer references
    try:
        for _ in range(20):
            try:
                chan = t.open_session()
                kept.append(chan)
                chan.invoke_subsystem("sftp")
                opened += 1
            except paramiko.SSHException:
                refused += 1
        return opened, refused, s.listdir("/")
    finally:
        t.close()


@pytest_twisted.ensureDeferred
async def test_channels_per_connection_are_bounded(rig):
    from ctrlagent.sftp.ssh import MAX_CHANNELS

    await rig.set_login()
    opened, refused, listing = await rig.in_thread(_many_channels, rig.port)
    assert opened == MAX_CHANNELS - 1 and refused == 20 - opened
    assert listing == []
