"""
A ``BackupManager`` wired as the agent would wire it, over a fake server
manager: real thread pool, real SQLite store, real local driver, a
``Clock`` for schedules and stop waits.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from ctrlagent.backups.config import BackupsConfig, parse_backups_config
from ctrlagent.backups.drivers import LocalDriver
from ctrlagent.backups.events import BackupEvent
from ctrlagent.backups.manager import BackupManager
from ctrlagent.backups.store import BackupStore
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.work import Tracker


class GatedDriver(LocalDriver):
    """A local driver whose writers wait for ``gate`` and count how many run at once."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.started = threading.Semaphore(0)
        self.free: int | None = None

    def open_writer(self, server_id: str, backup_id: str) -> Any:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        self.started.release()
        try:
            self.gate.wait(30)
            writer = super().open_writer(server_id, backup_id)
        except BaseException:
            self._done()
            raise
        inner_commit, inner_abort = writer.commit, writer.abort

        def commit() -> str:
            try:
                return inner_commit()
            finally:
                self._done()

        def abort() -> None:
            try:
                inner_abort()
            finally:
                self._done()

        writer.commit, writer.abort = commit, abort  # type: ignore[method-assign]
        return writer

    def _done(self) -> None:
        with self.lock:
            self.active -= 1

    def free_bytes(self) -> int | None:
        return self.free if self.free is not None else super().free_bytes()


@dataclass
class Rig:
    """Everything a manager test touches."""

    base: Path
    servers: FakeServerManager
    clock: Clock
    pool: ThreadPool
    driver: GatedDriver
    config: BackupsConfig
    events: list[BackupEvent] = field(default_factory=list)
    managers: list[BackupManager] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.base / "servers"

    def root(self, server_id: str = "srv1") -> Path:
        return self.data_dir / server_id

    def manager(self, drivers: dict[str, Any] | None = None) -> BackupManager:
        """A (new) manager over the same state: what a restarted agent builds."""
        store = BackupStore(global_reactor, str(self.base / "state" / "backups.sqlite3"))
        m = BackupManager(self.config, self.servers, store,
                          {"local": self.driver, **(drivers or {})},
                          reactor=global_reactor, clock=self.clock, threadpool=self.pool,
                          tracker=Tracker("backups-test"), data_dir=str(self.data_dir))
        m.add_listener(self.events.append)
        self.managers.append(m)
        return m

    def add_server(self, server_id: str) -> Path:
        self.servers.create_server(server_id, {"image": "game"})
        root = self.root(server_id)
        root.mkdir(parents=True, exist_ok=True)
        return root


def make_rig(base: Path, **settings: Any) -> Rig:
    (base / "servers").mkdir(parents=True, exist_ok=True)
    clock = Clock()
    clock.advance(1_700_000_000)  # 2023-11-14T22:13:20Z
    servers = FakeServerManager(clock=clock, data_dir=str(base / "servers"))
    pool = ThreadPool(minthreads=1, maxthreads=4, name="backups-test")
    pool.start()
    config = parse_backups_config({"directory": str(base / "archives"), **settings},
                                  state_dir=str(base / "state"))
    driver = GatedDriver(config.directory)
    rig = Rig(base, servers, clock, pool, driver, config)
    rig.add_server("srv1")
    return rig


def partials(directory: str) -> list[str]:
    """Partial archive files left under ``directory``."""
    out = []
    for dirpath, _, files in os.walk(directory):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".partial")]
    return out
