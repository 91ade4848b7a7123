"""
The ``ServerManager`` service: every game server on this node.

It implements ``IServerManager`` for the action dispatcher and publishes
``StatusChanged``/``ConsoleOutput``/``ResourceUpdate`` events to listeners
(the Panel link).  Dependencies are explicit: the reactor (clock and
threads), the config tree, the Docker client, the store and a thread pool for
filesystem work (disk usage, chown, purges).

Start-up never blocks on Docker: definitions are loaded from the store
(milliseconds), the API can serve at once, and the engine is reconciled in the
background: running containers are re-attached (console recovered from
Docker's logs), servers that should run but do not are started, and
containers with our label the store does not know are reported, not deleted.
Stopping the service detaches from the containers and leaves them running.

Container deaths arrive through Docker's event stream (``ResumableEvents``);
when that stream breaks, the engine is gone: servers report ``unknown`` and
the agent keeps serving; when it opens again, the manager reconciles.

Console delivery (``ctrlagent.servers.delivery``): lines are handed to the
listeners at once.  Without a Panel link that is delivery; with one (an
``IConsoleConsumer``), a line is delivered when the link settles its event's
receipt, once the frame carrying it was taken by the kernel.  The mark of
what was delivered advances in order (``MarkLedger``), is appended to the
journal in the same call (durable against SIGKILL) and copied to the store
in the background every ``servers.console_mark_interval`` seconds (durable
against power loss).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.config import AgentConfig
from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    DockerError,
    DockerUnavailable,
    NotFound,
    ServerNotFound,
)
from ctrlagent.events import ConsoleOutput, EventListener, ServerEvent
from ctrlagent.files import trees
from ctrlagent.files.confined import os_error
from ctrlagent.interfaces import IConsoleConsumer, IServerManager, ServerRoot
from ctrlagent.servers import spec as specs
from ctrlagent.servers.delivery import JOURNAL_NAME, Mark, MarkJournal, MarkLedger, newer
from ctrlagent.servers.server import Server
from ctrlagent.servers.spec import MANAGED_LABEL, ROLE_LABEL, SERVER_ID_LABEL
from ctrlagent.servers.states import ACTIVE_STATES, ServerState, parse_state
from ctrlagent.servers.store import ServerRecord, ServerStore, open_store
from ctrlagent.startup import StartupError
from ctrlagent.work import Deadlines, Tracker

T = TypeVar("T")
S = ServerState


@implementer(IServerManager)
class ServerManager(service.Service):
    """Owns one ``Server`` per game server and drives them through Docker."""

    log = Logger()
    name = "servers"

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        docker: Any,
        store: ServerStore,
        disk_pool: ThreadPool | None = None,
        network_mode: str = "bridge",
        clock: Any = None,
        tracker: Tracker | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.reactor = reactor
        # Time may come from elsewhere than threads (a Clock in unit tests).
        self.clock = clock if clock is not None else reactor
        self.config = config
        self.docker = docker
        self.store = store
        self.network_mode = network_mode
        self._own_pool = disk_pool is None
        self.disk_pool = disk_pool or ThreadPool(minthreads=0, maxthreads=2, name="ctrlagent-disk")
        # The manager's share of the agent's background work, and its deadlines.
        self.tracker = tracker if tracker is not None else Tracker("servers")
        self.deadlines = (
            deadlines
            if deadlines is not None
            else Deadlines(self.clock, self.tracker, config.timeouts)
        )
        self._servers: dict[str, Server] = {}
        self._aliases: dict[str, str] = {}
        self._listeners: list[EventListener] = []
        self.orphans: list[dict[str, Any]] = []
        self.docker_up = True
        self._events: Any = None
        self._events_task: Deferred[None] | None = None
        self._disk_loop: LoopingCall | None = None
        self._disk_slots = DeferredSemaphore(2)
        self._reconciling: Deferred[None] | None = None
        self._reconcile_again = False
        self._dead = False
        self.crashed: Deferred[None] | None = None
        # console delivery (ctrlagent.servers.delivery)
        self._consumer: Any = None  # the acknowledging consumer (the Panel link)
        self._had_consumer = False
        self._ledger = MarkLedger(self._delivered)
        self.delivered_marks: dict[str, Mark] = {}
        self.journal = MarkJournal(os.path.join(config.state_dir, JOURNAL_NAME))
        # the store's copy of the marks: one write in flight, whatever queued meanwhile next
        self._pending_marks: dict[str, Mark] = {}
        self._writing = False
        self._mark_timer: IDelayedCall | None = None
        self._last_mark_write = -1e18
        self._flushing = False
        self._closed = False
        self._idle_waiters: list[Deferred[None]] = []
        self.reconciled = 0

    # -- service -----------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 (Twisted hook)
        """
        Load definitions, then watch and reconcile the engine in the background.

        Loading is synchronous, before anything runs: a store or data
        directory that cannot be used raises ``StartupError`` here (the agent
        then exits with one line), and a stored server that cannot be used is
        quarantined while the others load.
        """
        try:
            self._load_servers()
            _ensure_data_root(self.config.data_dir)
        except BaseException:
            self.abort_start()
            raise
        super().startService()
        if self._own_pool:
            self.disk_pool.start()
        since = self.clock.seconds()
        self._events = self.docker.resumable_events(
            {MANAGED_LABEL: "true"},
            since=since,
            retry_delay=0.25,
            max_retry_delay=2.0,
            on_break=self._engine_lost,
            on_resume=self._engine_back,
        )
        self._events_task = self.tracker.run(self._watch_events(), "Docker event watcher")
        self.reconcile()
        self._schedule_marks()
        interval = self.config.servers.disk_check_interval
        if interval > 0:
            self._disk_loop = LoopingCall(self._check_all_disks)
            self._disk_loop.clock = self.clock
            self.tracker.track(self._disk_loop.start(interval, now=True), "disk usage checks")

    def abort_start(self) -> None:
        """
        The agent's start failed (here or in another service): release the
        store and the disk threads now, without the reactor, so that the
        process can exit instead of waiting on them.
        """
        self.store.close_now()
        self.journal.close()
        if self._own_pool and self.disk_pool.started:
            self.disk_pool.stop()

    def _load_servers(self) -> None:
        store = self.store
        if store.migrated:
            self.log.info(
                "state store {path}: added the column(s) {columns} with their defaults",
                path=store.path,
                columns=", ".join(store.migrated),
            )
        records = store.load()
        journal = self.journal.load()
        for record in records:
            try:
                server = self._server_from_record(record)
            except Exception as e:
                store.quarantine(record.server_id, _unusable(e))
                continue
            stored = (server.mark, server.mark_count)
            mark = newer(stored, journal.get(server.server_id))
            if mark[0]:
                server.mark, server.mark_count = mark
                self.delivered_marks[server.server_id] = mark
                if mark != stored:
                    # The journal is ahead (a SIGKILL): the store catches up.
                    self._pending_marks[server.server_id] = mark
            self._add(server)
        # A fresh journal of exactly the servers served.
        self.journal.open(self.delivered_marks)
        for entry in store.quarantined:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "stored server {server_id!r} cannot be used ({reason}): its row was moved to"
                " the quarantine table of {path} and it is not managed; the other servers are",
                server_id=entry.server_id,
                reason=entry.reason,
                path=store.path,
            )

    def _server_from_record(self, record: ServerRecord) -> Server:
        """A ``Server`` from its stored row; raises when the row cannot be trusted."""
        specs.validate_server_id(record.server_id)
        spec = specs.spec_from_json(record.spec)
        if spec.server_id != record.server_id:
            raise ValueError("its definition names server {!r}".format(spec.server_id))
        for alias in spec.aliases:
            owner = self._aliases.get(alias) or (alias if alias in self._servers else None)
            if owner is not None:
                raise ValueError("its alias {!r} already names server {!r}".format(alias, owner))
        return Server(
            self,
            spec,
            state=parse_state(record.state),
            desired=record.desired,
            container_id=record.container_id,
            console_mark=record.console_mark,
            console_mark_count=int(record.extra.get("markCount", 0)),
            last_crash=record.last_crash,
        )

    @async_to_deferred
    async def stopService(self) -> None:  # noqa: N802 (Twisted hook)
        """Detach from every container (they keep running) and close the store."""
        super().stopService()
        if self._disk_loop is not None and self._disk_loop.running:
            self._disk_loop.stop()
        if self._events is not None:
            self._events.close()
        for server in self._servers.values():
            server.detach_output()
            server.throttle.cancel()
        self.tracker.cancel_all()
        await self.tracker.wait()
        await self._flush_marks()
        self._closed = True
        self.journal.close()
        await self.store.close()
        if self._own_pool:
            self.disk_pool.stop()

    def simulate_crash(self) -> None:
        """
        Tests only: die as a SIGKILLed agent would, writing nothing more.

        Streams and timers are dropped, marks not yet copied to the store are
        lost there (the journal has them, as a SIGKILLed process's page-cache
        writes survive it), the store stays as the last commit left it.
        """
        self._dead = True
        self.running = False
        if self._disk_loop is not None and self._disk_loop.running:
            self._disk_loop.stop()
        if self._events is not None:
            self._events.close()
        for server in self._servers.values():
            server.detach_output()
            server.throttle.cancel()
        self.tracker.cancel_all()
        if self._mark_timer is not None and self._mark_timer.active():
            self._mark_timer.cancel()
        self._mark_timer = None
        self._pending_marks.clear()
        self.journal.close()
        # A dead process holds no threads: the store finishes the statement
        # in flight (as the kernel would flush an issued write) and closes.
        self.crashed = self.store.close()
        if self._own_pool:
            self.disk_pool.stop()

    # -- plumbing used by Server -------------------------------------------

    def emit(self, event: ServerEvent) -> None:
        """Publish an event to every listener; a failing listener is logged."""
        if self._dead:
            return
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self.log.failure("event listener failed")

    # True while console mark writes fail (reported once per episode).
    _marks_failing = False

    def deliver(
        self,
        server_id: str,
        events: list[ConsoleOutput],
        marks: list[Mark | None],
        mark: Mark | None,
    ) -> None:
        """
        Hand a server's console ``events`` to the listeners, now.

        ``marks[i]`` is the mark that covers ``events[i]`` (None for an agent
        notice, which no restart could replay); ``mark`` is the server's read
        position after them, past any lines the throttle held back (None when
        it did not move).  With an acknowledging consumer, each event carries
        a receipt and the delivered mark advances as receipts are settled;
        without one, handing the events on delivers them.  Once a consumer
        was there and left (the agent is stopping), nothing counts as
        delivered any more: a restart replays those lines.
        """
        if self._dead:
            return
        consumer = self._consumer
        if consumer is not None:
            ledger = self._ledger
            for event, event_mark in zip(events, marks, strict=True):
                if event_mark is not None and event_mark[0]:
                    event.receipt = ledger.expect(server_id, event_mark)
        self._fan_out(events)
        if mark is not None and mark[0] and (consumer is not None or not self._had_consumer):
            self._ledger.passed(server_id, mark)

    def _fan_out(self, events: list[ConsoleOutput]) -> None:
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    self.log.failure("event listener failed")
                    if listener is self._consumer and event.receipt is not None:
                        # It will never settle it: count those lines as dropped
                        # rather than hold every later mark back.
                        event.receipt()

    def _delivered(self, server_id: str, mark: Mark) -> None:
        """The ledger advanced: record the mark now (journal), and soon (store)."""
        if self._dead or self._closed or server_id not in self._servers:
            return
        if mark <= self.delivered_marks.get(server_id, (0, 0)):
            return
        self.delivered_marks[server_id] = mark
        self.journal.record(server_id, mark)
        if self.journal.due():
            self.journal.compact(self.delivered_marks)
        self._pending_marks[server_id] = mark
        self._schedule_marks()

    def _forget_marks(self, server_id: str) -> None:
        """A deleted server: no mark of it may outlive it (its id can come back)."""
        self._ledger.forget(server_id)
        self._pending_marks.pop(server_id, None)
        if self.delivered_marks.pop(server_id, None) is not None:
            self.journal.record(server_id, (0, 0))

    def _schedule_marks(self) -> None:
        """Copy the pending marks to the store: at once, or when the interval is up."""
        if self._writing or self._mark_timer is not None or not self._pending_marks:
            return
        if self._dead or self._closed:
            return
        wait = self._last_mark_write + self.config.servers.console_mark_interval
        delay = wait - self.clock.seconds()
        if delay > 0 and not self._flushing:
            self._mark_timer = self.clock.callLater(delay, self._write_marks)
        else:
            self._write_marks()

    def _write_marks(self) -> None:
        """One store transaction of every pending mark; the next one queues behind it."""
        self._mark_timer = None
        marks, self._pending_marks = self._pending_marks, {}
        changes = [
            (sid, {"console_mark": ns, "extra": {"markCount": n}})
            for sid, (ns, n) in marks.items()
            if sid in self._servers
        ]
        if not changes or self._dead:
            self._release_idle()
            return
        self._writing = True
        self._last_mark_write = self.clock.seconds()
        try:
            d = self.store.update_many(changes)
        except Exception:
            d = fail()

        def written(result: object) -> None:
            self._writing = False
            if isinstance(result, Failure):
                # The journal has the marks (unless it fails too); a later
                # write records later ones.  A full or broken state disk fails
                # every write: say so once, not every second.
                if not self._marks_failing:
                    self._marks_failing = True
                    self.log.warn(  # noqa: G010 (twisted.logger has warn)
                        "storing console marks failed: {error}",
                        error=result.getErrorMessage(),
                    )
            elif self._marks_failing:
                self._marks_failing = False
                self.log.info("storing console marks works again")
            if self._dead:
                return
            self._schedule_marks()
            self._release_idle()

        d.addBoth(written)

    def _release_idle(self) -> None:
        if self._writing or self._mark_timer is not None:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _flush_marks(self) -> None:
        """Copy every pending mark to the store now and wait for it (shutdown)."""
        self._flushing = True
        if self._mark_timer is not None:
            if self._mark_timer.active():
                self._mark_timer.cancel()
            self._mark_timer = None
        self._schedule_marks()
        if self._writing:
            waiter: Deferred[None] = Deferred()
            self._idle_waiters.append(waiter)
            await waiter

    def persist(self, server_id: str, **fields: Any) -> None:
        """Write fields of a server's row in the background (in order)."""
        if self._dead or server_id not in self._servers:
            return
        self.tracker.track(self.store.update(server_id, **fields), "store " + server_id)

    def track(self, work: Coroutine[Any, Any, T] | Deferred[T], description: str) -> Deferred[T]:
        """Run/track background work so failures are logged and shutdown waits."""
        if isinstance(work, Deferred):
            return self.tracker.track(work, description)
        return self.tracker.run(work, description)

    async def within(self, d: Deferred[Any], timeout: float) -> bool:
        """True if ``d`` fires within ``timeout`` s (``d`` itself is not cancelled)."""
        return await self.deadlines.within(d, timeout)

    def in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run blocking filesystem work in the disk pool."""
        return deferToThreadPool(self.reactor, self.disk_pool, fn, *args)

    async def ensure_network(self) -> None:
        """
        Make sure the servers' network exists before a container joins it.

        Docker's own modes need nothing; the agent's network (``docker.
        network_name``) is created, labelled as ours, when missing (an operator
        may have removed it).  Called before every create, which is rare.
        """
        mode = self.network_mode
        if mode in ("bridge", "host", "none", "default") or mode.startswith("container:"):
            return
        await self.docker.network_ensure(
            mode, self.config.docker.network_subnet or None, labels={MANAGED_LABEL: "true"}
        )

    async def prepare_data_dir(self, server: Server, recursive: bool = False) -> None:
        """
        Create the data directory owned by the server's user.  With
        ``recursive`` (after an install, whatever its exit code), hand the
        whole tree back to the server: everything owned by its user, no
        setuid/setgid bit, no device node, FIFO or socket (``_prepare_dir``).
        """
        uid, gid = server.owner
        report = await self.in_thread(_prepare_dir, server.data_path, uid, gid, recursive)
        if report is None:
            return
        if report.removed_total or report.cleared or report.failed or report.truncated:
            # One line per pass, whatever it found.
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "server {server_id}: data directory handed back to the server: removed {count}"
                " special files ({kinds}){examples}; cleared setuid/setgid bits of {cleared}"
                " entries; {failed} entries could not be fixed{truncated}",
                server_id=server.server_id,
                count=report.removed_total,
                kinds=", ".join("{} {}".format(n, kind) for kind, n in
                                sorted(report.removed.items())) or "none",
                examples=(", e.g. " + ", ".join(report.example_paths())
                          if report.examples else ""),
                cleared=report.cleared,
                failed=report.failed,
                truncated="; a part could not be walked" if report.truncated else "",
            )

    def start_install(self, server: Server) -> Deferred[Any] | None:
        """Run the install flow in the background under the power slot."""
        try:
            server.claim("install")
        except Conflict:
            return None
        return server.in_background("install", server.install)

    # -- engine watching and reconciling -----------------------------------

    async def _watch_events(self) -> None:
        assert self._events is not None
        async for event in self._events:
            if event.labels.get(ROLE_LABEL, "server") != "server":
                continue
            server = self._by_event(event)
            if server is None:
                continue
            server.on_event(event.action, event.exit_code, event.time)

    def _by_event(self, event: Any) -> Server | None:
        sid = event.labels.get(SERVER_ID_LABEL)
        server = self._servers.get(sid) if sid else None
        if server is None:
            for candidate in self._servers.values():
                if candidate.container_id == event.container_id:
                    return candidate
            return None
        if server.container_id not in (None, event.container_id):
            # An event of a replaced container: not about the current one.
            return None
        return server

    def _engine_lost(self, error: DockerError) -> None:
        if not self.docker_up:
            return
        self.docker_up = False
        self.log.warn(  # noqa: G010 (twisted.logger has warn)
            "Docker engine unreachable ({error}): servers are unknown", error=error
        )
        for server in self._servers.values():
            server.mark_unknown()

    def _engine_back(self) -> None:
        self.log.info("Docker engine is back: reconciling")
        self.docker_up = True
        self.reconcile()

    def reconcile(self) -> Deferred[None]:
        """Reconcile in the background (coalescing overlapping requests)."""
        if self._reconciling is not None:
            self._reconcile_again = True
            return self._reconciling
        d = self.tracker.run(self._reconcile_loop(), "reconcile")
        if not d.called:
            self._reconciling = d
        return d

    async def _reconcile_loop(self) -> None:
        try:
            while True:
                self._reconcile_again = False
                await self._reconcile()
                if not self._reconcile_again:
                    return
        finally:
            self._reconciling = None

    async def _reconcile(self) -> None:
        try:
            containers = await self.docker.container_list(labels={MANAGED_LABEL: "true"}, all=True)
        except DockerUnavailable as e:
            self._engine_lost(e)
            return
        self.docker_up = True
        found: dict[str, dict[str, Any]] = {}
        orphans: list[dict[str, Any]] = []
        for c in containers:
            labels = c.get("Labels") or {}
            sid = labels.get(SERVER_ID_LABEL, "")
            role = labels.get(ROLE_LABEL, "server")
            server = self._servers.get(sid)
            if server is None:
                orphans.append(
                    {
                        "containerId": c.get("Id"),
                        "names": c.get("Names") or [],
                        "serverId": sid,
                        "state": c.get("State"),
                    }
                )
                continue
            if role != "server":
                continue
            current = found.get(sid)
            # Prefer the container the store knows, then a running one.
            if current is None or c.get("Id") == server.container_id or c.get("State") == "running":
                found[sid] = c
        for orphan in orphans:
            if orphan not in self.orphans:
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "container {cid} ({names}) carries our label but no server is defined"
                    " for {server_id}: left alone",
                    cid=orphan["containerId"],
                    names=",".join(orphan["names"]),
                    server_id=orphan["serverId"],
                )
        self.orphans = orphans
        slots = DeferredSemaphore(8)

        @async_to_deferred
        async def one(server: Server) -> None:
            try:
                await server.reconcile(found.get(server.server_id))
            except DockerUnavailable as e:
                self._engine_lost(e)
            except CtrlAgentError as e:
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "reconciling server {server_id} failed: {error}",
                    server_id=server.server_id,
                    error=e.message,
                )

        work = [slots.run(one, server) for server in list(self._servers.values())]
        for d in work:
            await d
        self.reconciled += 1

    # -- disk usage --------------------------------------------------------

    def _check_all_disks(self) -> Deferred[Any]:
        check = async_to_deferred(self.check_disk)
        work = [self._disk_slots.run(check, server) for server in list(self._servers.values())]
        if not work:
            return succeed(None)
        from twisted.internet.defer import DeferredList

        return DeferredList(work, consumeErrors=True)

    async def check_disk(self, server: Server) -> int:
        """Measure the data directory (in a thread), cache it, enforce the limit."""
        used = await self.in_thread(_disk_usage, server.data_path)
        server.disk_bytes = used
        server.disk_checked = self.clock.seconds()
        limit = server.spec.limits.disk_mb
        if limit > 0 and used > limit * specs.MB and server.state in ACTIVE_STATES:
            if server.power is None and server.state is not S.STOPPING:
                server.notice(
                    "disk usage {:.1f} MB is over the limit of {} MB: stopping".format(
                        used / specs.MB, limit
                    )
                )
                server.claim("stop")
                server.set_desired("offline")
                server.in_background("stop", lambda: server.graceful_stop(None, None))
        return used

    # -- lookup ------------------------------------------------------------

    def _add(self, server: Server) -> None:
        self._servers[server.server_id] = server
        for alias in server.spec.aliases:
            self._aliases[alias] = server.server_id

    def _remove(self, server: Server) -> None:
        self._servers.pop(server.server_id, None)
        for alias, sid in list(self._aliases.items()):
            if sid == server.server_id:
                del self._aliases[alias]

    def resolve(self, server_id: str) -> str:
        """Canonical id of a server known by id, alias, container name or id."""
        if not isinstance(server_id, str) or not server_id:
            raise ServerNotFound("no server id given")
        if server_id in self._servers:
            return server_id
        if server_id in self._aliases:
            return self._aliases[server_id]
        if server_id.startswith(specs.CONTAINER_PREFIX):
            rest = server_id[len(specs.CONTAINER_PREFIX):]
            if rest in self._servers:
                return rest
        if len(server_id) >= 12:
            for server in self._servers.values():
                if server.container_id and server.container_id.startswith(server_id):
                    return server.server_id
        raise ServerNotFound("no server {!r} on this node".format(server_id))

    def get(self, server_id: str) -> Server:
        """The ``Server`` known by ``server_id`` (any of its names)."""
        return self._servers[self.resolve(server_id)]

    @property
    def servers(self) -> dict[str, Server]:
        """Every managed server by canonical id (read-only use)."""
        return dict(self._servers)

    # -- IServerManager ----------------------------------------------------

    @async_to_deferred
    async def create_server(self, server_id: str, params: dict) -> dict[str, Any]:
        """Define, install and create a server (answers within the Panel's 30 s)."""
        server_id = specs.validate_server_id(server_id)
        try:
            existing = self.resolve(server_id)
        except ServerNotFound:
            existing = None
        if existing is not None:
            raise Conflict("server {} already exists".format(server_id))
        spec = specs.parse_spec(server_id, params, self.config.servers)
        for alias in spec.aliases:
            if alias in self._servers or alias in self._aliases:
                raise Conflict("alias {} already names another server".format(alias))
        server = Server(self, spec)
        self._add(server)
        try:
            await self.store.insert(server_id, spec.to_json(), state="installing")
        except Exception:
            self._remove(server)
            raise
        d = self.start_install(server)
        if d is not None:
            await self.within(d, self.config.servers.create_answer_timeout)
        return {
            "serverId": server_id,
            "containerId": server.container_id,
            "status": server.state.value,
        }

    @async_to_deferred
    async def start(self, server_id: str) -> dict[str, Any]:
        """Start; fires once the container runs (``starting`` or ``running``)."""
        server = self.get(server_id)
        server.claim("start")
        try:
            await server.do_start()
        finally:
            server.release()
        return _brief(server)

    @async_to_deferred
    async def stop(
        self, server_id: str, signal: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Graceful stop in the background; ``SIGKILL`` kills at once."""
        server = self.get(server_id)
        if signal == "SIGKILL":
            return await self.kill(server_id)
        if server.state not in ACTIVE_STATES:
            server.set_desired("offline")
            return _brief(server)
        server.claim("stop")
        server.set_desired("offline")
        server.in_background("stop", lambda: server.graceful_stop(signal, timeout))
        return _brief(server)

    @async_to_deferred
    async def restart(self, server_id: str) -> dict[str, Any]:
        """Stop (if running) then start, in the background."""
        server = self.get(server_id)
        server.claim("restart")

        epoch = server.kill_epoch

        async def work() -> None:
            if server.state in ACTIVE_STATES:
                await server.graceful_stop(None, None)
            if server.kill_epoch != epoch:
                # "kill is always allowed" and means down: a kill that
                # came while this restart was stopping the server wins.
                server.notice("restart cancelled: the server was killed")
                return
            await server.do_start()

        server.in_background("restart", work)
        return _brief(server)

    @async_to_deferred
    async def kill(self, server_id: str) -> dict[str, Any]:
        """SIGKILL the server; always allowed, never removes anything."""
        server = self.get(server_id)
        server.kill_epoch += 1
        server.set_desired("offline")
        if server.state in ACTIVE_STATES or server.state is S.UNKNOWN:
            await server.hard_kill()
        return _brief(server)

    @async_to_deferred
    async def delete(self, server_id: str, purge_files: bool = False) -> dict[str, Any]:
        """Remove the container (and data when ``purge_files``) and forget the server."""
        server = self.get(server_id)
        server.claim("delete")
        try:
            server.set_desired("offline")
            server._expect_exit = True
            server.detach_output()
            for name in (server.container_id, server.spec.container_name,
                         server.spec.container_name + "-install"):
                if not name:
                    continue
                try:
                    await self.docker.container_remove(name, force=True)
                except NotFound:
                    pass
            if purge_files:
                # Files before the record: a purge that fails leaves the
                # server known, so the delete can be tried again.
                await self.in_thread(_purge, server.data_path)
            # The record before memory: a store that cannot write (a full
            # state disk) leaves the server known, so the delete can be
            # tried again rather than the server coming back at restart.
            await self.store.delete(server.server_id)
            self._remove(server)
            self._forget_marks(server.server_id)
            await self.in_thread(_unlink, server.install_log_path)
        finally:
            server.release()
        return {"serverId": server.server_id, "status": "deleted", "purged": purge_files}

    @async_to_deferred
    async def suspend(self, server_id: str) -> dict[str, Any]:
        """Stop the server and refuse starts until unsuspended."""
        server = self.get(server_id)
        server.claim("suspend")
        server.set_desired("offline")

        async def work() -> None:
            if server.state in ACTIVE_STATES:
                await server.graceful_stop(None, None)
            server.set_state(S.SUSPENDED)

        server.in_background("suspend", work)
        return _brief(server)

    @async_to_deferred
    async def unsuspend(self, server_id: str) -> dict[str, Any]:
        """Allow starts again."""
        server = self.get(server_id)
        if server.state is S.SUSPENDED:
            server.set_state(S.OFFLINE)
        return _brief(server)

    @async_to_deferred
    async def reinstall(self, server_id: str) -> dict[str, Any]:
        """Run the install flow again (the server must not be running)."""
        server = self.get(server_id)
        if server.state in ACTIVE_STATES:
            raise Conflict("server {} must be stopped to reinstall".format(server.server_id))
        if server.state is S.SUSPENDED:
            raise Conflict("server {} is suspended".format(server.server_id))
        d = self.start_install(server)
        if d is None:
            raise Conflict("server {} is busy: {}".format(server.server_id, server.power))
        await self.within(d, self.config.servers.create_answer_timeout)
        return _brief(server)

    @async_to_deferred
    async def update(self, server_id: str, params: dict) -> dict[str, Any]:
        """Apply changed settings; limits go live, the rest at the next start."""
        server = self.get(server_id)
        old = server.spec
        new = specs.merge_update(old, params, self.config.servers)
        for alias in new.aliases:
            owner = self._aliases.get(alias, server.server_id)
            if owner != server.server_id or (
                alias in self._servers and alias != server.server_id
            ):
                raise Conflict("alias {} already names another server".format(alias))
        # The store first: a write that fails (a full state disk) leaves
        # the old definition in memory and on disk alike.
        await self.store.update(server.server_id, spec=new.to_json())
        server.spec = new
        self._remove(server)
        self._add(server)
        live = False
        if server.container_id and new.limits != old.limits:
            try:
                await self.docker.container_update(
                    server.container_id, specs.resources(new, self.config.servers)
                )
                live = True
            except NotFound:
                pass
        return {**_brief(server), "limitsAppliedLive": live}

    def status(self, server_id: str) -> dict[str, Any]:
        """The server's status dict."""
        return self.get(server_id).status()

    def list_servers(self) -> list[dict[str, Any]]:
        """Status of every managed server."""
        return [s.status() for s in self._servers.values()]

    def server_metrics(self, server_id: str) -> dict[str, Any]:
        """The Panel's metrics shape from the latest sample."""
        return self.get(server_id).metrics()

    @async_to_deferred
    async def send_command(self, server_id: str, command: str) -> dict[str, Any]:
        """Write one line to the server's stdin."""
        server = self.get(server_id)
        await server.send_command(command)
        return {"serverId": server.server_id}

    @async_to_deferred
    async def console_command(self, server_id: str, command: str, wait: float = 1.0) -> str:
        """Send ``command``; fire with what the console printed within ``wait`` s."""
        server = self.get(server_id)
        before = server.lines_total
        await server.send_command(command)
        await deferLater(self.clock, wait, lambda: None)
        new = server.lines_total - before
        return "\n".join(server.console_history(min(new, len(server.console))))

    def console_history(self, server_id: str, lines: int = 100) -> list[str]:
        """The last ``lines`` console lines."""
        return self.get(server_id).console_history(lines)

    def console_status(self, server_id: str) -> dict[str, Any]:
        """Console attachment and buffer state."""
        return self.get(server_id).console_status()

    def console_clear(self, server_id: str) -> None:
        """Empty the console buffer."""
        self.get(server_id).console.clear()

    def server_root(self, server_id: str) -> ServerRoot:
        """Where the server's files live."""
        return self.get(server_id).root()

    def add_listener(self, listener: Any) -> None:
        """
        Subscribe to every event.  An ``IConsoleConsumer`` (the Panel link;
        at most one) settles console receipts: from then on, console marks
        advance only as it does.
        """
        if IConsoleConsumer.providedBy(listener):
            if self._consumer is not None and self._consumer is not listener:
                raise RuntimeError("the manager already has an acknowledging console consumer")
            self._consumer = listener
            self._had_consumer = True
        self._listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        """Unsubscribe (a consumer's unsettled lines then count as not delivered)."""
        if listener is self._consumer:
            self._consumer = None
        if listener in self._listeners:
            self._listeners.remove(listener)


def _brief(server: Server) -> dict[str, Any]:
    return {
        "serverId": server.server_id,
        "status": server.state.value,
        "panelStatus": server.status()["panelStatus"],
        "containerId": server.container_id,
    }


def _prepare_dir(path: str, uid: int, gid: int, recursive: bool) -> trees.Reclaimed | None:
    """
    Create the data directory ``path`` (its parents are the agent's own) and
    give it to ``uid:gid``; with ``recursive``, also everything beneath it
    (``trees.reclaim_tree``: iterative, fd-based, never following a link,
    clearing setuid/setgid bits and removing special files).  Returns that
    pass's ``trees.Reclaimed`` report, or None.
    """
    parent, name = os.path.split(os.path.normpath(path))
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.mkdir(name, 0o755, dir_fd=parent_fd)
            except FileExistsError:
                pass
            # Never through a link: whatever is at the server's name must be
            # a real directory.
            fd = os.open(name, trees.DIR_FLAGS, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    try:
        try:
            os.fchown(fd, uid, gid)
            chown = True
        except PermissionError:
            chown = False  # not root (development): the tree stays ours
        mode = os.fstat(fd).st_mode & 0o7777
        if mode & 0o6000:
            os.fchmod(fd, mode & ~0o6000)
        if not recursive:
            return None
        return trees.reclaim_tree(fd, uid, gid, chown=chown)
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    finally:
        os.close(fd)


def _disk_usage(path: str) -> int:
    """Bytes allocated beneath ``path``, at any depth (``trees.tree_usage``)."""
    try:
        fd = os.open(path, trees.DIR_FLAGS)
    except OSError:
        return 0
    try:
        used, _ = trees.tree_usage(fd, allocated=True)
        return used
    finally:
        os.close(fd)


def _purge(path: str) -> None:
    """
    Remove a server's data directory, however deep (``trees.remove_tree``);
    a failure is raised, never ignored, so the caller keeps the server.
    """
    parent, name = os.path.split(os.path.normpath(path))
    try:
        parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    try:
        trees.remove_tree(parent_fd, name)
    except OSError as e:
        raise os_error(e, "data directory {}".format(path)) from None
    finally:
        os.close(parent_fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unusable(error: Exception) -> str:
    """Why a stored server cannot be used, in a few words (no traceback)."""
    if isinstance(error, CtrlAgentError):
        return error.message
    if isinstance(error, KeyError):
        return "its definition lacks {}".format(error.args[0] if error.args else "a field")
    if isinstance(error, RecursionError):
        return "its definition is nested too deeply"
    if isinstance(error, json.JSONDecodeError):
        return "its definition is not valid JSON ({})".format(error.msg)
    text = str(error) or type(error).__name__
    if isinstance(error, ValueError) and text.startswith("its "):
        return text
    return "its definition is unreadable ({}: {})".format(type(error).__name__, text[:200])


def _ensure_data_root(path: str) -> None:
    """The root of the servers' data directories exists and is a directory."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StartupError(
            "data directory {} is not a directory (data_dir must name a directory)".format(path)
        )
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as e:
        raise StartupError(
            "data directory {} cannot be created ({})".format(path, e.strerror or e)
        ) from None


def make_server_manager(
    reactor: Any,
    config: AgentConfig,
    docker: Any,
    *,
    tracker: Tracker | None = None,
    deadlines: Deadlines | None = None,
) -> ServerManager:
    """The manager with its store opened in ``config.state_dir``."""
    return ServerManager(
        reactor,
        config,
        docker,
        open_store(reactor, config.state_dir),
        network_mode=config.docker.network_name or "bridge",
        tracker=tracker,
        deadlines=deadlines,
    )


# What a Server needs from its owner (the manager itself).
ServerContext = ServerManager
