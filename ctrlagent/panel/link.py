"""
The WebSocket link from the agent to the Panel (PROTOCOL.md section 3).

``PanelLink`` is a ``MultiService`` holding one ``ClientService`` that dials the
Panel through an Autobahn ``WebSocketClientFactory``.  The Autobahn protocol is
thin (magic-wormhole style): every callback is forwarded to the link, which owns
all state that outlives one connection:

- the reconnect schedule (``ReconnectBackoff``): exponential with jitter, fed by
  our own count of failed handshakes because ``ClientService`` resets its count
  on every TCP connect, with a slower floor after the Panel refused our
  credentials (HTTP 401/403);
- the ``Outbox``: event and response frames produced while the link is down or
  the socket is not draining, bounded, oldest dropped first and counted;
- the ``ConsoleBatcher``: console lines grouped per server into a few frames so
  that a flooding server cannot flood the Panel;
- the status the Panel was last told about each server, so that the snapshot
  sent after every (re)connect carries a truthful ``previousStatus``.

On every open the link starts the heartbeat, sends ``system_info``, flushes the
outbox in order (preceded by an ``events_dropped`` event when frames were lost)
and then sends a ``server_status_changed`` snapshot of every server, so the
Panel never keeps a stale state after a reconnect.  Until that sequence is done,
new events queue behind the outbox so nothing is reordered.

Commands in flight when the connection closes keep running (a half-done stop
must not be abandoned); their single response goes to the outbox and is
delivered, with its original id, on the next connection.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent import __version__
from ctrlagent.commands import ActionResult, Command, IDispatcher
from ctrlagent.config import AgentConfig
from ctrlagent.errors import ConfigInvalid, CtrlAgentError
from ctrlagent.events import ConsoleOutput, ResourceUpdate, ServerEvent, StatusChanged
from ctrlagent.panel import messages
from ctrlagent.tracker import DeferredTracker

# Frame groups: one logical event may be several frames (the event plus its
# legacy twin); they are queued, dropped and sent together.
Entry = tuple[bytes, ...]

# How long gathering system_info / the load for a pong may take before the
# link sends what it has.
_INFO_TIMEOUT = 5.0

# HTTP statuses that mean "your credentials are wrong", not "try again soon".
_REFUSED_STATUSES = (401, 403)


class EventSource(Protocol):
    """What the link needs from the server manager."""

    def add_listener(self, listener: Callable[[ServerEvent], None]) -> None: ...

    def remove_listener(self, listener: Callable[[ServerEvent], None]) -> None: ...

    def list_servers(self) -> list[Any]: ...


def panel_url(url: str, node_id: str) -> str:
    """
    ``url`` with ``nodeId=<node_id>`` in its query unless one is there already.

    Older Panels take the node id only from the query and close with 1008
    "Invalid node ID" without it.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "nodeId" and value for key, value in query):
        return url
    query = [(key, value) for key, value in query if key != "nodeId"]
    query.append(("nodeId", node_id))
    return urlunsplit(parts._replace(path=parts.path or "/", query=urlencode(query)))


def _without_query(url: str) -> str:
    """The URL as it may appear in a log line (the query could carry tokens)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment=""))


def _load_trust(path: str) -> Any:
    """The trust root made of every certificate in the PEM file ``path``."""
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    marker = b"-----END CERTIFICATE-----"
    try:
        with open(path, "rb") as f:
            pem = f.read()
        blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN" in block]
        if not blocks:
            raise ValueError("no PEM certificate found")
        return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])
    except (OSError, ValueError) as e:
        raise ConfigInvalid("panel.tls_ca {}: {}".format(path, e)) from None
    except Exception as e:  # pyOpenSSL raises its own error types for bad PEM
        raise ConfigInvalid("panel.tls_ca {}: not a PEM certificate ({})".format(path, e)) from None


class ReconnectBackoff:
    """
    The reconnect schedule, usable as ``ClientService``'s ``retryPolicy``.

    ``ClientService`` passes the number of consecutive failed TCP attempts, which
    it resets to zero on every TCP connect.  A Panel that accepts TCP and then
    refuses the WebSocket handshake (or closes the link at once) would thus be
    redialled at the shortest delay forever, so this policy adds its own count
    of failed handshakes.  After a 401/403 the delay never drops below
    ``refused_floor`` until a handshake succeeds again.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        factor: float = 2.0,
        refused_floor: float = 30.0,
        jitter: float = 0.25,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.refused_floor = refused_floor
        self.jitter = jitter
        self._random = random
        self.failed_handshakes = 0
        self.refused = False

    def base_delay(self, failed_attempts: int) -> float:
        """The delay before jitter for the given ``ClientService`` attempt count."""
        failures = max(failed_attempts - 1, 0) + self.failed_handshakes
        try:
            delay = self.initial * self.factor ** min(failures, 100)
        except OverflowError:
            delay = self.maximum
        delay = min(delay, self.maximum)
        if self.refused:
            delay = max(delay, self.refused_floor)
        return delay

    def __call__(self, failed_attempts: int) -> float:
        # Jitter only ever lengthens the delay, so many agents restarted together
        # spread out without any of them retrying sooner than the schedule says.
        return self.base_delay(failed_attempts) * (1.0 + self.jitter * self._random())

    def handshake_failed(self, refused: bool) -> None:
        """A TCP connection that did not become a lasting WebSocket session."""
        self.failed_handshakes += 1
        # Sticky until a handshake succeeds: a refusing Panel that then times out
        # is still one we must not hammer.
        self.refused = self.refused or refused

    def opened(self) -> None:
        """The Panel accepted our handshake: credentials are fine."""
        self.refused = False

    def stable(self) -> None:
        """A session lasted long enough to count as healthy: start over at ``initial``."""
        self.failed_handshakes = 0
        self.refused = False


class Outbox:
    """
    Bounded FIFO of frame groups the Panel could not take yet.

    When full, the oldest group is dropped and counted: recent state matters
    more than old, and the snapshot after a reconnect repairs any lost status.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: deque[Entry] = deque()
        self.dropped = 0  # since the last flush
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> bool:
        """Queue ``entry``; True when something was dropped to make room."""
        if self.size <= 0:
            self.dropped += 1
            self.dropped_total += 1
            return True
        dropped = False
        if len(self._entries) >= self.size:
            self._entries.popleft()
            self.dropped += 1
            self.dropped_total += 1
            dropped = True
        self._entries.append(entry)
        return dropped

    def popleft(self) -> Entry:
        """The oldest queued group."""
        return self._entries.popleft()

    def take_dropped(self) -> int:
        """How many groups were dropped since the last call."""
        dropped, self.dropped = self.dropped, 0
        return dropped


class _Batch:
    """The pending console lines of one server and stream."""

    __slots__ = ("stream", "lines", "stamps")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.lines: list[str] = []
        # (index of an event's first line, its timestamp): each frame is
        # stamped with its own first line's time, at a cost per event.
        self.stamps: list[tuple[int, float]] = []


class ConsoleBatcher:
    """
    Groups console lines into batches per server.

    A batch is delivered when it holds ``max_lines`` lines, when ``window``
    seconds have passed since its first line, when the stream changes (so
    stdout/stderr interleaving survives), or when ``flush`` is called (before a
    status change of the same server, so a crash's last lines precede it).
    A batch never goes out with more than ``max_lines`` lines: a larger event
    is cut into several.
    """

    def __init__(
        self,
        clock: Any,
        max_lines: int,
        window: float,
        deliver: Callable[[str, str, list[str], float], None],
    ) -> None:
        self._clock = clock
        self._max_lines = max(1, max_lines)
        self._window = window
        self._deliver = deliver
        self._pending: dict[str, _Batch] = {}
        self._timers: dict[str, IDelayedCall] = {}

    def add(self, event: ConsoleOutput) -> None:
        """Take one event's lines."""
        if not event.lines:
            return
        server_id = event.server_id
        batch = self._pending.get(server_id)
        if batch is not None and batch.stream != event.stream:
            self.flush(server_id)
            batch = None
        if batch is None:
            batch = self._pending[server_id] = _Batch(event.stream)
        batch.stamps.append((len(batch.lines), event.timestamp))
        batch.lines.extend(event.lines)
        if len(batch.lines) >= self._max_lines or self._window <= 0:
            self._deliver_full(server_id, batch)
        if server_id in self._pending and server_id not in self._timers:
            self._timers[server_id] = self._clock.callLater(self._window, self.flush, server_id)

    def _deliver_full(self, server_id: str, batch: _Batch) -> None:
        """Deliver every full frame; keep a partial rest waiting (unless no window)."""
        size = self._max_lines
        keep = 0 if self._window <= 0 else len(batch.lines) % size
        cut = len(batch.lines) - keep
        self._send(server_id, batch, cut)
        if keep:
            rest = _Batch(batch.stream)
            rest.lines = batch.lines[cut:]
            rest.stamps = [(0, _stamp_at(batch.stamps, cut))]
            self._pending[server_id] = rest
        else:
            self._drop(server_id)

    def _send(self, server_id: str, batch: _Batch, end: int) -> None:
        """Deliver the batch's first ``end`` lines in frames of at most ``max_lines``."""
        size, lines = self._max_lines, batch.lines
        for start in range(0, end, size):
            chunk = lines[start : min(start + size, end)]
            self._deliver(server_id, batch.stream, chunk, _stamp_at(batch.stamps, start))

    def _drop(self, server_id: str) -> None:
        self._pending.pop(server_id, None)
        timer = self._timers.pop(server_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def flush(self, server_id: str) -> None:
        """Deliver the server's pending lines now."""
        batch = self._pending.get(server_id)
        self._drop(server_id)
        if batch is not None and batch.lines:
            self._send(server_id, batch, len(batch.lines))

    def flush_all(self) -> None:
        """Deliver every pending batch (shutdown)."""
        for server_id in list(self._pending):
            self.flush(server_id)


def _stamp_at(stamps: list[tuple[int, float]], index: int) -> float:
    """The timestamp of the line at ``index``: that of the event it came in."""
    stamp = stamps[0][1]
    for first, ts in stamps:
        if first > index:
            break
        stamp = ts
    return stamp


@implementer(IPushProducer)
class _WriteFlow:
    """
    Registered with the transport so the link learns when the socket backs up.

    While paused, events go to the (bounded) outbox instead of piling up in the
    transport's unbounded write buffer.
    """

    def __init__(self, link: PanelLink, protocol: PanelProtocol) -> None:
        self._link = link
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._link.writes_paused(self._protocol)

    def resumeProducing(self) -> None:
        self._link.writes_resumed(self._protocol)

    def stopProducing(self) -> None:
        """The transport is going away; ``onClose`` does the cleanup."""


class PanelProtocol(WebSocketClientProtocol):
    """Thin Autobahn protocol: every callback is forwarded to the ``PanelLink``."""

    factory: PanelClientFactory

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        # Built per attempt so that the credential headers are always current.
        return self.factory.link.connecting_request(self.factory)

    def onOpen(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(_WriteFlow(self.factory.link, self), True)
        self.factory.link.connection_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.link.frame_received(self, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.link.connection_closed(self, code, reason, self.handshake_status())

    def handshake_status(self) -> int | None:
        """The HTTP status the Panel answered our upgrade request with, if any."""
        line = getattr(self, "http_status_line", None)
        if not isinstance(line, str):
            return None
        words = line.split()
        if len(words) < 2 or not words[1].isdigit():
            return None
        return int(words[1])

    def is_writable(self) -> bool:
        """
        True while frames can be sent.

        Between the start of a close handshake (ours or the Panel's, or an
        auto-ping timeout) and ``onClose`` the protocol is no longer open and
        Autobahn refuses to send.
        """
        return bool(self.state == self.STATE_OPEN)

    def send_frame(self, data: bytes) -> bool:
        """Send one text frame; False (nothing sent) once the connection is closing."""
        if not self.is_writable():
            return False
        self.sendMessage(data, isBinary=False)
        return True


class PanelClientFactory(WebSocketClientFactory):
    """The Autobahn factory, knowing the link its protocols forward to."""

    protocol = PanelProtocol  # type: ignore[assignment]

    def __init__(self, link: PanelLink, url: str, reactor: Any) -> None:
        super().__init__(url, reactor=reactor, useragent="ctrlagent/" + __version__)
        self.link = link


class PanelLink(service.MultiService):
    """
    The agent's WebSocket link to the Panel.

    - ``reactor``: the reactor (time, TCP); a ``Clock`` plus ``endpoint`` in tests;
    - ``config``: ``config.panel`` plus ``node_id`` and ``secret``;
    - ``dispatcher``: the ``IDispatcher`` shared with the HTTP API;
    - ``servers``: ``add_listener``/``remove_listener``/``list_servers`` (the
      ``ServerManager``);
    - ``system_info``: returns (a Deferred or coroutine of) the ``system_info``
      data, e.g. ``lambda: system.system_info(config.node_id)``;
    - ``load``: returns ``{cpu, memory, disk}`` percents for pongs, e.g.
      ``system.system_load``;
    - ``endpoint``: overrides the endpoint built from the URL (tests);
    - ``random``: the jitter source.

    ``connected`` is true exactly between ``onOpen`` and ``onClose``;
    ``is_connected()`` is what ``/health`` reports (true when the link is
    disabled, as PROTOCOL.md section 1 asks).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        dispatcher: IDispatcher,
        servers: EventSource,
        system_info: Callable[[], Awaitable[dict[str, Any]]],
        load: Callable[[], Awaitable[dict[str, Any]]],
        *,
        endpoint: IStreamClientEndpoint | None = None,
        random: Callable[[], float] = random.random,
    ) -> None:
        super().__init__()
        self.setName("panel-link")
        self._reactor = reactor
        self._config = config
        self._panel = config.panel
        self._dispatcher = dispatcher
        self._servers = servers
        self._system_info = system_info
        self._load = load
        self._tracker = DeferredTracker()

        self.url = panel_url(self._panel.url, config.node_id)
        self._log_url = _without_query(self.url)
        self.backoff = ReconnectBackoff(
            self._panel.backoff_initial,
            self._panel.backoff_max,
            factor=self._panel.backoff_factor,
            refused_floor=self._panel.refused_backoff,
            jitter=self._panel.backoff_jitter,
            random=random,
        )
        self.outbox = Outbox(self._panel.outbox_size)
        self._batcher = ConsoleBatcher(
            reactor,
            self._panel.console_batch_lines,
            self._panel.console_batch_window,
            self._console_batch,
        )

        self._protocol: PanelProtocol | None = None
        self._ready = False  # system_info sent, outbox flushed, snapshot sent
        self._paused = False  # the transport asked us to stop writing
        self._opened_at = 0.0
        self._heartbeat: LoopingCall | None = None
        self._in_flight: set[str] = set()
        self._reported: dict[str, str] = {}  # server id -> status the Panel was told
        self._drop_warned = False
        self.connections = 0  # successful opens, for tests and diagnostics

        self.factory = PanelClientFactory(self, self.url, reactor)
        self.factory.setProtocolOptions(
            openHandshakeTimeout=self._panel.open_handshake_timeout,
            autoPingInterval=self._panel.auto_ping_interval,
            autoPingTimeout=self._panel.auto_ping_timeout,
            maxMessagePayloadSize=self._panel.max_message_bytes,
        )
        if endpoint is None:
            endpoint = self._endpoint_for(self.url)
        self._client = ClientService(
            endpoint, self.factory, retryPolicy=self.backoff, clock=reactor
        )
        self._client.setServiceParent(self)

    def _endpoint_for(self, url: str) -> IStreamClientEndpoint:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, port, timeout=max(1, int(self._panel.open_handshake_timeout or 30))
        )
        if secure:
            # Imported here: TLS needs pyOpenSSL/service_identity only for wss.
            from twisted.internet.endpoints import wrapClientTLS
            from twisted.internet.ssl import optionsForClientTLS

            trust = _load_trust(self._panel.tls_ca) if self._panel.tls_ca else None
            # The hostname is always verified; only the roots change.
            endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), endpoint)
        return endpoint

    # --- state seen by others ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True only between ``onOpen`` and ``onClose``."""
        return self._protocol is not None

    def is_connected(self) -> bool:
        """What ``/health`` reports as ``connected``: the link state, or true when disabled."""
        return self.connected or not self._panel.enabled

    def stats(self) -> dict[str, Any]:
        """Diagnostics: link state, outbox depth and losses, failed handshakes."""
        return {
            "connected": self.connected,
            "connections": self.connections,
            "outbox": len(self.outbox),
            "dropped": self.outbox.dropped_total,
            "failedHandshakes": self.backoff.failed_handshakes,
            "commandsInFlight": len(self._in_flight),
        }

    # --- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        if not self._panel.enabled:
            # Still a service in the tree, so the composition root stays uniform;
            # it simply never dials.
            service.Service.startService(self)
            self.log.info("Panel WebSocket link disabled")
            return
        self._servers.add_listener(self._on_event)
        self.log.info("dialling the Panel at {url}", url=self._log_url)
        super().startService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self._panel.enabled:
            service.Service.stopService(self)
            return
        self._servers.remove_listener(self._on_event)
        self._batcher.flush_all()
        if self._protocol is not None:
            # A clean close frame first, so the Panel sees "going away" rather
            # than a dropped TCP connection (Autobahn only lets applications send 1000
            # or 3000-4999, so not 1001); ClientService then closes TCP.
            self._protocol.sendClose(1000, "agent shutting down")
        await super().stopService()
        self._tracker.cancel_all()
        await self._tracker.wait()

    # --- called by the protocol -------------------------------------------------------------

    def connecting_request(self, factory: WebSocketClientFactory) -> ConnectingRequest:
        """The upgrade request for one attempt, with the credential headers."""
        node_id = self._config.node_id
        headers = {
            "Authorization": "Bearer " + self._config.secret,
            "X-Node-Id": node_id,
            "X-Agent-ID": node_id,
        }
        return ConnectingRequest(
            host=factory.host,
            port=factory.port,
            resource=factory.resource,
            headers=headers,
            useragent=factory.useragent,
            origin=factory.origin,
            protocols=factory.protocols,
        )

    def connection_opened(self, protocol: PanelProtocol) -> None:
        """``onOpen``: the link is up."""
        self._protocol = protocol
        self._ready = False
        self._paused = False
        self._opened_at = self._reactor.seconds()
        self.connections += 1
        self.backoff.opened()
        self.log.info("connected to the Panel at {url}", url=self._log_url)
        heartbeat = self._heartbeat = LoopingCall(self._send_heartbeat, protocol)
        heartbeat.clock = self._reactor
        self._tracker.track(heartbeat.start(self._panel.heartbeat_interval, now=True), "heartbeat")
        self._tracker.run(self._synchronise(protocol), "synchronise with the Panel")

    def connection_closed(
        self, protocol: PanelProtocol, code: int | None, reason: str | None, status: int | None
    ) -> None:
        """``onClose``: of an open link, or of an attempt whose handshake failed."""
        if protocol is not self._protocol:
            refused = status in _REFUSED_STATUSES
            self.backoff.handshake_failed(refused)
            if refused:
                self.log.warn(  # noqa: G010
                    "the Panel refused our handshake with HTTP {status}: check AGENT_SECRET and "
                    "NODE_ID; retrying every {delay:.0f}s or more",
                    status=status,
                    delay=self.backoff.refused_floor,
                )
            else:
                self.log.info(
                    "WebSocket handshake with the Panel failed ({reason})",
                    reason=reason or "no reason given",
                )
            return

        duration = self._reactor.seconds() - self._opened_at
        self._protocol = None
        self._ready = False
        self._paused = False
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        if duration >= self._panel.stable_after:
            self.backoff.stable()
        else:
            # A Panel that accepts and then closes at once (1008 "Invalid node ID")
            # must not be redialled at the shortest delay forever.
            self.backoff.handshake_failed(False)
        if code == 1008:
            self.log.warn(  # noqa: G010
                "the Panel closed the link as a policy violation ({reason}): check NODE_ID",
                reason=reason,
            )
        else:
            self.log.info(
                "Panel link closed after {duration:.1f}s (code {code}: {reason})",
                duration=duration,
                code=code,
                reason=reason,
            )

    def writes_paused(self, protocol: PanelProtocol) -> None:
        """The transport's buffer is full: queue events in the outbox meanwhile."""
        if protocol is self._protocol:
            self._paused = True

    def writes_resumed(self, protocol: PanelProtocol) -> None:
        """The transport drained: send what queued up."""
        if protocol is self._protocol:
            self._paused = False
            if self._ready:
                self._flush_outbox(protocol)

    def frame_received(self, protocol: PanelProtocol, payload: bytes) -> None:
        """One message from the Panel."""
        message = messages.parse_frame(payload)
        if isinstance(message, messages.CommandFrame):
            self._start_command(message.command)
        elif isinstance(message, messages.PingFrame):
            self._tracker.run(self._answer_ping(protocol, message.ping_id), "answer a ping")
        elif isinstance(message, messages.SystemInfoRequest):
            self._tracker.run(self._send_system_info(protocol), "send system_info")
        elif isinstance(message, messages.InvalidCommand):
            self.log.warn(  # noqa: G010
                "unusable command {command_id} from the Panel: {error}",
                command_id=message.command_id,
                error=message.error.message,
            )
            if message.command_id is not None:
                frame = messages.response_for_error(
                    message.command_id, message.error, self._reactor.seconds()
                )
                self._emit((messages.encode(frame),))
        else:
            self.log.debug(
                "ignored a frame from the Panel ({reason}, type {frame_type})",
                reason=message.reason,
                frame_type=message.frame_type,
            )

    # --- connection sequence ----------------------------------------------------------------

    async def _synchronise(self, protocol: PanelProtocol) -> None:
        """system_info, then the outbox in order, then a snapshot of every server."""
        await self._send_system_info(protocol)
        if protocol is not self._protocol:
            return
        # Console lines produced while down but still in a batch belong before
        # the snapshot too: batch them into the outbox while not yet ready.
        self._batcher.flush_all()
        self._ready = True
        self._flush_outbox(protocol)
        self._send_snapshot(protocol)

    async def _gather(self, source: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Call ``source`` (Deferred or coroutine), waiting at most ``_INFO_TIMEOUT``."""
        # maybeDeferred wraps a returned coroutine, so both kinds of callable work.
        d: Deferred[Any] = maybeDeferred(source)
        result = await d.addTimeout(_INFO_TIMEOUT, self._reactor)
        return dict(result) if isinstance(result, Mapping) else {}

    async def _send_system_info(self, protocol: PanelProtocol) -> None:
        try:
            info = await self._gather(self._system_info)
        except CancelledError:
            raise
        except Exception as e:
            # The Panel still needs a system_info to list the node; send what we know.
            self.log.warn("could not gather system information: {error}", error=str(e))  # noqa: G010
            info = {}
        if protocol is self._protocol:
            frame = messages.system_info(info, self._config.node_id, self._reactor.seconds())
            protocol.send_frame(messages.encode(frame))

    def _flush_outbox(self, protocol: PanelProtocol) -> None:
        if not protocol.is_writable():
            # Closing: everything stays queued for the next connection.
            return
        dropped = self.outbox.take_dropped()
        self._drop_warned = False
        if dropped:
            self.log.warn(  # noqa: G010
                "{dropped} Panel frames were dropped while the link was down (outbox size {size})",
                dropped=dropped,
                size=self.outbox.size,
            )
            frame = messages.events_dropped(self._config.node_id, dropped, self._reactor.seconds())
            protocol.send_frame(messages.encode(frame))
        while (
            self.outbox
            and not self._paused
            and protocol is self._protocol
            and protocol.is_writable()
        ):
            for data in self.outbox.popleft():
                protocol.send_frame(data)

    def _send_snapshot(self, protocol: PanelProtocol) -> None:
        """The current state of every server, as status changes from what the Panel last heard."""
        now = self._reactor.seconds()
        # Rebuilt from the manager's list, so deleted servers are forgotten.
        reported: dict[str, str] = {}
        for status in self._servers.list_servers():
            if not isinstance(status, Mapping):
                continue
            server_id = status.get("serverId")
            current = status.get("status")
            if not isinstance(server_id, str) or not isinstance(current, str):
                continue
            previous = self._reported.get(server_id, current)
            reported[server_id] = current
            container_id = status.get("containerId")
            frames = messages.status_changed_frames(
                server_id,
                previous,
                current,
                now,
                container_id=container_id if isinstance(container_id, str) else None,
                with_legacy=self._panel.legacy_frames,
            )
            for frame in frames:
                protocol.send_frame(messages.encode(frame))
        self._reported = reported

    def _send_heartbeat(self, protocol: PanelProtocol) -> None:
        if protocol is self._protocol:
            frame = messages.heartbeat(self._config.node_id, self._reactor.seconds())
            protocol.send_frame(messages.encode(frame))

    async def _answer_ping(self, protocol: PanelProtocol, ping_id: Any) -> None:
        try:
            load = await self._gather(self._load)
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn("could not measure the system load for a pong: {error}", error=str(e))  # noqa: G010
            load = {}
        active = sum(
            1
            for status in self._servers.list_servers()
            if isinstance(status, Mapping) and status.get("status") in ("running", "starting")
        )
        if protocol is self._protocol:
            frame = messages.pong(
                ping_id, self._reactor.seconds(), active_servers=active, system_load=load
            )
            protocol.send_frame(messages.encode(frame))

    # --- commands ---------------------------------------------------------------------------

    def _start_command(self, command: Command) -> None:
        command_id = command.command_id
        if command_id is not None:
            if command_id in self._in_flight:
                # One final response per id: a retransmitted command is already
                # being answered.
                self.log.warn(  # noqa: G010
                    "command {command_id} is already running; duplicate ignored",
                    command_id=command_id,
                )
                return
            self._in_flight.add(command_id)
        self._tracker.run(self._run_command(command), "Panel command " + command.action)

    async def _run_command(self, command: Command) -> None:
        command_id = command.command_id
        try:
            try:
                result = await maybeDeferred(self._dispatcher.dispatch, command)
            except CtrlAgentError as e:
                self.log.info(
                    "command {action} {command_id} failed: {code} {message}",
                    action=command.action,
                    command_id=command_id,
                    code=e.code,
                    message=e.message,
                )
                frame = messages.response_for_error(command_id, e, self._reactor.seconds())
            except CancelledError:
                raise
            except Exception:
                self.log.failure(
                    "command {action} {command_id} raised an unexpected error",
                    action=command.action,
                    command_id=command_id,
                )
                frame = messages.response_failure(
                    command_id,
                    "EXECUTION_ERROR",
                    "internal error running " + command.action,
                    self._reactor.seconds(),
                )
            else:
                if isinstance(result, Mapping):
                    result = ActionResult(data=dict(result))
                elif not isinstance(result, ActionResult):
                    result = ActionResult()
                frame = messages.response_success(command_id, result, self._reactor.seconds())
        finally:
            if command_id is not None:
                self._in_flight.discard(command_id)
        if command_id is None:
            # Legacy typed frames carry no id: nothing to correlate a reply with.
            return
        self._emit((messages.encode(frame),))

    # --- events -----------------------------------------------------------------------------

    def _on_event(self, event: ServerEvent) -> None:
        """Listener registered with the server manager; must never raise into it."""
        try:
            if isinstance(event, ConsoleOutput):
                self._batcher.add(event)
            elif isinstance(event, StatusChanged):
                # The server's last console lines (a crash's stack trace) belong
                # before the status change that ends them.
                self._batcher.flush(event.server_id)
                self._reported[event.server_id] = event.current
                self._emit_frames(
                    messages.frames_for_status(event, with_legacy=self._panel.legacy_frames)
                )
            elif isinstance(event, ResourceUpdate):
                self._emit_frames(
                    messages.resource_frames(
                        event,
                        self._reactor.seconds(),
                        status=self._reported.get(event.server_id),
                        with_legacy=self._panel.legacy_frames,
                    )
                )
        except Exception:
            self.log.failure("could not forward a server event to the Panel")

    def _console_batch(
        self, server_id: str, stream: str, lines: list[str], timestamp: float
    ) -> None:
        self._emit_frames(
            messages.console_frames(
                server_id, stream, lines, timestamp, with_legacy=self._panel.legacy_frames
            )
        )

    def _emit_frames(self, frames: list[dict[str, Any]]) -> None:
        self._emit(tuple(messages.encode(frame) for frame in frames))

    def _emit(self, entry: Entry) -> None:
        """Send now when the link is up and draining, else queue behind the outbox."""
        protocol = self._protocol
        if (
            protocol is not None
            and self._ready
            and not self._paused
            and not self.outbox
            and protocol.is_writable()
        ):
            for data in entry:
                protocol.send_frame(data)
            return
        if self.outbox.append(entry) and not self._drop_warned:
            self._drop_warned = True
            self.log.warn(  # noqa: G010
                "Panel outbox full ({size} entries): dropping the oldest events",
                size=self.outbox.size,
            )
