"""
The data root is the agent's alone (0700): whatever a game leaves in its
directory (a setuid file made as root in a ``user: "image"`` container, or
as the server's uid) is out of every other host user's reach.  A real
unprivileged process tries to reach it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import pytest_twisted

from ctrlagent.config import DiskConfig
from ctrlagent.files.usage import Meter
from ctrlagent.servers.datadir import DataDirs

NOBODY = 65534


def datadirs(root: Path) -> DataDirs:
    from twisted.internet import reactor

    return DataDirs(reactor, str(root), reactor.getThreadPool(), DiskConfig(mode="walk"), Meter())


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_data_root_is_the_agents_alone(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "servers"
    datadirs(root).start()
    assert mode(root) == 0o700


def test_the_managers_new_data_root_is_made_closed_with_nothing_to_say(
    tmp_path: Path, log_lines: list[str],
) -> None:
    from ctrlagent.servers.manager import _ensure_data_root

    root = tmp_path / "fresh"
    _ensure_data_root(str(root))  # the manager's start, before the data dirs'
    assert mode(root) == 0o700
    datadirs(root).start()
    assert not [line for line in log_lines if "-> 700" in line]


def test_an_open_data_root_of_the_agents_is_closed_with_one_line(
    tmp_path: Path, log_lines: list[str],
) -> None:
    root = tmp_path / "servers"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    datadirs(root).start()
    assert mode(root) == 0o700
    assert [line for line in log_lines if "data directory" in line and "755 -> 700" in line]
    # Closed already: nothing to say the next time.
    log_lines.clear()
    datadirs(root).start()
    assert not [line for line in log_lines if "-> 700" in line]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_an_open_data_root_of_another_owner_is_left_with_a_warning(
    tmp_path: Path, log_lines: list[str],
) -> None:
    root = tmp_path / "servers"
    root.mkdir()
    os.chmod(root, 0o755)
    os.chown(root, NOBODY, NOBODY)
    datadirs(root).start()
    assert mode(root) == 0o755
    assert [line for line in log_lines if "host users may reach the servers' files" in line]


def as_nobody(path: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``path`` as a host user with no privilege at all."""
    return subprocess.run(
        [str(path)], user=NOBODY, group=NOBODY, extra_groups=[],
        capture_output=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )


def plant_setuid(where: Path) -> Path:
    """What a game running as root in its container can leave behind."""
    planted = where / "sh"
    shutil.copy("/bin/true", planted)
    os.chown(planted, 0, 0)
    os.chmod(planted, 0o4755)
    return planted


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another host user")
@pytest_twisted.ensureDeferred
async def test_a_host_user_cannot_reach_a_setuid_file_a_game_left() -> None:
    # Under /tmp, so that no directory above is a barrier of its own.
    top = Path(tempfile.mkdtemp(prefix="ctrlagent-root-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        # The control: in an open directory, the host user runs it.
        (top / "open").mkdir(mode=0o755)
        try:
            control = as_nobody(plant_setuid(top / "open"))
        except PermissionError:
            pytest.skip("/tmp is mounted noexec: no host user runs anything there")
        assert control.returncode == 0
        root = top / "servers"
        data = datadirs(root)
        data.start()
        await data.prepare("s1", (1000, 1000))
        assert mode(root / "s1") == 0o755  # open to the server's own user
        planted = plant_setuid(root / "s1")
        with pytest.raises(PermissionError):
            as_nobody(planted)
        assert mode(root) == 0o700
    finally:
        shutil.rmtree(top)
