"""
The server manager and the agent's service tree at start: a stored server
that cannot be used is reported (with its id and the reason) and quarantined
while the others are served; a start that cannot happen at all ends the
process with one critical line and ``SystemExit(1)``, after releasing every
thread (a thread left behind would keep a dead agent alive on its port).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from ctrlagent.config import AgentConfig, ServersConfig
from ctrlagent.servers.manager import ServerManager
from ctrlagent.servers.store import open_store
from ctrlagent.startup import StartupError
from ctrlagent.tap import AgentService
from ctrlagent.testing.engine import FakeEngine
from tests.startup.test_store_state import corrupt, raw_rows, spec_json


def config_for(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        development=True,
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        servers=ServersConfig(disk_check_interval=0.0, stats_mode="poll"),
    )


def manager_for(config: AgentConfig) -> ServerManager:
    store = open_store(reactor, config.state_dir)
    clock = Clock()
    return ServerManager(reactor, config, FakeEngine(clock), store, clock=clock)


class Logged:
    """Every log event while in use."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> Logged:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def at(self, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level") == level]


def aliased(server_id: str, alias: str) -> str:
    spec = json.loads(spec_json(server_id))
    spec["aliases"] = [alias]
    return json.dumps(spec)


@pytest_twisted.ensureDeferred
async def test_unusable_stored_servers_are_quarantined_and_the_others_served(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path)
    store = open_store(reactor, config.state_dir)
    for sid in ("a", "not-json", "no-image", "imposter", "dup-alias", "z"):
        await store.insert(sid, spec_json(sid))
    await store.update("a", spec=aliased("a", "shared"))
    await store.update("dup-alias", spec=aliased("dup-alias", "shared"))
    await store.update("not-json", spec='{"server_id": "not-json", "image"')
    broken = json.loads(spec_json("no-image"))
    del broken["image"]
    await store.update("no-image", spec=json.dumps(broken))
    await store.update("imposter", spec=spec_json("a"))
    await store.close()
    # A row whose id would name a directory outside the data root.
    corrupt(
        Path(config.state_dir) / "servers.sqlite3",
        "INSERT INTO servers (server_id, spec, updated) VALUES ('../escape', ?, 0)",
        spec_json("escape"),
    )
    manager = manager_for(config)
    with Logged() as logged:
        manager.startService()
    try:
        assert sorted(manager.servers) == ["a", "z"]
        assert manager.resolve("shared") == "a"
        warned = {e["server_id"]: e["reason"] for e in logged.at(LogLevel.warn)}
        assert set(warned) == {"not-json", "no-image", "imposter", "dup-alias", "../escape"}
        assert "not valid JSON" in warned["not-json"]
        assert "lacks image" in warned["no-image"]
        assert "names server 'a'" in warned["imposter"]
        assert "alias 'shared' already names server 'a'" in warned["dup-alias"]
        assert "serverId" in warned["../escape"]
        assert not any(e.get("log_failure") for e in logged.events)
    finally:
        await manager.stopService()
    path = Path(config.state_dir) / "servers.sqlite3"
    assert [r[0] for r in raw_rows(path, "servers")] == [b"a", b"z"]
    kept = {r[0]: r[1] for r in raw_rows(path, "quarantine")}
    assert set(kept) == {b"not-json", b"no-image", b"imposter", b"dup-alias", b"../escape"}
    assert kept[b"not-json"] == b'{"server_id": "not-json", "image"'
    # The id of a quarantined server is free again.
    again = manager_for(config)
    again.startService()
    try:
        await again.create_server("not-json", {"image": "img", "skipScripts": True})
        assert "not-json" in again.servers
    finally:
        await again.stopService()


def test_a_data_root_that_is_a_file_stops_the_start_and_releases_the_store(
    tmp_path: Path,
) -> None:
    config = config_for(tmp_path)
    Path(config.data_dir).write_text("oops")
    threads = set(threading.enumerate())
    manager = manager_for(config)
    with pytest.raises(StartupError, match="data directory .* is not a directory"):
        manager.startService()
    assert not manager.running
    assert set(threading.enumerate()) == threads


class _Failing(Service):
    def __init__(self, error: Exception, where: str) -> None:
        self.error = error
        self.where = where

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        if self.where == "privileged":
            raise self.error

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.where == "start":
            raise self.error


@pytest.mark.parametrize("where", ["privileged", "start"])
def test_a_failing_start_exits_with_one_critical_line(
    tmp_path: Path, where: str, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    config = config_for(tmp_path)
    manager = manager_for(config)
    top = AgentService()
    manager.setServiceParent(top)
    _Failing(StartupError("state store /x is not a SQLite database"), where).setServiceParent(
        top
    )
    threads = set(threading.enumerate())
    with Logged() as logged, pytest.raises(SystemExit) as exited:
        top.privilegedStartService()
        top.startService()
    assert exited.value.code == 1
    [line] = logged.at(LogLevel.critical)
    assert line["log_format"] == "ctrlagent: error: {problem}"
    assert line["problem"] == "state store /x is not a SQLite database"
    assert "log_failure" not in line
    # Every thread the manager had is gone: the process can exit.
    assert set(threading.enumerate()) <= threads
    assert manager.store._closed
    fail_on_logged_errors.clear()


def test_an_unexpected_start_failure_is_still_one_line(
    fail_on_logged_errors: list[dict[str, Any]],
) -> None:
    top = AgentService()
    _Failing(KeyError("boom"), "start").setServiceParent(top)
    with Logged() as logged, pytest.raises(SystemExit):
        top.startService()
    [line] = logged.at(LogLevel.critical)
    assert line["problem"].startswith("unexpected KeyError: 'boom' (at ")
    assert "\n" not in line["problem"]
    fail_on_logged_errors.clear()


def test_state_dirs_are_not_created_world_writable(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    manager_for(config).store.close_now()
    assert os.stat(config.state_dir).st_mode & 0o077 == 0
