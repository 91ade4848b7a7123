"""
The durable store of server definitions and desired state (SQLite).

One database file in the agent's state directory, opened with
``journal_mode=WAL`` and ``synchronous=FULL`` so that a committed write
survives a power cut.

Threading choice: every statement runs on **one dedicated thread** (a
``ThreadPool`` of exactly one worker, started on the first write).  A
``synchronous=FULL`` commit is an fsync, which takes milliseconds and must
never block the reactor; a single thread serialises all access to the one
connection without locks and keeps writes in submission order, so "desired
state" updates can never be applied out of order.  Console marks are written
in groups by the caller (one transaction per batch, see ``ServerManager``),
which keeps the fsync rate bounded however much the servers print.  The only
synchronous work is opening, ``load()`` and ``quarantine()`` at service start,
before any write is queued.

Bad state never wedges the agent:

- a store that cannot be used at all (not a SQLite file, damaged, read-only,
  on a full disk, a directory, a table that is not ours) raises
  ``StoreUnusable`` when it is opened, with one line naming the problem;
- a ``servers`` table that lacks columns this agent added later is migrated
  (``ALTER TABLE ... ADD COLUMN`` with the default); one that lacks the server
  id or the definition is refused;
- a row that cannot be read back (invalid UTF-8, a corrupt JSON column, a
  wrong type) is moved, exactly as stored, to the ``quarantine`` table with the
  reason, and the other servers load as usual; the caller can quarantine rows
  it cannot use for its own reasons the same way.  Nothing is ever deleted:
  an operator can move a row back after repairing it.

A write that fails later (a full state disk, typically) fails its Deferred
with a coded ``CtrlAgentError`` (``INSUFFICIENT_RESOURCES`` for a full disk)
and leaves the store as it was before the transaction.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ctrlagent.errors import Conflict, CtrlAgentError, InsufficientResources
from ctrlagent.startup import StartupError

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

# Columns a store written by an older agent may lack, with how to add them.
_ADDABLE = {
    "desired": "TEXT NOT NULL DEFAULT 'offline'",
    "state": "TEXT NOT NULL DEFAULT 'offline'",
    "container_id": "TEXT",
    "console_mark": "INTEGER NOT NULL DEFAULT 0",
    "last_crash": "REAL",
    "extra": "TEXT NOT NULL DEFAULT '{}'",
    "updated": "REAL NOT NULL DEFAULT 0",
}
# Without these a row means nothing: such a table is refused, not migrated.
_REQUIRED = ("server_id", "spec")
_COLUMNS = (*_REQUIRED, *_ADDABLE)

# Rows that could not be used, kept verbatim: the columns carry no type, so
# SQLite stores every value exactly as it was in ``servers``.
_QUARANTINE = """
CREATE TABLE IF NOT EXISTS quarantine (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    reason       TEXT NOT NULL,
    quarantined  REAL NOT NULL,
    {}
);
CREATE TABLE IF NOT EXISTS store_meta (
    key    TEXT PRIMARY KEY,
    value  TEXT
);
""".format(",\n    ".join(_COLUMNS))

# Each server's console settings (``console:settings:update``), apart from
# its row so that they never touch the definition.
_CONSOLE_SETTINGS = """
CREATE TABLE IF NOT EXISTS console_settings (
    server_id  TEXT PRIMARY KEY,
    settings   TEXT NOT NULL,
    updated    REAL NOT NULL
);
"""

_FIELDS = frozenset(
    {"spec", "desired", "state", "container_id", "console_mark", "last_crash", "extra"}
)

_ADVICE = "move it away or restore a backup"


class StoreUnusable(StartupError):
    """The state store cannot be used at all; ``str()`` says why, in one line."""


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


@dataclass(frozen=True)
class Quarantined:
    """A stored row set aside: ``server_id`` as far as it could be read."""

    server_id: str
    reason: str


class _BadRow(Exception):
    """A column of a stored row that cannot be used (the message says which)."""


class ServerStore:
    """SQLite-backed store; every write runs on the store's own thread."""

    def __init__(self, reactor: IReactorThreads, path: str) -> None:
        self._reactor = reactor
        self.path = path
        # Rows set aside by load() or quarantine(), and columns added on open.
        self.quarantined: list[Quarantined] = []
        self.migrated: list[str] = []
        self._db = self._open()
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="ctrlagent-store")
        self._pool_started = False
        self._closed = False

    # -- opening -----------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        _prepare_parent(self.path)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreUnusable(
                "state store {} cannot be read ({})".format(self.path, _reason(e))
            ) from None
        else:
            if stat.S_ISDIR(st.st_mode):
                raise StoreUnusable(
                    "state store {} is a directory, not a database file; {}".format(
                        self.path, _ADVICE
                    )
                )
            if not stat.S_ISREG(st.st_mode):
                raise StoreUnusable(
                    "state store {} is not a regular file; {}".format(self.path, _ADVICE)
                )
        db: sqlite3.Connection | None = None
        try:
            # check_same_thread=False: the connection is used by the store
            # thread, and at start (open, load, quarantine) before that
            # thread has any work.
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchall()
            if not check or check[0][0] != "ok":
                detail = str(check[0][0]) if check else "no answer"
                raise StoreUnusable(
                    "state store {} is damaged (integrity check: {}); {}".format(
                        self.path, " ".join(detail.split())[:200], _ADVICE
                    )
                )
            self._ensure_schema(db)
            # A write at every start: a store that cannot take one (read-only,
            # full disk) is reported now, not at the first command.
            _execute_transaction(
                db,
                [
                    (
                        "INSERT OR REPLACE INTO store_meta (key, value) VALUES (?, ?)",
                        ("opened", repr(time.time())),
                    )
                ],
            )
        except sqlite3.Error as e:
            if db is not None:
                _close_quietly(db)
            raise StoreUnusable(_describe_open_failure(self.path, e)) from None
        except StoreUnusable:
            if db is not None:
                _close_quietly(db)
            raise
        return db

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        kind = db.execute("SELECT type FROM sqlite_master WHERE name = 'servers'").fetchone()
        if kind is None:
            db.executescript(_SCHEMA)
        elif kind[0] != "table":
            raise StoreUnusable(
                "state store {} has a {} named 'servers' where the servers table belongs;"
                " {}".format(self.path, kind[0], _ADVICE)
            )
        else:
            self._migrate(db)
        db.executescript(_QUARANTINE)
        db.executescript(_CONSOLE_SETTINGS)

    def _migrate(self, db: sqlite3.Connection) -> None:
        info = db.execute("PRAGMA table_info(servers)").fetchall()
        columns = {row[1]: row for row in info}
        missing = [name for name in _REQUIRED if name not in columns]
        if missing:
            raise StoreUnusable(
                "state store {} has a servers table without the column(s) {} (not written"
                " by this agent); {}".format(self.path, ", ".join(missing), _ADVICE)
            )
        for name, row in columns.items():
            # cid, name, type, notnull, dflt_value, pk
            if name not in _COLUMNS and row[3] and row[4] is None and not row[5]:
                raise StoreUnusable(
                    "state store {} has a servers table with an unknown required column"
                    " {!r}; {}".format(self.path, name, _ADVICE)
                )
        try:
            db.execute("SELECT rowid FROM servers LIMIT 1").fetchall()
        except sqlite3.OperationalError:
            raise StoreUnusable(
                "state store {} has a servers table without row ids (WITHOUT ROWID);"
                " {}".format(self.path, _ADVICE)
            ) from None
        added = [name for name in _ADDABLE if name not in columns]
        if added:
            _execute_transaction(
                db,
                [
                    ("ALTER TABLE servers ADD COLUMN {} {}".format(name, _ADDABLE[name]), ())
                    for name in added
                ],
            )
            self.migrated = added

    # -- start-time reads and quarantine ------------------------------------

    def load(self) -> list[ServerRecord]:
        """
        Every usable stored server (synchronous; call before queueing writes).

        Rows that cannot be read back are moved to the quarantine table and
        listed in ``self.quarantined``; the others load as usual.
        """
        db = self._db
        db.text_factory = bytes  # decode ourselves: one bad row must not fail all
        try:
            rows = db.execute(
                "SELECT rowid, server_id, spec, desired, state, container_id, console_mark,"
                " last_crash, extra FROM servers ORDER BY server_id"
            ).fetchall()
        except sqlite3.Error as e:
            raise StoreUnusable(_describe_open_failure(self.path, e)) from None
        finally:
            db.text_factory = str
        records: list[ServerRecord] = []
        for row in rows:
            try:
                records.append(_record(row))
            except _BadRow as e:
                self._set_aside(row[0], _display_id(row[1]), str(e))
        return records

    def quarantine(self, server_id: str, reason: str) -> Quarantined:
        """
        Move the row of ``server_id`` to the quarantine table (synchronous;
        only at start, before writes are queued).
        """
        rowid = self._db.execute(
            "SELECT rowid FROM servers WHERE server_id = ?", (server_id,)
        ).fetchone()
        if rowid is None:
            raise KeyError(server_id)
        return self._set_aside(int(rowid[0]), server_id, reason)

    def _set_aside(self, rowid: int, server_id: str, reason: str) -> Quarantined:
        columns = ", ".join(_COLUMNS)
        try:
            _execute_transaction(
                self._db,
                [
                    (
                        "INSERT INTO quarantine (reason, quarantined, {cols})"
                        " SELECT ?, ?, {cols} FROM servers WHERE rowid = ?".format(cols=columns),
                        (reason, time.time(), rowid),
                    ),
                    ("DELETE FROM servers WHERE rowid = ?", (rowid,)),
                ],
            )
        except sqlite3.Error as e:
            # Not moved: the row stays where it is, and is skipped again next start.
            reason = "{}; it could not be moved to quarantine ({}) and stays in place".format(
                reason, _reason(e)
            )
        entry = Quarantined(server_id=server_id, reason=reason)
        self.quarantined.append(entry)
        return entry

    # -- writes --------------------------------------------------------------

    def _run(self, fn: Callable[[], T]) -> Deferred[T]:
        if not self._pool_started:
            self._pool_started = True
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, fn)  # type: ignore[arg-type]

    def _transaction(
        self, statements: Iterable[tuple[str, tuple[Any, ...]]], what: str = "the change"
    ) -> None:
        try:
            _execute_transaction(self._db, statements)
        except sqlite3.Error as e:
            raise self._write_error(e, what) from None

    def _write_error(self, error: sqlite3.Error, what: str) -> CtrlAgentError:
        name = getattr(error, "sqlite_errorname", "") or ""
        if name.startswith("SQLITE_FULL") or (
            name.startswith("SQLITE_IOERR") and _disk_nearly_full(self.path)
        ):
            return InsufficientResources(
                "the agent's state disk is full: {} was not stored (nothing changed)".format(what)
            )
        if isinstance(error, sqlite3.IntegrityError):
            return Conflict("{} conflicts with a stored record (nothing changed)".format(what))
        if name.startswith("SQLITE_READONLY"):
            return CtrlAgentError(
                "the agent's state store is read-only: {} was not stored".format(what)
            )
        return CtrlAgentError(
            "the agent's state store failed ({}): {} was not stored".format(_reason(error), what)
        )

    def insert(self, server_id: str, spec_json: str, **fields: Any) -> Deferred[None]:
        """Store a new server definition."""
        values = {"spec": spec_json, "desired": "offline", "state": "offline", **fields}
        self._check(values)
        cols = ["server_id", *values, "updated"]
        args = (server_id, *[_encode(k, v) for k, v in values.items()], time.time())
        sql = "INSERT INTO servers ({}) VALUES ({})".format(
            ", ".join(cols), ", ".join("?" for _ in cols)
        )
        what = "server {}".format(server_id)
        return self._run(lambda: self._transaction([(sql, args)], what))

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
        return self._run(lambda: self._transaction(statements, "the update"))

    def update_marks(self, marks: Mapping[str, tuple[int, int]]) -> Deferred[None]:
        """
        Several servers' console marks (``(ns, count)``) in one durable
        transaction: ``console_mark`` and the count in ``extra``, as
        ``update_many`` would write them.  The rows are made in the store's
        thread, not on the reactor: the marks of hundreds of servers come
        every ``console_mark_interval``.
        """
        marks = dict(marks)

        def write() -> None:
            now = time.time()
            rows = [(int(ns), _MARK_EXTRA % int(n), now, sid) for sid, (ns, n) in marks.items()]
            try:
                _execute_transaction(self._db, [], many=(_MARKS_SQL, rows))
            except sqlite3.Error as e:
                raise self._write_error(e, "the console marks") from None

        return self._run(write)

    def delete(self, server_id: str) -> Deferred[None]:
        """Forget a server."""
        sql = "DELETE FROM servers WHERE server_id = ?"
        what = "the removal of server {}".format(server_id)
        return self._run(lambda: self._transaction([(sql, (server_id,))], what))

    def close(self) -> Deferred[None]:
        """Finish queued writes, then close the database and the thread."""
        if self._closed:
            return Deferred.fromCoroutine(_none())
        self._closed = True
        if not self._pool_started:
            self._db.close()
            return Deferred.fromCoroutine(_none())
        d = self._run(self._db.close)

        def stop(result: object) -> object:
            self._pool.stop()
            return result

        return d.addBoth(stop).addCallback(lambda _: None)

    def close_now(self) -> None:
        """
        Close at once, without the reactor (a start that failed): no write may
        be queued.  A thread left running would keep the process alive.
        """
        if self._closed:
            return
        self._closed = True
        if self._pool_started:
            self._pool.stop()
        _close_quietly(self._db)

    # -- console settings (their own table) ---------------------------------

    def load_console_settings(self) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
        """
        Every server's stored console settings (synchronous; at start, like
        ``load``): ``({server_id: settings object}, [(server_id, why unusable)])``.
        An unusable row is left as it is (the server gets the defaults) and
        reported; the next update replaces it.
        """
        db = self._db
        db.text_factory = bytes
        try:
            rows = db.execute("SELECT server_id, settings FROM console_settings").fetchall()
        except sqlite3.Error as e:
            raise StoreUnusable(_describe_open_failure(self.path, e)) from None
        finally:
            db.text_factory = str
        good: dict[str, dict[str, Any]] = {}
        bad: list[tuple[str, str]] = []
        for raw_id, raw in rows:
            server_id = _display_id(raw_id)
            try:
                value = json.loads(_text(raw, "settings") or "")
            except (_BadRow, ValueError, RecursionError) as e:
                bad.append((server_id, "settings are not valid JSON text ({})".format(
                    str(e)[:100])))
                continue
            if not isinstance(value, dict):
                bad.append((server_id, "settings are not a JSON object"))
                continue
            good[server_id] = value
        return good, bad

    def set_console_settings(self, server_id: str, settings: dict[str, Any]) -> Deferred[None]:
        """Store a server's console settings (replacing what was stored)."""
        sql = ("INSERT OR REPLACE INTO console_settings (server_id, settings, updated)"
               " VALUES (?, ?, ?)")
        args = (server_id, json.dumps(settings, sort_keys=True), time.time())
        what = "the console settings of server {}".format(server_id)
        return self._run(lambda: self._transaction([(sql, args)], what))

    def forget_console_settings(self, server_id: str) -> Deferred[None]:
        """Drop a server's console settings (it was deleted)."""
        sql = "DELETE FROM console_settings WHERE server_id = ?"
        what = "the removal of the console settings of server {}".format(server_id)
        return self._run(lambda: self._transaction([(sql, (server_id,))], what))

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


# What ``_encode`` makes of ``{"markCount": n}`` (json.dumps, sorted keys).
_MARK_EXTRA = '{"markCount": %d}'
_MARKS_SQL = "UPDATE servers SET console_mark = ?, extra = ?, updated = ? WHERE server_id = ?"


def _execute_transaction(
    db: sqlite3.Connection,
    statements: Iterable[tuple[str, tuple[Any, ...]]],
    many: tuple[str, list[tuple[Any, ...]]] | None = None,
) -> None:
    """
    Run ``statements`` (and ``many``'s one statement over its rows) in one
    transaction; on any failure nothing of it stays.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, args in statements:
            db.execute(sql, args)
        if many is not None:
            db.executemany(*many)
        db.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (a full disk does): a second
        # ROLLBACK would raise and hide the real error.
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise


def _close_quietly(db: sqlite3.Connection) -> None:
    try:
        db.close()
    except sqlite3.Error:
        pass


def _text(value: Any, column: str, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise _BadRow("{} is empty".format(column))
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadRow("{} is not valid UTF-8 text".format(column)) from None
    raise _BadRow("{} is a {}, not text".format(column, type(value).__name__))


def _record(row: tuple[Any, ...]) -> ServerRecord:
    """A ``ServerRecord`` from a raw row (text columns as bytes), or ``_BadRow``."""
    _, raw_id, spec, desired, state, container_id, mark, last_crash, extra = row
    server_id = _text(raw_id, "server_id")
    if not server_id:
        raise _BadRow("server_id is empty")
    if mark is None:
        mark = 0
    if isinstance(mark, float) and mark.is_integer():
        mark = int(mark)
    if not isinstance(mark, int):
        raise _BadRow("console_mark is not an integer")
    if last_crash is not None and (
        not isinstance(last_crash, (int, float)) or not math.isfinite(last_crash)
    ):
        raise _BadRow("last_crash is not a finite number")
    extra_text = _text(extra, "extra", required=False) or "{}"
    try:
        extra_value = json.loads(extra_text)
    except (ValueError, RecursionError) as e:
        raise _BadRow("extra is not valid JSON ({})".format(str(e)[:100])) from None
    if not isinstance(extra_value, dict):
        raise _BadRow("extra is not a JSON object")
    return ServerRecord(
        server_id=server_id,
        spec=_text(spec, "spec") or "",
        desired=_text(desired, "desired") or "offline",
        state=_text(state, "state") or "offline",
        container_id=_text(container_id, "container_id", required=False),
        console_mark=mark,
        last_crash=None if last_crash is None else float(last_crash),
        extra=extra_value,
    )


def _display_id(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "backslashreplace")
    return "<no id>" if raw is None else str(raw)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__


def _prepare_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if not parent:
        return
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise StoreUnusable(
            "state directory {} is not a directory (state_dir must name a directory)".format(
                parent
            )
        )
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise StoreUnusable(
            "state directory {} is not a directory (state_dir must name a directory)".format(
                parent
            )
        ) from None
    except NotADirectoryError:
        raise StoreUnusable(
            "state directory {} cannot be created: part of its path is a file".format(parent)
        ) from None
    except OSError as e:
        raise StoreUnusable(
            "state directory {} cannot be created ({})".format(parent, _reason(e))
        ) from None


def _read_only_filesystem(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _disk_nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 256 * 1024


def _describe_open_failure(path: str, error: sqlite3.Error) -> str:
    """One line saying why the store at ``path`` cannot be used."""
    name = getattr(error, "sqlite_errorname", "") or ""
    detail = _reason(error)
    parent = os.path.dirname(path) or "."
    if name.startswith("SQLITE_NOTADB"):
        return "state store {} is not a SQLite database ({}); {}".format(path, detail, _ADVICE)
    if name.startswith("SQLITE_CORRUPT"):
        return "state store {} is damaged ({}); {}".format(path, detail, _ADVICE)
    if name.startswith("SQLITE_FULL") or (
        name.startswith("SQLITE_IOERR") and _disk_nearly_full(path)
    ):
        return (
            "the agent's state disk is full: state store {} cannot be written ({});"
            " free space on {}".format(path, detail, parent)
        )
    if _read_only_filesystem(parent):
        return (
            "state store {} is on a read-only filesystem ({}); the agent must be able"
            " to write its state directory {}".format(path, detail, parent)
        )
    if name.startswith("SQLITE_READONLY") or (
        name.startswith("SQLITE_CANTOPEN") and not os.access(parent, os.W_OK)
    ):
        return (
            "state store {} is read-only ({}); the agent must be able to write it and"
            " its directory {} (check owner, mode and mount)".format(path, detail, parent)
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return (
            "state store {} is locked by another process ({}); is another agent using"
            " state directory {}?".format(path, detail, parent)
        )
    if name.startswith("SQLITE_IOERR"):
        return "state store {} cannot be read or written: I/O error ({}); check the disk".format(
            path, detail
        )
    return "state store {} cannot be used ({}); {}".format(path, detail, _ADVICE)


def open_store(reactor: IReactorThreads, state_dir: str) -> ServerStore:
    """Open (creating if needed) the store in the agent's state directory."""
    return ServerStore(reactor, os.path.join(state_dir, "servers.sqlite3"))
