"""
The S3 driver against a real S3 API on loopback (moto in server mode):
streaming multipart uploads with one part in memory at most, retried
parts, aborted uploads leaving nothing behind, ranged downloads, and a
whole backup and restore through the manager.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.backups.config import S3_MAX_PARTS, S3_MIN_PART, S3Config
from ctrlagent.backups.s3 import S3Driver, S3Error, capacity, part_size_for
from tests.backups.conftest import populate, tree
from tests.backups.rig import Rig, make_rig
from tests.backups.s3rig import MotoServer, moto_server  # noqa: F401 - fixture
from tests.backups.test_manager import started

MiB = 1024 * 1024
TiB = 1024 ** 4


@pytest.fixture
def bucket(moto_server: MotoServer) -> Iterator[str]:  # noqa: F811
    name = "b-" + uuid.uuid4().hex[:12]
    moto_server.client().create_bucket(Bucket=name)
    yield name


def make_driver(moto_server: MotoServer, bucket: str, client: Any = None,  # noqa: F811
                **kw: Any) -> S3Driver:
    config = S3Config(endpoint=moto_server.endpoint, bucket=bucket, access_key="test",
                      secret_key="test", path_style=True, part_size=S3_MIN_PART, **kw)
    return S3Driver(config, client=client)


def uploads(moto_server: MotoServer, bucket: str) -> list[Any]:  # noqa: F811
    return moto_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_part_sizes_hold_the_largest_object_s3_takes() -> None:
    assert capacity(S3_MIN_PART) >= 5 * TiB
    assert part_size_for(1, 64 * MiB) == 64 * MiB
    assert part_size_for(S3_MAX_PARTS, 64 * MiB) == 5 * 1024 * MiB
    assert all(part_size_for(n, S3_MIN_PART) >= S3_MIN_PART for n in range(1, 10_001, 97))


def test_multipart_upload_streams_with_one_part_in_memory(
        moto_server: MotoServer, bucket: str) -> None:  # noqa: F811
    driver = make_driver(moto_server, bucket)
    data = os.urandom(12 * MiB)
    w = driver.open_writer("srv1", "b1")
    for i in range(0, len(data), MiB):
        w.write(data[i:i + MiB])
    key = w.commit()
    assert len(w.parts) == 3
    assert w.most_buffered <= S3_MIN_PART + MiB
    with driver.open_reader(key) as r:  # type: ignore[attr-defined]
        assert r.read() == data
    r = driver.open_reader(key, 100, 50)
    assert r.read() == data[100:150]
    r.close()
    assert uploads(moto_server, bucket) == []
    driver.delete(key)
    assert "Contents" not in moto_server.client().list_objects_v2(Bucket=bucket)


def test_a_small_archive_is_one_put(moto_server: MotoServer, bucket: str) -> None:  # noqa: F811
    driver = make_driver(moto_server, bucket)
    w = driver.open_writer("srv1", "b1")
    w.write(b"tiny")
    key = w.commit()
    assert w.upload_id is None and driver.open_reader(key).read() == b"tiny"


def test_an_aborted_upload_leaves_no_parts_and_no_object(
        moto_server: MotoServer, bucket: str) -> None:  # noqa: F811
    driver = make_driver(moto_server, bucket)
    w = driver.open_writer("srv1", "b1")
    w.write(os.urandom(6 * MiB))
    assert len(uploads(moto_server, bucket)) == 1
    w.abort()
    assert uploads(moto_server, bucket) == []
    assert "Contents" not in moto_server.client().list_objects_v2(Bucket=bucket)


def test_an_upload_left_by_a_killed_agent_is_aborted_on_the_next_start(
        moto_server: MotoServer, bucket: str) -> None:  # noqa: F811
    driver = make_driver(moto_server, bucket)
    w = driver.open_writer("srv1", "b1")
    w.write(os.urandom(6 * MiB))  # one part up, then the process dies
    other = driver.open_writer("srv1", "b2")
    other.write(os.urandom(6 * MiB))
    assert len(uploads(moto_server, bucket)) == 2
    make_driver(moto_server, bucket).discard_partial("srv1", "b1")
    left = uploads(moto_server, bucket)
    assert [u["Key"] for u in left] == [driver.key("srv1", "b2")]
    other.abort()


class Flaky:
    """A client whose first ``failures`` part uploads fail with ``error``."""

    def __init__(self, client: Any, failures: int, error: Exception) -> None:
        self.client = client
        self.failures = failures
        self.error = error

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def upload_part(self, **kw: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise self.error
        return self.client.upload_part(**kw)


def test_a_part_is_retried_with_backoff(moto_server: MotoServer, bucket: str) -> None:  # noqa: F811
    from botocore.exceptions import EndpointConnectionError

    flaky = Flaky(moto_server.client(), 3, EndpointConnectionError(endpoint_url="x"))
    driver = make_driver(moto_server, bucket, client=flaky)
    slept: list[float] = []
    driver.sleep = slept.append
    data = os.urandom(6 * MiB)
    w = driver.open_writer("srv1", "b1")
    w.write(data)
    key = w.commit()
    assert slept == [0.5, 1.0, 2.0]
    assert driver.open_reader(key).read() == data


def test_a_part_failing_for_good_fails_the_upload_clearly(
        moto_server: MotoServer, bucket: str) -> None:  # noqa: F811
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"},
                          "ResponseMetadata": {"HTTPStatusCode": 403}}, "UploadPart")
    driver = make_driver(moto_server, bucket, client=Flaky(moto_server.client(), 99, denied))
    driver.sleep = lambda s: None
    w = driver.open_writer("srv1", "b1")
    with pytest.raises(S3Error, match="AccessDenied"):
        w.write(os.urandom(6 * MiB))
    w.abort()
    assert uploads(moto_server, bucket) == []


@pytest_twisted.async_yield_fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    for m in r.managers:
        if m.running:
            await m.stopService()
    r.pool.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_backup_and_restore_through_s3(rig: Rig, moto_server: MotoServer,  # noqa: F811
                                             bucket: str) -> None:
    populate(rig.root())
    (rig.root() / "big").write_bytes(os.urandom(7 * MiB))
    before = tree(rig.root())
    driver = make_driver(moto_server, bucket)
    m = rig.manager({"s3": driver})
    m.startService()
    await m.ready
    answer = await m.create_backup("srv1", driver="s3")
    record = await m.finished(answer["backupId"])
    assert record.status == "completed" and record.driver == "s3", record.error
    (rig.root() / "big").unlink()
    (rig.root() / "server.properties").write_text("changed")
    await m.restore_backup("srv1", record.id, truncate=True)
    assert tree(rig.root()) == before
    dl = await m.open_download("srv1", record.id, "bytes=0-3")
    assert await dl.read() == b"\x28\xb5\x2f\xfd"  # the zstd magic
    dl.close()
    await m.delete_backup("srv1", record.id)
    assert "Contents" not in moto_server.client().list_objects_v2(Bucket=bucket)
    assert uploads(moto_server, bucket) == []
    _ = started
