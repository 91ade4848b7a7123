"""
One game server: its parts, and the power actions that drive them.

A ``Server`` is built from its definition (``ServerSpec``) and the services
it uses (``ServerServices``): it never reaches back to the manager that owns
it.  Its parts: ``Lifecycle`` (the state, the only place that emits and
persists ``StatusChanged``), ``PowerSlot`` and ``ExitWatch``
(``ctrlagent.servers.lifecycle``), ``ConsolePipeline`` (console),
``StatsSampler`` (stats) and ``Installer`` (installer).  Power orchestration
lives here only.

Power actions take the server's *power slot*: a second action while one runs
answers ``CONFLICT`` at once; ``kill`` never needs the slot, so it can cut a
slow stop short.  Long parts (the graceful stop, the install) finish in the
background, holding the slot until they are done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ctrlagent.engine.interface import ContainerState, EngineEvent
from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    EngineError,
    EngineUnavailable,
    InsufficientResources,
    NotFound,
)
from ctrlagent.events import ResourceUpdate
from ctrlagent.interfaces import ServerRoot
from ctrlagent.servers import spec as specs
from ctrlagent.servers.console import ConsolePipeline, ConsoleSettings, Line
from ctrlagent.servers.containers import SPEC_HASH_LABEL, server_container
from ctrlagent.servers.installer import Installer
from ctrlagent.servers.lifecycle import (
    ACTIVE_STATES,
    Exit,
    ExitWatch,
    Input,
    Lifecycle,
    PowerSlot,
    ServerState,
)
from ctrlagent.servers.services import ServerServices
from ctrlagent.servers.spec import ServerSpec
from ctrlagent.servers.stats import StatsSampler
from ctrlagent.servers.typed import TypedLine
from ctrlagent.wire.servers import (
    Allocation,
    ConsoleStatus,
    CrashReport,
    Deleted,
    Metrics,
    ServerBrief,
    ServerStatus,
)

S = ServerState
MB = 1024 * 1024
# Lines of console kept with a crash report.
CRASH_TAIL = 50
# Power actions that create or start the container (a reconcile leaves them be).
_MAKING_A_RUN = frozenset({"start", "restart", "crash-restart"})
# A container's status once its run has ended (Docker's and Podman's words):
# not "stopping", "paused", "restarting" or "removing", which may still run.
_ENDED = frozenset({"exited", "dead", "created", "stopped", "configured"})
# A run's events are those stamped from a millisecond before its start on.
_RUN_SLACK_NS = 1_000_000


class Server:
    """One game server managed by the agent."""

    log = Logger()

    def __init__(
        self,
        spec: ServerSpec,
        services: ServerServices,
        *,
        state: ServerState = S.OFFLINE,
        desired: str = "offline",
        container_id: str | None = None,
        console_mark: int = 0,
        console_mark_count: int = 0,
        last_crash: float | None = None,
    ) -> None:
        self.spec = spec
        self.services = services
        sid = spec.server_id
        self.desired = desired
        self.container_id = container_id
        self.last_crash = last_crash
        self.crash_report: CrashReport | None = None
        self.retired = False
        # The status and metrics answers kept by ``servers.reads`` (by action).
        self.kept_answers: dict[str, Any] = {}
        config = services.config.servers
        self.lifecycle = Lifecycle(
            sid,
            state,
            clock=services.clock,
            emit=services.bus.emit,
            persist=self._persist,
            container_id=lambda: self.container_id,
        )
        self.slot = PowerSlot(sid)
        # The background power work holding the slot (a stop, restart, suspend).
        self._power_work: Deferred[Any] | None = None
        self.exits = ExitWatch()
        self.console = ConsolePipeline(
            sid,
            engine=services.engine,
            clock=services.clock,
            tracker=services.tracker,
            deadlines=services.deadlines,
            buffer_lines=config.console_buffer_lines,
            throttle_lines=config.console_throttle_lines,
            throttle_interval=config.console_throttle_interval,
            deliver=services.delivery.deliver,
            startup_seen=self._startup_seen,
            startup_done=self._startup_done,
            mark=console_mark,
            mark_count=console_mark_count,
            history_slots=services.history_slots,
        )
        self.sampler = StatsSampler(
            sid,
            engine=services.engine,
            clock=services.clock,
            tracker=services.tracker,
            config=config,
            container_id=lambda: self.container_id,
            active=lambda: self.state in ACTIVE_STATES,
            on_sample=self._sampled,
            hub=services.stats,
        )
        self.installer = Installer(sid, services, self.console)
        self._exit_waiters: list[Deferred[None]] = []
        # Deaths seen (``on_exit``): an attach that saw one begin while it
        # attached leaves the state to it.
        self._deaths = 0
        # Runs begun by this agent (``do_start``): a death judged late is not
        # the new run's.
        self._runs = 0
        # The line raw console input has typed on the run's stdin so far.
        self.typed = TypedLine()
        # Engine events heard about this server's containers (``drift_key``).
        self.heard = 0
        self.started_at: float | None = None
        # Engine time (ns) from which events belong to the current run.
        self.run_since_ns: int | None = None
        self.disk_bytes: int = 0
        self.disk_checked: float | None = None
        self.installing = False

    # -- identity ----------------------------------------------------------

    @property
    def server_id(self) -> str:
        """The id the server was created with (its canonical id)."""
        return self.spec.server_id

    @property
    def data_path(self) -> str:
        """The server's data directory on the host."""
        return self.services.data.path(self.server_id)

    @property
    def install_log_path(self) -> str:
        """Where the install script's output goes (in the agent's state directory)."""
        return self.installer.log_path

    @property
    def owner(self) -> tuple[int, int]:
        """Numeric owner of the data directory."""
        pair = specs.uid_gid(self.spec)
        if pair is None:
            servers = self.services.config.servers
            return servers.container_uid, servers.container_gid
        return pair

    def root(self) -> ServerRoot:
        """Where the server's files live (for the file manager)."""
        uid, gid = self.owner
        disk = self.spec.limits.disk_mb
        return ServerRoot(
            server_id=self.server_id,
            path=self.data_path,
            disk_limit_bytes=disk * MB if disk > 0 else None,
            uid=uid,
            gid=gid,
        )

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> ServerState:
        """The lifecycle's state."""
        return self.lifecycle.state

    @property
    def last_known(self) -> ServerState | None:
        """The state before the engine was lost."""
        return self.lifecycle.last_known

    @property
    def error(self) -> str | None:
        """Why the last change happened, when it was a failure."""
        return self.lifecycle.error

    @property
    def power(self) -> str | None:
        """The power action in progress, if any."""
        return self.slot.action

    @property
    def stats(self) -> dict[str, Any]:
        """The latest resource sample."""
        return self.sampler.latest

    def _persist(self, **fields: Any) -> None:
        """Write fields of this server's row in the background (in order)."""
        if not self.retired:
            self.services.rows.write(self.server_id, **fields)

    def set_desired(self, desired: str) -> None:
        """Record what the server should be doing (durably)."""
        if self.desired != desired:
            self.desired = desired
            self._persist(desired=desired)

    def status(
        self, allocations: tuple[Allocation, ...] = (), now: float | None = None
    ) -> ServerStatus:
        """
        The server's status as the Panel reads it (with its published ports,
        given) at ``now`` (the clock's time when not given).  ``read_key``
        names everything it shows but the time.
        """
        if now is None:
            now = self.services.clock.seconds()
        active = self.state in ACTIVE_STATES
        uptime: float | None = None
        if active and self.started_at is not None:
            uptime = max(0.0, now - self.started_at)
        return ServerStatus(
            server_id=self.server_id,
            name=self.spec.name,
            state=self.state.value,
            panel_status=self.lifecycle.panel_status(),
            container_id=self.container_id,
            desired_state=self.desired,
            image=self.spec.image,
            aliases=tuple(self.spec.aliases),
            error=self.error or None,
            resources=self.metrics(now) if active else None,
            uptime=uptime,
            last_crash=self.crash_report,
            power_action=self.power or None,
            allocations=allocations,
        )

    def read_key(self) -> tuple[object, ...]:
        """
        Everything ``status`` and ``metrics`` show but the time, sampling the
        kernel first as they do: while it is the same (``==``), so are their
        answers at the same ``now`` (``servers.reads`` keeps them by it).
        ``tests/servers/test_read_answers.py`` holds it to the attributes they read.
        """
        if self.state in ACTIVE_STATES:
            self.sampler.fresh()
        return (
            self.state, self.lifecycle.panel_status(), self.container_id, self.desired,
            self.spec, self.error, self.crash_report, self.power, self.started_at,
            self.disk_bytes, self.stats,
        )

    def brief(self) -> ServerBrief:
        """The short answer of a power action."""
        return ServerBrief(
            server_id=self.server_id,
            state=self.state.value,
            panel_status=self.lifecycle.panel_status(),
            container_id=self.container_id,
        )

    def metrics(self, now: float | None = None) -> Metrics:
        """The latest sample in the Panel's units (zeroes when stopped), at ``now``."""
        if self.state in ACTIVE_STATES:
            # Unwatched servers are sampled seldom: a reader gets a recent one.
            self.sampler.fresh()
        if now is None:
            now = self.services.clock.seconds()
        running = self.state in ACTIVE_STATES and bool(self.stats)
        stats = self.stats if running else {}
        return Metrics(
            cpu=float(stats.get("cpu", 0.0)),
            memory_mb=float(stats.get("memory", 0.0)),
            memory_limit_mb=float(stats.get("memoryLimit", 0.0)),
            disk_mb=round(self.disk_bytes / MB, 3),
            rx=int(stats.get("rx", 0)),
            tx=int(stats.get("tx", 0)),
            blk_read=int(stats.get("blkRead", 0)),
            blk_write=int(stats.get("blkWrite", 0)),
            pids=int(stats.get("pids", 0)),
            uptime=(
                max(0.0, now - self.started_at)
                if running and self.started_at is not None
                else 0.0
            ),
            players=0,
            at=now,
        )

    def _sampled(self) -> None:
        self.services.bus.emit(ResourceUpdate(server_id=self.server_id, metrics=self.metrics()))

    # -- background power work ---------------------------------------------

    def _in_background(self, action: str, work: Callable[[], Awaitable[Any]]) -> Deferred[Any]:
        """Run ``work`` holding the (already claimed) slot, releasing it at the end."""

        async def run() -> None:
            try:
                await work()
            except CtrlAgentError as e:
                # Background power work has no caller to answer: the failure
                # goes to the log and the console (a lost engine included;
                # the event watcher takes care of that state).
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "server {server_id}: {action} failed: {error}",
                    server_id=self.server_id,
                    action=action,
                    error=e.message,
                )
                self.notice("{} failed: {}".format(action, e.message))
            finally:
                self.slot.release()

        d = self.services.tracker.run(run(), "{} of server {}".format(action, self.server_id))
        if not d.called:
            self._power_work = d
            d.addBoth(self._power_work_done, d)
        return d

    def _power_work_done(self, result: Any, d: Deferred[Any]) -> Any:
        if self._power_work is d:
            self._power_work = None
        return result

    # -- power actions (the manager's IServerManager calls) -----------------

    async def start(self) -> ServerBrief:
        """Start; returns once the container runs (``starting`` or ``running``)."""
        self.services.locks.refuse(self.server_id, "start")
        self.slot.claim("start")
        try:
            await self.do_start()
        finally:
            self.slot.release()
        return self.brief()

    async def stop(
        self, signal: str | None = None, timeout: float | None = None, typed: bytes | None = None,
    ) -> ServerBrief:
        """
        Graceful stop in the background; ``SIGKILL`` kills at once
        (``typed``: the stop command was typed on the console but for its
        line end; these bytes, that end and what followed it, are written
        instead of the command).
        """
        if signal == "SIGKILL":
            return await self.kill()
        if self.state not in ACTIVE_STATES:
            self.set_desired("offline")
            return self.brief()
        self.slot.claim("stop")
        self.set_desired("offline")
        self._in_background("stop", lambda: self.graceful_stop(signal, timeout, typed))
        return self.brief()

    async def restart(self) -> ServerBrief:
        """Stop (if running) then start, in the background."""
        self.services.locks.refuse(self.server_id, "restart")
        self.slot.claim("restart")
        epoch = self.slot.kill_epoch

        async def work() -> None:
            if self.state in ACTIVE_STATES:
                await self.graceful_stop(None, None)
            if self.slot.kill_epoch != epoch:
                # "kill is always allowed" and means down: a kill that
                # came while this restart was stopping the server wins.
                self.notice("restart cancelled: the server was killed")
                return
            await self.do_start()

        self._in_background("restart", work)
        return self.brief()

    async def kill(self) -> ServerBrief:
        """SIGKILL the server; always allowed, never removes anything."""
        self.slot.killed()
        self.set_desired("offline")
        if self.state in ACTIVE_STATES or self.state is S.UNKNOWN:
            await self.hard_kill()
        if self._power_work is not None:
            # A stop (or restart, suspend) the kill cut short ends on the same
            # exit: let it settle, so that the answer frees the slot and the
            # next power action is not refused as "stop in progress".
            await self.services.deadlines.within(
                self._power_work, self.services.config.timeouts.exit_drain
            )
        return self.brief()

    async def suspend(self) -> ServerBrief:
        """Stop the server and refuse starts until unsuspended."""
        self.slot.claim("suspend")
        self.set_desired("offline")

        async def work() -> None:
            if self.state in ACTIVE_STATES:
                await self.graceful_stop(None, None)
            self.lifecycle.fire(Input.SUSPEND)

        self._in_background("suspend", work)
        return self.brief()

    async def unsuspend(self) -> ServerBrief:
        """Allow starts again."""
        if self.state is S.SUSPENDED:
            self.lifecycle.fire(Input.UNSUSPEND)
        return self.brief()

    async def reinstall(self) -> ServerBrief:
        """Run the install flow again (the server must not be running)."""
        self.services.locks.refuse(self.server_id, "reinstall")
        if self.state in ACTIVE_STATES:
            raise Conflict("server {} must be stopped to reinstall".format(self.server_id))
        if self.state is S.SUSPENDED:
            raise Conflict("server {} is suspended".format(self.server_id))
        if not await self.install_for_answer():
            raise Conflict("server {} is busy: {}".format(self.server_id, self.power))
        return self.brief()

    async def install_for_answer(self) -> bool:
        """
        Install in the background, waiting at most ``create_answer_timeout``
        for it; False when another power action holds the slot.
        """
        d = self.start_install()
        if d is None:
            return False
        await self.services.deadlines.within(d, self.services.config.servers.create_answer_timeout)
        return True

    async def retire(
        self, purge_files: bool, forget: Callable[[], Awaitable[None]]
    ) -> Deleted:
        """
        Remove the containers (and the data when ``purge_files``), then
        ``forget`` the server (its owner's record of it), holding the slot.

        Files before the record: a purge that fails leaves the server known,
        so the delete can be tried again; likewise a ``forget`` that fails
        (a store that cannot write).
        """
        self.services.locks.refuse(self.server_id, "delete")
        self.slot.claim("delete")
        try:
            self.set_desired("offline")
            self.exits.expect()
            self.detach_output()
            engine = self.services.engine
            for name in (self.container_id, self.spec.container_name,
                         self.spec.container_name + "-install"):
                if not name:
                    continue
                try:
                    await engine.remove(name)
                except NotFound:
                    pass
            if purge_files:
                await self.services.data.purge(self.server_id)
            await forget()
            self.retired = True
            await self.services.data.unlink(self.install_log_path)
        finally:
            self.slot.release()
        return Deleted(server_id=self.server_id, purged=purge_files)

    async def enforce_disk(self, used: int, uncounted: str = "") -> int:
        """
        Keep the measured disk use; stop a running server over its limit.

        ``uncounted`` says why part of its directory could not be measured
        because of the tree's shape (what a game can make to hide bytes from
        the count): with a limit set, that counts as over it.
        """
        self.disk_bytes = used
        self.disk_checked = self.services.clock.seconds()
        limit = self.spec.limits.disk_mb
        over = used > limit * MB or bool(uncounted)
        if limit > 0 and over and self.state in ACTIVE_STATES:
            if self.power is None and self.state is not S.STOPPING:
                if uncounted:
                    self.notice(
                        "disk usage cannot be measured whole ({}): stopping, as over the"
                        " limit of {} MB".format(uncounted, limit)
                    )
                else:
                    self.notice(
                        "disk usage {:.1f} MB is over the limit of {} MB: stopping".format(
                            used / MB, limit
                        )
                    )
                self.slot.claim("stop")
                self.set_desired("offline")
                self._in_background("stop", lambda: self.graceful_stop(None, None))
        return used

    def close(self) -> None:
        """
        The agent stops (or dies): let go of the container's streams and
        timers.  Work of this agent still under way (a reconcile, a start)
        opens no stream or stdin any more.
        """
        self.sampler.stop()
        self.console.close()

    # -- console -----------------------------------------------------------

    def notice(self, text: str) -> None:
        """Write an agent notice into the console (buffer and subscribers)."""
        self.console.notice(text)

    def _startup_seen(self, lines: list[Line]) -> bool:
        done = self.spec.startup_done
        return (
            done is not None
            and self.state is S.STARTING
            and any(done.matches(line.text) for line in lines)
        )

    def _startup_done(self) -> None:
        if self.state is S.STARTING:
            self.lifecycle.fire(Input.STARTUP_DONE)

    def console_history(self, lines: int) -> list[str]:
        """The last ``lines`` console lines."""
        return self.console.history(lines)

    def console_status(self) -> ConsoleStatus:
        """Whether the console is followed, its last activity and buffer size."""
        console = self.console
        return ConsoleStatus(
            connected=console.stdin_connected or console.attached,
            last_activity=console.buffer.last_activity,
            buffer_size=len(console.buffer),
        )

    async def console_command(self, command: str, wait: float) -> str:
        """Send ``command``; what the console printed within ``wait`` s."""
        before = self.console.lines_total
        await self.send_command(command)
        await deferLater(self.services.clock, wait, lambda: None)
        new = self.console.lines_total - before
        return "\n".join(self.console_history(min(new, len(self.console.buffer))))

    @property
    def output_attached(self) -> bool:
        """True while the console stream is being followed."""
        return self.console.attached

    async def send_command(self, command: str) -> None:
        """
        Write one line to the server's stdin.

        The server's own stop command, typed while it starts or runs and no
        power action is under way, is the Stop a player asked for (as in
        Wings): it runs as the ``stop`` power action, which writes the line.
        So the server shows ``stopping``, stays down (it is not restarted as
        a crash, nor brought back by a reconcile), and is killed if it has
        not stopped within the stop timeout.
        """
        if self.state not in ACTIVE_STATES or self.container_id is None:
            raise Conflict("server {} is not running".format(self.server_id))
        if self._is_typed_stop(command):
            self.notice("the stop command was typed: stopping the server")
            await self.stop()
            return
        await self.console.send_line(self.container_id, command)
        self.typed.ended(self._stdin_run())

    def _is_typed_stop(self, command: str) -> bool:
        method = self.spec.stop
        return (
            method.kind == "command"
            and command.strip() == method.value.strip()
            and (self.state is S.RUNNING or self.state is S.STARTING)
            and self.slot.action is None
        )

    async def console_input(self, data: str) -> int:
        """
        Write ``data`` to the server's stdin exactly as given (no newline
        added: a prompt's answer, a partial line, Ctrl+D as ``\x04``); the
        number of bytes accepted.

        Input that completes the server's stop command (typed key by key, as
        a terminal-like console sends it, or pasted among other lines) is the
        Stop a player asked for, as through ``send_command``: the characters
        up to that line's end go as they are, and the Stop action writes a
        LF for its end (a terminal's Enter is a CR, which a game reading a
        pipe may not take for one) and then whatever followed it.
        """
        if self.state not in ACTIVE_STATES or self.container_id is None:
            raise Conflict("server {} is not running".format(self.server_id))
        raw = data.encode("utf-8", "surrogateescape")
        cid, run = self.container_id, self._stdin_run()
        line, end = next(((line, end) for line, end in self.typed.lines(run, data)
                          if line is not None and self._is_typed_stop(line)), (None, -1))
        # Before any wait: the next input (the Panel's commands run side by
        # side) must find the line this one typed.
        self.typed.wrote(run, data)
        if line is None:
            await self.console.send_raw(cid, raw)
            return len(raw)
        head = data[:end].encode("utf-8", "surrogateescape")
        if head:
            await self.console.send_raw(cid, head)
        after = end + 2 if data.startswith("\r\n", end) else end + 1
        rest = ("\n" + data[after:]).encode("utf-8", "surrogateescape")
        if self._stdin_run() != run or self.container_id != cid:
            return len(head)  # the run ended meanwhile: the rest has nowhere to go
        if self._is_typed_stop(line):
            self.notice("the stop command was typed: stopping the server")
            await self.stop(typed=rest)
        else:
            # A power action took the server meanwhile: a plain line.
            await self.console.send_raw(cid, data[end:].encode("utf-8", "surrogateescape"))
        return len(raw)

    def _stdin_run(self) -> tuple[int, int]:
        """Which run's stdin input goes to: a new one after each start or death."""
        return self._runs, self._deaths

    async def interrupt(self) -> None:
        """
        Ctrl+C: SIGINT to the server's main process.  Not a power action (no
        slot, the desired state stays): the game decides what a Ctrl+C means,
        as it would in a terminal; if it exits, the exit reads as a stop the
        agent did not ask for.
        """
        if self.state not in ACTIVE_STATES or self.container_id is None:
            raise Conflict("server {} is not running".format(self.server_id))
        await self.services.engine.kill(self.container_id, "SIGINT")
        self.notice("Ctrl+C (SIGINT) sent to the server's process")

    @property
    def console_settings(self) -> ConsoleSettings:
        """The console settings in force."""
        return self.console.settings

    def apply_console_settings(self, settings: ConsoleSettings) -> None:
        """Put console settings in force (the caller stores them)."""
        self.console.apply(settings)

    async def attach(self, recover: bool) -> None:
        """
        Follow the container's console (and open stdin, start sampling stats).

        ``recover``: the buffer is empty after an agent restart, so the history
        up to the mark is read first (no events), then new lines from the mark.
        """
        cid = self.container_id
        assert cid is not None
        self.sampler.stop()
        deaths = self._deaths
        if not await self.console.attach(cid, recover):
            return
        if self._deaths != deaths:
            # It died while the console attached: the stdin just opened is
            # that dead run's (its death closed the one before).
            self.console.close_stdin()
            return
        self.sampler.start()

    def detach_output(self) -> None:
        """Stop following the console (the container keeps running)."""
        self.console.detach()
        self.sampler.stop()

    # -- container ---------------------------------------------------------

    async def ensure_container(self) -> str:
        """The server's container id, (re)created when missing or outdated."""
        services = self.services
        engine = services.engine
        digest = self.spec.digest()
        if self.container_id is not None:
            try:
                found = await engine.inspect(self.container_id)
            except NotFound:
                self.container_id = None
            else:
                if found.labels.get(SPEC_HASH_LABEL) == digest:
                    return self.container_id
                await engine.remove(self.container_id)
                self.container_id = None
        await services.data.prepare(self.server_id, self.owner, settle=True,
                                    disk_limit=self.root().disk_limit_bytes)
        await services.network.ensure()
        container = server_container(
            self.spec, self.data_path, services.config.servers, services.network.mode
        )
        try:
            cid = await engine.create(container)
        except Conflict:
            # A container of that name the store did not know (an earlier
            # agent died between create and commit): it is ours, replace it.
            await engine.remove(container.name)
            cid = await engine.create(container)
        self.container_id = cid
        self._persist(container_id=cid)
        return cid

    async def do_start(self) -> None:
        """Create/start the container and attach; returns once it runs."""
        # Every start comes through here (power start, a restart's second
        # half, the crash auto-restart): none while a restore holds the files.
        self.services.locks.refuse(self.server_id, "start")
        if self.state is S.SUSPENDED:
            raise Conflict("server {} is suspended".format(self.server_id))
        if self.state is S.INSTALL_FAILED:
            raise Conflict("server {} failed to install: reinstall it".format(self.server_id))
        if self.state is S.INSTALLING or self.installing:
            raise Conflict("server {} is installing".format(self.server_id))
        limit = self.spec.limits.disk_mb
        if limit > 0 and self.disk_bytes > limit * MB:
            self.notice(
                "start refused: disk usage {:.1f} MB is over the limit of {} MB".format(
                    self.disk_bytes / MB, limit
                )
            )
            raise InsufficientResources(
                "server {} uses more disk than its limit".format(self.server_id)
            )
        if self.state in (S.STARTING, S.RUNNING) and self.output_attached:
            return
        self.set_desired("running")
        if self.state is S.OFFLINE:
            # Stopped: the one time its directory may become a subvolume.
            await self.services.data.prepare(self.server_id, self.owner, settle=True,
                                             disk_limit=self.root().disk_limit_bytes)
        cid = await self.ensure_container()
        self.exits.reset()
        self._runs += 1
        self.lifecycle.fire(Input.START)
        self.run_since_ns = None
        try:
            await self.services.engine.start(cid)
        except EngineError as e:
            self.lifecycle.fire(Input.START_FAILED, error=e.message)
            raise
        await self._note_run_start(cid)
        self.started_at = self.services.clock.seconds()
        await self.attach(recover=False)
        if self.spec.startup_done is None and self.state is S.STARTING:
            self.lifecycle.fire(Input.STARTUP_DONE)

    async def _note_run_start(self, cid: str) -> None:
        """
        Remember when this run started, on the engine's clock.

        Events of this run are stamped at or after its start; comparing
        engine times with engine times needs no agreement between clocks.
        """
        try:
            found = await self.services.engine.inspect(cid)
        except EngineError:
            return
        if found.started_at_ns is not None:
            self.run_since_ns = found.started_at_ns - _RUN_SLACK_NS

    async def graceful_stop(
        self, signal: str | None, timeout: float | None, typed: bytes | None = None,
    ) -> None:
        """
        Ask the server to stop, kill it after ``timeout``; returns once it is
        down (``typed``: what ends the stop command already typed, see ``stop``).
        """
        if self.container_id is None or self.state not in ACTIVE_STATES:
            if self.state is not S.CRASHED and self.state is not S.SUSPENDED:
                self.lifecycle.fire(Input.FOUND_DOWN)
            return
        method = self.spec.stop
        timeout = timeout if timeout is not None else method.timeout
        if timeout is None:
            timeout = self.services.config.servers.stop_timeout
        self.exits.expect()
        self.lifecycle.fire(Input.STOP)
        exited = self.wait_exit()
        use_command = method.kind == "command" and signal in (None, "SIGTERM")
        try:
            if use_command:
                try:
                    if typed is None:
                        await self.send_command(method.value)
                    else:
                        await self.console.send_raw(self.container_id, typed)
                except (EngineError, Conflict):
                    use_command = False
            if not use_command:
                default = method.value if method.kind == "signal" else "SIGTERM"
                await self.services.engine.kill(self.container_id, signal or default)
        except NotFound:
            await self._exited_without_event()
            return
        except Conflict:
            # 409: the container is not running any more.
            await self._exited_without_event()
            return
        if await self.services.deadlines.within(exited, timeout):
            return
        self.notice("server did not stop within {:g} s: killing it".format(timeout))
        await self.hard_kill()

    async def hard_kill(self) -> None:
        """SIGKILL and wait (bounded) for the death to be seen."""
        if self.container_id is None:
            return
        self.exits.expect()
        exited = self.wait_exit()
        try:
            await self.services.engine.kill(self.container_id, "SIGKILL")
        except (NotFound, Conflict):
            await self._exited_without_event()
            return
        grace = self.services.config.timeouts.kill_grace
        if not await self.services.deadlines.within(exited, grace):
            await self._exited_without_event()

    async def _exited_without_event(self) -> None:
        """The container is down but no ``die`` event came: settle from inspect."""
        if self.state not in ACTIVE_STATES:
            return
        code: int | None = None
        if self.container_id is not None:
            try:
                found = await self.services.engine.inspect(self.container_id)
            except NotFound:
                found = None
            if found is not None:
                if found.running:
                    return
                code = found.exit_code
        await self.on_exit(code, oom=False)

    def wait_exit(self) -> Deferred[None]:
        """A Deferred firing when the container's death is seen."""
        d: Deferred[None] = Deferred()
        self._exit_waiters.append(d)
        return d

    def on_event(self, event: EngineEvent) -> Deferred[None] | None:
        """
        Handle an engine event about this server's container.

        An event older than the current run on the engine's clock (replayed
        after the event stream resumed) is about a previous run and ignored,
        so an old ``die`` never reads as a crash of the new run.
        """
        self.heard += 1
        action = event.action
        when = event.at_ns
        if when and self.run_since_ns is not None and when < self.run_since_ns:
            self.log.debug(
                "server {server_id}: stale {action} event ignored",
                server_id=self.server_id,
                action=action,
            )
            return None
        if action == "die":
            return self.services.tracker.run(
                self.on_exit(event.exit_code, oom=self.exits.oom),
                "death of server {}".format(self.server_id),
            )
        self.exits.saw(action)
        return None

    async def on_exit(
        self, exit_code: int | None, oom: bool, late: float = 0.0, removed: bool = False,
    ) -> None:
        """
        The container died: settle the state, detect crashes, maybe restart
        (``late``: up to how long after the death this is judged; ``removed``:
        the container is gone too, removed by someone else).
        """
        if self.state not in ACTIVE_STATES and self.state is not S.UNKNOWN:
            return
        self._deaths += 1
        run = self._runs
        self.sampler.stop()
        self.started_at = None
        # Every line it printed, delivered before its death is reported (an
        # attach of a restarted agent may be under way: see ``catch_up``).
        if self.container_id is not None:
            await self.console.catch_up(
                self.container_id, self.services.config.timeouts.exit_drain)
        waiters, self._exit_waiters = self._exit_waiters, []
        if self._runs != run or (self.state not in ACTIVE_STATES and self.state is not S.UNKNOWN):
            # Settled meanwhile by another report of this death (the event and
            # a kill's own look, or a reconcile), or a new run began: nothing
            # more to judge.
            self._release(waiters)
            return
        self.console.close_stdin()
        verdict = self.exits.classify(oom)
        self.console.throttle.flush()
        if verdict is Exit.EXPECTED:
            self.lifecycle.fire(Input.EXITED, exit_code=exit_code)
        elif verdict is Exit.EXTERNAL:
            self.notice("stopped outside the agent ({})".format(
                "its container was removed" if removed else "exit code {}".format(exit_code)))
            self.lifecycle.fire(Input.EXITED, exit_code=exit_code)
        else:
            await self._crashed(exit_code, oom, run, late)
        self._release(waiters)

    @staticmethod
    def _release(waiters: list[Deferred[None]]) -> None:
        for d in waiters:
            if not d.called:
                d.callback(None)

    async def _crashed(self, exit_code: int | None, oom: bool, run: int, late: float) -> None:
        services = self.services
        if self.container_id is not None and not oom:
            try:
                found = await services.engine.inspect(self.container_id)
                oom = found.oom_killed
                if exit_code is None:
                    exit_code = found.exit_code
            except EngineUnavailable:
                raise
            except (EngineError, NotFound):
                # Gone already (removed right after its death): judged by
                # what the death's report said.
                pass
        if self._runs != run or (self.state not in ACTIVE_STATES and self.state is not S.UNKNOWN):
            # Settled during the inspect by another report of this death (a
            # kill's own look, a reconcile), or a new run began: neither a
            # clean exit nor a crash is left to judge.
            return
        if exit_code == 0 and not oom and not services.config.servers.clean_exit_is_crash:
            self.notice("server exited by itself with code 0: offline"
                        " (servers.clean_exit_is_crash is off)")
            self.lifecycle.fire(Input.EXITED, exit_code=exit_code)
            self.set_desired("offline")
            return
        now = services.clock.seconds()
        window = services.config.servers.crash_restart_window
        # A death judged late (the drift check) may have come sooner after the
        # last crash than the judgements did: the guard allows for that.
        recent = self.last_crash is not None and now - self.last_crash < window + late
        locked = services.locks.locked(self.server_id)
        restart = (self.spec.crash_restart and not recent and self.desired == "running"
                   and locked is None)
        self.crash_report = CrashReport(
            at=now,
            exit_code=exit_code,
            oom_killed=oom,
            lines=tuple(self.console_history(CRASH_TAIL)),
            restarted=restart,
        )
        self.last_crash = now
        self._persist(last_crash=now)
        reason = "crashed with exit code {}{}".format(exit_code, " (out of memory)" if oom else "")
        self.notice("server " + reason)
        self.lifecycle.fire(Input.CRASHED, error=reason, exit_code=exit_code, oom=oom)
        if restart:
            self.notice("restarting after the crash")
            if not self.slot.try_claim("crash-restart"):
                return
            self._in_background("crash-restart", self.do_start)
            return
        if self.spec.crash_restart and locked is not None:
            self.notice("not restarting: the server's files are being {}".format(locked))
        elif self.spec.crash_restart and recent:
            self.notice(
                "not restarting: it crashed twice within {:g} s (crash-loop guard)".format(window)
            )
        self.set_desired("offline")

    def mark_unknown(self) -> None:
        """The engine went away: nobody knows what the container does."""
        self.detach_output()
        if self.state in (S.INSTALL_FAILED, S.SUSPENDED, S.INSTALLING):
            return
        self.lifecycle.fire(Input.ENGINE_LOST)

    async def reconcile(self, container: ContainerState | None) -> None:
        """Bring this server in line with what the engine has (an ``engine.list`` item)."""
        if self.installing or self.console.closed:
            return
        if self.power in _MAKING_A_RUN:
            # The list may predate the container this action is creating or
            # starting: reading it as gone (or down) would forget the container
            # or stop following the run it starts.  The action settles the state.
            return
        if self.state is S.INSTALLING:
            self.start_install()
            return
        if (container is None or not container.running) and self.state in ACTIVE_STATES:
            # Gone or down by a list that may predate a start just done: look again.
            container = await self._look_again(container)
        if container is None:
            self.container_id = None
            self.detach_output()
            if self.desired == "running" and self.state is not S.SUSPENDED:
                await self._reconcile_start()
            elif self.state in ACTIVE_STATES or self.state is S.UNKNOWN:
                if self.last_known is S.CRASHED:
                    self.lifecycle.fire(Input.FOUND_GONE_AFTER_CRASH)
                else:
                    self.lifecycle.fire(Input.FOUND_GONE)
            return
        self.container_id = container.id
        if container.running:
            if self.output_attached:
                return
            try:
                found = await self.services.engine.inspect(self.container_id)
            except NotFound:
                return
            if found.running:
                await self._reattach(found)
                return
            # It died since the list: as a container found down, below.
        self.detach_output()
        if self.state in ACTIVE_STATES or self.state is S.UNKNOWN:
            # It died while no agent (or no engine) watched: the lines it
            # printed since the mark come before anything else is reported.
            await self.console.catch_up(container.id, self.services.config.timeouts.exit_drain)
        if self.desired == "running" and self.state is not S.SUSPENDED:
            await self._reconcile_start()
        elif self.state in ACTIVE_STATES or self.state is S.UNKNOWN:
            self.lifecycle.fire(Input.FOUND_DOWN)

    def drift_key(self) -> tuple[Any, ...] | None:
        """
        What the drift check (``ctrlagent.servers.drift``) compares between
        two looks at the engine: ``None`` unless the server's container should
        be running with nothing under way (no install, no power action); else
        its container, state, runs, deaths and the events heard, so that any
        news of the server between the looks makes them differ.
        """
        if self.installing or self.retired or self.console.closed or self.power is not None:
            return None
        if self.state not in ACTIVE_STATES or self.container_id is None:
            return None
        return (self.container_id, self.state, self._runs, self._deaths, self.heard)

    async def settle_unheard_end(
        self, key: tuple[Any, ...], late: float = 0.0, first: ContainerState | None = None,
    ) -> bool:
        """
        The drift check found the container down (or gone) twice, ``key``
        unchanged in between: its end was never told by an event (one the
        engine lost).  Settle it as that event would have: a death is judged
        as ``on_exit`` judges one (crash report, crash policy; ``late``: how
        much later than the death it may be judged, which the crash-loop
        guard allows for).  ``first`` is the container as the first look
        listed it: ended then and gone now (a prune since), its death is
        judged all the same.  Gone at both looks, it was removed by someone
        else while it ran (an engine that lost its state is lost to the agent
        too, and reconciled when it is back, so no look comes meanwhile): on
        Docker its lost events were a kill, a die and a destroy, which read
        as a stop outside the agent, so the server is settled offline as they
        would have left it (its desired state kept, as for any stop outside
        the agent), and its next start makes a new container.  Nothing is
        done (and False returned) when the server moved meanwhile or the
        container has not ended after all (it runs, or is stopping, paused or
        restarting).
        """
        cid = key[0]
        try:
            found: ContainerState | None = await self.services.engine.inspect(cid)
        except NotFound:
            found = None
        if self.drift_key() != key:
            return False
        if found is not None and (found.running or found.status not in _ENDED):
            return False
        self.log.warn(  # noqa: G010 (twisted.logger has warn)
            "server {server_id}: its container {cid} is {status} but the engine sent no event"
            " of its end (one was lost): settled now",
            server_id=self.server_id,
            cid=cid[:12],
            status=found.status if found is not None else "gone",
        )
        ended = found if found is not None else first
        if ended is not None:
            await self.on_exit(ended.exit_code, oom=ended.oom_killed or self.exits.oom, late=late)
        else:
            self.exits.saw("kill")
            await self.on_exit(None, oom=self.exits.oom, late=late, removed=True)
            if self.container_id == cid and self.state not in ACTIVE_STATES:
                self.container_id = None
        return True

    async def _look_again(self, listed: ContainerState | None) -> ContainerState | None:
        """The server's container as the engine has it now (``listed`` when unsure)."""
        cid = self.container_id if listed is None else listed.id
        if cid is None:
            return listed
        try:
            found = await self.services.engine.inspect(cid)
        except NotFound:
            return None
        return found if found.running else listed

    async def _reattach(self, found: ContainerState) -> None:
        """Follow a container found running (after an agent restart or an engine loss)."""
        started_ns = found.started_at_ns
        self.started_at = started_ns / 1e9 if started_ns is not None else None
        if started_ns is not None:
            self.run_since_ns = started_ns - _RUN_SLACK_NS
        interrupted_stop = self.state is S.STOPPING or (
            self.last_known is S.STOPPING and self.state is S.UNKNOWN
        )
        deaths = self._deaths
        await self.attach(recover=True)
        if self._deaths != deaths:
            # It died while the console re-attached: its death (``on_exit``)
            # drains the console and settles the state.
            return
        if self.state is not S.RUNNING:
            self.lifecycle.fire(Input.FOUND_RUNNING)
        if interrupted_stop and self.desired == "offline":
            # The agent died (or lost the engine) mid-stop: finish the stop.
            if not self.slot.try_claim("stop"):
                return
            self._in_background("stop", lambda: self.graceful_stop(None, None))

    async def _reconcile_start(self) -> None:
        if not self.slot.try_claim("start"):
            return
        try:
            self.notice("starting: the server should be running")
            await self.do_start()
        finally:
            self.slot.release()

    # -- install -----------------------------------------------------------

    def start_install(self) -> Deferred[Any] | None:
        """Run the install flow in the background under the power slot (None: busy)."""
        if not self.slot.try_claim("install"):
            return None
        return self._in_background("install", self.install)

    async def install(self) -> None:
        """
        Pull the image, run the install script once, create the container.

        Every way out leaves a settled state: ``offline`` when done,
        ``install_failed`` with the reason otherwise (a refused limit, a
        data directory that cannot be prepared, an internal error).  Only a
        lost engine or the agent's own shutdown leave ``installing``, which
        the next reconcile resumes.
        """
        engine = self.services.engine
        fire = self.lifecycle.fire
        self.installing = True
        try:
            fire(Input.INSTALL)
            try:
                await self.services.data.prepare(self.server_id, self.owner, settle=True,
                                                 disk_limit=self.root().disk_limit_bytes)
                await engine.ensure_image(self.spec.image)
                script = self.spec.install
                if script is not None and not self.spec.skip_scripts:
                    if script.image:
                        await engine.ensure_image(script.image)
                    code, reason = await self.installer.script(self.spec, self.owner)
                    if code != 0:
                        fire(Input.INSTALL_FAILED, error=reason, exit_code=code)
                        return
                await self.ensure_container()
            except (EngineUnavailable, CancelledError):
                raise
            except CtrlAgentError as e:
                fire(Input.INSTALL_FAILED, error=e.message)
                return
            except OSError as e:
                fire(
                    Input.INSTALL_FAILED,
                    error="data directory of server {}: {}".format(
                        self.server_id, e.strerror or e.__class__.__name__
                    ),
                )
                return
            except Exception:
                # A bug: logged with its traceback by the tracker, but the
                # server must not stay "installing" for ever.
                fire(Input.INSTALL_FAILED, error="internal error during the install")
                raise
            fire(Input.INSTALLED)
        finally:
            self.installing = False

