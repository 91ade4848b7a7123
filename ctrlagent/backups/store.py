"""
The durable record of backups and schedules (SQLite), in its own file
(``backups.sqlite3`` in the state directory), apart from the servers'
store: its schema and its write rate are the backups' own, and a damaged
backups database never stops the agent's servers from loading.

As ``ServerStore``: ``journal_mode=WAL``, ``synchronous=FULL``, every
statement on one dedicated thread (submission order kept, the reactor never
blocked by an fsync); opening is synchronous, at service construction.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ctrlagent.errors import CtrlAgentError, InsufficientResources
from ctrlagent.startup import StartupError
from ctrlagent.wire.time import iso_ms, iso_ms_or_none

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS backups (
    id          TEXT PRIMARY KEY,
    server_id   TEXT NOT NULL,
    name        TEXT NOT NULL,
    driver      TEXT NOT NULL,
    status      TEXT NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    files       INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0,
    checksum    TEXT,
    location    TEXT,
    created     REAL NOT NULL,
    completed   REAL,
    error       TEXT,
    scheduled   INTEGER NOT NULL DEFAULT 0,
    notes       TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS backups_server ON backups (server_id, created);
CREATE TABLE IF NOT EXISTS schedules (
    server_id    TEXT PRIMARY KEY,
    cron         TEXT NOT NULL,
    retain_last  INTEGER,
    retain_days  REAL,
    driver       TEXT NOT NULL,
    last_run     REAL NOT NULL
);
"""


class BackupStoreUnusable(StartupError):
    """The backups database cannot be used; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class BackupRecord:
    """One backup as stored."""

    id: str
    server_id: str
    name: str
    driver: str
    status: str  # running | completed | failed
    created: float
    size: int = 0
    files: int = 0
    bytes: int = 0
    checksum: str | None = None
    location: str | None = None
    completed: float | None = None
    error: str | None = None
    scheduled: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The Panel's shape (PROTOCOL.md section 5)."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "driver": self.driver,
            "status": self.status,
            "size": self.size,
            "files": self.files,
            "checksum": self.checksum,
            "createdAt": iso_ms(self.created),
            "completedAt": iso_ms_or_none(self.completed),
        }
        if self.error is not None:
            out["error"] = self.error
        if self.notes:
            out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True)
class ScheduleRecord:
    """A server's backup schedule."""

    server_id: str
    cron: str
    retain_last: int | None
    retain_days: float | None
    driver: str
    last_run: float


_COLS = ("id", "server_id", "name", "driver", "status", "created", "size", "files", "bytes",
         "checksum", "location", "completed", "error", "scheduled", "notes")


def _row(row: tuple[Any, ...]) -> BackupRecord:
    values = dict(zip(_COLS, row, strict=True))
    values["scheduled"] = bool(values["scheduled"])
    try:
        notes = json.loads(values["notes"])
        values["notes"] = [str(n) for n in notes] if isinstance(notes, list) else []
    except ValueError:
        values["notes"] = []
    return BackupRecord(**values)


class BackupStore:
    """SQLite record of backups and schedules; writes on the store's own thread."""

    def __init__(self, reactor: IReactorThreads, path: str) -> None:
        self._reactor = reactor
        self.path = path
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as e:
            raise BackupStoreUnusable(
                "backups database {} cannot be used ({}); move it away".format(path, e)
            ) from None
        self._db = db
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="ctrlagent-backups-store")
        self._started = False
        self._closed = False

    def _run(self, fn: Callable[[], T], what: str) -> Deferred[T]:
        if self._closed:
            raise CtrlAgentError("the backups database is closed")
        if not self._started:
            self._started = True
            self._pool.start()

        def guarded() -> T:
            try:
                return fn()
            except sqlite3.Error as e:
                name = getattr(e, "sqlite_errorname", "") or ""
                if name.startswith("SQLITE_FULL"):
                    raise InsufficientResources(
                        "the state disk is full: {} was not stored".format(what)) from None
                raise CtrlAgentError(
                    "the backups database failed ({}): {}".format(e, what)) from None

        return deferToThreadPool(self._reactor, self._pool, guarded)  # type: ignore[arg-type]

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(sql, args)

    # -- backups -------------------------------------------------------------

    def insert(self, record: BackupRecord) -> Deferred[None]:
        """Store a new backup."""
        args = tuple(getattr(record, c) for c in _COLS[:-2]) + (
            int(record.scheduled), json.dumps(record.notes))
        sql = "INSERT INTO backups ({}) VALUES ({})".format(
            ", ".join(_COLS), ", ".join("?" for _ in _COLS))
        return self._run(lambda: self._write(sql, args), "backup {}".format(record.id))

    def update(self, record: BackupRecord, **fields: Any) -> Deferred[BackupRecord]:
        """Change some fields of a backup; fires with the new record."""
        new = replace(record, **fields)
        sets = []
        args: list[Any] = []
        for key, value in fields.items():
            sets.append("{} = ?".format(key))
            if key == "notes":
                value = json.dumps(list(value))
            elif key == "scheduled":
                value = int(value)
            args.append(value)
        sql = "UPDATE backups SET {} WHERE id = ?".format(", ".join(sets))
        d = self._run(lambda: self._write(sql, (*args, record.id)),
                      "backup {}".format(record.id))
        return d.addCallback(lambda _: new)

    def get(self, backup_id: str) -> Deferred[BackupRecord | None]:
        """The backup ``backup_id``, or None."""
        def read() -> BackupRecord | None:
            row = self._db.execute("SELECT {} FROM backups WHERE id = ?".format(
                ", ".join(_COLS)), (backup_id,)).fetchone()
            return _row(row) if row is not None else None
        return self._run(read, "a read")

    def find(self, server_id: str | None = None, status: str | None = None
             ) -> Deferred[list[BackupRecord]]:
        """Backups (of one server, of one status), newest first."""
        where, args = [], []
        if server_id is not None:
            where.append("server_id = ?")
            args.append(server_id)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        sql = "SELECT {} FROM backups{} ORDER BY created DESC, rowid DESC".format(
            ", ".join(_COLS), " WHERE " + " AND ".join(where) if where else "")
        return self._run(lambda: [_row(r) for r in self._db.execute(sql, args).fetchall()],
                         "a read")

    def delete(self, backup_id: str) -> Deferred[None]:
        """Forget a backup."""
        return self._run(lambda: self._write("DELETE FROM backups WHERE id = ?", (backup_id,)),
                         "the removal of backup {}".format(backup_id))

    # -- schedules -----------------------------------------------------------

    def set_schedule(self, schedule: ScheduleRecord, replace: bool = True) -> Deferred[None]:
        """Store a server's schedule; with ``replace=False`` only if it has none."""
        sql = ("INSERT OR {} INTO schedules (server_id, cron, retain_last, retain_days,"
               " driver, last_run) VALUES (?, ?, ?, ?, ?, ?)").format(
                   "REPLACE" if replace else "IGNORE")
        args = (schedule.server_id, schedule.cron, schedule.retain_last, schedule.retain_days,
                schedule.driver, schedule.last_run)
        return self._run(lambda: self._write(sql, args), "the schedule")

    def remove_schedule(self, server_id: str) -> Deferred[None]:
        """Drop a server's schedule."""
        return self._run(lambda: self._write("DELETE FROM schedules WHERE server_id = ?",
                                             (server_id,)), "the schedule")

    def schedules(self) -> Deferred[list[ScheduleRecord]]:
        """Every schedule."""
        def read() -> list[ScheduleRecord]:
            rows = self._db.execute("SELECT server_id, cron, retain_last, retain_days, driver,"
                                    " last_run FROM schedules ORDER BY server_id").fetchall()
            return [ScheduleRecord(*r) for r in rows]
        return self._run(read, "a read")

    def abort(self) -> None:
        """Close at once, without waiting for queued work (the agent failed to start)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._pool.stop()
        self._db.close()

    def close(self) -> Deferred[None]:
        """Finish queued work, close the database and its thread."""
        if self._closed:
            return succeed(None)
        if not self._started:
            self._closed = True
            self._db.close()
            return succeed(None)
        d = self._run(self._db.close, "closing")
        self._closed = True

        def stop(result: object) -> None:
            self._pool.stop()

        return d.addBoth(stop)
