"""
The data and the state filesystems full.

The agent's data directory and state directory are small tmpfs mounts made by
the test (``mount -t tmpfs -o size=...``), filled to the last byte while a game
server runs and prints.  Every file action then answers HTTP 200 with
``success: false`` and a code (PROTOCOL.md section 1), never a raw error
text; nothing already written is lost or left half-written, no work files are
left behind; the agent keeps serving and the console keeps flowing; once space
is freed everything works again, and a restarted agent still knows every
server.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.rig import (
    FaultAgent,
    assert_answer,
    fill_filesystem,
    mounted_tmpfs,
    wait_for,
)
from tests.rig.agentproc import remove_containers_under

# Docker only: full filesystems: the runtime only runs the game; Podman's share of the fault suite
# is test_agent_kills
pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.docker, pytest.mark.slow,
              pytest.mark.runtimes("docker")]

WORK_PREFIX = ".ctrlagent-"  # the agent's temp and keep files


def _refused(agent: FaultAgent, action: str, server_id: str, payload: dict[str, Any]) -> str:
    """The action fails cleanly: success false with a code; the code."""
    answer = agent.call(action, server_id, payload)
    code = assert_answer(answer, action)
    assert code is not None, "{} succeeded on a full filesystem: {!r}".format(action, answer)
    return code


def _no_work_files(server_dir: Path) -> None:
    left = [name for name in os.listdir(server_dir) if name.startswith(WORK_PREFIX)]
    assert not left, "work files left behind: {}".format(left)


def _ticks(agent: FaultAgent, server_id: str) -> list[int]:
    """The numbers of the game's "tick <n>" lines in the console history."""
    answer = agent.call("console:history", server_id, {"lines": 1000})
    assert answer["success"] is True, answer
    return [
        int(line.split()[1])
        for line in answer["data"]["history"]
        if line.startswith("tick ") and line.split()[1].isdigit()
    ]


def _last_tick(agent: FaultAgent, server_id: str) -> int:
    return max(_ticks(agent, server_id), default=0)


def test_full_filesystems_answer_coded_errors_lose_nothing_and_recover(
    make_agent: Callable[..., FaultAgent], scripted_image: str
) -> None:
    agent = make_agent()
    tag = uuid.uuid4().hex[:8]
    server, later = "full-" + tag, "later-" + tag
    keep_text = "".join("line {} of the kept file\n".format(i) for i in range(800))
    keep_bytes = os.urandom(16 * 1024)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mounted_tmpfs(agent.data_dir, "2m"))
        # The store's write-ahead log alone grows to about 4 MB between checkpoints.
        stack.enter_context(mounted_tmpfs(agent.state_dir, "8m"))
        stack.callback(remove_containers_under, agent.docker_host, agent.data_dir)
        stack.callback(agent.stop)
        agent.start()
        created = agent.call(
            "create_server",
            server,
            {"name": server, "image": scripted_image, "startup": "/usr/local/bin/gameserver",
             "environment": {"TICK_INTERVAL": 0.05}, "limits": {"memory": 64, "cpu": 50}},
        )
        assert created["success"] is True, created
        assert agent.call("start_server", server)["success"] is True
        wait_for(lambda: _last_tick(agent, server) > 5, 20, "the console flowing")
        assert agent.call("write_file", server, {"path": "keep.txt", "content": keep_text})[
            "success"
        ] is True
        uploaded = agent.call(
            "upload_file",
            server,
            {"path": "keep.bin", "content": base64.b64encode(keep_bytes).decode()},
        )
        assert uploaded["success"] is True, uploaded
        server_dir = agent.data_dir / server

        # -- the data filesystem full ------------------------------------------------------
        data_filler = agent.data_dir / "filler"
        fill_filesystem(data_filler)
        big_text = "x" * (200 * 1024)
        big_b64 = base64.b64encode(os.urandom(150 * 1024)).decode()
        _refused(agent, "write_file", server, {"path": "keep.txt", "content": big_text})
        _refused(agent, "write_file", server, {"path": "new.txt", "content": big_text})
        _refused(agent, "upload_file", server, {"path": "keep.bin", "content": big_b64})
        chunk = base64.b64encode(os.urandom(100 * 1024)).decode()
        first = agent.call(
            "upload_file", server, {"path": "big.bin.chunk0", "content": chunk, "totalChunks": 2}
        )
        second = agent.call(
            "upload_file", server, {"path": "big.bin.chunk1", "content": chunk, "totalChunks": 2}
        )
        assert assert_answer(first, "chunk 0") or assert_answer(second, "chunk 1"), (
            "a chunked upload larger than the free space succeeded"
        )
        archived = agent.call(
            "create_archive",
            server,
            {"files": ["keep.txt", "keep.bin"], "archivePath": "backup.tar", "format": "tar"},
        )
        assert assert_answer(archived, "create_archive") is not None, archived
        assert_answer(
            agent.call("create_server", later, {"name": later, "image": scripted_image}),
            "create_server with the data filesystem full",
        )
        # Nothing written before is lost, nothing half-written is left.
        assert (server_dir / "keep.txt").read_text() == keep_text
        assert (server_dir / "keep.bin").read_bytes() == keep_bytes
        assert not (server_dir / "new.txt").exists()
        assert not (server_dir / "big.bin").exists()
        assert not (server_dir / "backup.tar").exists()
        _no_work_files(server_dir)
        read = agent.call("read_file", server, {"path": "keep.txt"})
        assert read["success"] is True and read["data"]["content"] == keep_text
        assert agent.health()["status"] == "healthy"

        data_filler.unlink()
        for name in ("big.bin.chunk0", "big.bin.chunk1"):
            with contextlib.suppress(FileNotFoundError):
                (server_dir / name).unlink()
        written = agent.call("write_file", server, {"path": "keep.txt", "content": big_text})
        assert written["success"] is True, written
        assert (server_dir / "keep.txt").read_text() == big_text
        if agent.call("get_server_status", later).get("success"):
            agent.call("delete_server", later, {"purgeFiles": True})

        # -- the state filesystem full -----------------------------------------------------
        state_filler = agent.state_dir / "filler"
        fill_filesystem(state_filler)
        before = _last_tick(agent, server)
        code = _refused(
            agent,
            "create_server",
            later,
            {"name": later, "image": scripted_image, "startup": "/usr/local/bin/gameserver"},
        )
        refusal = agent.call("create_server", later, {"name": later, "image": scripted_image})
        assert assert_answer(refusal, "create_server") is not None
        text = refusal["error"].lower()
        assert "sqlite" not in text and "database or disk is full" not in text, (
            "the store's raw error reaches the Panel ({}): {!r}".format(code, refusal["error"])
        )
        # The agent keeps serving, and the console keeps flowing.
        assert agent.health()["status"] == "healthy"
        assert agent.call("get_server_status", server)["data"]["status"] == "running"
        assert agent.call("list_servers")["success"] is True
        wait_for(
            lambda: _last_tick(agent, server) > before + 10,
            10,
            "console lines while the state filesystem is full",
        )
        state_filler.unlink()

        created = agent.call(
            "create_server",
            later,
            {"name": later, "image": scripted_image, "startup": "/usr/local/bin/gameserver"},
        )
        assert created["success"] is True, created

        # Nothing the agent acknowledged is lost: a restarted agent knows both servers.
        assert agent.stop() in (0, -15)
        agent.start()
        listed = agent.call("list_servers")
        ids = {s["serverId"] for s in listed["data"]["servers"]}
        assert {server, later} <= ids, ids
        wait_for(
            lambda: agent.call("get_server_status", server)["data"]["status"] == "running",
            20,
            "the running server re-attached",
        )
        assert (server_dir / "keep.bin").read_bytes() == keep_bytes
