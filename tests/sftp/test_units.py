"""
The pure and small parts: configuration, the wire parser and path rules
(property-tested), link targets, the login throttle (on a ``Clock``), the
credentials file, the host key, and the interfaces the pieces declare.
"""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.conch.interfaces import ISFTPFile, ISFTPServer
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from ctrlagent.errors import ConfigInvalid, InvalidInput, PermissionDenied
from ctrlagent.interfaces import IServerManager, ServerRoot
from ctrlagent.sftp import wire
from ctrlagent.sftp.config import SftpConfig, parse_sftp_config
from ctrlagent.sftp.credentials import SftpCredentials
from ctrlagent.sftp.filesystem import (
    FileHandle,
    ServerFiles,
    ServerFileSystem,
    SftpFile,
    link_target,
)
from ctrlagent.sftp.quota import UsageTracker
from ctrlagent.sftp.ssh import ServerLoginChecker, SftpRealm, fingerprint, load_host_key
from ctrlagent.sftp.throttle import LoginThrottle
from ctrlagent.testing.servers import FakeServerManager

# -- configuration ---------------------------------------------------------------


def test_config_defaults_listen_on_2022_with_the_key_in_the_state_dir():
    config = parse_sftp_config({})
    assert config == SftpConfig()
    assert config.enabled is True and config.backend == "local"
    assert config.endpoint_description() == "tcp:2022:interface=0.0.0.0"
    assert config.host_key_path("/var/lib/ctrlagent") == \
        "/var/lib/ctrlagent/sftp_host_ed25519_key"


def test_config_takes_an_endpoint_and_coerces_strings():
    config = parse_sftp_config({"endpoint": "tcp6:2222:interface=\\:\\:1", "enabled": "false",
                                "port": "2200", "throttle_max": "10"})
    assert config.endpoint_description() == "tcp6:2222:interface=\\:\\:1"
    assert config.enabled is False and config.port == 2200 and config.throttle_max == 10.0


@pytest.mark.parametrize("values, field", [
    ({"nope": 1}, "sftp.nope"),
    ({"port": 0}, "sftp.port"),
    ({"port": "x"}, "sftp.port"),
    ({"port": True}, "sftp.port"),
    ({"backend": "ldap"}, "sftp.backend"),
    ({"backend": "panel"}, "sftp.panel_url"),
    ({"throttle_base": -1.0}, "sftp.throttle_base"),
    ({"throttle_base": 5.0, "throttle_max": 1.0}, "sftp.throttle_max"),
    ({"throttle_max": float("nan")}, "sftp.throttle_max"),
    ({"max_sessions": 0}, "sftp.max_sessions"),
    ({"bcrypt_rounds": 3}, "sftp.bcrypt_rounds"),
    ({"enabled": "maybe"}, "sftp.enabled"),
    ({"endpoint": "2022"}, "sftp.endpoint"),
    ({"host_key": 5}, "sftp.host_key"),
])
def test_bad_config_values_are_refused_naming_the_setting(values, field):
    with pytest.raises(ConfigInvalid) as e:
        parse_sftp_config(values)
    assert field in str(e.value)


def test_config_that_is_not_a_table_is_refused():
    with pytest.raises(ConfigInvalid):
        parse_sftp_config(["port", 1])  # type: ignore[arg-type]


# -- wire ---------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_reader_raises_only_bad_message_on_any_input(data):
    r = wire.Reader(data)
    try:
        r.u32()
        r.string()
        r.attrs()
        r.u64()
        r.byte()
        r.end()
    except wire.BadMessage:
        pass


@given(st.lists(st.sampled_from([b"..", b".", b"", b"a", b"b", b"..a", b"%2e%2e", b"\\.."]),
                max_size=12), st.booleans())
def test_components_never_climb_or_hold_dots(parts, absolute):
    path = (b"/" if absolute else b"") + b"/".join(parts)
    comps = wire.components(path)
    assert all(c not in ("", ".", "..") and "/" not in c for c in comps)
    assert wire.display(comps).startswith(b"/")


def test_components_refuse_nul_and_overlong():
    with pytest.raises(wire.BadMessage):
        wire.components(b"a\x00b")
    with pytest.raises(wire.BadMessage):
        wire.components(b"a" * 256)
    with pytest.raises(wire.BadMessage):
        wire.components(b"a/" * 3000)


def test_attrs_round_trip():
    st_ = os.stat_result((0o100644, 1, 2, 1, 1000, 1000, 12345, 1, 2, 3))
    r = wire.Reader(wire.pack_attrs(st_))
    a = r.attrs()
    r.end()
    assert (a.size, a.uid, a.gid, a.permissions, a.atime, a.mtime) == (
        12345, 1000, 1000, 0o100644, 1, 2)


def _lexical(parent: tuple[str, ...], text: str) -> list[str] | None:
    out = list(parent)
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(part)
    return out


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5),
       st.lists(st.sampled_from(["..", ".", "a", "b", "x"]), max_size=8), st.booleans())
def test_link_targets_are_relative_and_stay_inside(link, target_parts, absolute):
    target = ("/" if absolute else "") + "/".join(target_parts)
    try:
        text = link_target(tuple(link), target.encode())
    except (PermissionDenied, InvalidInput):
        return
    assert not text.startswith("/")
    assert _lexical(tuple(link[:-1]), text) is not None


# -- throttle -----------------------------------------------------------------------------


def test_throttle_grows_doubles_caps_and_forgets():
    clock = Clock()
    t = LoginThrottle(clock, base=1.0, cap=8.0, forget=100.0)
    assert t.wait_before("1.2.3.4", "srv") == 0
    delays = [t.failed("1.2.3.4", "srv") for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert t.wait_before("1.2.3.4", "someone-else") == 8.0  # the address is slowed
    assert t.wait_before("5.6.7.8", "srv") == 8.0  # and the username from anywhere
    assert t.wait_before("5.6.7.8", "other") == 0.0
    clock.advance(101)
    assert t.wait_before("1.2.3.4", "srv") == 0.0 and t.failures("1.2.3.4", "srv") == 0


def test_throttle_success_clears_and_memory_is_bounded():
    t = LoginThrottle(Clock(), base=1.0, cap=8.0, max_keys=10)
    t.failed("a", "u")
    t.succeeded("a", "u")
    assert t.failures("a", "u") == 0
    for i in range(100):
        t.failed("10.0.0.{}".format(i), "u{}".format(i))
    assert len(t._keys) <= 10


# -- credentials ------------------------------------------------------------------------


def test_credentials_store_only_a_slow_hash_in_a_private_file(tmp_path):
    path = tmp_path / "creds.json"
    store = SftpCredentials(str(path), rounds=4)
    store.set("srv1", {"password": "hunter2-hunter2", "readOnly": True})
    raw = path.read_text()
    assert "hunter2" not in raw
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    stored = json.loads(raw)["servers"]["srv1"]["passwordHash"]
    assert stored.startswith("bcrypt-sha256$$2b$04$")
    assert store.check_password("srv1", b"hunter2-hunter2")
    assert not store.check_password("srv1", b"hunter2-hunter3")
    assert not store.check_password("nobody", b"hunter2-hunter2")
    again = SftpCredentials(str(path))
    again.load()
    assert again.get("srv1").read_only is True
    assert again.check_password("srv1", b"hunter2-hunter2")
    # Longer than bcrypt's 72 bytes: every byte counts.
    store.set("srv1", {"password": "p" * 100})
    assert not store.check_password("srv1", b"p" * 72)
    assert store.check_password("srv1", b"p" * 100)
    assert [p.name for p in tmp_path.iterdir()] == ["creds.json"]  # no temp files left


def test_credentials_validate_payloads(tmp_path):
    store = SftpCredentials(str(tmp_path / "c.json"), rounds=4)
    for params, field in [
        ({"password": "short"}, "password"),
        ({"password": 12345678}, "password"),
        ({"publicKeys": "ssh-ed25519 AAAA"}, "publicKeys"),
        ({"publicKeys": ["not a key"]}, "publicKeys"),
        ({"publicKeys": ["ssh-ed25519 AAAA"] * 40}, "publicKeys"),
        ({"readOnly": "yes"}, "readOnly"),
        ({}, "password"),
    ]:
        with pytest.raises(InvalidInput) as e:
            store.set("srv1", params)
        assert e.value.field == field
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()
    with pytest.raises(InvalidInput):
        store.set("srv1", {"publicKeys": [pem]})


def test_revoking_forgets_the_login(tmp_path):
    store = SftpCredentials(str(tmp_path / "c.json"), rounds=4)
    store.set("srv1", {"password": "a long password"})
    assert store.revoke("srv1") is True
    assert store.revoke("srv1") is False
    assert store.get("srv1") is None
    reloaded = SftpCredentials(str(tmp_path / "c.json"))
    reloaded.load()
    assert reloaded.get("srv1") is None


def test_a_corrupt_credentials_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigInvalid):
        SftpCredentials(str(path)).load()


# -- host key ------------------------------------------------------------------------------


def test_host_key_is_generated_once_private_and_reused(tmp_path):
    path = tmp_path / "state" / "key"
    key = load_host_key(str(path))
    assert key.sshType() == b"ssh-ed25519"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_host_key(str(path)).public().blob() == key.public().blob()
    assert fingerprint(key).startswith("SHA256:")


def test_a_host_key_others_can_read_is_refused(tmp_path):
    path = tmp_path / "key"
    load_host_key(str(path))
    os.chmod(path, 0o644)
    with pytest.raises(ConfigInvalid) as e:
        load_host_key(str(path))
    assert "chmod 600" in str(e.value)


def test_a_host_key_that_is_not_a_key_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text("hello")
    path.chmod(0o600)
    with pytest.raises(ConfigInvalid):
        load_host_key(str(path))


# -- interfaces ------------------------------------------------------------------------------


def test_pieces_provide_the_twisted_interfaces_they_declare(tmp_path):
    servers = FakeServerManager(data_dir=str(tmp_path))
    assert verifyObject(IServerManager, servers)
    root = ServerRoot("s", str(tmp_path), None, -1, -1)
    files = ServerFiles(root, UsageTracker(30.0), read_only=False)
    fs = ServerFileSystem(None, None, files)  # type: ignore[arg-type]
    assert verifyObject(ISFTPServer, fs)
    fd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        assert verifyObject(ISFTPFile, SftpFile(fs, FileHandle(fd, (), True, False, False)))
    finally:
        os.close(fd)
    assert verifyObject(ICredentialsChecker,
                        ServerLoginChecker(None, None, servers, None))  # type: ignore[arg-type]
    assert verifyObject(IRealm, SftpRealm(None))


def test_status_packets_carry_id_code_and_message():
    packet = wire.status(9, wire.FX_FAILURE, "disk quota exceeded")
    length, kind, rid, code = struct.unpack(">IBII", packet[:13])
    assert (kind, rid, code) == (wire.FXP_STATUS, 9, wire.FX_FAILURE)
    assert b"quota" in packet and length == len(packet) - 4
