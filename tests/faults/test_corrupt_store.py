"""
Bad state at start-up: the agent's SQLite store damaged while it was down.

A store the agent cannot use must make it exit non-zero at once with one
clear line naming the problem, so that systemd's ``Restart=always`` and the
operator see it; it must never stay alive holding its port with ``/health``
timing out, and never print a raw traceback.  One bad server record is not a
reason to stop the others: it is reported and set aside, its files kept, and
every other server is served.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.rig import (
    FaultAgent,
    log_events,
    log_messages,
    logged_tracebacks,
    wait_for,
)

# Docker only: store faults: the runtime only runs the game; Podman's share of the fault suite is
# test_agent_kills
pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.docker,
              pytest.mark.runtimes("docker")]

STORE = "servers.sqlite3"
# A store the agent cannot use must be reported within this long.
EXIT_WITHIN = 15.0


def _problem_lines(agent: FaultAgent) -> list[str]:
    """Raw output (stderr) and log events at warning level or above, as text."""
    from twisted.logger import eventFromJSON, formatEvent

    lines = []
    for line in agent.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                event = eventFromJSON(line)
            except Exception:
                lines.append(line)
                continue
            level = event.get("log_level")
            if level is not None and level.name in ("warn", "error", "critical"):
                lines.append(formatEvent(event))
        elif line.strip():
            lines.append(line)
    return lines


def _assert_clear_startup_failure(agent: FaultAgent, names: str) -> None:
    """Exit non-zero, promptly, with a line naming ``names`` and no traceback."""
    code = agent.wait_exit(EXIT_WITHIN)
    if code is None:
        try:
            health = agent.health()
        except OSError as e:
            health = {"error": str(e)}
        agent.kill()
        raise AssertionError(
            "the agent still runs {}s after starting on an unusable store "
            "(/health: {}); log:\n{}".format(EXIT_WITHIN, health, "\n".join(
                log_messages(agent.log_path)[-15:]))
        )
    agent.process = None
    assert code != 0, "exit status 0 on an unusable store"
    tracebacks = logged_tracebacks(agent.log_path)
    assert not tracebacks, "a traceback instead of one clear line:\n" + "\n".join(tracebacks[:3])
    problems = _problem_lines(agent)
    assert any(names in line for line in problems), (
        "no line names {}; warnings, errors and stderr were:\n{}".format(
            names, "\n".join(problems[-15:])
        )
    )


def _create(agent: FaultAgent, server_id: str, image: str, **env: Any) -> None:
    answer = agent.call(
        "create_server",
        server_id,
        {
            "name": server_id,
            "image": image,
            "startup": "/usr/local/bin/gameserver",
            "environment": env,
            "limits": {"memory": 64, "cpu": 50},
        },
    )
    assert answer["success"] is True, answer


def _made_store(agent: FaultAgent, image: str, servers: list[str], running: str | None) -> Path:
    """A real store written by the agent itself (stopped cleanly afterwards)."""
    agent.start()
    for server_id in servers:
        _create(agent, server_id, image, TICK_INTERVAL=0.5)
    if running is not None:
        assert agent.call("start_server", running)["success"] is True
        wait_for(
            lambda: agent.call("get_server_status", running)["data"]["status"] == "running",
            20,
            "the server to run",
        )
    assert agent.stop() in (0, -15)
    store = agent.state_dir / STORE
    assert store.is_file()
    # A clean stop checkpoints the write-ahead log into the database file.
    assert not (agent.state_dir / (STORE + "-wal")).exists() or (
        agent.state_dir / (STORE + "-wal")
    ).stat().st_size == 0
    return store


def test_a_store_of_random_bytes_stops_the_agent_with_one_clear_line(
    make_agent: Callable[..., FaultAgent],
) -> None:
    agent = make_agent()
    agent.state_dir.mkdir(parents=True, mode=0o700)
    (agent.state_dir / STORE).write_bytes(os.urandom(64 * 1024))
    agent.launch()
    _assert_clear_startup_failure(agent, str(agent.state_dir))


def test_a_truncated_store_stops_the_agent_with_one_clear_line(
    make_agent: Callable[..., FaultAgent], scripted_image: str
) -> None:
    agent = make_agent()
    store = _made_store(agent, scripted_image, ["trunc-" + uuid.uuid4().hex[:8]], None)
    size = store.stat().st_size
    assert size >= 8192, size
    # Cut in the middle of the second page: the header is intact, the tables are not.
    with open(store, "r+b") as f:
        f.truncate(4096 + 1000)
    agent.launch()
    _assert_clear_startup_failure(agent, str(agent.state_dir))


def test_a_store_with_a_foreign_schema_stops_the_agent_with_one_clear_line(
    make_agent: Callable[..., FaultAgent],
) -> None:
    agent = make_agent()
    agent.state_dir.mkdir(parents=True, mode=0o700)
    db = sqlite3.connect(agent.state_dir / STORE)
    db.execute("CREATE TABLE servers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO servers (name) VALUES ('from another program')")
    db.commit()
    db.close()
    agent.launch()
    _assert_clear_startup_failure(agent, str(agent.state_dir))


def test_a_state_path_that_is_a_file_stops_the_agent_with_one_clear_line(
    make_agent: Callable[..., FaultAgent],
) -> None:
    agent = make_agent()
    agent.workdir.mkdir(parents=True)
    agent.state_dir.write_text("not a directory\n")
    agent.launch()
    _assert_clear_startup_failure(agent, str(agent.state_dir))


@pytest.mark.parametrize("column", ["spec", "extra"])
def test_one_corrupt_record_is_set_aside_and_the_other_servers_are_served(
    make_agent: Callable[..., FaultAgent], scripted_image: str, column: str
) -> None:
    agent = make_agent()
    tag = uuid.uuid4().hex[:8]
    good, bad, other = "good-" + tag, "bad-" + tag, "other-" + tag
    store = _made_store(agent, scripted_image, [good, bad, other], running=good)
    (agent.data_dir / bad / "world.dat").write_bytes(b"the bad record's world")
    db = sqlite3.connect(store)
    changed = db.execute(
        "UPDATE servers SET {} = ? WHERE server_id = ?".format(column), ('{"broken', bad)
    ).rowcount
    db.commit()
    db.close()
    assert changed == 1

    agent.start(timeout=EXIT_WITHIN)
    health = agent.health()
    assert health["status"] == "healthy", health
    listed = agent.call("list_servers")
    assert listed["success"] is True, listed
    ids = {s["serverId"] for s in listed["data"]["servers"]}
    assert {good, other} <= ids, ids
    wait_for(
        lambda: agent.call("get_server_status", good)["data"]["status"] == "running",
        20,
        "the good server to be re-attached as running",
    )
    assert agent.call("get_server_status", other)["data"]["status"] == "offline"
    reply = agent.call("console:command", good, {"command": "say still served"})
    assert reply["success"] is True, reply
    # The bad record is reported by name, and its files are kept.
    assert any(bad in line for line in log_messages(agent.log_path)), "the bad record is not named"
    assert (agent.data_dir / bad / "world.dat").read_bytes() == b"the bad record's world"
    assert not [e for e in log_events(agent.log_path) if e.get("log_failure")]
