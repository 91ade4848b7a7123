"""
Backups in the real agent: ``twistd -n ctrlagent`` driving a server made
from the scripted image, everything through the API as the Panel would:
a file written with ``write_file``, ``create_backup`` through
``POST /api/command``, ``list_backups`` polled until the backup completed,
the file changed, ``restore_backup {stop: true}`` while the server runs
(the agent stops it, then puts the files back), and the archive downloaded
over HTTP, whole and with a ``Range`` header.
"""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.test_panel_http import PANEL_ID, UUID, create_payload, ok, post, wait_status
from tests.rig.agentproc import AgentProcess

# Docker only: backups archive the data directory: the runtime only runs the game
pytestmark = [pytest.mark.e2e, pytest.mark.runtimes("docker")]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _backup(agent: AgentProcess, backup_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll list_backups (bounded) until the backup is no longer running."""
    found: dict[str, Any] = {}
    for _ in range(int(timeout / 0.2)):
        listed = ok(agent, "list_backups", PANEL_ID)
        assert listed["count"] == len(listed["backups"])
        found = {b["id"]: b for b in listed["backups"]}.get(backup_id, {})
        if found.get("status") not in (None, "running"):
            return found
        time.sleep(0.2)
    raise AssertionError("backup {} never finished: {}".format(backup_id, found))


def _download(agent: AgentProcess, backup_id: str, **headers: str) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(
        "{}/api/servers/{}/backups/{}/download".format(agent.base_url, PANEL_ID, backup_id),
        headers={"Authorization": "Bearer " + agent.secret, **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _read(agent: AgentProcess, path: str) -> str:
    return str(ok(agent, "read_file", PANEL_ID, path=path)["content"])


def test_a_backup_made_and_restored_over_the_api_and_downloaded_with_a_range(
    make_agent: Callable[..., AgentProcess], scripted_image: str
) -> None:
    agent = make_agent().start()
    ok(agent, "create_server", UUID, **create_payload(scripted_image))
    wait_status(agent, PANEL_ID, "offline")
    ok(agent, "write_file", PANEL_ID, path="world/level.dat", content="the world as it was\n")
    ok(agent, "write_file", PANEL_ID, path="server.log", content="noise\n")
    ok(agent, "start_server", UUID)
    wait_status(agent, PANEL_ID, "running")

    created = ok(agent, "create_backup", PANEL_ID, name="before the dragon", ignore=["*.log"])
    assert created["status"] == "running"
    backup = _backup(agent, created["backupId"])
    assert backup["status"] == "completed", backup
    assert backup["name"] == "before the dragon" and backup["driver"] == "local"
    assert backup["size"] > 0 and backup["files"] >= 1

    ok(agent, "write_file", PANEL_ID, path="world/level.dat", content="burnt by the dragon\n")
    # While the server runs, a restore without stop is refused with a code.
    status, answer = post(agent, {"action": "restore_backup", "serverId": PANEL_ID,
                                  "payload": {"backupId": backup["id"]}})
    assert (status, answer["success"], answer["code"]) == (200, False, "CONFLICT")
    assert _read(agent, "world/level.dat") == "burnt by the dragon\n"

    restored = ok(agent, "restore_backup", PANEL_ID, backupId=backup["id"], stop=True)
    if restored.get("status") == "restoring":  # the answer came before the restore ended
        for _ in range(300):
            if _read(agent, "world/level.dat") == "the world as it was\n":
                break
            time.sleep(0.2)
    assert _read(agent, "world/level.dat") == "the world as it was\n"
    assert (agent.data_dir / UUID / "world" / "level.dat").read_text() == "the world as it was\n"
    # The restore stopped the server; the log the backup left out is still there.
    assert ok(agent, "get_server_status", PANEL_ID)["status"] == "offline"
    assert _read(agent, "server.log") == "noise\n"

    code, headers, whole = _download(agent, backup["id"])
    assert code == 200
    assert whole.startswith(ZSTD_MAGIC) and len(whole) == backup["size"]
    assert hashlib.sha256(whole).hexdigest() == backup["checksum"]
    assert headers["Accept-Ranges"] == "bytes"
    code, headers, part = _download(agent, backup["id"], Range="bytes=4-99")
    assert code == 206 and part == whole[4:100]
    assert headers["Content-Range"] == "bytes 4-99/{}".format(len(whole))
    code, headers, _ = _download(agent, backup["id"], Range="bytes={}-".format(len(whole)))
    assert code == 416 and headers["Content-Range"] == "bytes */{}".format(len(whole))
    code, _, _ = _download(agent, "no-such-backup")
    assert code == 404

    log = agent.log_path.read_text(errors="replace")
    assert "Traceback" not in log
