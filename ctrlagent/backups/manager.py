"""
``BackupManager``: the backup actions of PROTOCOL.md section 5, as a service.

The reactor thread validates, keeps the per-server and node-wide limits and
records; archives, restores and driver calls run in the thread pool.  The
rules:

- one backup, restore or deletion at a time per server (``Conflict``), at
  most ``concurrency`` backups and restores on the node at once (the others
  wait their turn);
- a backup id is looked up together with its server: another server's id
  is ``NotFound``, exactly as an unknown one;
- ``create_backup`` answers at once with ``{backupId, status: "running"}``;
  progress and the end come as ``events`` to the listeners;
- a restore is refused with ``Conflict`` while the server runs, unless
  ``stop`` asks to stop it first (then it waits until the server is
  offline, at most ``stop_timeout``); the restore locks the server's files
  (``IServerManager.lock_files``, taken before the stop, released at the
  end), so no start, crash auto-restart, file action or SFTP write happens
  meanwhile; ``busy(server_id)`` tells what backup work holds the server;
- on start, backups left ``running`` by an agent that died are marked
  ``failed`` and their partial files removed, and restore staging
  directories left in the data directory are swept;
- schedules (cron, UTC) are looked at every ``schedule_interval`` seconds of
  the injected clock; a run missed while the agent was down runs once, not
  once per missed time, and each scheduled backup is followed by its
  retention (only scheduled backups are ever deleted by it).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import IO, Any, TypeVar

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.backups import config as cfg
from ctrlagent.backups.archive import ArchiveStats, write_archive
from ctrlagent.backups.drivers import BackupDriver
from ctrlagent.backups.events import BackupEvent, BackupProgress, BackupStatusChanged
from ctrlagent.backups.ignore import load_rules, parse_patterns
from ctrlagent.backups.restore import RestoreResult, restore_root, sweep_staging
from ctrlagent.backups.store import BackupRecord, BackupStore, ScheduleRecord
from ctrlagent.errors import (
    ConfigInvalid,
    Conflict,
    CtrlAgentError,
    InsufficientResources,
    InvalidInput,
    NotFound,
)
from ctrlagent.events import ConsoleOutput, unstamp
from ctrlagent.files import trees
from ctrlagent.files.confined import Confined, os_error
from ctrlagent.interfaces import IBackupManager, ServerRoot
from ctrlagent.wire.json import to_json
from ctrlagent.work import Tracker

T = TypeVar("T")

# Server states in which a restore may write the server's files.
STOPPED_STATES = frozenset({"offline", "crashed", "install_failed", "suspended"})
# States a stop moves away from (a stop then waits for one of STOPPED_STATES).
RUNNING_STATES = frozenset({"starting", "running", "stopping"})
MAX_NAME_CHARS = 200
# A stored schedule of a server that opted out of the node's default one.
OPTED_OUT = "-"
MAX_ID_CHARS = 64
STOP_POLL = 0.5


def _compressed(drv: BackupDriver) -> bool:
    """Whether archives of ``drv`` are zstd-compressed by us (restic compresses itself)."""
    return bool(getattr(drv, "compressed", True))


class RangeNotSatisfiable(InvalidInput):
    """A ``Range`` header that selects no byte of the archive (HTTP 416)."""

    def __init__(self, size: int) -> None:
        super().__init__("requested range is not satisfiable", field="Range")
        self.size = size


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """
    The one byte range ``(start, end)`` (inclusive) a ``Range`` header asks
    for, or None for the whole archive (no header, several ranges, or a unit
    other than bytes: a full answer is always allowed).  ``RangeNotSatisfiable``
    when it selects nothing.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None  # malformed: ignored, as RFC 9110 allows
    if first == "":
        if last == "" or int(last) == 0:
            raise RangeNotSatisfiable(size)
        n = min(int(last), size)
        if size == 0:
            raise RangeNotSatisfiable(size)
        return size - n, size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(size)
    return start, min(end, size - 1)


@dataclass
class BackupDownload:
    """
    An archive opened for download: ``start``..``end`` (inclusive) of
    ``size`` bytes; ``partial`` when a range was asked (HTTP 206).  Read it
    with ``await read()`` until it answers ``b""``; ``close()`` when done.
    """

    backup_id: str
    filename: str
    size: int
    start: int
    end: int
    partial: bool
    checksum: str | None
    _stream: IO[bytes]
    _manager: BackupManager
    content_type: str = "application/zstd"
    # False: a stream of unknown length (no Content-Length, no ranges).
    sized: bool = True

    @property
    def length(self) -> int:
        """Bytes this answer carries (-1: unknown until its end)."""
        if not self.sized:
            return -1
        return self.end - self.start + 1 if self.size else 0

    def content_range(self) -> str:
        """The ``Content-Range`` header value of a partial answer."""
        return "bytes {}-{}/{}".format(self.start, self.end, self.size)

    def read(self, n: int = 256 * 1024) -> Deferred[bytes]:
        """The next chunk (read in the thread pool); ``b""`` at the end."""
        return self._manager._in_thread(self._stream.read, n)

    def close(self) -> None:
        """Release the archive."""
        self._stream.close()


@implementer(IBackupManager)
class BackupManager(service.Service):
    """
    Backups of every server on this node.

    ``servers`` is an ``IServerManager`` (``resolve``, ``server_root``,
    ``status``, ``stop``); ``drivers`` maps driver names to drivers;
    ``reactor`` hops thread results back; ``clock`` measures the time and
    drives the schedules; ``threadpool`` does the blocking work; ``tracker``
    owns the background work; ``data_dir`` (the servers' data directory) is
    swept of restore leftovers on start.
    """

    log = Logger()
    name = "backups"

    def __init__(self, config: cfg.BackupsConfig, servers: Any, store: BackupStore,
                 drivers: Mapping[str, BackupDriver], *, reactor: Any, clock: IReactorTime,
                 threadpool: ThreadPool, tracker: Tracker, data_dir: str | None = None,
                 owns_threadpool: bool = False) -> None:
        self.config = config
        self.servers = servers
        self.store = store
        self.drivers = dict(drivers)
        self.reactor: IReactorThreads | IReactorFromThreads = reactor
        self.clock = clock
        self.threadpool = threadpool
        # Started with the service and stopped once its work is done (tap.py's pool).
        self.owns_threadpool = owns_threadpool
        self.tracker = tracker
        self.data_dir = data_dir
        self._busy: dict[str, str] = {}
        self._slots = DeferredSemaphore(config.concurrency)
        self._listeners: list[Any] = []
        self._work: dict[str, Deferred[BackupRecord]] = {}
        self._waiters: dict[str, list[Deferred[BackupRecord]]] = {}
        self._stopping = False
        self._ticking = False
        self._scheduler: LoopingCall | None = None
        self.ready: Deferred[None] = Deferred()

    # -- plumbing --------------------------------------------------------------

    def _in_thread(self, fn: Any, *args: Any, **kw: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args, **kw)  # type: ignore[arg-type]

    def add_listener(self, listener: Any) -> None:
        """Subscribe ``listener(event)`` to backup events."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        """Unsubscribe."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, event: BackupEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self.log.failure("backup event listener failed")

    def _status(self, server_id: str) -> str:
        """The server's state (``offline``, ``running``, ...), from its status record."""
        shape = to_json(self.servers.status(server_id))
        return str(shape.get("status", "unknown")) if isinstance(shape, dict) else "unknown"

    def busy(self, server_id: str) -> str | None:
        """What backup work holds the server (``backup``, ``restore``, ``delete``), if any."""
        return self._busy.get(server_id)

    def _claim(self, server_id: str, what: str) -> None:
        held = self._busy.get(server_id)
        if held is not None:
            raise Conflict("a {} of this server is in progress".format(held))
        self._busy[server_id] = what

    def _driver(self, name: str | None, field: str = "driver") -> tuple[str, BackupDriver]:
        name = name or self.config.driver
        if not isinstance(name, str) or name not in self.drivers:
            raise InvalidInput("driver must be one of {}".format(", ".join(sorted(self.drivers))),
                               field=field)
        return name, self.drivers[name]

    async def _record(self, server_id: str, backup_id: object) -> BackupRecord:
        if not isinstance(backup_id, str) or not backup_id or len(backup_id) > MAX_ID_CHARS:
            raise InvalidInput("backupId must be a backup's id", field="backupId")
        record = await self.store.get(backup_id)
        if record is None or record.server_id != server_id:
            raise NotFound("backup {} of this server does not exist".format(backup_id))
        return record

    def finished(self, backup_id: str) -> Deferred[BackupRecord]:
        """Fires with the record of a running backup once it has ended (tests, hooks)."""
        if backup_id not in self._work:
            raise NotFound("backup {} is not running".format(backup_id))
        waiter: Deferred[BackupRecord] = Deferred()
        self._waiters.setdefault(backup_id, []).append(waiter)
        return waiter

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.owns_threadpool and not self.threadpool.started:
            self.threadpool.start()
        self._stopping = False
        d = Deferred.fromCoroutine(self._start())
        self.tracker.track(d, "backups recovery")
        d.addBoth(lambda _: self.ready.callback(None) if not self.ready.called else None)

    async def _start(self) -> None:
        await self.recover()
        # Each look is tracked, so that stopping waits for one in flight
        # before the store closes under it.
        self._scheduler = LoopingCall(lambda: self.tracker.track(
            Deferred.fromCoroutine(self._tick_safely()), "backup schedules"))
        self._scheduler.clock = self.clock
        self._scheduler.start(self.config.schedule_interval, now=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.stop()
        d = self.tracker.wait()
        d.addCallback(lambda _: self.store.close())
        d.addBoth(self._release_threadpool)
        return d

    def _release_threadpool(self, result: object) -> object:
        if self.owns_threadpool and self.threadpool.started:
            self.threadpool.stop()
        return result

    def abort_start(self) -> None:
        """Another service failed to start: let go of the threads, so the process can exit."""
        self._stopping = True
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.stop()
        self._release_threadpool(None)
        self.store.abort()

    async def recover(self) -> None:
        """Mark backups an earlier agent left running as failed; remove their partial files."""
        now = self.clock.seconds()
        for record in await self.store.find(status="running"):
            if record.id in self._work:
                continue
            driver = self.drivers.get(record.driver)
            if driver is not None:
                try:
                    await self._in_thread(driver.discard_partial, record.server_id, record.id)
                except Exception as e:
                    self.log.warn(  # noqa: G010 - twisted.logger\'s method
                "partial backup {backup_id} not removed: {error}",
                                  backup_id=record.id, error=str(e))
            await self.store.update(record, status="failed", completed=now,
                                    error="the agent stopped during the backup; "
                                          "its partial files were removed")
            self.log.info("backup {backup_id} of {server_id} was interrupted: marked failed",
                          backup_id=record.id, server_id=record.server_id)
        if self.data_dir is not None:
            swept = await self._in_thread(sweep_staging, self.data_dir)
            if swept:
                self.log.info("removed {count} restore leftover(s)", count=swept)

    # -- create ----------------------------------------------------------------

    @async_to_deferred
    async def create_backup(self, server_id: str, name: object = None, driver: object = None,
                            ignore: object = None, *, scheduled: bool = False
                            ) -> dict[str, Any]:
        """Start a backup; ``{"backupId", "status": "running"}`` at once."""
        server_id = self.servers.resolve(server_id)
        if name is None:
            name = "backup"
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS \
                or "\x00" in name:
            raise InvalidInput("name must be a short text", field="name")
        driver_name, drv = self._driver(driver if driver is None or isinstance(driver, str)
                                        else "?")
        patterns = parse_patterns(ignore)
        root: ServerRoot = self.servers.server_root(server_id)
        if self._stopping:
            raise Conflict("the agent is stopping")
        locked = self.servers.files_locked(server_id)
        if locked is not None:
            # The servers' one lock state (a restore here or of another
            # manager's making): a backup of files being swapped is no backup.
            raise Conflict("the server's files are being {}".format(locked))
        self._claim(server_id, "backup")
        backup_id = str(uuid.uuid4())
        record = BackupRecord(id=backup_id, server_id=server_id, name=name, driver=driver_name,
                              status="running", created=self.clock.seconds(),
                              scheduled=scheduled)
        try:
            await self.store.insert(record)
        except BaseException:
            self._busy.pop(server_id, None)
            raise
        self._emit(BackupStatusChanged(server_id, backup_id, "backup", "running"))
        work = Deferred.fromCoroutine(self._run_backup(record, root, drv, patterns))
        self._work[backup_id] = work

        def forget(result: Any) -> Any:
            self._work.pop(backup_id, None)
            for waiter in self._waiters.pop(backup_id, []):
                waiter.callback(result)
            return result

        work.addBoth(forget)
        self.tracker.track(work, "backup {} of {}".format(backup_id, server_id))
        return {"backupId": backup_id, "status": "running"}

    async def _run_backup(self, record: BackupRecord, root: ServerRoot, drv: BackupDriver,
                          patterns: list[str]) -> BackupRecord:
        try:
            hooked = False
            try:
                await self._slots.acquire()
                try:
                    hooked, hook_note = await self._before_hooks(record.server_id)
                    stats, location = await self._in_thread(
                        self._backup_in_thread, record, root, drv, patterns)
                    if hook_note:
                        stats.notes.insert(0, hook_note)
                finally:
                    self._slots.release()
                    if hooked:
                        await self._after_hooks(record.server_id)
            except Exception as e:
                error = self._error_text(e, "backup {}".format(record.id))
                failed = await self.store.update(record, status="failed", error=error,
                                                 completed=self.clock.seconds())
                self._emit(BackupStatusChanged(record.server_id, record.id, "backup", "failed",
                                               error=error))
                return failed
            notes = stats.notes if stats.summary() is None else [stats.summary()] + stats.notes
            done = await self.store.update(
                record, status="completed", size=stats.size, files=stats.files,
                bytes=stats.bytes, checksum=stats.checksum, location=location,
                completed=self.clock.seconds(), notes=[n for n in notes if n])
            self.log.info("backup {backup_id} of {server_id} completed: {files} files,"
                          " {size} bytes", backup_id=record.id, server_id=record.server_id,
                          files=stats.files, size=stats.size)
            self._emit(BackupStatusChanged(record.server_id, record.id, "backup", "completed",
                                           size=stats.size, checksum=stats.checksum))
            return done
        finally:
            self._busy.pop(record.server_id, None)

    async def _before_hooks(self, server_id: str) -> tuple[bool, str | None]:
        """
        Send the ``before`` commands to a running server and wait for
        ``wait_for``; ``(whether hooks ran, a note)``.
        """
        hooks = self.config.hooks
        if not (hooks.before or hooks.after):
            return False, None
        status = self._status(server_id)
        if status != "running":
            return False, None
        seen: Deferred[None] = Deferred()
        pattern = re.compile(hooks.wait_for) if hooks.wait_for else None

        def listener(event: object) -> None:
            if (pattern is None or seen.called or not isinstance(event, ConsoleOutput)
                    or event.server_id != server_id):
                return
            # The pattern is about what the game printed: with the server's
            # console timestamps on, its listeners get each line behind a
            # stamp, which would keep a ``^``-anchored pattern from ever
            # matching.  Read now, as the lines were stamped (same turn).
            lines = event.lines
            if event.stream != "agent" and self._timestamps_on(server_id):
                lines = [unstamp(line) for line in lines]
            if any(pattern.search(line) for line in lines):
                seen.callback(None)

        if pattern is not None:
            self.servers.add_listener(listener)
        try:
            try:
                for command in hooks.before:
                    await self.servers.send_command(server_id, command)
            except CtrlAgentError as e:
                return True, "backup hook failed ({}); backed up anyway".format(e)
            if pattern is None:
                return True, None
            timeout: Deferred[None] = Deferred()
            timer = self.clock.callLater(hooks.wait_timeout, timeout.callback, None)
            await DeferredList([seen, timeout], fireOnOneCallback=True)
            if timer.active():
                timer.cancel()
                return True, None
            return True, "the console never printed {!r} within {} s; backed up anyway".format(
                hooks.wait_for, hooks.wait_timeout)
        finally:
            if pattern is not None:
                self.servers.remove_listener(listener)

    def _timestamps_on(self, server_id: str) -> bool:
        """Whether the server's console lines reach listeners stamped."""
        try:
            answer = self.servers.console_settings(server_id)
        except CtrlAgentError:
            return False
        settings = answer.get("settings") if isinstance(answer, dict) else None
        return isinstance(settings, dict) and settings.get("timestamps") is True

    async def _after_hooks(self, server_id: str) -> None:
        for command in self.config.hooks.after:
            try:
                await self.servers.send_command(server_id, command)
            except CtrlAgentError as e:
                self.log.warn(  # noqa: G010 - twisted.logger's method
                    "backup hook {command!r} of {server_id} failed: {error}",
                    command=command, server_id=server_id, error=str(e))

    def _error_text(self, e: BaseException, what: str) -> str:
        if isinstance(e, CtrlAgentError):
            self.log.warn(  # noqa: G010 - twisted.logger\'s method
                "{what} failed: {error}", what=what, error=str(e))
            return str(e)
        self.log.failure("{what} failed", what=what)
        return "internal error: {}".format(type(e).__name__)

    def _backup_in_thread(self, record: BackupRecord, root: ServerRoot, drv: BackupDriver,
                          patterns: list[str]) -> tuple[ArchiveStats, str]:
        """Thread-side: measure, check the room, write the archive, commit it."""
        try:
            with Confined(root.path, root.uid, root.gid) as c:
                free = drv.free_bytes()
                backup_tree = getattr(drv, "backup_tree", None)
                # The progress total: the tree's content bytes, from the
                # measuring walk, or, for a directory snapshot with no room
                # to check, from the driver's own planning walk (one walk
                # of ours per backup, not two).
                total = [0]
                measured = free is not None or backup_tree is None
                if measured:
                    total[0], _ = trees.tree_usage(c.root_fd)
                    if free is not None and total[0] > free:
                        raise InsufficientResources(
                            "not enough room for the backup: it may need up to {} bytes and {} "
                            "are free".format(total[0], free))
                rules = load_rules(c.root_fd, patterns)
                progress = self._progress_from_thread(record, total, "backup")
                cancelled = lambda: self._stopping  # noqa: E731
                if backup_tree is not None:
                    # A store that snapshots a directory itself (restic:
                    # incremental); None when it cannot here.
                    done = backup_tree(record.server_id, record.id, root.path, c.root_fd,
                                       rules, progress, cancelled,
                                       planned=lambda n: total.__setitem__(0, n))
                    if done is not None:
                        return done  # type: ignore[no-any-return]
                    if not measured:
                        total[0], _ = trees.tree_usage(c.root_fd)
                writer = drv.open_writer(record.server_id, record.id)
                try:
                    stats = write_archive(
                        c.root_fd, writer.write, rules,
                        level=self.config.compression_level if _compressed(drv) else None,
                        progress=progress,
                        progress_interval=self.config.progress_interval,
                        cancelled=cancelled, file_fd=writer.file_fd)
                    location = writer.commit()
                except BaseException:
                    writer.abort()
                    raise
                return stats, location
        except OSError as e:
            raise os_error(e, "backup") from None

    def _progress_from_thread(self, record: BackupRecord, total: int | list[int],
                              operation: str) -> Any:
        """
        ``progress(done, files)`` for a thread, as events; ``total`` the
        bytes of 100 %, or a one-item list holding them (read at each call:
        a total known only once the work has begun).
        """
        def progress(done: int, files: int) -> None:
            whole = total[0] if isinstance(total, list) else total
            percent = 100.0 if whole <= 0 else min(100.0, round(done * 100.0 / whole, 1))
            event = BackupProgress(record.server_id, record.id, operation, done, files, whole,
                                   percent)
            self.reactor.callFromThread(self._emit, event)  # type: ignore[union-attr]
        return progress

    # -- list / delete -----------------------------------------------------------

    @async_to_deferred
    async def list_backups(self, server_id: str) -> dict[str, Any]:
        """``{"backups": [...], "count"}``, newest first."""
        server_id = self.servers.resolve(server_id)
        records = await self.store.find(server_id)
        return {"backups": [r.to_json() for r in records], "count": len(records)}

    @async_to_deferred
    async def delete_backup(self, server_id: str, backup_id: object) -> dict[str, Any]:
        """Remove a backup's archive and record."""
        server_id = self.servers.resolve(server_id)
        record = await self._record(server_id, backup_id)
        if record.status == "running":
            raise Conflict("backup {} is still running".format(record.id))
        self._claim(server_id, "deletion")
        try:
            await self._delete_record(record)
        finally:
            self._busy.pop(server_id, None)
        return {}

    async def _delete_record(self, record: BackupRecord) -> None:
        drv = self.drivers.get(record.driver)
        if record.location and drv is not None:
            await self._in_thread(drv.delete, record.location)
        elif drv is not None:
            await self._in_thread(drv.discard_partial, record.server_id, record.id)
        await self.store.delete(record.id)

    # -- restore ---------------------------------------------------------------

    @async_to_deferred
    async def restore_backup(self, server_id: str, backup_id: object, truncate: object = False,
                             stop: object = False) -> dict[str, Any]:
        """Put a backup back (see the module docstring); fires once done."""
        server_id = self.servers.resolve(server_id)
        if not isinstance(truncate, bool):
            raise InvalidInput("truncate must be true or false", field="truncate")
        if not isinstance(stop, bool):
            raise InvalidInput("stop must be true or false", field="stop")
        record = await self._record(server_id, backup_id)
        if record.status != "completed":
            raise Conflict("backup {} is {}, not completed".format(record.id, record.status))
        drv = self.drivers.get(record.driver)
        if drv is None or not record.location:
            raise InvalidInput("backup {} was made with driver {!r}, not configured here"
                               .format(record.id, record.driver), field="backupId")
        root: ServerRoot = self.servers.server_root(server_id)
        if root.disk_limit_bytes is not None and record.bytes > root.disk_limit_bytes:
            raise InsufficientResources("the backup holds {} bytes, beyond the server's disk "
                                        "limit".format(record.bytes))
        self._claim(server_id, "restore")
        try:
            # The servers' one lock state: from here to the end, no start
            # (power, crash auto-restart), no action writing the files, no
            # SFTP write.  Taken before the stop, so nothing slips between.
            release = self.servers.lock_files(server_id, "restored")
        except BaseException:
            self._busy.pop(server_id, None)
            raise
        try:
            await self._stopped(server_id, stop)
            self._emit(BackupStatusChanged(server_id, record.id, "restore", "running"))
            try:
                result: RestoreResult = await self._slots.run(
                    self._in_thread, self._restore_in_thread, record, root, drv, truncate)
            except Exception as e:
                error = self._error_text(e, "restore of backup {}".format(record.id))
                self._emit(BackupStatusChanged(server_id, record.id, "restore", "failed",
                                               error=error))
                raise
        finally:
            release()
            self._busy.pop(server_id, None)
        self._emit(BackupStatusChanged(server_id, record.id, "restore", "completed"))
        self.log.info("backup {backup_id} restored into {server_id}", backup_id=record.id,
                      server_id=server_id)
        return {"backupId": record.id, "files": result.files, "kept": result.kept,
                "skipped": result.skipped, "notes": result.notes}

    async def _stopped(self, server_id: str, stop: bool) -> None:
        status = self._status(server_id)
        if status in STOPPED_STATES:
            return
        if status not in RUNNING_STATES:
            raise Conflict("the server is {}: it cannot be restored now".format(status))
        if not stop:
            raise Conflict("the server is {}; stop it first or pass stop".format(status))
        # The stop fires once it is under way (or, in some managers, once
        # done): its outcome is watched, never awaited without bound.
        outcome: list[object] = []
        stopping = self.servers.stop(server_id)
        stopping.addBoth(outcome.append)
        waited = 0.0
        while True:
            if outcome and isinstance(outcome[0], Failure):
                outcome[0].raiseException()
            status = self._status(server_id)
            if status in STOPPED_STATES:
                return
            if waited >= self.config.stop_timeout:
                raise Conflict("the server did not stop within {} s; nothing restored"
                               .format(self.config.stop_timeout))
            d: Deferred[None] = Deferred()
            self.clock.callLater(STOP_POLL, d.callback, None)
            await d
            waited += STOP_POLL

    def _restore_in_thread(self, record: BackupRecord, root: ServerRoot, drv: BackupDriver,
                           truncate: bool) -> RestoreResult:
        parent = os.path.dirname(os.path.normpath(root.path))
        sweep_staging(parent, os.path.basename(os.path.normpath(root.path)))
        st = os.statvfs(parent)
        if st.f_bavail * st.f_frsize < record.bytes:
            raise InsufficientResources("not enough room to restore: the backup holds {} "
                                        "bytes".format(record.bytes))
        # The server directory exists (an empty one is made if need be).
        Confined(root.path, root.uid, root.gid).close()
        assert record.location is not None
        # A directory snapshot (restic's own integrity checks) is dumped as a
        # tar naming its directory: no archive checksum to compare, a prefix
        # to strip.
        tree_strip = getattr(drv, "tree_strip", None)
        strip = tree_strip(record.location) if tree_strip is not None else None
        raw = drv.open_reader(record.location)
        try:
            return restore_root(root.path, raw,
                                size=record.size if strip is None else None,
                                checksum=record.checksum if strip is None else None,
                                content_bytes=record.bytes, uid=root.uid, gid=root.gid,
                                truncate=truncate, compressed=_compressed(drv),
                                strip=strip or (),
                                progress=self._progress_from_thread(record, record.bytes,
                                                                    "restore"),
                                progress_interval=self.config.progress_interval)
        finally:
            raw.close()

    # -- download --------------------------------------------------------------

    @async_to_deferred
    async def open_download(self, server_id: str, backup_id: object,
                            range_header: str | None = None) -> BackupDownload:
        """A completed backup's archive, whole or the one range asked."""
        server_id = self.servers.resolve(server_id)
        record = await self._record(server_id, backup_id)
        if record.status != "completed" or not record.location:
            raise Conflict("backup {} is {}, not completed".format(record.id, record.status))
        drv = self.drivers.get(record.driver)
        if drv is None:
            raise InvalidInput("backup {} was made with driver {!r}, not configured here"
                               .format(record.id, record.driver), field="backupId")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in record.name)[:80]
        tree_strip = getattr(drv, "tree_strip", None)
        if tree_strip is not None and tree_strip(record.location) is not None:
            # A directory snapshot is dumped as a tar whose length nobody
            # knows beforehand: the whole of it, no range (RFC 9110 allows it).
            stream = await self._in_thread(drv.open_reader, record.location)
            return BackupDownload(backup_id=record.id, filename="{}-{}.tar".format(
                safe or "backup", record.id[:8]), size=0, start=0, end=-1, partial=False,
                checksum=None, _stream=stream, _manager=self,
                content_type="application/x-tar", sized=False)
        wanted = parse_range(range_header, record.size)
        start, end = wanted if wanted is not None else (0, record.size - 1)
        stream = await self._in_thread(drv.open_reader, record.location, start,
                                       end - start + 1)
        return BackupDownload(backup_id=record.id, filename="{}-{}.tar.zst".format(
            safe or "backup", record.id[:8]), size=record.size, start=start, end=end,
            partial=wanted is not None, checksum=record.checksum, _stream=stream,
            _manager=self)

    # -- schedules -------------------------------------------------------------

    @async_to_deferred
    async def set_backup_schedule(self, server_id: str, cron: object, retain: object = None,
                                  driver: object = None) -> dict[str, Any]:
        """Set (or with an empty ``cron``, remove) the server's schedule."""
        server_id = self.servers.resolve(server_id)
        try:
            expr = cfg.parse_cron(cron)
            keep = cfg.parse_retention(retain)
        except ConfigInvalid as e:
            raise InvalidInput(str(e), field="cron" if "cron" in str(e) else "retain") from None
        if expr is None:
            if self.config.schedule.cron:
                # Opted out of the node's default schedule: remembered as such.
                await self.store.set_schedule(ScheduleRecord(
                    server_id, OPTED_OUT, None, None, self.config.driver,
                    self.clock.seconds()))
            else:
                await self.store.remove_schedule(server_id)
            return {}
        driver_name, _ = self._driver(driver if driver is None or isinstance(driver, str)
                                      else "?")
        await self.store.set_schedule(ScheduleRecord(
            server_id=server_id, cron=expr, retain_last=keep.last, retain_days=keep.days,
            driver=driver_name, last_run=self.clock.seconds()))
        return {}

    async def _tick_safely(self) -> None:
        try:
            await self.tick()
        except Exception:
            self.log.failure("backup schedules could not be run")

    async def tick(self) -> None:
        """Start every scheduled backup that is due (once, however many runs were missed)."""
        if self._ticking:
            return  # one look at a time: two could both see a run as due
        self._ticking = True
        try:
            await self._tick()
        finally:
            self._ticking = False

    async def _tick(self) -> None:
        from croniter import croniter

        now = self.clock.seconds()
        schedules = await self.store.schedules()
        if self.config.schedule.cron:
            await self._adopt_default(schedules, now)
            schedules = await self.store.schedules()
        for schedule in schedules:
            if schedule.cron == OPTED_OUT:
                continue
            try:
                due = croniter(schedule.cron, schedule.last_run).get_next(float)
            except (ValueError, KeyError):
                continue
            if due > now or self.busy(schedule.server_id) or self._stopping \
                    or self.servers.files_locked(schedule.server_id) is not None:
                continue
            await self.store.set_schedule(ScheduleRecord(
                schedule.server_id, schedule.cron, schedule.retain_last, schedule.retain_days,
                schedule.driver, now))
            try:
                answer = await self.create_backup(schedule.server_id, name="scheduled",
                                                  driver=schedule.driver, scheduled=True)
            except CtrlAgentError as e:
                self.log.warn(  # noqa: G010 - twisted.logger\'s method
                "scheduled backup of {server_id} not started: {error}",
                              server_id=schedule.server_id, error=str(e))
                continue
            if answer["backupId"] in self._work:
                retention = Deferred.fromCoroutine(
                    self._retain_after(self.finished(answer["backupId"]), schedule))
                self.tracker.track(retention, "retention of {}".format(schedule.server_id))

    async def _adopt_default(self, schedules: list[ScheduleRecord], now: float) -> None:
        """
        Give every server without a schedule of its own the node's default
        (``[backups.schedule]``), first due at its next time after now.
        """
        default = self.config.schedule
        if not default.cron:
            return
        known = {s.server_id for s in schedules}
        for status in self.servers.list_servers():
            shape = to_json(status)
            server_id = shape.get("serverId") if isinstance(shape, dict) else None
            if not isinstance(server_id, str) or server_id in known:
                continue
            record = ScheduleRecord(server_id, default.cron, default.retain.last,
                                    default.retain.days, default.driver, now)
            # Never over a schedule set meanwhile (an opt-out, say).
            await self.store.set_schedule(record, replace=False)
            schedules.append(record)

    async def _retain_after(self, work: Deferred[BackupRecord], schedule: ScheduleRecord
                            ) -> None:
        record = await work
        if record.status == "completed":
            await self.apply_retention(schedule.server_id, schedule.retain_last,
                                       schedule.retain_days)

    async def apply_retention(self, server_id: str, last: int | None, days: float | None
                              ) -> list[str]:
        """Delete scheduled backups beyond the newest ``last`` and older than ``days``."""
        if last is None and days is None:
            return []
        now = self.clock.seconds()
        records = [r for r in await self.store.find(server_id, "completed") if r.scheduled]
        going = [
            record for i, record in enumerate(records)
            if not ((last is not None and i < last)
                    or (days is not None and record.created >= now - days * 86400))
        ]
        # Each driver's archives in one call (restic prunes once for all of
        # them), then the records: a failure leaves every record, and the
        # next retention deletes again what is still there.
        by_driver: dict[str, list[str]] = {}
        for record in going:
            if record.location and record.driver in self.drivers:
                by_driver.setdefault(record.driver, []).append(record.location)
        for name, locations in by_driver.items():
            await self._in_thread(self.drivers[name].delete_all, locations)
        removed = []
        for record in going:
            drv = self.drivers.get(record.driver)
            if not record.location and drv is not None:
                await self._in_thread(drv.discard_partial, record.server_id, record.id)
            await self.store.delete(record.id)
            removed.append(record.id)
        if removed:
            self.log.info("retention removed {count} backup(s) of {server_id}",
                          count=len(removed), server_id=server_id)
        return removed


def build_drivers(config: cfg.BackupsConfig, state_dir: str) -> dict[str, BackupDriver]:
    """Every driver the configuration makes usable: local always, s3 and restic when set."""
    from ctrlagent.backups.drivers import LocalDriver

    drivers: dict[str, BackupDriver] = {"local": LocalDriver(config.directory)}
    if config.s3.bucket:
        from ctrlagent.backups.s3 import S3Driver

        drivers["s3"] = S3Driver(config.s3)
    if config.restic.repository and (config.restic.password is not None
                                     or config.restic.password_file is not None):
        from ctrlagent.backups.restic import ResticDriver

        drivers["restic"] = ResticDriver(config.restic,
                                         cache_dir=os.path.join(state_dir, "restic-cache"),
                                         source_dir=os.path.join(state_dir, "restic-source"),
                                         progress_interval=config.progress_interval)
    return drivers


def build_backup_manager(config: cfg.BackupsConfig, servers: Any, *, reactor: Any,
                         clock: IReactorTime, threadpool: ThreadPool | None = None,
                         tracker: Tracker, state_dir: str, data_dir: str | None
                         ) -> BackupManager:
    """
    The service ``tap.py`` adds: store in ``<state_dir>/backups.sqlite3``,
    every driver.  Without ``threadpool``, the manager gets its own
    (``concurrency + 2`` threads: the backups and restores, a deletion and a
    download), started and stopped with the service.  A database that cannot
    be used is ``BackupStoreUnusable`` (a ``StartupError``), raised here.
    """
    if not config.directory:
        config = replace(config, directory=config.directory_path(state_dir))
    store = BackupStore(reactor, os.path.join(state_dir, "backups.sqlite3"))
    owns = threadpool is None
    if threadpool is None:
        threadpool = ThreadPool(0, config.concurrency + 2, "ctrlagent-backups")
    return BackupManager(config, servers, store, build_drivers(config, state_dir),
                         reactor=reactor, clock=clock, threadpool=threadpool, tracker=tracker,
                         data_dir=data_dir, owns_threadpool=owns)
