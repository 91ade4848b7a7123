"""
The ``ServerManager`` service: every game server on this node.

It implements ``IServerManager`` for the action dispatcher and publishes
``StatusChanged``/``ConsoleOutput``/``ResourceUpdate`` events to listeners
(the Panel link).  Dependencies are explicit: the reactor (clock and
threads), the config tree, the container engine (``IContainerEngine``), the
store and a thread pool for
filesystem work (disk usage, chown, purges).

The manager is the set of servers (ids, aliases, definitions in the store),
the engine's event routing and the reconcile and disk loops.  Every power
action is the ``Server``'s own (``ctrlagent.servers.server``): the manager
finds the server and calls it, and a server never calls the manager back;
what it uses is handed to it once (``ServerServices``).

A server created without ports gets one of the node's range
(``servers.ports``), picked and added in one reactor turn; the create and
update answers carry what the engine warned of (a limit it dropped), each
distinct warning logged once.

Start-up never blocks on the engine: definitions are loaded from the store
(milliseconds), the API can serve at once, and the engine is reconciled in the
background: running containers are re-attached (console recovered from
the engine's kept output), servers that should run but do not are started, and
containers with our label the store does not know are reported, not deleted.
Stopping the service detaches from the containers and leaves them running.

Container deaths arrive through the engine's event stream (``engine.events``);
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
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, cast

from twisted.application import service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.config import AgentConfig
from ctrlagent.engine.interface import ContainerState, EngineEvent, IContainerEngine, IEventStream
from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    EngineError,
    EngineUnavailable,
    InvalidInput,
    NotFound,
    ServerNotFound,
)
from ctrlagent.events import ServerEvent, ServerRemoved
from ctrlagent.interfaces import IServerManager, ServerRoot
from ctrlagent.servers import containers as boxes
from ctrlagent.servers import spec as specs
from ctrlagent.servers.containers import MANAGED_LABEL, ROLE_LABEL, SERVER_ID_LABEL
from ctrlagent.servers.datadir import DataDirs
from ctrlagent.servers.delivery import JOURNAL_NAME, ConsoleDelivery, EventBus, Mark, MarkJournal
from ctrlagent.servers.drift import DriftCheck
from ctrlagent.servers.lifecycle import parse_state
from ctrlagent.servers.locks import FileLocks
from ctrlagent.servers.ports import PortPool, allocations
from ctrlagent.servers.reads import METRICS, STATUS, ReadAnswers
from ctrlagent.servers.server import Server
from ctrlagent.servers.services import RowWriter, ServerNetwork, ServerServices
from ctrlagent.servers.stats import StatsHub
from ctrlagent.servers.store import ServerRecord, ServerStore, open_store
from ctrlagent.startup import StartupError
from ctrlagent.wire import http as envelopes
from ctrlagent.wire.command import ActionResult, unusable_text
from ctrlagent.wire.json import encode, to_json
from ctrlagent.wire.servers import (
    Ack,
    ConsoleStatus,
    Created,
    Deleted,
    Metrics,
    ServerBrief,
    ServerStatus,
    Updated,
)
from ctrlagent.work import Deadlines, Tracker

# Kernel stats reads in one reactor turn at most (about 0.1 ms each): a
# request arriving meanwhile waits for them.
STATS_READS_PER_TICK = 4
# Disk-usage walks at once in a round of checks (each in the disk threads).
DISK_WALKS = 2
# Console histories read back at once by a restarted agent, behind the
# followed consoles (each a read of up to ``console_buffer_lines`` lines).
HISTORY_READS = 4


@implementer(IServerManager)
class ServerManager(service.Service):
    """Owns one ``Server`` per game server and drives them through the container engine."""

    log = Logger()
    name = "servers"

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        engine: IContainerEngine,
        store: ServerStore,
        disk_pool: ThreadPool | None = None,
        network_mode: str = "bridge",
        clock: Any = None,
        tracker: Tracker | None = None,
        deadlines: Deadlines | None = None,
        close_engine: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.reactor = reactor
        #: Status and metrics answers kept between samples (``read_answer``).
        self.reads = ReadAnswers(self._render_read)
        # Time may come from elsewhere than threads (a Clock in unit tests).
        self.clock = clock if clock is not None else reactor
        self.config = config
        self.engine = engine
        # Given by the owner of the engine: run once the manager stopped using it.
        self._close_engine = close_engine
        self.store = store
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
        self.orphans: list[dict[str, Any]] = []
        self.engine_up = True
        self._events: IEventStream | None = None
        self._events_task: Deferred[None] | None = None
        self._disk_loop: LoopingCall | None = None
        self._reconciling: Deferred[None] | None = None
        self._reconcile_again = False
        self.crashed: Deferred[None] | None = None
        # events and console delivery (ctrlagent.servers.delivery)
        self.bus = EventBus()
        self.delivery = ConsoleDelivery(
            self.bus,
            MarkJournal(os.path.join(config.state_dir, JOURNAL_NAME)),
            store,
            self.clock,
            config.servers.console_mark_interval,
        )
        self.rows = RowWriter(store, self.tracker)
        self.data = DataDirs(reactor, config.data_dir, self.disk_pool, config.disk)
        self.network = ServerNetwork(engine, network_mode, config.docker.network_subnet or None)
        self.locks = FileLocks()
        # Every running server's kernel-read stats on one timer.
        self.stats_hub = StatsHub(
            self.clock,
            config.servers.stats_interval,
            idle_interval=config.servers.stats_idle_interval,
            per_tick=STATS_READS_PER_TICK,
        )
        # What every server uses: it never reaches back to the manager.
        self.services = ServerServices(
            engine=engine,
            clock=self.clock,
            deadlines=self.deadlines,
            tracker=self.tracker,
            bus=self.bus,
            delivery=self.delivery,
            rows=self.rows,
            data=self.data,
            network=self.network,
            config=config,
            locks=self.locks,
            stats=self.stats_hub,
            history_slots=DeferredSemaphore(HISTORY_READS),
        )
        self.reconciled = 0
        # A game's end no engine event told, caught by looking at the list.
        self.drift = DriftCheck(
            self.clock,
            engine,
            self._servers.values,
            lambda: self.engine_up and self._reconciling is None,
            self.tracker,
            config.servers.drift_check_interval,
        )
        # Ports for servers created without any (servers.port_range).
        self.ports = PortPool(config.servers)
        # Ports an update gave a server whose new spec is not stored yet.
        self._pending_ports: set[int] = set()
        # Every engine warning already logged (each distinct one is logged once).
        self._warned: set[str] = set()

    @property
    def network_mode(self) -> str:
        """The network the servers' containers join."""
        return self.network.mode

    @network_mode.setter
    def network_mode(self, mode: str) -> None:
        self.network.mode = mode

    @property
    def journal(self) -> MarkJournal:
        """The journal of delivered console marks."""
        return self.delivery.journal

    @property
    def delivered_marks(self) -> dict[str, Mark]:
        """Each server's delivered console mark."""
        return self.delivery.delivered_marks

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
            self.data.start()
        except BaseException:
            self.abort_start()
            raise
        super().startService()
        if self._own_pool:
            self.disk_pool.start()
        self._events = self.engine.events(
            {MANAGED_LABEL: "true"},
            since_ns=int(self.clock.seconds() * 1e9),
            on_break=self._engine_lost,
            on_resume=self._engine_back,
        )
        self._events_task = self.tracker.run(self._watch_events(), "engine event watcher")
        reconciled = self.reconcile()
        self.delivery.schedule()
        if self.config.servers.disk_check_interval > 0:
            # Each round is the tracker's work: shutdown cancels it and waits
            # for it, instead of leaving its walks to go on after the manager.
            self._disk_loop = LoopingCall(
                lambda: self.tracker.run(self._check_all_disks(), "disk usage checks")
            )
            self._disk_loop.clock = self.clock
            # After the first reconcile: re-attaching every running server
            # comes first at start-up, and hundreds of walks in the disk
            # threads would compete with it for the interpreter.
            reconciled.addBoth(self._start_disk_checks)
        reconciled.addBoth(self._start_drift_checks)

    def _start_disk_checks(self, result: Any) -> Any:
        loop = self._disk_loop
        if self.running and loop is not None and not loop.running:
            interval = self.config.servers.disk_check_interval
            loop.start(interval, now=True)
        return result

    def _start_drift_checks(self, result: Any) -> Any:
        if self.running:
            self.drift.start()
        return result

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
            console = server.console
            mark = self.delivery.load(
                server.server_id, (console.mark, console.mark_count), journal
            )
            if mark[0]:
                console.mark, console.mark_count = mark
            self._add(server)
        self._load_console_settings()
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

    def _load_console_settings(self) -> None:
        """Put each server's stored console settings in force; bad ones are reported."""
        stored, bad = self.store.load_console_settings()
        for server_id, settings in stored.items():
            server = self._servers.get(server_id)
            if server is None:
                continue
            try:
                server.apply_console_settings(server.console_settings.changed(settings))
            except InvalidInput as e:
                bad.append((server_id, e.message))
        for server_id, reason in bad:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "stored console settings of server {server_id!r} cannot be used ({reason}):"
                " it keeps the defaults until they are set again",
                server_id=server_id, reason=reason)

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
            spec,
            self.services,
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
        self.data.stop()
        if self._disk_loop is not None and self._disk_loop.running:
            self._disk_loop.stop()
        self.drift.stop()
        if self._events is not None:
            self._events.close()
        for server in self._servers.values():
            server.close()
        self.stats_hub.stop()
        self.tracker.cancel_all()
        await self.tracker.wait()
        await self.delivery.flush()
        self.delivery.closed = True
        self.journal.close()
        await self.store.close()
        if self._own_pool:
            self.disk_pool.stop()
        if self._close_engine is not None:
            await self._close_engine()

    def simulate_crash(self) -> None:
        """
        Tests only: die as a SIGKILLed agent would, writing nothing more.

        Streams and timers are dropped, marks not yet copied to the store are
        lost there (the journal has them, as a SIGKILLed process's page-cache
        writes survive it), the store stays as the last commit left it.
        """
        self.running = False
        self.rows.halt()
        self.delivery.die()
        self.data.stop()
        if self._disk_loop is not None and self._disk_loop.running:
            self._disk_loop.stop()
        self.drift.stop()
        if self._events is not None:
            self._events.close()
        for server in self._servers.values():
            server.close()
        self.stats_hub.stop()
        self.tracker.cancel_all()
        # A dead process holds no threads: the store finishes the statement
        # in flight (as the kernel would flush an issued write) and closes.
        self.crashed = self.store.close()
        if self._own_pool:
            self.disk_pool.stop()

    def emit(self, event: ServerEvent) -> None:
        """Publish an event to every listener (``EventBus.emit``)."""
        self.bus.emit(event)

    # -- engine watching and reconciling -----------------------------------

    async def _watch_events(self) -> None:
        assert self._events is not None
        async for event in self._events:
            if event.labels.get(ROLE_LABEL, "server") != "server":
                continue
            server = self._by_event(event)
            if server is None:
                continue
            server.on_event(event)

    def _by_event(self, event: EngineEvent) -> Server | None:
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

    def _engine_lost(self, error: EngineError) -> None:
        if not self.engine_up:
            return
        self.engine_up = False
        self.log.warn(  # noqa: G010 (twisted.logger has warn)
            "container engine {engine} unreachable ({error}): servers are unknown",
            engine=self.engine.name,
            error=error,
        )
        for server in self._servers.values():
            server.mark_unknown()

    def _engine_back(self) -> None:
        self.log.info("container engine {engine} is back: reconciling", engine=self.engine.name)
        self.engine_up = True
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
            containers = await self.engine.list({MANAGED_LABEL: "true"})
        except EngineUnavailable as e:
            self._engine_lost(e)
            return
        self.engine_up = True
        found: dict[str, ContainerState] = {}
        orphans: list[dict[str, Any]] = []
        for c in containers:
            sid = c.labels.get(SERVER_ID_LABEL, "")
            role = c.labels.get(ROLE_LABEL, "server")
            server = self._servers.get(sid)
            if server is None:
                orphans.append(
                    {
                        "containerId": c.id,
                        "names": list(c.names),
                        "serverId": sid,
                        "state": c.status,
                    }
                )
                continue
            if role != "server":
                continue
            current = found.get(sid)
            # Prefer the container the store knows, then a running one.
            if current is None or c.id == server.container_id or c.running:
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
        # Re-attaching is mostly waiting on the engine (an inspect, the kept
        # console, the live console, stdin): many at once, bounded.
        slots = DeferredSemaphore(self.config.servers.reconcile_concurrency)
        self.reconcile_slots = slots

        @async_to_deferred
        async def one(server: Server) -> None:
            try:
                await server.reconcile(found.get(server.server_id))
            except EngineUnavailable as e:
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
        # DISK_WALKS walks at a time, each taking the next server when its
        # last ends: not hundreds of queued checks made in one reactor turn
        # (6 ms at 500 servers, every interval, a stall every request felt).
        if not self._servers:
            return succeed(None)
        servers = iter(list(self._servers.values()))

        async def walk() -> None:
            for server in servers:
                if not self.running:
                    return
                try:
                    await self.check_disk(server)
                except CancelledError:
                    return
                except Exception as e:  # noqa: BLE001 - one server's check never stops the round
                    self.log.debug("disk check of {server_id} failed: {e}",
                                   server_id=server.server_id, e=e)

        return DeferredList([Deferred.fromCoroutine(walk()) for _ in range(DISK_WALKS)],
                            consumeErrors=True)

    async def check_disk(self, server: Server) -> int:
        """Measure the data directory (in a thread), cache it, enforce the limit."""
        used = await self.data.measure(server.server_id)
        return await server.enforce_disk(used.allocated, uncounted=used.uncounted)

    # -- lookup ------------------------------------------------------------

    def _add(self, server: Server) -> None:
        self._servers[server.server_id] = server
        self.delivery.serve(server.server_id)
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
    async def create_server(self, server_id: str, params: dict) -> Created:
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
        if not spec.ports and self.ports.enabled:
            # No await between the pick and ``_add``: the next create sees it held.
            spec = replace(spec, ports=(self.ports.allocate(self._held_ports()),))
        server = Server(spec, self.services)
        self._add(server)
        try:
            await self.store.insert(server_id, spec.to_json(), state="installing")
        except Exception:
            self._remove(server)
            self.delivery.forget(server_id)
            raise
        await server.install_for_answer()
        return Created(
            server_id=server_id,
            container_id=server.container_id,
            state=server.state.value,
            allocations=allocations(server.spec),
            warnings=self._engine_warnings(server),
        )

    def _held_ports(self) -> set[int]:
        """Every host port a server of this agent publishes (stopped ones too)."""
        held = {p.external for server in self._servers.values() for p in server.spec.ports}
        return held | self._pending_ports

    def _engine_warnings(self, server: Server) -> tuple[str, ...]:
        """
        What the engine warned of when it last created or updated the
        server's container (a limit it does not apply); each distinct
        warning is logged once for the agent's life, not at every create.
        """
        cid = server.container_id
        warnings = self.engine.last_warnings(cid) if cid else ()
        for warning in warnings:
            if warning in self._warned:
                continue
            if len(self._warned) < _WARNINGS_REMEMBERED:
                self._warned.add(warning)
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "container engine {engine} accepted a setting of server {server_id} it does not"
                " apply: {warning} (said once; create and update answers carry it as warnings)",
                engine=self.engine.name,
                server_id=server.server_id,
                warning=warning,
            )
        return tuple(warnings)

    def lock_files(self, server_id: str, reason: str) -> Callable[[], None]:
        """Lock the server's files (``FileLocks.lock``); the release is returned."""
        return self.locks.lock(self.resolve(server_id), reason)

    def files_locked(self, server_id: str) -> str | None:
        """Why the server's files are locked (``"restored"``), or None (unknown: None)."""
        try:
            return self.locks.locked(self.resolve(server_id))
        except ServerNotFound:
            return None

    @async_to_deferred
    async def start(self, server_id: str) -> ServerBrief:
        """Start; fires once the container runs (``starting`` or ``running``)."""
        return await self.get(server_id).start()

    @async_to_deferred
    async def stop(
        self, server_id: str, signal: str | None = None, timeout: float | None = None
    ) -> ServerBrief:
        """Graceful stop in the background; ``SIGKILL`` kills at once."""
        return await self.get(server_id).stop(signal, timeout)

    @async_to_deferred
    async def restart(self, server_id: str) -> ServerBrief:
        """Stop (if running) then start, in the background."""
        return await self.get(server_id).restart()

    @async_to_deferred
    async def kill(self, server_id: str) -> ServerBrief:
        """SIGKILL the server; always allowed, never removes anything."""
        return await self.get(server_id).kill()

    @async_to_deferred
    async def delete(self, server_id: str, purge_files: bool = False) -> Deleted:
        """Remove the container (and data when ``purge_files``) and forget the server."""
        server = self.get(server_id)

        async def forget() -> None:
            # The record before memory: a store that cannot write (a full
            # state disk) leaves the server known, so the delete can be
            # tried again rather than the server coming back at restart.
            await self.store.forget_console_settings(server.server_id)
            await self.store.delete(server.server_id)
            self._remove(server)
            self.delivery.forget(server.server_id)
            self.emit(ServerRemoved(server.server_id))

        return await server.retire(purge_files, forget)

    @async_to_deferred
    async def suspend(self, server_id: str) -> ServerBrief:
        """Stop the server and refuse starts until unsuspended."""
        return await self.get(server_id).suspend()

    @async_to_deferred
    async def unsuspend(self, server_id: str) -> ServerBrief:
        """Allow starts again."""
        return await self.get(server_id).unsuspend()

    @async_to_deferred
    async def reinstall(self, server_id: str) -> ServerBrief:
        """Run the install flow again (the server must not be running)."""
        return await self.get(server_id).reinstall()

    @async_to_deferred
    async def update(self, server_id: str, params: dict) -> Updated:
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
        if not new.ports and self.ports.enabled:
            # An update leaves no server of a node with a range without a
            # port: it keeps the one it had, or (a server defined before the
            # range) gets one now.
            new = replace(new, ports=old.ports or (self.ports.allocate(self._held_ports()),))
        # Held until the server's spec says so (after the store's write), so
        # that a create meanwhile does not pick it.
        held = {p.external for p in new.ports} - {p.external for p in old.ports}
        self._pending_ports |= held
        try:
            # The store first: a write that fails (a full state disk) leaves
            # the old definition in memory and on disk alike.
            await self.store.update(server.server_id, spec=new.to_json())
        finally:
            self._pending_ports -= held
        server.spec = new
        self._remove(server)
        self._add(server)
        live = False
        warnings: tuple[str, ...] = ()
        if new.limits.disk_mb != old.limits.disk_mb:
            await self.data.set_limit(server.server_id, server.root().disk_limit_bytes)
        if server.container_id and new.limits != old.limits:
            try:
                await self.engine.update_limits(
                    server.container_id, boxes.limits(new, self.config.servers)
                )
                live = True
            except (NotFound, Conflict):
                # Gone, or an engine that updates running containers only
                # (Podman): the new limits apply when the start recreates the
                # container from the changed definition.
                pass
            else:
                warnings = self._engine_warnings(server)
        return Updated(brief=server.brief(), limits_applied_live=live, warnings=warnings)

    def status(self, server_id: str) -> ServerStatus:
        """The server's status, with the ports it publishes."""
        return _with_allocations(self.get(server_id))

    def list_servers(self) -> list[ServerStatus]:
        """Status of every managed server."""
        return [_with_allocations(s) for s in self._servers.values()]

    def server_metrics(self, server_id: str) -> Metrics:
        """The Panel's metrics shape from the latest sample."""
        return self.get(server_id).metrics()

    def read_answer(self, action: str, server_id: str) -> bytes | None:
        """
        The encoded success answer of a bare ``get_server_status`` or
        ``get_server_metrics`` of ``server_id`` (any of its names), filled
        from the server's kept answer (``servers.reads``); None for any other
        action, an unknown server, or an answer not kept: the registry
        answers it as ever.
        """
        if action not in _READS:
            return None
        # As ``resolve`` does, ids first; an alias with a lone surrogate is the
        # registry's to refuse.
        server = self._servers.get(server_id)
        if server is None:
            canonical = self._aliases.get(server_id)
            if canonical is None or unusable_text(server_id):
                return None
            server = self._servers.get(canonical)
            if server is None:
                return None
        return self.reads.answer(action, server, self.clock.seconds())

    @staticmethod
    def _render_read(action: str, server: Server, now: float) -> bytes:
        """A read's answer at ``now`` as the registry writes it (``actions/servers.py``)."""
        if action == STATUS:
            data: object = _with_allocations(server, now)
        else:
            data = {**to_json(server.metrics(now)), "serverId": server.server_id}
        return encode(envelopes.success(ActionResult(cast(dict[str, Any], data))))

    @async_to_deferred
    async def send_command(self, server_id: str, command: str) -> Ack:
        """Write one line to the server's stdin."""
        server = self.get(server_id)
        await server.send_command(command)
        return Ack(server_id=server.server_id)

    @async_to_deferred
    async def console_command(
        self, server_id: str, command: str, wait: float | None = None
    ) -> str:
        """
        Send ``command``; fire with what the console printed within ``wait``
        seconds (``timeouts.console_reply_wait`` when not given).
        """
        if wait is None:
            wait = self.config.timeouts.console_reply_wait
        return await self.get(server_id).console_command(command, wait)

    def console_history(self, server_id: str, lines: int = 100) -> list[str]:
        """The last ``lines`` console lines."""
        return self.get(server_id).console_history(lines)

    @async_to_deferred
    async def console_input(self, server_id: str, data: str) -> dict[str, Any]:
        """Write ``data`` to the server's stdin as it is (no newline added)."""
        server = self.get(server_id)
        written = await server.console_input(data)
        return {"serverId": server.server_id, "bytes": written}

    @async_to_deferred
    async def console_interrupt(self, server_id: str) -> dict[str, Any]:
        """Ctrl+C: SIGINT to the server's process."""
        server = self.get(server_id)
        await server.interrupt()
        return {"serverId": server.server_id, "signal": "SIGINT"}

    def console_settings(self, server_id: str) -> dict[str, Any]:
        """The console settings in force."""
        server = self.get(server_id)
        return {"serverId": server.server_id, "settings": server.console_settings.to_wire()}

    @async_to_deferred
    async def update_console_settings(self, server_id: str, settings: object) -> dict[str, Any]:
        """
        Change some console settings: checked (unknown keys refused), stored,
        then put in force; a store that cannot write changes nothing.
        """
        server = self.get(server_id)
        new = server.console_settings.changed(settings)
        await self.store.set_console_settings(server.server_id, new.to_wire())
        if self._servers.get(server.server_id) is server:
            server.apply_console_settings(new)
        return {"serverId": server.server_id, "settings": new.to_wire()}

    def console_status(self, server_id: str) -> ConsoleStatus:
        """Console attachment and buffer state."""
        return self.get(server_id).console_status()

    def console_clear(self, server_id: str) -> None:
        """Empty the console buffer."""
        self.get(server_id).console.buffer.clear()

    def server_root(self, server_id: str) -> ServerRoot:
        """Where the server's files live."""
        return self.get(server_id).root()

    def add_listener(self, listener: Any, console: bool = True) -> None:
        """
        Subscribe to every event (but the console's, when ``console`` is
        False).  An ``IConsoleConsumer`` (the Panel link; at most one) settles
        console receipts: from then on, console marks advance only as it does.
        """
        self.bus.add(listener, console)

    def remove_listener(self, listener: Any) -> None:
        """Unsubscribe (a consumer's unsettled lines then count as not delivered)."""
        self.bus.remove(listener)

    def follow_figures(self, live: Callable[[], bool]) -> None:
        """
        Who says whether every server's figures are followed as they come
        (the Panel link while connected): then running servers are sampled
        every ``servers.stats_interval``, else every
        ``servers.stats_idle_interval`` and when read.
        """
        self.stats_hub.live = live


# Distinct engine warnings remembered as logged (beyond, a new one is logged
# every time it comes: a bound, not a behaviour any engine reaches).
_WARNINGS_REMEMBERED = 256


# The reads ``read_answer`` may answer.
_READS = frozenset((STATUS, METRICS))


def _with_allocations(server: Server, now: float | None = None) -> ServerStatus:
    """``server``'s status with its published ports (built once: a status read's cost)."""
    return server.status(allocations(server.spec), now)


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
        os.makedirs(path, mode=0o700, exist_ok=True)  # the agent's alone: see DataDirs
    except OSError as e:
        raise StartupError(
            "data directory {} cannot be created ({})".format(path, e.strerror or e)
        ) from None


def make_server_manager(
    reactor: Any,
    config: AgentConfig,
    engine: IContainerEngine,
    *,
    tracker: Tracker | None = None,
    deadlines: Deadlines | None = None,
    close_engine: Callable[[], Awaitable[None]] | None = None,
) -> ServerManager:
    """
    The manager with its store opened in ``config.state_dir``;
    ``close_engine`` runs when it stopped (the engine's owner closing it).
    """
    return ServerManager(
        reactor,
        config,
        engine,
        open_store(reactor, config.state_dir),
        network_mode=config.docker.network_name or "bridge",
        tracker=tracker,
        deadlines=deadlines,
        close_engine=close_engine,
    )

