"""
The disk limit on every SFTP write (the class of Wings' advisory where SFTP
writes ignored it): a write that would take the server past its limit fails
with a quota message and writes nothing, so the file is never bigger than
the limit allows; truncating frees room; growing by SETSTAT is charged too.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from tests.sftp.clients import connect
from tests.sftp.conftest import PASSWORD

MB = 1024 * 1024


def _usage(path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _run(rig, fn, username="quota"):
    def run():
        t, s = connect(rig.port, username, PASSWORD)
        try:
            return fn(s)
        finally:
            t.close()

    return rig.in_thread(run)


@pytest.fixture
def limited(rig):
    rig.add_server("quota", disk_mb=1)
    return rig.root("quota")


def _upload(s, path, data, chunk=32 * 1024):
    """Write in chunks, as every client does; the error names the failure."""
    with s.open(path, "wb") as f:
        for i in range(0, len(data), chunk):
            f.write(data[i:i + chunk])


@pytest_twisted.ensureDeferred
async def test_an_upload_past_the_limit_fails_and_leaves_at_most_the_limit(rig, limited):
    await rig.set_login("quota")

    def work(s):
        with pytest.raises(OSError) as e:
            _upload(s, "/big.bin", os.urandom(2 * MB))
        return str(e.value)

    message = await _run(rig, work)
    assert "quota" in message
    assert os.path.getsize(limited / "big.bin") <= MB
    assert _usage(limited) <= MB


@pytest_twisted.ensureDeferred
async def test_files_already_there_count_and_truncation_frees_room(rig, limited):
    (limited / "world.dat").write_bytes(b"\0" * (800 * 1024))
    await rig.set_login("quota")

    def work(s):
        with pytest.raises(OSError):
            _upload(s, "/more.bin", os.urandom(300 * 1024))
        partial = s.stat("/more.bin").st_size
        # Replacing the world (open with truncation) gives its room back.
        _upload(s, "/world.dat", os.urandom(700 * 1024))
        return partial

    partial = await _run(rig, work)
    assert partial <= MB - 800 * 1024
    assert os.path.getsize(limited / "world.dat") == 700 * 1024
    assert _usage(limited) <= MB


@pytest_twisted.ensureDeferred
async def test_growing_by_setstat_or_a_far_offset_is_charged(rig, limited):
    await rig.set_login("quota")

    def work(s):
        _upload(s, "/f", b"x")
        with pytest.raises(OSError):
            s.truncate("/f", 10 * MB)  # a sparse file still counts its apparent size
        with s.open("/f", "r+") as f:
            f.seek(5 * MB)
            with pytest.raises(OSError):
                f.write(b"y")
                f.flush()
        s.truncate("/f", 1000)  # within the limit: fine

    await _run(rig, work)
    assert os.path.getsize(limited / "f") == 1000


@pytest_twisted.ensureDeferred
async def test_parallel_sessions_share_one_limit(rig, limited):
    await rig.set_login("quota")

    def work(name):
        def upload(s):
            try:
                _upload(s, name, os.urandom(400 * 1024))
            except OSError:
                return False
            return True

        return _run(rig, upload)

    results = await gatherResults([work("/p{}".format(i)) for i in range(4)])
    assert results.count(True) <= 2
    assert _usage(limited) <= MB


@pytest_twisted.ensureDeferred
async def test_absurd_offsets_and_sizes_get_errors_not_crashes(rig):
    await rig.set_login()

    def work(s):
        _upload(s, "/f", b"abc")
        with s.open("/f", "r") as f:
            f.seek(2 ** 63)
            assert f.read(10) == b""  # EOF
        with s.open("/f", "r+") as f:
            f.seek(2 ** 62)
            with pytest.raises(OSError):
                f.write(b"x")
                f.flush()
        with pytest.raises(OSError):
            s.truncate("/f", 2 ** 63)
        return s.stat("/f").st_size

    assert await _run(rig, work, "srv1") == 3
