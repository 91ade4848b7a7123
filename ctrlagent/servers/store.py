"""
The durable store of server definitions and desired state (SQLite).

One database file in the agent's state directory, opened with
``journal_mode=WAL`` and ``synchronous=FULL`` so that a committed write
survives a power cut.

Threading choice: every statement runs on **one dedicated thread** (a
``ThreadPool`` of exactly one worker).  A ``synchronous=FULL`` commit is an
fsync, which takes milliseconds and must never block the reactor; a single
thread serialises all access to the one connection without locks and keeps
writes in submission order, so "desired state" updates can never be applied
out of order.  Console marks are written in groups by the caller (one
transaction per batch, see ``ServerManager``), which keeps the fsync rate
bounded however much the servers print.  The only synchronous read is
``load()`` at service start, before any write is queued.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    server_id     TEXT PRIMARY KEY,
    spec          TEXT NOT NULL,
    desired       TEXT NOT NULL DEFAULT 'offline',
    state         TEXT NOT NULL DEFAULT 'offline',
    container_id  TEXT,
    console_mark  INTEGER NOT NULL DEFAULT 0,
    last_crash    REAL,
    extra         TEXT NOT NULL DEFAULT '{}',
    updated       REAL NOT NULL
);
"""

_FIELDS = frozenset(
    {"spec", "desired", "state", "container_id", "console_mark", "last_crash", "extra"}
)


@dataclass(frozen=True)
class ServerRecord:
    """One stored server as loaded at start."""

    server_id: str
    spec: str
    desired: str
    state: str
    container_id: str | None
    console_mark: int
    last_crash: float | None
    extra: dict[str, Any]


class ServerStore:
    """SQLite-backed store; every write runs on the store's own thread."""

    def __init__(self, reactor: IReactorThreads, path: str) -> None:
        self._reactor = reactor
        self.path = path
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        # check_same_thread=False: the connection is used by the store thread,
        # and once by load() before that thread has any work.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="ctrlagent-store")
        self._pool.start()
        self._closed = False

    def load(self) -> list[ServerRecord]:
        """Every stored server (synchronous; call before queueing writes)."""
        rows = self._db.execute(
            "SELECT server_id, spec, desired, state, container_id, console_mark, last_crash, extra"
            " FROM servers ORDER BY server_id"
        ).fetchall()
        return [
            ServerRecord(
                server_id=r[0],
                spec=r[1],
                desired=r[2],
                state=r[3],
                container_id=r[4],
                console_mark=int(r[5] or 0),
                last_crash=r[6],
                extra=json.loads(r[7] or "{}"),
            )
            for r in rows
        ]

    def _run(self, fn: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, fn)  # type: ignore[arg-type]

    def _transaction(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                db.execute(sql, args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def insert(self, server_id: str, spec_json: str, **fields: Any) -> Deferred[None]:
        """Store a new server definition."""
        values = {"spec": spec_json, "desired": "offline", "state": "offline", **fields}
        self._check(values)
        cols = ["server_id", *values, "updated"]
        args = (server_id, *[_encode(k, v) for k, v in values.items()], time.time())
        sql = "INSERT INTO servers ({}) VALUES ({})".format(
            ", ".join(cols), ", ".join("?" for _ in cols)
        )
        return self._run(lambda: self._transaction([(sql, args)]))

    def update(self, server_id: str, **fields: Any) -> Deferred[None]:
        """Change some fields of one server."""
        return self.update_many([(server_id, fields)])

    def update_many(self, changes: list[tuple[str, dict[str, Any]]]) -> Deferred[None]:
        """Change fields of several servers in one durable transaction."""
        statements = []
        for server_id, fields in changes:
            if not fields:
                continue
            self._check(fields)
            sets = ", ".join("{} = ?".format(k) for k in fields)
            args = (*[_encode(k, v) for k, v in fields.items()], time.time(), server_id)
            statements.append(
                ("UPDATE servers SET {}, updated = ? WHERE server_id = ?".format(sets), args)
            )
        return self._run(lambda: self._transaction(statements))

    def delete(self, server_id: str) -> Deferred[None]:
        """Forget a server."""
        sql = "DELETE FROM servers WHERE server_id = ?"
        return self._run(lambda: self._transaction([(sql, (server_id,))]))

    def close(self) -> Deferred[None]:
        """Finish queued writes, then close the database and the thread."""
        if self._closed:
            return Deferred.fromCoroutine(_none())
        self._closed = True
        d = self._run(self._db.close)

        def stop(result: object) -> object:
            self._pool.stop()
            return result

        return d.addBoth(stop).addCallback(lambda _: None)

    @staticmethod
    def _check(fields: dict[str, Any]) -> None:
        unknown = set(fields) - _FIELDS
        if unknown:
            raise ValueError("unknown store fields: {}".format(sorted(unknown)))


async def _none() -> None:
    return None


def _encode(key: str, value: Any) -> Any:
    if key == "extra":
        return json.dumps(value, sort_keys=True)
    return value


def open_store(reactor: IReactorThreads, state_dir: str) -> ServerStore:
    """Open (creating if needed) the store in the agent's state directory."""
    return ServerStore(reactor, os.path.join(state_dir, "servers.sqlite3"))
