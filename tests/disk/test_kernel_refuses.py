"""
EDQUOT from the kernel reaches every writer as the clear disk-full error
(``INSUFFICIENT_RESOURCES`` / an SFTP failure naming the quota), never a
traceback: SFTP and archive extraction into a subvolume whose qgroup is
full.  Neither is told of the limit: only the kernel can refuse.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
import pytest_twisted

from ctrlagent.config import FilesConfig
from ctrlagent.errors import InsufficientResources
from ctrlagent.files.manager import FileManager
from ctrlagent.interfaces import ServerRoot
from tests.disk.test_btrfs import MiB, datadirs
from tests.sftp.conftest import rig, sftp_config, use_openat2  # noqa: F401 (fixtures)
from tests.sftp.test_quota import _run, _upload


@pytest.fixture
def tmp_path(data_root: Path) -> Path:
    """The SFTP rig's directories, on the btrfs filesystem."""
    return data_root


@pytest_twisted.ensureDeferred
async def test_an_sftp_upload_past_the_qgroup_fails_with_the_quota_message(
    rig: object, data_root: Path,  # noqa: F811 (the imported fixture)
) -> None:
    dirs = datadirs(data_root / "servers")
    await dirs.prepare("kq", (1000, 1000), settle=True, disk_limit=1 * MiB)
    rig.add_server("kq")  # type: ignore[attr-defined]
    await rig.set_login("kq")  # type: ignore[attr-defined]

    def work(s: object) -> str:
        with pytest.raises(OSError) as e:
            _upload(s, "/big.bin", os.urandom(2 * MiB))
        return str(e.value)

    message = await _run(rig, work, username="kq")
    assert "quota" in message.lower(), message
    assert os.path.getsize(data_root / "servers" / "kq" / "big.bin") <= MiB


@pytest_twisted.ensureDeferred
async def test_an_extraction_past_the_qgroup_is_refused_and_leaves_nothing_half_done(
    data_root: Path,
) -> None:
    dirs = datadirs(data_root)
    await dirs.prepare("s1", (0, 0), settle=True, disk_limit=2 * MiB)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("world/a.bin", b"\0" * (3 * MiB))
    (data_root / "s1" / "pack.zip").write_bytes(buf.getvalue())
    from twisted.internet import reactor

    fm = FileManager(reactor, FilesConfig())
    root = ServerRoot("s1", str(data_root / "s1"), None, 0, 0)
    with pytest.raises(InsufficientResources):
        await fm.extract_archive(root, "pack.zip", "out")
    assert not (data_root / "s1" / "out" / "world" / "a.bin").exists()
