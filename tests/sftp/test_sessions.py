"""
Live sessions: listed with their byte counts, and ended within a second when
the server's credentials are revoked or changed or the server is suspended
or deleted (``close_sessions``); other servers' sessions go on.
"""

from __future__ import annotations

import os
import time

import paramiko
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.sftp.clients import connect
from tests.sftp.conftest import PASSWORD, make_config


def _open(rig, username="srv1", password=PASSWORD):
    return rig.in_thread(connect, rig.port, username, password)


def _seconds_until_closed(t: paramiko.Transport, limit: float = 3.0) -> float:
    start = time.monotonic()
    while t.is_active() and time.monotonic() - start < limit:
        time.sleep(0.01)
    return time.monotonic() - start


@pytest_twisted.ensureDeferred
async def test_sessions_are_listed_with_their_traffic(rig):
    await rig.set_login()
    t, s = await _open(rig, "panel-uuid-1")
    try:
        def traffic():
            with s.open("/f", "wb") as f:
                f.write(b"x" * 5000)
            with s.open("/f", "rb") as f:
                f.read()

        await rig.in_thread(traffic)
        sessions = rig.service.list_sessions("srv1")["sessions"]
        assert len(sessions) == 1
        (one,) = sessions
        assert one["username"] == "panel-uuid-1"
        assert one["serverId"] == "srv1"
        assert one["remoteAddress"] == "127.0.0.1"
        assert one["bytesWritten"] == 5000 and one["bytesRead"] == 5000
        assert one["startedAt"].endswith("Z") and one["id"]
    finally:
        await rig.in_thread(t.close)


@pytest.mark.parametrize("how", ["revoke", "change", "close_sessions"])
@pytest_twisted.ensureDeferred
async def test_revoking_or_changing_credentials_ends_sessions_within_a_second(rig, how):
    rig.add_server("other")
    await rig.set_login()
    await rig.set_login("other")
    t, s = await _open(rig)
    t2, s2 = await _open(rig, "other")
    try:
        await rig.in_thread(s.listdir, "/")
        if how == "revoke":
            result = await rig.service.revoke_credentials("panel-uuid-1")
            assert result == {"revoked": True, "closedSessions": 1}
        elif how == "change":
            await rig.set_login(password="a brand new password")
        else:
            assert rig.service.close_sessions("srv1", "server suspended") == 1
        elapsed = await rig.in_thread(_seconds_until_closed, t)
        assert elapsed < 1.0
        assert not t.is_active()
        assert rig.service.list_sessions("srv1")["sessions"] == []
        # The other server's session is untouched.
        assert t2.is_active()
        assert await rig.in_thread(s2.listdir, "/") == []
        if how == "revoke":
            with pytest.raises(paramiko.AuthenticationException):
                await _open(rig)
    finally:
        await rig.in_thread(t.close)
        await rig.in_thread(t2.close)


@pytest_twisted.ensureDeferred
async def test_set_credentials_answers_username_and_port(rig):
    answer = await rig.set_login("panel-uuid-1")
    assert answer == {"username": "srv1", "port": rig.port}


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_ends_sessions(rig):
    await rig.set_login()
    t, s = await _open(rig)
    await rig.in_thread(s.open, "/held.txt", "w")  # an open handle, closed on the way out
    await rig.service.stopService()
    assert await rig.in_thread(_seconds_until_closed, t) < 1.0
    rig.service.startService()  # the fixture stops it again


@pytest_twisted.ensureDeferred
async def test_a_suspended_server_refuses_logins(rig):
    await rig.set_login()
    await rig.servers.suspend("srv1")
    with pytest.raises(paramiko.AuthenticationException):
        await _open(rig)
    await rig.servers.unsuspend("srv1")
    t, s = await _open(rig)
    t.close()


@pytest_twisted.ensureDeferred
async def test_forgetting_a_deleted_server_ends_sessions_and_drops_its_login(rig):
    await rig.set_login()
    t, s = await _open(rig)
    try:
        assert await rig.service.forget_server("srv1") == {"closedSessions": 1}
        assert await rig.in_thread(_seconds_until_closed, t) < 1.0
        assert rig.service.credentials.get("srv1") is None
    finally:
        await rig.in_thread(t.close)


def _fds_under(path) -> int:
    """Open file descriptors of this process that point into ``path``."""
    count = 0
    prefix = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if target == prefix or target.startswith(prefix + "/"):
            count += 1
    return count


@pytest_twisted.ensureDeferred
async def test_a_cut_session_closes_its_files_and_root(rig):
    await rig.set_login()
    (rig.root() / "d").mkdir()
    t, s = await _open(rig)
    try:
        def hold():
            f = s.open("/held.bin", "w")
            f.write(b"x")
            f.flush()
            return f

        await rig.in_thread(hold)
        assert _fds_under(rig.root()) >= 2  # the root, the file
        rig.service.close_sessions("srv1")
        for _ in range(100):
            if _fds_under(rig.root()) == 0:
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert _fds_under(rig.root()) == 0
    finally:
        await rig.in_thread(t.close)


def _leave_during_the_password_check(port):
    t = paramiko.Transport(("127.0.0.1", port))
    t.start_client(timeout=10)
    import threading

    threading.Timer(0.3, t.close).start()
    try:
        t.auth_password("srv1", PASSWORD)
    except Exception:
        pass
    time.sleep(3.0)  # longer than the check at cost 13


@pytest.mark.parametrize("sftp_config", [make_config(bcrypt_rounds=13)])
@pytest_twisted.ensureDeferred
async def test_a_client_gone_before_its_login_succeeds_leaves_no_session(rig):
    await rig.set_login()
    await rig.in_thread(_leave_during_the_password_check, rig.port)
    assert rig.service.list_sessions()["sessions"] == []


# -- access ends with the server, without anyone calling close_sessions ---------------


@pytest.mark.parametrize("how", ["suspend", "delete"])
@pytest_twisted.ensureDeferred
async def test_suspending_or_deleting_the_server_ends_its_sessions_within_a_second(rig, how):
    rig.add_server("other")
    await rig.set_login()
    await rig.set_login("other")
    t, s = await _open(rig)
    t2, s2 = await _open(rig, "other")
    try:
        await rig.in_thread(s.listdir, "/")
        if how == "suspend":
            await rig.servers.suspend("srv1")
        else:
            await rig.servers.delete("srv1")
        elapsed = await rig.in_thread(_seconds_until_closed, t)
        assert elapsed < 1.0
        assert not t.is_active()
        assert rig.service.list_sessions("other")["sessions"] != []
        assert [x["serverId"] for x in rig.service.list_sessions()["sessions"]] == ["other"]
        # The other server's session is untouched.
        assert t2.is_active()
        assert await rig.in_thread(s2.listdir, "/") == []
    finally:
        await rig.in_thread(t.close)
        await rig.in_thread(t2.close)


@pytest_twisted.ensureDeferred
async def test_a_status_change_to_suspended_ends_the_sessions_at_once(rig):
    # The real manager announces a suspension (StatusChanged to "suspended"):
    # the sessions end on the event, without waiting for the next check.
    from ctrlagent.events import StatusChanged

    await rig.set_login()
    t, s = await _open(rig)
    try:
        rig.service._watch.stop()  # only the event may close it now
        rig.servers._emit(StatusChanged("srv1", "running", "stopping", 0.0))
        assert len(rig.service.list_sessions("srv1")["sessions"]) == 1
        rig.servers._emit(StatusChanged("srv1", "stopping", "suspended", 0.0))
        assert rig.service.list_sessions("srv1")["sessions"] == []
        assert await rig.in_thread(_seconds_until_closed, t) < 1.0
    finally:
        await rig.in_thread(t.close)


@pytest_twisted.ensureDeferred
async def test_a_stopped_service_no_longer_watches_the_servers(rig):
    await rig.service.stopService()
    assert rig.service._server_event not in rig.servers._listeners
    assert rig.service._watch is None
    rig.service.startService()  # the fixture stops it again
    assert rig.service._server_event in rig.servers._listeners
    assert rig.service._watch is not None and rig.service._watch.running


@pytest_twisted.ensureDeferred
async def test_a_new_server_under_a_deleted_ones_id_inherits_no_login(rig):
    # The delete event drops the login (ServerRemoved), not only its sessions:
    # a server created later under the same id starts with no credentials.
    await rig.set_login()
    t, _ = await _open(rig)
    await rig.in_thread(t.close)
    assert rig.service.credentials.get("srv1") is not None
    await rig.servers.delete("srv1")
    for _ in range(50):  # the drop runs in the thread pool: bounded wait
        if rig.service.credentials.get("srv1") is None:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert rig.service.credentials.get("srv1") is None
    rig.add_server("srv1")
    with pytest.raises(paramiko.AuthenticationException):
        await _open(rig)
