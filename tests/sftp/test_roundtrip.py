"""
Everyday SFTP work with a real client (paramiko) against the real service:
each test drives the whole stack (SSH, the SFTP protocol, the thread pool,
``Confined``) and checks the result on disk, not only what the client says.
"""

from __future__ import annotations

import os
import stat

import paramiko
import pytest
import pytest_twisted

from tests.sftp.clients import connect
from tests.sftp.conftest import PASSWORD


def _session(rig, fn, username="srv1", password=PASSWORD, pkey=None):
    def run():
        t, s = connect(rig.port, username, password, pkey)
        try:
            return fn(s)
        finally:
            t.close()

    return rig.in_thread(run)


@pytest_twisted.ensureDeferred
async def test_upload_download_list_rename_remove_round_trip(rig):
    await rig.set_login()
    payload = os.urandom(300_000)  # several 32 KiB requests, not a multiple of them

    def work(s: paramiko.SFTPClient):
        with s.open("/world.bin", "wb") as f:
            f.write(payload)
        s.mkdir("/saves")
        s.rename("/world.bin", "/saves/world.bin")
        listing = sorted(s.listdir("/saves"))
        with s.open("saves/world.bin", "rb") as f:
            back = f.read()
        size = s.stat("/saves/world.bin").st_size
        s.remove("/saves/world.bin")
        s.rmdir("/saves")
        return listing, back, size, s.listdir("/")

    listing, back, size, after = await _session(rig, work)
    assert listing == ["world.bin"]
    assert back == payload and size == len(payload)
    assert after == []
    assert list(rig.root().iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_new_files_and_directories_belong_to_the_server_user(rig):
    await rig.set_login()

    def work(s):
        with s.open("/a.txt", "w") as f:
            f.write(b"x")
        s.mkdir("/d")
        s.symlink("a.txt", "/d/link")

    await _session(rig, work)
    for p in (rig.root() / "a.txt", rig.root() / "d", rig.root() / "d" / "link"):
        st = os.lstat(p)
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (1000, 1000), p


@pytest_twisted.ensureDeferred
async def test_chmod_and_utime_apply_but_never_setuid(rig):
    await rig.set_login()
    (rig.root() / "run.sh").write_text("#!/bin/sh\n")

    def work(s):
        s.chmod("/run.sh", 0o4755)
        s.utime("/run.sh", (1_000_000, 2_000_000))
        return s.stat("/run.sh")

    st = await _session(rig, work)
    mode = stat.S_IMODE(os.stat(rig.root() / "run.sh").st_mode)
    assert mode == 0o755  # setuid dropped
    assert st.st_mtime == 2_000_000
    assert os.stat(rig.root() / "run.sh").st_mtime == 2_000_000


@pytest_twisted.ensureDeferred
async def test_chown_is_refused(rig):
    await rig.set_login()
    (rig.root() / "f").write_text("x")
    os.chown(rig.root() / "f", 1000, 1000)

    def work(s):
        with pytest.raises(PermissionError):
            s.chown("/f", 0, 0)
        s.chown("/f", 1000, 1000)  # no change: allowed (clients send it with other attributes)

    await _session(rig, work)
    assert os.stat(rig.root() / "f").st_uid == 1000


@pytest_twisted.ensureDeferred
async def test_symlinks_inside_the_root_are_created_relative_and_followed(rig):
    await rig.set_login()
    (rig.root() / "cfg").mkdir()
    (rig.root() / "cfg" / "server.properties").write_text("motd=hi\n")

    def work(s):
        s.mkdir("/links")
        s.symlink("/cfg/server.properties", "/links/props")  # absolute in the session
        with s.open("/links/props") as f:
            data = f.read()
        return data, s.readlink("/links/props"), s.lstat("/links/props"), s.stat("/links/props")

    data, text, lst, st = await _session(rig, work)
    assert data == b"motd=hi\n"
    assert os.readlink(rig.root() / "links" / "props") == "../cfg/server.properties"
    assert text == "../cfg/server.properties"
    assert stat.S_ISLNK(lst.st_mode) and stat.S_ISREG(st.st_mode)


@pytest_twisted.ensureDeferred
async def test_posix_rename_replaces_and_plain_rename_does_not(rig):
    await rig.set_login()
    (rig.root() / "a").write_text("new")
    (rig.root() / "b").write_text("old")

    def work(s):
        with pytest.raises(IOError):
            s.rename("/a", "/b")  # SSH_FXP_RENAME never replaces
        s.posix_rename("/a", "/b")

    await _session(rig, work)
    assert (rig.root() / "b").read_text() == "new"
    assert not (rig.root() / "a").exists()


@pytest_twisted.ensureDeferred
async def test_listing_shows_links_as_links_and_hides_agent_work_files(rig):
    await rig.set_login()
    (rig.root() / "f.txt").write_text("x")
    (rig.root() / ".ctrlagent-tmp-0123").write_text("partial")
    os.symlink("f.txt", rig.root() / "l")

    def work(s):
        return {a.filename: a.st_mode for a in s.listdir_attr("/")}

    entries = await _session(rig, work)
    assert set(entries) == {"f.txt", "l"}
    assert stat.S_ISLNK(entries["l"]) and stat.S_ISREG(entries["f.txt"])


@pytest_twisted.ensureDeferred
async def test_a_login_by_alias_reaches_the_same_server(rig):
    await rig.set_login()
    (rig.root() / "mine").write_text("x")
    names = await _session(rig, lambda s: s.listdir("/"), username="panel-uuid-1")
    assert names == ["mine"]


@pytest_twisted.ensureDeferred
async def test_each_login_sees_only_its_own_server(rig):
    rig.add_server("srv2")
    (rig.root("srv2") / "theirs").write_text("x")
    (rig.root() / "mine").write_text("x")
    await rig.set_login()
    await rig.set_login("srv2", password="another password")
    assert await _session(rig, lambda s: s.listdir("/")) == ["mine"]
    assert await _session(rig, lambda s: s.listdir("/"), "srv2", "another password") == [
        "theirs"]
    with pytest.raises(paramiko.AuthenticationException):
        await _session(rig, lambda s: None, "srv2", PASSWORD)


@pytest_twisted.ensureDeferred
async def test_read_only_login_reads_but_changes_nothing(rig):
    await rig.set_login(readOnly=True)
    (rig.root() / "keep.txt").write_text("keep")

    def work(s):
        with s.open("/keep.txt") as f:
            data = f.read()
        refused = []
        for name, op in [
            ("write", lambda: s.open("/new.txt", "w")),
            ("append", lambda: s.open("/keep.txt", "a")),
            ("remove", lambda: s.remove("/keep.txt")),
            ("mkdir", lambda: s.mkdir("/d")),
            ("rename", lambda: s.rename("/keep.txt", "/moved")),
            ("chmod", lambda: s.chmod("/keep.txt", 0o777)),
            ("symlink", lambda: s.symlink("keep.txt", "/l")),
        ]:
            try:
                op()
            except PermissionError:
                refused.append(name)
        return data, refused

    data, refused = await _session(rig, work)
    assert data == b"keep"
    assert refused == ["write", "append", "remove", "mkdir", "rename", "chmod", "symlink"]
    assert sorted(p.name for p in rig.root().iterdir()) == ["keep.txt"]
    assert (rig.root() / "keep.txt").read_text() == "keep"
    assert stat.S_IMODE(os.stat(rig.root() / "keep.txt").st_mode) == 0o644


@pytest_twisted.ensureDeferred
async def test_public_key_login(rig):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
    import io

    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
    await rig.set_login(password=None, publicKeys=[public + " player@laptop"])
    (rig.root() / "k").write_text("x")
    assert await _session(rig, lambda s: s.listdir("/"), password=None, pkey=pkey) == ["k"]
    with pytest.raises(paramiko.AuthenticationException):
        await _session(rig, lambda s: None, password=PASSWORD)
    other = paramiko.Ed25519Key.from_private_key(io.StringIO(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()).decode()))
    with pytest.raises(paramiko.AuthenticationException):
        await _session(rig, lambda s: None, password=None, pkey=other)


@pytest_twisted.ensureDeferred
async def test_directory_of_many_entries_lists_completely(rig):
    await rig.set_login()
    for i in range(1500):
        (rig.root() / "f{:05d}".format(i)).write_bytes(b"")
    names = await _session(rig, lambda s: s.listdir("/"))
    assert sorted(names) == ["f{:05d}".format(i) for i in range(1500)]
