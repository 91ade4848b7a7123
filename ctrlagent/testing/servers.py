"""
An in-memory ``IServerManager``, for action-registry, API and link tests.

``FakeServerManager`` keeps real state (server lifecycle, aliases, console
buffers) and real rules (conflicts, unknown ids), so a test that passes
against it says something about its caller, not about canned answers.

Slow work is simulated with *gates*: ``manager.hold("stop")`` returns a
Deferred that the next ``stop`` waits on before finishing, so a test can
observe an action that outlives the Panel's timeout.  Failures are injected
with ``manager.fail_next("start", SomeError(...))``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.errors import (
    Conflict,
    InvalidInput,
    ServerNotFound,
)
from ctrlagent.events import (
    ConsoleOutput,
    ResourceUpdate,
    ServerEvent,
    ServerRemoved,
    StatusChanged,
)
from ctrlagent.interfaces import IServerManager, ServerRoot
from ctrlagent.wire.servers import (
    Ack,
    ConsoleStatus,
    Created,
    Deleted,
    Metrics,
    ServerBrief,
    ServerStatus,
    Updated,
    coerce_metrics,
)

PANEL_STATUS = {
    "installing": "INSTALLING",
    "install_failed": "INSTALL_FAILED",
    "suspended": "SUSPENDED",
    "offline": "OFFLINE",
    "starting": "STARTING",
    "running": "RUNNING",
    "stopping": "STOPPING",
    "crashed": "CRASHED",
}

# The states in which a server takes console input (the real manager's
# ACTIVE_STATES: its container runs).
_TAKES_INPUT = ("starting", "running", "stopping")


def _stop_command(params: dict[str, Any]) -> str | None:
    """
    The create payload's stop command, None when its stop is a signal (the
    spec's rule: ``"^C"`` and ``SIG...`` names are signals unless typed).
    """
    raw = params.get("stop")
    kind, value = (raw.get("type"), raw.get("value")) if isinstance(raw, dict) else (None, raw)
    if not isinstance(value, str) or not value or value == "^C":
        return None
    if kind is None:
        kind = "signal" if re.fullmatch(r"SIG[A-Z0-9]{1,16}", value) else "command"
    return value if kind == "command" else None


@dataclass
class FakeServer:
    """One game server as the fake manager keeps it."""

    server_id: str
    params: dict[str, Any]
    container_id: str
    aliases: set[str] = field(default_factory=set)
    status: str = "offline"
    suspended: bool = False
    console: list[str] = field(default_factory=list)
    last_activity: float | None = None
    stdin: list[str] = field(default_factory=list)
    busy: str | None = None  # the power action in progress, if any
    raw_stdin: bytes = b""  # raw console input not yet ended by a newline
    # Raw console input since its last CR or LF (a stop typed key by key);
    # None: over 256 characters, which no stop command is.
    typed: str | None = ""
    console_settings: dict[str, Any] = field(default_factory=dict)


@implementer(IServerManager)
class FakeServerManager:
    """An ``IServerManager`` keeping servers in memory with real lifecycle rules."""

    def __init__(
        self,
        clock: IReactorTime | None = None,
        data_dir: str = "/srv/ctrlagent/servers",
        console_buffer_lines: int = 1000,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.data_dir = data_dir
        self.buffer_lines = console_buffer_lines
        self.servers: dict[str, FakeServer] = {}
        self.purged: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.metrics: dict[str, dict[str, Any]] = {}
        self._listeners: list[Callable[[ServerEvent], None]] = []
        self._quiet: list[object] = []  # the listeners without console events
        self._gates: dict[str, Deferred[None]] = {}
        self._failures: dict[str, Exception] = {}
        self._next_container = 1
        # server id -> why its files are locked (the real FileLocks' state).
        self.file_locks: dict[str, str] = {}

    # -- test controls -------------------------------------------------------

    def hold(self, operation: str) -> Deferred[None]:
        """Make the next ``operation`` (``create``, ``stop``, ...) wait for the returned gate."""
        gate: Deferred[None] = Deferred()
        self._gates[operation] = gate
        return gate

    def fail_next(self, operation: str, error: Exception) -> None:
        """Make the next ``operation`` raise ``error``."""
        self._failures[operation] = error

    def set_metrics(self, server_id: str, metrics: dict[str, Any]) -> None:
        """The sample a running server reports (Panel units)."""
        self.metrics[self.resolve(server_id)] = metrics

    def emit_console(self, server_id: str, line: str, stream: str = "stdout") -> None:
        """Pretend the server printed ``line``."""
        self._print(self._get(server_id), line, stream)

    # -- internals -----------------------------------------------------------

    def _enter(self, operation: str, server_id: str) -> None:
        self.calls.append((operation, server_id))
        error = self._failures.pop(operation, None)
        if error is not None:
            raise error

    async def _gate(self, operation: str) -> None:
        gate = self._gates.pop(operation, None)
        if gate is not None:
            await gate

    def _get(self, server_id: str) -> FakeServer:
        return self.servers[self.resolve(server_id)]

    def _emit(self, event: ServerEvent) -> None:
        console = isinstance(event, ConsoleOutput)
        for listener in list(self._listeners):
            if not (console and listener in self._quiet):
                listener(event)

    def _set_status(self, server: FakeServer, status: str, error: str | None = None) -> None:
        previous, server.status = server.status, status
        if previous != status:
            self._emit(
                StatusChanged(
                    server_id=server.server_id,
                    previous=previous,
                    current=status,
                    timestamp=self.clock.seconds(),
                    error=error,
                    container_id=server.container_id,
                )
            )

    def _print(self, server: FakeServer, line: str, stream: str = "stdout") -> None:
        server.console.append(line)
        del server.console[: -self._console_settings(server)["historySize"]]
        server.last_activity = self.clock.seconds()
        self._emit(ConsoleOutput(server.server_id, stream, [line], self.clock.seconds()))

    def _claim(self, server: FakeServer, operation: str) -> None:
        """One power action at a time per server, as the real manager enforces."""
        if server.busy is not None:
            raise Conflict(
                "server {} is busy with {}".format(server.server_id, server.busy),
            )
        server.busy = operation

    def _state_of(self, server: FakeServer) -> str:
        return "suspended" if server.suspended and server.status == "offline" else server.status

    def _state(self, server: FakeServer) -> ServerStatus:
        status = self._state_of(server)
        return ServerStatus(
            server_id=server.server_id,
            name=str(server.params.get("name") or server.server_id),
            state=status,
            panel_status=PANEL_STATUS.get(status, "OFFLINE"),
            container_id=server.container_id,
            desired_state="running" if status in ("starting", "running") else "offline",
            image=str(server.params.get("image") or ""),
            aliases=tuple(sorted(server.aliases)),
        )

    def _brief(self, server: FakeServer) -> ServerBrief:
        status = self._state_of(server)
        return ServerBrief(
            server_id=server.server_id,
            state=status,
            panel_status=PANEL_STATUS.get(status, "OFFLINE"),
            container_id=server.container_id,
        )

    # -- IServerManager --------------------------------------------------------

    def resolve(self, server_id: str) -> str:
        """The canonical id for an id, alias, container name or container id."""
        if server_id in self.servers:
            return server_id
        for server in self.servers.values():
            if (
                server_id in server.aliases
                or server_id == server.container_id
                or server_id == "ctrl-alt-play-" + server.server_id
            ):
                return server.server_id
        raise ServerNotFound("server {} not found".format(server_id))

    @async_to_deferred
    async def create_server(self, server_id: str, params: dict) -> Created:
        """Define a server; waits on the ``create`` gate as a slow pull would."""
        self._enter("create", server_id)
        image = params.get("image")
        if not isinstance(image, str) or not image:
            raise InvalidInput("image is required", field="image")
        aliases = {str(a) for a in params.get("aliases") or [] if a}
        if params.get("panelId"):
            aliases.add(str(params["panelId"]))
        aliases.discard(server_id)
        for name in {server_id, *aliases}:
            try:
                existing = self.resolve(name)
            except ServerNotFound:
                continue
            raise Conflict("server {} already exists (as {})".format(name, existing))
        server = FakeServer(
            server_id=server_id,
            params=dict(params),
            container_id="{:064x}".format(self._next_container),
            aliases=aliases,
            status="installing",
        )
        self._next_container += 1
        self.servers[server_id] = server
        await self._gate("create")
        if server_id in self.servers:
            self._set_status(server, "offline")
        return Created(server_id=server_id, container_id=server.container_id, state=server.status)

    def lock_files(self, server_id: str, reason: str) -> Callable[[], None]:
        """Lock the server's files (``Conflict`` when they are); the release is returned."""
        server_id = self.resolve(server_id)
        if server_id in self.file_locks:
            raise Conflict("the server's files are being {}".format(self.file_locks[server_id]))
        self.file_locks[server_id] = reason

        def release() -> None:
            self.file_locks.pop(server_id, None)

        return release

    def files_locked(self, server_id: str) -> str | None:
        """Why the server's files are locked, or None."""
        return self.file_locks.get(server_id)

    @async_to_deferred
    async def start(self, server_id: str) -> ServerBrief:
        """Start: refused while suspended, installing, busy or locked; idempotent when running."""
        server = self._get(server_id)
        self._enter("start", server.server_id)
        if server.server_id in self.file_locks:
            raise Conflict("start: the server's files are being {}".format(
                self.file_locks[server.server_id]))
        if server.suspended:
            raise Conflict("server {} is suspended".format(server.server_id))
        if server.status == "installing":
            raise Conflict("server {} is still installing".format(server.server_id))
        if server.status in ("running", "starting"):
            return self._brief(server)
        self._claim(server, "start")
        server.typed, server.raw_stdin = "", b""  # a new run's stdin
        try:
            self._set_status(server, "starting")
            await self._gate("start")
            self._set_status(server, "running")
            self._print(server, "[fake] server started")
        finally:
            server.busy = None
        return self._brief(server)

    @async_to_deferred
    async def stop(
        self, server_id: str, signal: str | None = None, timeout: float | None = None
    ) -> ServerBrief:
        """Graceful stop (waits on the ``stop`` gate), or a kill for SIGKILL."""
        server = self._get(server_id)
        self._enter("stop", server.server_id)
        if signal == "SIGKILL":
            return await self.kill(server.server_id)
        if server.status in ("offline", "crashed", "install_failed"):
            return self._brief(server)
        self._claim(server, "stop")
        try:
            self._set_status(server, "stopping")
            await self._gate("stop")
            self._set_status(server, "offline")
        finally:
            server.busy = None
        return self._brief(server)

    @async_to_deferred
    async def restart(self, server_id: str) -> ServerBrief:
        """Stop then start."""
        await self.stop(server_id)
        return await self.start(server_id)

    def kill(self, server_id: str) -> Deferred[ServerBrief]:
        """Kill the process; the container and files stay."""
        try:
            server = self._get(server_id)
            self._enter("kill", server.server_id)
        except Exception as e:
            return fail(e)
        if server.status not in ("offline", "installing"):
            self._set_status(server, "offline")
        return succeed(self._brief(server))

    @async_to_deferred
    async def delete(self, server_id: str, purge_files: bool = False) -> Deleted:
        """Forget the server (its files too when ``purge_files``)."""
        server = self._get(server_id)
        self._enter("delete", server.server_id)
        if server.busy is not None:
            raise Conflict("server {} is busy with {}".format(server.server_id, server.busy))
        await self._gate("delete")
        self._set_status(server, "offline")
        del self.servers[server.server_id]
        if purge_files:
            self.purged.append(server.server_id)
        self._emit(ServerRemoved(server.server_id))
        return Deleted(server_id=server.server_id, purged=purge_files)

    @async_to_deferred
    async def suspend(self, server_id: str) -> ServerBrief:
        """Stop and refuse starts."""
        server = self._get(server_id)
        if server.status not in ("offline", "crashed"):
            await self.stop(server.server_id)
        server.suspended = True
        return self._brief(server)

    def unsuspend(self, server_id: str) -> Deferred[ServerBrief]:
        """Allow starts again."""
        try:
            server = self._get(server_id)
        except Exception as e:
            return fail(e)
        server.suspended = False
        return succeed(self._brief(server))

    @async_to_deferred
    async def reinstall(self, server_id: str) -> ServerBrief:
        """Install again; only while offline."""
        server = self._get(server_id)
        if server.status not in ("offline", "crashed", "install_failed"):
            raise Conflict("server {} must be offline to reinstall".format(server.server_id))
        self._set_status(server, "installing")
        await self._gate("reinstall")
        self._set_status(server, "offline")
        return self._brief(server)

    def update(self, server_id: str, params: dict) -> Deferred[Updated]:
        """Merge changed settings into the definition."""
        try:
            server = self._get(server_id)
        except Exception as e:
            return fail(e)
        aliases = params.get("aliases")
        if isinstance(aliases, list):
            for alias in aliases:
                try:
                    owner = self.resolve(str(alias))
                except ServerNotFound:
                    continue
                if owner != server.server_id:
                    return fail(Conflict("alias {} already names another server".format(alias)))
            server.aliases.update(str(a) for a in aliases if str(a) != server.server_id)
        server.params.update({k: v for k, v in params.items() if k != "aliases"})
        return succeed(Updated(brief=self._brief(server), limits_applied_live=False))

    def status(self, server_id: str) -> ServerStatus:
        """The status (sync)."""
        server = self._get(server_id)
        state = self._state(server)
        if server.status == "running":
            state = replace(state, resources=self.server_metrics(server.server_id))
        return state

    def list_servers(self) -> list[ServerStatus]:
        """Every managed server's status."""
        return [self._state(s) for s in self.servers.values()]

    def server_metrics(self, server_id: str) -> Metrics:
        """The latest sample (``set_metrics``, coerced) while running, zeroes otherwise."""
        server = self._get(server_id)
        now = self.clock.seconds()
        if server.status != "running":
            return Metrics(at=now)
        sample = coerce_metrics(self.metrics.get(server.server_id, {}), now)
        self._emit(ResourceUpdate(server.server_id, sample))
        return sample

    def read_answer(self, action: str, server_id: str) -> bytes | None:
        """Never at hand: the registry answers every read (``IServerManager.read_answer``)."""
        return None

    def send_command(self, server_id: str, command: str) -> Deferred[Ack]:
        """
        Write a line to stdin; the fake server echoes it.  Taken while the
        server starts, runs or stops, as the real manager takes it.  Its stop
        command (the create payload's ``stop``), typed while it starts or
        runs and no power action is under way, is the ``stop`` action (on
        the ``stop`` gate).
        """
        try:
            server = self._get(server_id)
            self._enter("send_command", server.server_id)
            if server.status not in _TAKES_INPUT:
                raise Conflict("server {} is not running".format(server.server_id))
        except Exception as e:
            return fail(e)
        if self._typed_stop(server, [command]):
            # The stop action runs in the background (its gate held or not),
            # as the real manager answers once it has begun.
            self._stop_typed(server)
        server.stdin.append(command)
        server.typed = ""
        self._print(server, "> " + command)
        return succeed(Ack(server_id=server.server_id))

    @staticmethod
    def _typed_stop(server: FakeServer, lines: list[str]) -> bool:
        """Whether one of ``lines``, typed now, is the server's stop action."""
        stop = _stop_command(server.params)
        return (stop is not None and any(line.strip() == stop.strip() for line in lines)
                and server.busy is None and server.status in ("running", "starting"))

    def _stop_typed(self, server: FakeServer) -> None:
        """The stop action, begun in the background for a typed stop command."""
        self._print(server, "[ctrlagent] the stop command was typed: stopping the server",
                    "agent")
        self.stop(server.server_id).addErrback(lambda f: self._print(
            server, "[ctrlagent] stop failed: {}".format(f.getErrorMessage()), "agent"))

    @async_to_deferred
    async def console_command(
        self, server_id: str, command: str, wait: float | None = None
    ) -> str:
        """Send ``command`` and answer with what the server printed in reply."""
        server = self._get(server_id)
        before = len(server.console)
        await self.send_command(server.server_id, command)
        return "\n".join(server.console[before:])

    def console_history(self, server_id: str, lines: int = 100) -> list[str]:
        """The last ``lines`` console lines."""
        server = self._get(server_id)
        return list(server.console[-lines:]) if lines > 0 else []

    def console_status(self, server_id: str) -> ConsoleStatus:
        """Whether the console is attached (i.e. running) and its buffer size."""
        server = self._get(server_id)
        return ConsoleStatus(
            connected=server.status in ("starting", "running", "stopping"),
            last_activity=server.last_activity,
            buffer_size=len(server.console),
        )

    def console_clear(self, server_id: str) -> None:
        """Empty the buffer."""
        self._get(server_id).console.clear()

    def console_input(self, server_id: str, data: str) -> Deferred[dict[str, Any]]:
        """Raw stdin: each line the input completes is echoed, as a shell's read sees it."""
        try:
            server = self._get(server_id)
            self._enter("console_input", server.server_id)
            if server.status not in _TAKES_INPUT:
                raise Conflict("server {} is not running".format(server.server_id))
        except Exception as e:
            return fail(e)
        raw = data.encode("utf-8", "surrogateescape")
        before = "x" * 257 if server.typed is None else server.typed
        *ended, tail = re.split("[\r\n]", before + data)
        server.typed = tail if len(tail) <= 256 else None
        if self._typed_stop(server, [line for line in ended if len(line) <= 256]):
            # Input that completes the stop command is the stop action, as
            # the real manager reads it (a CR ends the line too).
            self._stop_typed(server)
        server.raw_stdin += raw
        while b"\n" in server.raw_stdin:
            line, server.raw_stdin = server.raw_stdin.split(b"\n", 1)
            text = line.decode("utf-8", "surrogateescape")
            server.stdin.append(text)
            self._print(server, "> " + text)
        return succeed({"serverId": server.server_id, "bytes": len(raw)})

    def console_interrupt(self, server_id: str) -> Deferred[dict[str, Any]]:
        """Ctrl+C: the fake game stops on SIGINT, as the scripted one does."""
        try:
            server = self._get(server_id)
            self._enter("console_interrupt", server.server_id)
            if server.status not in ("starting", "running", "stopping"):
                raise Conflict("server {} is not running".format(server.server_id))
        except Exception as e:
            return fail(e)
        self._print(server, "Stopping server (SIGINT)")
        self._set_status(server, "offline")
        return succeed({"serverId": server.server_id, "signal": "SIGINT"})

    def _console_settings(self, server: FakeServer) -> dict[str, Any]:
        defaults = {"historySize": self.buffer_lines, "throttleLines": 2000,
                    "throttleInterval": 1.0, "timestamps": False}
        return {**defaults, **server.console_settings}

    def console_settings(self, server_id: str) -> dict[str, Any]:
        """The settings in force (the registry checked every key of an update)."""
        server = self._get(server_id)
        return {"serverId": server.server_id, "settings": self._console_settings(server)}

    def update_console_settings(
        self, server_id: str, settings: object
    ) -> Deferred[dict[str, Any]]:
        """Merge checked settings; the history is cut to the new size at once."""
        try:
            server = self._get(server_id)
            self._enter("update_console_settings", server.server_id)
            if not isinstance(settings, dict):
                raise InvalidInput("settings must be an object", field="settings")
        except Exception as e:
            return fail(e)
        server.console_settings.update(settings)
        size = self._console_settings(server)["historySize"]
        del server.console[:-size]
        return succeed(self.console_settings(server.server_id))

    def server_root(self, server_id: str) -> ServerRoot:
        """``<data_dir>/<canonical id>``, disk limit from ``limits.disk`` (MB)."""
        server = self._get(server_id)
        limits = server.params.get("limits") or {}
        disk_mb = limits.get("disk") if isinstance(limits, dict) else None
        return ServerRoot(
            server_id=server.server_id,
            path=posixpath.join(self.data_dir, server.server_id),
            disk_limit_bytes=int(disk_mb) * 1024 * 1024 if disk_mb else None,
            uid=1000,
            gid=1000,
        )

    def add_listener(self, listener: object, console: bool = True) -> None:
        """Subscribe ``listener(event)`` to events (but the console's unless ``console``)."""
        assert callable(listener)
        if listener in self._listeners:
            return  # once, as the real bus
        self._listeners.append(listener)
        if not console:
            self._quiet.append(listener)

    def remove_listener(self, listener: object) -> None:
        """Unsubscribe."""
        if listener in self._listeners:
            self._listeners.remove(listener)
        if listener in self._quiet:
            self._quiet.remove(listener)
