"""
The backups in the agent's service tree: built by ``tap.build_service``
between SFTP and the transports, reached by the actions, their events by the
Panel link and their archives by the API; a backups database that cannot be
used ends the start with one line naming it.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from ctrlagent.backups.manager import BackupManager
from ctrlagent.backups.store import BackupStoreUnusable
from ctrlagent.config import AgentConfig, PanelConfig
from ctrlagent.errors import CtrlAgentError
from ctrlagent.startup import StartupError, describe_startup_failure
from ctrlagent.tap import AgentService, build_service, makeService
from ctrlagent.wire.command import Command


def config_for(tmp_path: Path) -> AgentConfig:
    (tmp_path / "state").mkdir(exist_ok=True)
    return AgentConfig(
        development=True,
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        sftp=AgentConfig().sftp.__class__(enabled=False),
        # A configured Panel WebSocket: the link is built (never started here).
        panel=PanelConfig(url="ws://127.0.0.1:1/agent"),
    )


async def _close(top: AgentService) -> None:
    await top.getServiceNamed("servers").store.close()  # type: ignore[attr-defined]
    await top.getServiceNamed("backups").store.close()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_the_backups_are_a_service_between_the_servers_and_the_transports(
    tmp_path: Path,
) -> None:
    top = build_service(reactor, config_for(tmp_path))  # built, not started
    try:
        assert [child.name for child in top] == ["banner", "servers", "backups", "panel", "http"]
        backups = top.getServiceNamed("backups")
        assert isinstance(backups, BackupManager)
        assert backups.servers is top.getServiceNamed("servers")
        assert backups.store.path == str(tmp_path / "state" / "backups.sqlite3")
        assert backups.config.directory == str(tmp_path / "state" / "backups")
        # Its own thread pool, sized by backups.concurrency, not started before the service.
        assert backups.owns_threadpool and not backups.threadpool.started
        assert backups.threadpool.max == AgentConfig().backups.concurrency + 2
        # The actions reach it (an unknown server, not "backups not available") ...
        http = top.getServiceNamed("http")
        dispatcher = http._api._dispatcher  # type: ignore[attr-defined]
        with pytest.raises(CtrlAgentError) as e:
            await dispatcher.dispatch(Command("list_backups", "no-such-server", {}))
        assert e.value.code == "SERVER_NOT_FOUND"
        # ... the API serves its downloads, the Panel link listens to its events.
        assert http._api._backup_download is not None  # type: ignore[attr-defined]
        assert top.getServiceNamed("panel")._backups is backups  # type: ignore[attr-defined]
    finally:
        await _close(top)


def _corrupt_database(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "backups.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(path).execute("SELECT 1 FROM sqlite_master")
    return path


def test_a_corrupt_backups_database_is_a_startup_error_naming_it(tmp_path: Path) -> None:
    path = _corrupt_database(tmp_path)
    with pytest.raises(BackupStoreUnusable) as e:
        build_service(reactor, config_for(tmp_path))
    assert isinstance(e.value, StartupError)
    line = describe_startup_failure(e.value)
    assert "\n" not in line
    assert line.startswith("backups database {} cannot be used (".format(path))
    assert line.endswith("); move it away")


def test_a_corrupt_backups_database_ends_twistd_with_one_line_and_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _corrupt_database(tmp_path)
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    options: Any = SimpleNamespace(config=config_for(tmp_path))
    with pytest.raises(SystemExit) as exited:
        makeService(options)
    assert exited.value.code == 1
    [line] = stderr.getvalue().splitlines()
    assert line.startswith("ctrlagent: error: backups database {} cannot be used".format(path))
    assert "Traceback" not in stderr.getvalue()


@pytest_twisted.ensureDeferred
async def test_the_managers_own_thread_pool_starts_and_stops_with_the_service(
    tmp_path: Path,
) -> None:
    from ctrlagent.backups.manager import build_backup_manager
    from ctrlagent.testing.servers import FakeServerManager
    from ctrlagent.work import Tracker

    config = AgentConfig().backups
    manager = build_backup_manager(
        config, FakeServerManager(clock=reactor, data_dir=str(tmp_path / "data")),
        reactor=reactor, clock=reactor, tracker=Tracker("backups"),
        state_dir=str(tmp_path / "state"), data_dir=str(tmp_path / "data"),
    )
    # Local archives under the state directory when backups.directory is empty.
    assert manager.config.directory == str(tmp_path / "state" / "backups")
    pool = manager.threadpool
    assert manager.owns_threadpool and not pool.started
    manager.startService()
    await manager.ready
    assert pool.started
    await manager.stopService()
    assert not pool.started
    assert not [t for t in pool.threads if t.is_alive()]


def test_a_failed_start_elsewhere_releases_the_backups_threads(tmp_path: Path) -> None:
    from ctrlagent.backups.manager import build_backup_manager
    from ctrlagent.testing.servers import FakeServerManager
    from ctrlagent.work import Tracker

    manager = build_backup_manager(
        AgentConfig().backups, FakeServerManager(clock=reactor),
        reactor=reactor, clock=reactor, tracker=Tracker("backups"),
        state_dir=str(tmp_path / "state"), data_dir=None,
    )
    manager.threadpool.start()
    manager.abort_start()
    assert not manager.threadpool.started
    with pytest.raises(CtrlAgentError, match="closed"):
        manager.store.get("x")
