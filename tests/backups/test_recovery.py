"""
An agent SIGKILLed in the middle of a backup: the next agent marks the
backup failed and removes its partial archive.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.backups.rig import Rig, make_rig, partials


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
async def test_an_agent_killed_mid_backup_leaves_a_failed_backup_and_no_partial(
        rig: Rig) -> None:
    (rig.root() / "noise").write_bytes(os.urandom(8 * 1024 * 1024))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-m", "tests.backups.killed_agent", str(rig.base)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = b""
        while b"writing" not in line and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            line = proc.stdout.readline()
            if not line:
                break
        assert b"writing" in line, proc.stderr.read() if proc.stderr else b""
        assert partials(rig.config.directory)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    m = rig.manager()
    m.startService()
    await m.ready
    (row,) = (await m.list_backups("srv1"))["backups"]
    assert row["status"] == "failed" and "stopped during the backup" in row["error"]
    assert not partials(rig.config.directory)
