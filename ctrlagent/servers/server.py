"""
One game server: its state, its container, its console and its power actions.

A ``Server`` is owned by the ``ServerManager``, which gives it the Docker
client, the clock, the store and the event fan-out (``ServerContext``).

Power actions take the server's *power slot*: a second action while one runs
answers ``CONFLICT`` at once; ``kill`` never needs the slot, so it can cut a
slow stop short.  Long parts (the graceful stop, the install) finish in the
background, holding the slot until they are done.

Console output comes from Docker's *logs* (``follow=1&timestamps=1``), not
from a plain attach: each line carries the engine's nanosecond timestamp,
which is the line's identity across agent restarts.  The manager hands lines
on at once and records the *mark* of what was delivered (for the Panel link:
what the kernel took; see ``ctrlagent.servers.delivery``); a re-attach after
an agent restart replays ``logs(since=mark - 1 s)`` dropping the lines the
mark covers (``MarkFilter``): lines printed while the agent was down, or not
yet delivered when it died, are delivered, none twice, none lost.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ctrlagent.errors import (
    Conflict,
    CtrlAgentError,
    DockerError,
    DockerUnavailable,
    InsufficientResources,
    NotFound,
)
from ctrlagent.events import ConsoleOutput, ResourceUpdate, StatusChanged
from ctrlagent.interfaces import ServerRoot
from ctrlagent.servers import spec as specs
from ctrlagent.servers.console import ConsoleBuffer, ConsoleLine, ConsoleThrottle, split_timestamp
from ctrlagent.servers.spec import ServerSpec
from ctrlagent.servers.states import ACTIVE_STATES, ServerState, panel_status

if TYPE_CHECKING:
    from ctrlagent.servers.manager import ServerContext

S = ServerState
MB = 1024 * 1024
# How long a death may take to show up after SIGKILL before we look ourselves.
KILL_GRACE = 10.0
# Lines of console kept with a crash report.
CRASH_TAIL = 50


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC for an epoch time (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def parse_docker_time(value: str | None) -> float | None:
    """Epoch seconds of Docker's RFC 3339 ``StartedAt`` (None for the zero time)."""
    if not value or value.startswith("0001-"):
        return None
    ns, _ = split_timestamp(value + " ")
    return ns / 1e9 if ns else None


@dataclass
class CrashReport:
    """What the agent knows about a server's last crash."""

    timestamp: float
    exit_code: int | None
    oom_killed: bool
    lines: list[str]
    restarted: bool

    def as_dict(self) -> dict[str, Any]:
        """The report in the Panel's camelCase."""
        return {
            "timestamp": iso(self.timestamp),
            "exitCode": self.exit_code,
            "oomKilled": self.oom_killed,
            "lines": list(self.lines),
            "restarted": self.restarted,
        }


_STREAM = attrgetter("stream")


def _marks_at(
    lines: list[ConsoleLine], ends: list[int], before: tuple[int, int]
) -> Iterator[tuple[int, int]]:
    """
    The mark after ``lines[:end]`` for each of ``ends`` (ascending), starting
    from ``before``: the same arithmetic as ``Server.take_lines``.
    """
    mark, count = before
    i = 0
    for end in ends:
        for line in lines[i:end]:
            ns = line.mark
            if ns > mark:
                mark, count = ns, 1
            elif ns and ns == mark:
                count += 1
        i = end
        yield mark, count


class MarkFilter:
    """
    Drops the console lines already delivered before a re-attach.

    ``mark`` is the largest engine timestamp delivered and ``count`` how many
    lines carried exactly that timestamp (two lines may share a nanosecond).

    It relies on stamps rising in the log's order, which holds within one
    stream (one engine goroutine stamps and writes them); a stdout and a
    stderr line stamped microseconds apart may be written the other way
    round, and a crash falling exactly between those two could drop the
    older-stamped one.  Per-stream marks would close that gap.
    """

    def __init__(self, mark: int, count: int) -> None:
        self.mark = mark
        self.count = count
        self._same = 0

    def seen(self, ns: int) -> bool:
        """True when the line stamped ``ns`` was delivered before."""
        if ns == 0 or ns > self.mark:
            return False
        if ns < self.mark:
            return True
        if self._same < self.count:
            self._same += 1
            return True
        return False


class Server:
    """One game server managed by the agent."""

    log = Logger()

    def __init__(
        self,
        ctx: ServerContext,
        spec: ServerSpec,
        *,
        state: ServerState = S.OFFLINE,
        desired: str = "offline",
        container_id: str | None = None,
        console_mark: int = 0,
        console_mark_count: int = 0,
        last_crash: float | None = None,
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.state = state
        self.last_known: ServerState | None = None
        self.desired = desired
        self.container_id = container_id
        self.mark = console_mark
        self.mark_count = console_mark_count
        self.last_crash = last_crash
        self.crash_report: CrashReport | None = None
        self.error: str | None = None
        config = ctx.config.servers
        self.console = ConsoleBuffer(config.console_buffer_lines)
        self.lines_total = 0
        self.throttle = ConsoleThrottle(
            ctx.clock,
            config.console_throttle_lines,
            config.console_throttle_interval,
            self._report_dropped,
        )
        self.power: str | None = None
        # Bumped by every kill: background power work that began before a
        # kill (a restart waiting out its stop) must not start the server again.
        self.kill_epoch = 0
        self._expect_exit = False
        self._external_kill = False
        self._oom = False
        self._exit_waiters: list[Deferred[None]] = []
        self._output: Any = None
        self._attach_epoch = 0  # bumped by every detach (and so every attach)
        self._output_done: Deferred[None] | None = None
        self._stdin: Any = None
        self._stats_call: IDelayedCall | None = None
        self._stats_running = False
        self._stats_stream: Any = None
        self.started_at: float | None = None
        # Engine time from which events belong to the current run.
        self.run_since: float | None = None
        self.stats: dict[str, Any] = {}
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
        return os.path.join(self.ctx.config.data_dir, self.server_id)

    @property
    def owner(self) -> tuple[int, int]:
        """Numeric owner of the data directory."""
        pair = specs.uid_gid(self.spec)
        if pair is None:
            servers = self.ctx.config.servers
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

    def set_state(
        self,
        new: ServerState,
        *,
        error: str | None = None,
        exit_code: int | None = None,
        oom_killed: bool = False,
        persist: bool = True,
    ) -> None:
        """Move to ``new``, emitting one ``StatusChanged`` with the real previous state."""
        old = self.state
        if old is new:
            return
        if new is S.UNKNOWN:
            self.last_known = old
        self.state = new
        self.error = error
        self.log.info(
            "server {server_id} {old} -> {new}", server_id=self.server_id, old=old, new=new
        )
        self.ctx.emit(
            StatusChanged(
                server_id=self.server_id,
                previous=old.value,
                current=new.value,
                timestamp=self.ctx.clock.seconds(),
                error=error,
                container_id=self.container_id,
                exit_code=exit_code,
                oom_killed=oom_killed,
            )
        )
        if persist and new is not S.UNKNOWN:
            self.ctx.persist(self.server_id, state=new.value)

    def set_desired(self, desired: str) -> None:
        """Record what the server should be doing (durably)."""
        if self.desired != desired:
            self.desired = desired
            self.ctx.persist(self.server_id, desired=desired)

    def status(self) -> dict[str, Any]:
        """The status dict the Panel reads."""
        out: dict[str, Any] = {
            "serverId": self.server_id,
            "name": self.spec.name,
            "status": self.state.value,
            "panelStatus": panel_status(self.state, self.last_known),
            "containerId": self.container_id,
            "desiredState": self.desired,
            "image": self.spec.image,
            "aliases": list(self.spec.aliases),
        }
        if self.error:
            out["error"] = self.error
        if self.state in ACTIVE_STATES:
            out["resources"] = self.metrics()
            if self.started_at is not None:
                out["uptime"] = max(0.0, self.ctx.clock.seconds() - self.started_at)
        if self.crash_report is not None:
            out["lastCrash"] = self.crash_report.as_dict()
        if self.power:
            out["powerAction"] = self.power
        return out

    def metrics(self) -> dict[str, Any]:
        """The Panel's metrics shape from the latest sample (zeroes when stopped)."""
        running = self.state in ACTIVE_STATES and bool(self.stats)
        stats = self.stats if running else {}
        return {
            "cpu": float(stats.get("cpu", 0.0)),
            "memory": float(stats.get("memory", 0.0)),
            "memoryLimit": float(stats.get("memoryLimit", 0.0)),
            "disk": round(self.disk_bytes / MB, 3),
            "network": {"in": int(stats.get("rx", 0)), "out": int(stats.get("tx", 0))},
            "blockIo": {
                "read": int(stats.get("blkRead", 0)),
                "write": int(stats.get("blkWrite", 0)),
            },
            "pids": int(stats.get("pids", 0)),
            "uptime": (
                max(0.0, self.ctx.clock.seconds() - self.started_at)
                if running and self.started_at is not None
                else 0.0
            ),
            "players": 0,
            "timestamp": iso(self.ctx.clock.seconds()),
        }

    # -- power slot --------------------------------------------------------

    def claim(self, action: str) -> None:
        """Take the power slot or answer CONFLICT at once."""
        if self.power is not None:
            raise Conflict(
                "server {} is busy: {} in progress".format(self.server_id, self.power),
                details={"serverId": self.server_id, "inProgress": self.power},
            )
        self.power = action

    def release(self) -> None:
        """Free the power slot."""
        self.power = None

    def in_background(self, action: str, work: Callable[[], Awaitable[Any]]) -> Deferred[Any]:
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
                self.release()

        return self.ctx.track(run(), "{} of server {}".format(action, self.server_id))

    # -- console -----------------------------------------------------------

    def notice(self, text: str) -> None:
        """Write an agent notice into the console (buffer and subscribers)."""
        now = self.ctx.clock.seconds()
        line = ConsoleLine(timestamp=now, stream="agent", text="[ctrlagent] " + text)
        self.console.append(line)
        self.lines_total += 1
        self.ctx.deliver(
            self.server_id,
            [ConsoleOutput(self.server_id, "agent", [line.text], now)],
            [None],
            None,
        )

    def _report_dropped(self, count: int, interval: float) -> None:
        self.notice(
            "console throttled: {} lines not forwarded in the last {:g} s".format(count, interval)
        )

    def take_lines(self, batch: list[tuple[str, str]], filt: MarkFilter | None) -> None:
        """
        Handle a batch of ``(stream, timestamped line)`` from the logs stream.

        Every line goes into the buffer; the throttle's share goes out as one
        ``ConsoleOutput`` per run of a stream, each with the mark that covers
        it.  This is the agent's hottest loop under a flood: per line it only
        splits the stamp, advances the read position (``self.mark``) and
        builds the buffer's line.
        """
        kept: list[ConsoleLine] = []
        before = (self.mark, self.mark_count)
        mark, mark_count = before
        now: float | None = None
        for stream, raw in batch:
            ns, text = split_timestamp(raw)
            if ns:
                if filt is not None and filt.seen(ns):
                    continue
                if ns > mark:
                    mark, mark_count = ns, 1
                elif ns == mark:
                    mark_count += 1
                kept.append(ConsoleLine(ns / 1e9, stream, text, ns))
            else:
                if now is None:
                    now = self.ctx.clock.seconds()
                kept.append(ConsoleLine(now, stream, text, 0))
        self.mark, self.mark_count = mark, mark_count
        self.console.extend(kept)
        self.lines_total += len(kept)
        done = self.spec.startup_done
        became_running = (
            done is not None
            and self.state is S.STARTING
            and any(done.matches(line.text) for line in kept)
        )
        admitted = self.throttle.admit_many(len(kept))
        forwarded = kept if admitted == len(kept) else kept[:admitted]
        events: list[ConsoleOutput] = []
        ends: list[int] = []
        for stream, group in groupby(forwarded, _STREAM):
            lines = list(group)
            events.append(
                ConsoleOutput(
                    self.server_id, stream, [line.text for line in lines], lines[0].timestamp
                )
            )
            ends.append((ends[-1] if ends else 0) + len(lines))
        if forwarded is kept and len(events) == 1:
            marks: list[tuple[int, int] | None] = [(mark, mark_count)]
        else:
            marks = list(_marks_at(forwarded, ends, before))
        self.ctx.deliver(self.server_id, events, marks, (mark, mark_count))
        if became_running and self.state is S.STARTING:
            self.set_state(S.RUNNING)

    def history_lines(self, batch: list[tuple[str, str]], filt: MarkFilter) -> None:
        """
        Lines delivered before an agent restart: history only, no events.

        Exactly those the mark covers (``filt``): a line after it, or one
        sharing its nanosecond beyond the count, comes again from the live
        stream, as new, and must not be in the history twice.
        """
        for stream, raw in batch:
            ns, text = split_timestamp(raw)
            if ns and not filt.seen(ns):
                continue
            self.console.append(ConsoleLine(ns / 1e9 if ns else 0.0, stream, text, ns))
            self.lines_total += 1

    def console_history(self, lines: int) -> list[str]:
        """The last ``lines`` console lines."""
        return [line.text for line in self.console.tail(lines)]

    def console_status(self) -> dict[str, Any]:
        """``{"connected", "lastActivity", "bufferSize"}``."""
        connected = self._stdin is not None and bool(getattr(self._stdin, "connected", False))
        return {
            "connected": connected or self.output_attached,
            "lastActivity": iso(self.console.last_activity),
            "bufferSize": len(self.console),
        }

    @property
    def output_attached(self) -> bool:
        """True while the console stream is being followed."""
        return self._output_done is not None and not self._output_done.called

    async def send_command(self, command: str) -> None:
        """Write one line to the server's stdin."""
        if self.state not in ACTIVE_STATES or self.container_id is None:
            raise Conflict("server {} is not running".format(self.server_id))
        pipe = self._stdin
        if pipe is None or not pipe.connected:
            pipe = await self._attach_stdin()
        pipe.write_line(command)

    async def _attach_stdin(self) -> Any:
        assert self.container_id is not None
        pipe = await self.ctx.docker.attach_stdin(self.container_id)
        old, self._stdin = self._stdin, pipe
        if old is not None and old is not pipe:
            old.close()
        return pipe

    async def attach(self, recover: bool) -> None:
        """
        Follow the container's console (and open stdin, start sampling stats).

        ``recover``: the buffer is empty after an agent restart, so the history
        up to the mark is read first (no events), then new lines from the mark.
        """
        cid = self.container_id
        assert cid is not None
        self.detach_output()
        # One console stream delivers at a time: an attach that a newer one
        # (or a detach) overtook while it read the history gives up, or two
        # pumps would deliver every line twice.
        epoch = self._attach_epoch
        docker = self.ctx.docker
        if recover and self.mark and not len(self.console):
            history = docker.logs(
                cid, follow=False, tail=self.console.capacity, timestamps=True
            )
            delivered = MarkFilter(self.mark, self.mark_count)
            try:
                async for batch in history.batches():
                    if epoch != self._attach_epoch:
                        return
                    self.history_lines(batch, delivered)
            finally:
                history.close()
            if epoch != self._attach_epoch:
                return
        filt = MarkFilter(self.mark, self.mark_count) if self.mark else None
        since = (self.mark / 1e9 - 1.0) if self.mark else None
        stream = docker.logs(cid, follow=True, since=since, timestamps=True)
        self._output = stream
        self._output_done = self.ctx.track(
            self._pump(stream, filt), "console of server {}".format(self.server_id)
        )
        try:
            pipe = await self._attach_stdin()
        except NotFound:
            pipe = None
        if epoch != self._attach_epoch:
            if pipe is not None and self._stdin is pipe:
                self._stdin = None
                pipe.close()
            return
        self.start_stats()

    async def _pump(self, stream: Any, filt: MarkFilter | None) -> None:
        try:
            async for batch in stream.batches(2000):
                if self._output is not stream:
                    return  # detached (or replaced): the next attach resumes from the mark
                self.take_lines(batch, filt)
        except DockerError as e:
            # The engine went away or the container vanished: the manager
            # learns of it through events/reconcile; nothing is lost, the
            # next attach resumes from the mark.
            self.log.debug("console of {server_id} ended: {e}", server_id=self.server_id, e=e)
        finally:
            if self._output is stream:
                self._output = None

    def detach_output(self) -> None:
        """Stop following the console (the container keeps running)."""
        self._attach_epoch += 1
        if self._output is not None:
            self._output.close()
            self._output = None
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        self.stop_stats()

    async def drained(self, timeout: float) -> None:
        """Wait (bounded) until the console stream has delivered its last lines."""
        done = self._output_done
        if done is not None and not done.called:
            await self.ctx.within(done, timeout)

    # -- stats -------------------------------------------------------------

    def start_stats(self) -> None:
        """Sample resource use every ``stats_interval`` while active."""
        if self.ctx.config.servers.stats_mode == "stream":
            if self._stats_stream is None and self.container_id is not None:
                stream = self.ctx.docker.stats_stream(self.container_id)
                self._stats_stream = stream
                self.ctx.track(
                    self._pump_stats(stream), "stats of server {}".format(self.server_id)
                )
            return
        if self._stats_call is None or not self._stats_call.active():
            interval = self.ctx.config.servers.stats_interval
            # Spread the servers over the interval so samples don't bunch up.
            offset = (hash(self.server_id) % 1000) / 1000.0 * interval
            self._stats_call = self.ctx.clock.callLater(offset, self._sample_tick)

    def stop_stats(self) -> None:
        """Stop sampling."""
        if self._stats_call is not None and self._stats_call.active():
            self._stats_call.cancel()
        self._stats_call = None
        if self._stats_stream is not None:
            stream, self._stats_stream = self._stats_stream, None
            stream.close()

    async def _pump_stats(self, stream: Any) -> None:
        """
        Keep the latest sample of the engine's stats stream.

        The engine pushes a sample about every second over one long-lived
        connection per server, which costs the agent far less than a request
        per sample; only one sample per ``stats_interval`` is kept/published.
        """
        interval = self.ctx.config.servers.stats_interval
        last = -1e18
        try:
            async for batch in stream.batches(16):
                now = self.ctx.clock.seconds()
                if now - last >= interval * 0.95:
                    last = now
                    self.apply_stats(batch[-1])
        except DockerError as e:
            self.log.debug("stats of {server_id} ended: {e}", server_id=self.server_id, e=e)
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            # Shim: an empty (``null``) stats document the client cannot parse.
            self.log.debug("stats of {server_id} unreadable: {e}", server_id=self.server_id, e=e)
        finally:
            if self._stats_stream is stream:
                self._stats_stream = None

    def _sample_tick(self) -> None:
        self._stats_call = None
        if self.state not in ACTIVE_STATES or self.container_id is None:
            return
        if not self._stats_running:
            self._stats_running = True
            self.ctx.track(self._sample(), "stats of server {}".format(self.server_id))
        self._stats_call = self.ctx.clock.callLater(
            self.ctx.config.servers.stats_interval, self._sample_tick
        )

    async def _sample(self) -> None:
        cid = self.container_id
        try:
            if cid is None:
                return
            # Not one-shot: the engine samples twice (about a second apart,
            # on its side), so the CPU percent is real.
            sample = await self.ctx.docker.stats_once(cid)
        except DockerError:
            return
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            # Shim: the engine can answer an empty (``null``) stats document
            # for a container that is just starting or stopping, which the
            # client does not parse; a missed sample is harmless.
            self.log.debug("stats of {server_id} unreadable: {e}", server_id=self.server_id, e=e)
            return
        finally:
            self._stats_running = False
        self.apply_stats(sample)

    def apply_stats(self, sample: Any) -> None:
        """Keep a stats sample as the latest and publish it."""
        self.stats = {
            "at": self.ctx.clock.seconds(),
            "cpu": round(float(sample.cpu_percent), 3),
            "memory": round(sample.memory_bytes / MB, 3),
            "memoryLimit": round(sample.memory_limit_bytes / MB, 3),
            "rx": sample.rx_bytes,
            "tx": sample.tx_bytes,
            "blkRead": sample.blk_read,
            "blkWrite": sample.blk_write,
            "pids": sample.pids,
        }
        self.ctx.emit(ResourceUpdate(server_id=self.server_id, metrics=self.metrics()))

    # -- container ---------------------------------------------------------

    async def ensure_container(self) -> str:
        """The server's container id, (re)created when missing or outdated."""
        docker = self.ctx.docker
        digest = self.spec.digest()
        if self.container_id is not None:
            try:
                doc = await docker.container_inspect(self.container_id)
            except NotFound:
                self.container_id = None
            else:
                labels = (doc.get("Config") or {}).get("Labels") or {}
                if labels.get(specs.SPEC_HASH_LABEL) == digest:
                    return self.container_id
                await docker.container_remove(self.container_id, force=True)
                self.container_id = None
        await self.ctx.prepare_data_dir(self)
        await self.ctx.ensure_network()
        body = specs.container_body(
            self.spec, self.data_path, self.ctx.config.servers, self.ctx.network_mode
        )
        name = self.spec.container_name
        try:
            cid = await docker.container_create(name, body)
        except Conflict:
            # A container of that name the store did not know (an earlier
            # agent died between create and commit): it is ours, replace it.
            await docker.container_remove(name, force=True)
            cid = await docker.container_create(name, body)
        self.container_id = cid
        self.ctx.persist(self.server_id, container_id=cid)
        return cid

    async def do_start(self) -> None:
        """Create/start the container and attach; returns once it runs."""
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
        cid = await self.ensure_container()
        self._expect_exit = False
        self._external_kill = False
        self._oom = False
        self.set_state(S.STARTING)
        self.run_since = None
        try:
            await self.ctx.docker.container_start(cid)
        except DockerError as e:
            self.set_state(S.OFFLINE, error=e.message)
            raise
        await self._note_run_start(cid)
        self.started_at = self.ctx.clock.seconds()
        await self.attach(recover=False)
        if self.spec.startup_done is None and self.state is S.STARTING:
            self.set_state(S.RUNNING)

    async def _note_run_start(self, cid: str) -> None:
        """
        Remember when this run started, on the engine's clock.

        Events of this run are stamped at or after ``StartedAt``; comparing
        engine times with engine times needs no agreement between clocks.
        """
        try:
            doc = await self.ctx.docker.container_inspect(cid)
        except DockerError:
            return
        started = parse_docker_time((doc.get("State") or {}).get("StartedAt"))
        if started is not None:
            self.run_since = started - 0.001

    async def graceful_stop(self, signal: str | None, timeout: float | None) -> None:
        """Ask the server to stop, kill it after ``timeout``; returns once it is down."""
        if self.container_id is None or self.state not in ACTIVE_STATES:
            if self.state is not S.CRASHED and self.state is not S.SUSPENDED:
                self.set_state(S.OFFLINE)
            return
        method = self.spec.stop
        timeout = timeout if timeout is not None else method.timeout
        if timeout is None:
            timeout = self.ctx.config.servers.stop_timeout
        self._expect_exit = True
        self.set_state(S.STOPPING)
        exited = self.wait_exit()
        use_command = method.kind == "command" and signal in (None, "SIGTERM")
        try:
            if use_command:
                try:
                    await self.send_command(method.value)
                except (DockerError, Conflict):
                    use_command = False
            if not use_command:
                default = method.value if method.kind == "signal" else "SIGTERM"
                await self.ctx.docker.container_kill(self.container_id, signal or default)
        except NotFound:
            await self._exited_without_event()
            return
        except Conflict:
            # 409: the container is not running any more.
            await self._exited_without_event()
            return
        if await self.ctx.within(exited, timeout):
            return
        self.notice("server did not stop within {:g} s: killing it".format(timeout))
        await self.hard_kill()

    async def hard_kill(self) -> None:
        """SIGKILL and wait (bounded) for the death to be seen."""
        if self.container_id is None:
            return
        self._expect_exit = True
        exited = self.wait_exit()
        try:
            await self.ctx.docker.container_kill(self.container_id, "SIGKILL")
        except (NotFound, Conflict):
            await self._exited_without_event()
            return
        if not await self.ctx.within(exited, KILL_GRACE):
            await self._exited_without_event()

    async def _exited_without_event(self) -> None:
        """The container is down but no ``die`` event came: settle from inspect."""
        if self.state not in ACTIVE_STATES:
            return
        code: int | None = None
        if self.container_id is not None:
            try:
                doc = await self.ctx.docker.container_inspect(self.container_id)
            except NotFound:
                doc = {}
            state = doc.get("State") or {}
            if state.get("Running"):
                return
            code = state.get("ExitCode")
        await self.on_exit(code, oom=False)

    def wait_exit(self) -> Deferred[None]:
        """A Deferred firing when the container's death is seen."""
        d: Deferred[None] = Deferred()
        self._exit_waiters.append(d)
        return d

    def on_event(
        self, action: str, exit_code: int | None, when: float = 0.0
    ) -> Deferred[None] | None:
        """
        Handle a Docker event about this server's container.

        ``when`` is the event's engine time: an event older than the current
        run (replayed after the event stream resumed) is about a previous run
        and ignored, so an old ``die`` never reads as a crash of the new run.
        """
        if when and self.run_since is not None and when < self.run_since:
            self.log.debug(
                "server {server_id}: stale {action} event ignored",
                server_id=self.server_id,
                action=action,
            )
            return None
        if action == "oom":
            self._oom = True
        elif action == "kill" and not self._expect_exit:
            # A stop we did not ask for (a person, or the engine shutting down).
            self._external_kill = True
        elif action == "die":
            return self.ctx.track(
                self.on_exit(exit_code, oom=self._oom), "death of server {}".format(self.server_id)
            )
        return None

    async def on_exit(self, exit_code: int | None, oom: bool) -> None:
        """The container died: settle the state, detect crashes, maybe restart."""
        if self.state not in ACTIVE_STATES and self.state is not S.UNKNOWN:
            return
        self.stop_stats()
        self.started_at = None
        # Let the console stream hand over the last lines before judging.
        await self.drained(2.0)
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        waiters, self._exit_waiters = self._exit_waiters, []
        expected, external = self._expect_exit, self._external_kill
        self._expect_exit = self._external_kill = False
        self.throttle.flush()
        if expected:
            self.set_state(S.OFFLINE, exit_code=exit_code)
        elif external and not oom:
            self.notice("stopped outside the agent (exit code {})".format(exit_code))
            self.set_state(S.OFFLINE, exit_code=exit_code)
        else:
            await self._crashed(exit_code, oom)
        for d in waiters:
            if not d.called:
                d.callback(None)

    async def _crashed(self, exit_code: int | None, oom: bool) -> None:
        if self.container_id is not None and not oom:
            try:
                doc = await self.ctx.docker.container_inspect(self.container_id)
                state = doc.get("State") or {}
                oom = bool(state.get("OOMKilled"))
                if exit_code is None:
                    exit_code = state.get("ExitCode")
            except DockerUnavailable:
                raise
            except DockerError:
                pass
        now = self.ctx.clock.seconds()
        window = self.ctx.config.servers.crash_restart_window
        recent = self.last_crash is not None and now - self.last_crash < window
        restart = self.spec.crash_restart and not recent and self.desired == "running"
        self.crash_report = CrashReport(
            timestamp=now,
            exit_code=exit_code,
            oom_killed=oom,
            lines=self.console_history(CRASH_TAIL),
            restarted=restart,
        )
        self.last_crash = now
        self.ctx.persist(self.server_id, last_crash=now)
        reason = "crashed with exit code {}{}".format(exit_code, " (out of memory)" if oom else "")
        self.notice("server " + reason)
        self.set_state(S.CRASHED, error=reason, exit_code=exit_code, oom_killed=oom)
        if restart:
            self.notice("restarting after the crash")
            try:
                self.claim("crash-restart")
            except Conflict:
                return
            self.in_background("crash-restart", self.do_start)
            return
        if self.spec.crash_restart and recent:
            self.notice(
                "not restarting: it crashed twice within {:g} s (crash-loop guard)".format(window)
            )
        self.set_desired("offline")

    def mark_unknown(self) -> None:
        """The engine went away: nobody knows what the container does."""
        self.detach_output()
        if self.state in (S.INSTALL_FAILED, S.SUSPENDED, S.INSTALLING):
            return
        self.set_state(S.UNKNOWN)

    async def reconcile(self, container: dict[str, Any] | None) -> None:
        """Bring this server in line with what the engine has (``container_list`` item)."""
        if self.installing:
            return
        if self.state is S.INSTALLING:
            self.ctx.start_install(self)
            return
        if container is None:
            self.container_id = None
            self.detach_output()
            if self.desired == "running" and self.state is not S.SUSPENDED:
                await self._reconcile_start()
            elif self.state in ACTIVE_STATES or self.state is S.UNKNOWN:
                self.set_state(self.last_known if self.last_known in (S.CRASHED,) else S.OFFLINE)
            return
        self.container_id = str(container.get("Id"))
        running = container.get("State") == "running"
        if running:
            if self.output_attached:
                return
            try:
                doc = await self.ctx.docker.container_inspect(self.container_id)
                self.started_at = parse_docker_time((doc.get("State") or {}).get("StartedAt"))
                if self.started_at is not None:
                    self.run_since = self.started_at - 0.001
            except NotFound:
                return
            interrupted_stop = self.state is S.STOPPING or (
                self.last_known is S.STOPPING and self.state is S.UNKNOWN
            )
            await self.attach(recover=True)
            if self.state is not S.RUNNING:
                self.set_state(S.RUNNING)
            if interrupted_stop and self.desired == "offline":
                # The agent died (or lost the engine) mid-stop: finish the stop.
                try:
                    self.claim("stop")
                except Conflict:
                    return
                self.in_background("stop", lambda: self.graceful_stop(None, None))
            return
        self.detach_output()
        if self.desired == "running" and self.state is not S.SUSPENDED:
            await self._reconcile_start()
        elif self.state in ACTIVE_STATES or self.state is S.UNKNOWN:
            self.set_state(S.OFFLINE)

    async def _reconcile_start(self) -> None:
        try:
            self.claim("start")
        except Conflict:
            return
        try:
            self.notice("starting: the server should be running")
            await self.do_start()
        finally:
            self.release()

    # -- install -----------------------------------------------------------

    async def install(self) -> None:
        """
        Pull the image, run the install script once, create the container.

        Every way out leaves a settled state: ``offline`` when done,
        ``install_failed`` with the reason otherwise (a refused limit, a
        data directory that cannot be prepared, an internal error).  Only a
        lost engine or the agent's own shutdown leave ``installing``, which
        the next reconcile resumes.
        """
        ctx = self.ctx
        docker = ctx.docker
        self.installing = True
        try:
            self.set_state(S.INSTALLING)
            try:
                await ctx.prepare_data_dir(self)
                await docker.ensure_image(self.spec.image)
                script = self.spec.install
                if script is not None and not self.spec.skip_scripts:
                    if script.image:
                        await docker.ensure_image(script.image)
                    code, reason = await self._install_script()
                    if code != 0:
                        self.set_state(S.INSTALL_FAILED, error=reason, exit_code=code)
                        return
                await self.ensure_container()
            except (DockerUnavailable, CancelledError):
                raise
            except CtrlAgentError as e:
                self.set_state(S.INSTALL_FAILED, error=e.message)
                return
            except OSError as e:
                self.set_state(
                    S.INSTALL_FAILED,
                    error="data directory of server {}: {}".format(
                        self.server_id, e.strerror or e.__class__.__name__
                    ),
                )
                return
            except Exception:
                # A bug: logged with its traceback by the tracker, but the
                # server must not stay "installing" for ever.
                self.set_state(S.INSTALL_FAILED, error="internal error during the install")
                raise
            self.set_state(S.OFFLINE)
        finally:
            self.installing = False

    async def _install_script(self) -> tuple[int, str]:
        """
        Run the install container, then clean the data directory, whatever happened.

        The script ran as root in a container: whatever its exit code (a
        failure, a timeout, a container that vanished, an engine error, even
        our own shutdown), the data directory is swept before anything else
        touches it (ownership, setuid/setgid bits, special files).  A sweep
        that fails fails the install.
        """
        try:
            code, reason = await self._run_install_script()
        finally:
            problem = await self._clean_after_install()
        if problem is not None:
            if code != 0:
                return code, "{}; {}".format(reason, problem)
            raise CtrlAgentError(problem)
        return code, reason

    async def _clean_after_install(self) -> str | None:
        """The recursive prepare pass; the problem as a sentence, None when clean."""
        try:
            await self.ctx.prepare_data_dir(self, recursive=True)
        except CancelledError:
            raise
        except (OSError, CtrlAgentError) as e:
            text = e.message if isinstance(e, CtrlAgentError) else (e.strerror or str(e))
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "server {server_id}: cleaning the data directory after the install failed:"
                " {error}",
                server_id=self.server_id,
                error=text,
            )
            return "cleaning the data directory after the install failed: {}".format(text)
        except Exception:
            self.log.failure(
                "server {server_id}: cleaning the data directory after the install failed",
                server_id=self.server_id,
            )
            return "cleaning the data directory after the install failed"
        return None

    async def _run_install_script(self) -> tuple[int, str]:
        """Run the install container; ``(exit code, reason)``."""
        ctx = self.ctx
        docker = ctx.docker
        script = self.spec.install
        assert script is not None
        script_dir = os.path.join(ctx.config.state_dir, "install", self.server_id)
        log = InstallLog(self.install_log_path, ctx.config.servers.install_log_max_bytes)
        await ctx.in_thread(_write_script, script_dir, script.script)
        await ctx.in_thread(log.create)
        name = self.spec.container_name + "-install"
        try:
            await docker.container_remove(name, force=True)
        except NotFound:
            pass
        await ctx.ensure_network()
        body = specs.install_body(
            self.spec, self.data_path, script_dir, ctx.config.servers, ctx.network_mode
        )
        cid = await docker.container_create(name, body)
        timeout = script.timeout
        if timeout is None:
            timeout = ctx.config.servers.install_timeout
        try:
            await docker.container_start(cid)
            self.notice("install script running (log: {})".format(os.path.basename(log.path)))
            stream = docker.logs(cid, follow=True, timestamps=False)
            copied = ctx.track(self._copy_install_log(stream, log), "install log")
            result: list[int] = []

            async def wait() -> None:
                try:
                    result.append(await docker.container_wait(cid))
                except DockerError:
                    result.append(-1)

            waiting = Deferred.fromCoroutine(wait())
            if not await ctx.within(waiting, timeout):
                waiting.cancel()
                waiting.addErrback(lambda _: None)  # the cancellation is ours
                try:
                    await docker.container_kill(cid, "SIGKILL")
                except (NotFound, Conflict):
                    pass
                stream.close()
                await ctx.in_thread(log.append, ["[ctrlagent] install timed out"])
                return -1, "install script timed out after {:g} s".format(timeout)
            code = result[0] if result else -1
            await ctx.within(copied, 5.0)
            if code != 0:
                return code, "install script exited with code {}".format(code)
            return 0, ""
        finally:
            try:
                await docker.container_remove(cid, force=True)
            except NotFound:
                pass
            await ctx.in_thread(shutil.rmtree, script_dir, True)

    @property
    def install_log_path(self) -> str:
        """Where the install script's output goes (in the agent's state directory)."""
        return os.path.join(self.ctx.config.state_dir, "install-logs", self.server_id + ".log")

    async def _copy_install_log(self, stream: Any, log: InstallLog) -> None:
        writable = True
        try:
            async for batch in stream.batches(1000):
                lines = [line for _, line in batch]
                for line in lines:
                    self.console.append(
                        ConsoleLine(self.ctx.clock.seconds(), "install", line)
                    )
                if not writable:
                    continue
                try:
                    await self.ctx.in_thread(log.append, lines)
                except OSError as e:
                    # A full state disk, or the file replaced by a link: the
                    # output still reaches the console buffer, the log stops.
                    writable = False
                    self.log.warn(  # noqa: G010 (twisted.logger has warn)
                        "server {server_id}: install log {path} not written: {error}",
                        server_id=self.server_id,
                        path=log.path,
                        error=e.strerror or e,
                    )
        except DockerError:
            return


class InstallLog:
    """
    The install script's output, in a file of the agent's state directory.

    The text comes from the install container, which runs whatever the egg
    says: it is untrusted.  The file is opened without following a link
    (wherever it is, a link planted in its place must not redirect our
    writes) and holds at most ``max_bytes``; what comes after is counted in
    one closing line, not written.  Used from the disk thread pool only.
    """

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped_lines = 0

    def create(self) -> None:
        """Start an empty log (replacing the previous install's)."""
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        _unlink_entry(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC,
                     0o640)
        os.close(fd)
        self.written = 0
        self.dropped_lines = 0

    def append(self, lines: list[str]) -> None:
        """Add ``lines`` up to the size bound; count the rest."""
        data = bytearray()
        room = self.max_bytes - self.written
        for index, line in enumerate(lines):
            encoded = (line + "\n").encode("utf-8", "replace")
            if len(encoded) > room:
                if self.dropped_lines == 0:
                    note = "[ctrlagent] install log truncated at {} bytes\n".format(
                        self.max_bytes
                    ).encode()
                    data += note
                self.dropped_lines += len(lines) - index
                break
            data += encoded
            room -= len(encoded)
        if not data:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.written += len(data)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _unlink_entry(path: str) -> None:
    """Remove ``path`` if it is a file or a link (never what a link points to)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


def _write_script(script_dir: str, script: str) -> None:
    """Write ``install.sh`` into a fresh ``script_dir`` (mounted read-only into the container)."""
    if os.path.islink(script_dir):
        os.unlink(script_dir)
    else:
        shutil.rmtree(script_dir, ignore_errors=True)
    os.makedirs(script_dir, mode=0o755, exist_ok=True)
    path = os.path.join(script_dir, "install.sh")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o755)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, 0o755)  # whatever the umask: the container must run it
        f.write(script.replace("\r\n", "\n"))
