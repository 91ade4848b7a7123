import pytest_twisted

from tests.sftp.clients import connect
from tests.sftp.conftest import PASSWORD


@pytest_twisted.ensureDeferred
async def test_upload_and_download_round_trip(rig):
    await rig.set_login()

    def client():
        t, s = connect(rig.port, "srv1", PASSWORD)
        try:
            with s.open("/hello.txt", "w") as f:
                f.write(b"hello world")
            with s.open("/hello.txt", "r") as f:
                return f.read(), sorted(s.listdir("/"))
        finally:
            t.close()

    data, names = await rig.in_thread(client)
    assert data == b"hello world"
    assert names == ["hello.txt"]
    assert (rig.root() / "hello.txt").read_bytes() == b"hello world"
