"""
The WebSocket link from the agent to the Panel (PROTOCOL.md section 3).

``PanelLink`` is a ``MultiService`` holding one ``ClientService`` that dials the
Panel through an Autobahn ``WebSocketClientFactory``.  The Autobahn protocol is
thin (magic-wormhole style): every callback is forwarded to the link, which owns
all state that outlives one connection:

- the reconnect schedule (``ReconnectBackoff``, ``panel.backoff``): exponential
  with jitter, fed by our own count of failed handshakes because
  ``ClientService`` resets its count on every TCP connect, with a slower floor
  after the Panel refused our credentials (HTTP 401/403);
- the ``Outbox`` (``panel.outbox``, with the batcher and the intake): frames
  produced while the link is down or the socket is not draining.  Answers
  (responses, pongs, error frames) are never dropped; events are bounded,
  oldest dropped first and counted under the reason they waited (the link was
  down, or the Panel was not reading);
- one ``_Drain`` per connection (``panel.protocol``): a pull producer on the socket's transport
  that learns when the bytes written have been taken by the kernel.  It is
  the write flow control (past a buffer's worth, events wait in the outbox)
  and it settles the receipts of the console frames written before: the link
  is the server manager's acknowledging consumer (``IConsoleConsumer``), whose
  marks advance only on those receipts, or on the outbox dropping a frame
  (``ctrlagent.servers.delivery``).  Console frames the kernel never took when
  a connection fails go out first on the next one;
- one ``CommandIntake`` per connection: back-pressure on the reader.  At most
  ``max_in_flight`` frames are handled at once (an answer that cannot be
  delivered keeps its slot), later ones wait undecoded, and reading from the
  transport pauses while too many bytes wait, so a burst of commands is
  answered in full with bounded memory;
- the ``ConsoleBatcher``: console lines grouped per server into a few frames so
  that a flooding server cannot flood the Panel (a batch's lines are not
  delivered before it goes out);
- the status the Panel was last told about each server, so that the snapshot
  sent after every (re)connect carries a truthful ``previousStatus``.

On every open the link starts the heartbeat, sends ``system_info``, flushes the
outbox in order (preceded by an ``events_dropped`` event when frames were lost)
and then sends a ``server_status_changed`` snapshot of every server, so the
Panel never keeps a stale state after a reconnect.  Until that sequence is done,
new events queue behind the outbox so nothing is reordered.

Commands in flight when the connection closes keep running (a half-done stop
must not be abandoned), and frames already read are still handled; their single
response goes to the outbox and is delivered, with its original id, on the next
connection.  Every command with an id gets exactly one answer with that id as
sent (see ``wire.incoming`` for ids and for frames that cannot be decoded); a
failure of one without an id is reported by an ``error`` frame.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.types import ConnectingRequest
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent.config import AgentConfig
from ctrlagent.errors import ConfigInvalid, CtrlAgentError
from ctrlagent.events import (
    BackupEvent,
    BackupProgress,
    BackupStatusChanged,
    ConsoleOutput,
    ResourceUpdate,
    ServerEvent,
    StatusChanged,
)
from ctrlagent.interfaces import IConsoleConsumer
from ctrlagent.panel.backoff import (
    ReconnectBackoff,
    panel_url,
    without_credentials,
    without_query,
)
from ctrlagent.panel.outbox import (
    CommandIntake,
    ConsoleBatcher,
    Entry,
    Outbox,
    Pending,
    Receipts,
    settle,
)
from ctrlagent.panel.protocol import PanelClientFactory, PanelProtocol
from ctrlagent.wire import frames as outgoing
from ctrlagent.wire import incoming
from ctrlagent.wire.command import ActionResult, IDispatcher, printable
from ctrlagent.wire.json import encode, to_json
from ctrlagent.wire.time import iso_ms
from ctrlagent.work import DeferredTracker, async_to_deferred

# At a stop, how long the Panel has to take the last frames and answer the
# close frame before the connection is aborted (Autobahn's default, one
# second, cut off console lines a busy host had not yet delivered).
CLOSE_TIMEOUT = 5.0

# HTTP statuses that mean "your credentials are wrong", not "try again soon".
_REFUSED_STATUSES = (401, 403)

# Why events had to wait in the outbox, as the log says it.
_DROP_REASONS = {
    "linkDown": "the link is down",
    "panelNotReading": "the Panel is not reading (its socket is backed up)",
    "synchronising": "the link is sending its opening system_info",
}


class EventSource(Protocol):
    """What the link needs from the server manager."""

    def add_listener(self, listener: Callable[[ServerEvent], None]) -> None: ...

    def remove_listener(self, listener: Callable[[ServerEvent], None]) -> None: ...

    def list_servers(self) -> list[Any]: ...


class BackupEventSource(Protocol):
    """What the link needs from the backup manager (``IBackupManager``)."""

    def add_listener(self, listener: Callable[[BackupEvent], None]) -> None: ...

    def remove_listener(self, listener: Callable[[BackupEvent], None]) -> None: ...


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


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """
    The link's endpoint, telling the link why a connection attempt failed
    (``ClientService`` only logs it), so that ``panelLink.lastError`` says.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, failed: Callable[[str], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, protocolFactory: Any) -> Deferred[Any]:  # noqa: N803 (Twisted's name)
        d: Deferred[Any] = self._endpoint.connect(protocolFactory)

        def failed(failure: Any) -> Any:
            if not failure.check(CancelledError):
                self._failed(printable(str(failure.value) or type(failure.value).__name__, 200))
            return failure

        return d.addErrback(failed)


@implementer(IConsoleConsumer)
class _ConsoleConsumer:
    """
    The link as the server manager's event listener: it settles console
    receipts once the kernel has taken their frames (``_Drain``), or when the
    outbox drops them.
    """

    def __init__(self, link: PanelLink) -> None:
        self._link = link

    def __call__(self, event: object) -> None:
        self._link._on_event(cast(ServerEvent, event))


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
    - ``backups``: ``add_listener``/``remove_listener`` of the backup manager,
      whose events become ``backup_progress``/``backup_status_changed`` frames;
    - ``endpoint``: overrides the endpoint built from the URL (tests);
    - ``random``: the jitter source;
    - ``max_in_flight`` / ``max_held_bytes``: the back-pressure bounds of each
      connection's ``CommandIntake`` (frames handled at once; bytes of frames
      waiting for a slot before reading from the Panel pauses); by default
      ``panel.max_in_flight`` / ``panel.max_held_bytes`` of the config.

    ``connected`` is true exactly between ``onOpen`` and ``onClose``;
    ``is_connected()`` is that, or true when the link is disabled.  The link
    is optional (the Panel drives the agent over HTTP): ``/health`` and
    ``/api/status`` report ``state()`` under ``panelLink`` and never let it
    make the node look offline.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        dispatcher: IDispatcher,
        servers: EventSource,
        system_info: Callable[[], Awaitable[object]],
        load: Callable[[], Awaitable[object]],
        *,
        endpoint: IStreamClientEndpoint | None = None,
        random: Callable[[], float] = random.random,
        max_in_flight: int | None = None,
        max_held_bytes: int | None = None,
        tracker: DeferredTracker | None = None,
        backups: BackupEventSource | None = None,
    ) -> None:
        super().__init__()
        self.setName("panel-link")
        self._backups = backups
        self.max_in_flight = (
            config.panel.max_in_flight if max_in_flight is None else max_in_flight
        )
        self.max_held_bytes = (
            config.panel.max_held_bytes if max_held_bytes is None else max_held_bytes
        )
        self._reactor = reactor
        self._config = config
        self._panel = config.panel
        self._dispatcher = dispatcher
        self._servers = servers
        self._system_info = system_info
        self._load = load
        # The link's share of the agent's background work (tap.py passes a scope).
        self._tracker = tracker if tracker is not None else DeferredTracker()

        self._dials = self._panel.dials()
        # Without a URL the link never dials; Autobahn still wants one to build on.
        self.url = panel_url(self._panel.url.strip() or "ws://localhost/", config.node_id)
        self._log_url = without_query(self.url)
        # What state() reports: "disabled", "connecting" (dialling, no failure
        # yet), "connected", "disconnected" (since a failure or a close).
        self._state = "connecting" if self._dials else "disabled"
        self._state_since: float | None = None
        self._last_error: str | None = None
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
            # Batches of many servers due within half a window of each other
            # leave together: one reactor wake for them, not one per server.
            slack=self._panel.console_batch_window / 2,
        )

        self._protocol: PanelProtocol | None = None
        self._ready = False  # system_info sent, outbox flushed, snapshot sent
        self._paused = False  # the transport asked us to stop writing
        self._opened_at = 0.0
        self._heartbeat: LoopingCall | None = None
        # Ids of commands running now (by JSON type and value): one answer per id.
        self._in_flight: set[tuple[str, Any]] = set()
        self._intakes: set[CommandIntake] = set()
        self._reported: dict[str, str] = {}  # server id -> status the Panel was told
        self._drop_warned = False
        self.connections = 0  # successful opens, for tests and diagnostics
        # The manager's acknowledging console consumer (IConsoleConsumer),
        # registered from the start: the manager's own start may already
        # read console lines, and none may count as delivered without it.
        self.consumer = _ConsoleConsumer(self)
        self._listening = False

        self.factory = PanelClientFactory(self, self.url, reactor)
        self.factory.setProtocolOptions(
            openHandshakeTimeout=self._panel.open_handshake_timeout,
            autoPingInterval=self._panel.auto_ping_interval,
            autoPingTimeout=self._panel.auto_ping_timeout,
            closeHandshakeTimeout=CLOSE_TIMEOUT,
            maxMessagePayloadSize=self._panel.max_message_bytes,
            # The link decodes every frame itself and answers a text frame that
            # is not UTF-8 with an error frame, instead of Autobahn failing the
            # whole connection (1007) over one bad frame.
            utf8validateIncoming=False,
        )
        if endpoint is None:
            endpoint = self._endpoint_for(self.url)
        self._client = ClientService(
            _ObservedEndpoint(endpoint, self._connect_failed),
            self.factory,
            retryPolicy=self.backoff,
            clock=reactor,
        )
        self._client.setServiceParent(self)
        if self._dials:
            self._listen()

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
        """The link is up, or there is no link to be up (disabled)."""
        return self.connected or not self._dials

    def state(self) -> dict[str, Any]:
        """
        The link's own state for ``/health`` and ``/api/status`` (``panelLink``):
        ``{enabled, connected, state, url, lastError, since}``; ``url`` without
        its query (which may carry a token), ``since`` when ``state`` began.
        """
        since = self._state_since
        return {
            "enabled": self._dials,
            "connected": self.connected,
            "state": self._state,
            "url": without_credentials(self.url) if self._dials else None,
            "lastError": self._last_error,
            "since": iso_ms(since) if since is not None else None,
        }

    def _set_state(self, state: str, error: str | None = None) -> None:
        if error is not None:
            self._last_error = error
        if state != self._state or self._state_since is None:
            self._state = state
            self._state_since = self._reactor.seconds()

    def _connect_failed(self, reason: str) -> None:
        """A TCP (or TLS) connection attempt failed: the link is down, and why."""
        if self._protocol is None:
            self._set_state("disconnected", "could not connect: " + reason)

    def stats(self) -> dict[str, Any]:
        """Diagnostics: link state, outbox depth and losses, failed handshakes, intake."""
        self._intakes = {i for i in self._intakes if i.open or not i.idle()}
        current = self._protocol.intake if self._protocol is not None else None
        return {
            "connected": self.connected,
            "connections": self.connections,
            "outbox": len(self.outbox),
            "answersQueued": self.outbox.answers,
            "dropped": self.outbox.dropped_total,
            "failedHandshakes": self.backoff.failed_handshakes,
            "commandsInFlight": sum(i.in_flight for i in self._intakes),
            "framesHeld": sum(len(i.held) for i in self._intakes),
            "heldBytes": sum(i.held_bytes for i in self._intakes),
            "readingPaused": bool(current is not None and current.reading_paused),
            "readPauses": sum(i.read_pauses for i in self._intakes),
        }

    # --- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        if not self._dials:
            # Still a service in the tree, so the composition root stays uniform;
            # it simply never dials.
            service.Service.startService(self)
            self.log.info("Panel WebSocket link disabled")
            return
        self._listen()
        self._set_state("connecting")
        self.log.info("dialling the Panel at {url}", url=self._log_url)
        super().startService()

    def _listen(self) -> None:
        if not self._listening:
            self._listening = True
            self._servers.add_listener(self.consumer)
            if self._backups is not None:
                self._backups.add_listener(self._on_backup_event)

    @async_to_deferred
    async def stopService(self) -> None:  # noqa: N802 (Twisted hook)
        if not self._dials:
            service.Service.stopService(self)
            return
        self._servers.remove_listener(self.consumer)
        if self._backups is not None:
            self._backups.remove_listener(self._on_backup_event)
        self._listening = False
        self._batcher.flush_all()
        if self._protocol is not None:
            # A clean close frame first, so the Panel sees "going away" rather
            # than a dropped TCP connection (Autobahn only lets applications send 1000
            # or 3000-4999, so not 1001); ClientService then closes TCP.
            self._protocol.sendClose(1000, "agent shutting down")
        await super().stopService()
        unstarted = sum(intake.discard_held() for intake in self._intakes)
        if unstarted:
            self.log.info(
                "{count} frames read from the Panel were not started: the agent is stopping",
                count=unstarted,
            )
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
        intake = protocol.intake = CommandIntake(
            protocol.transport,
            lambda payload, done: self._handle_frame(protocol, payload, done),
            max_in_flight=self.max_in_flight,
            max_held_bytes=self.max_held_bytes,
        )
        self._intakes.add(intake)
        self.backoff.opened()
        self._set_state("connected")
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
            self._set_state(
                "disconnected",
                "the Panel refused the handshake with HTTP {}".format(status)
                if refused
                else "WebSocket handshake failed ({})".format(
                    printable(reason or "no reason given", 200)
                ),
            )
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
        if protocol.intake is not None:
            protocol.intake.closed()
        if protocol.drain is not None:
            # Console frames the kernel never took go out first on the next
            # connection (answers written meanwhile are not tracked).
            self.outbox.put_back(protocol.drain.take_unsent())
        self._protocol = None
        self._ready = False
        self._paused = False
        self._set_state(
            "disconnected",
            "closed with code {} ({})".format(code, printable(reason or "no reason given", 200)),
        )
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
        """One message from the Panel: into the connection's intake (back-pressure)."""
        intake = protocol.intake
        if intake is None:
            # Autobahn delivers messages only once open; be safe anyway.
            self._handle_frame(protocol, payload, lambda: None)
            return
        intake.receive(payload)

    def _handle_frame(
        self, protocol: PanelProtocol, payload: bytes, done: Callable[[], None]
    ) -> None:
        """Decode one message and answer it; ``done`` once the answer is handed over."""
        message = incoming.parse_frame(payload)
        if isinstance(message, incoming.CommandFrame):
            self._start_command(message, done)
        elif isinstance(message, incoming.PingFrame):
            self._tracker.run(self._answer_ping(protocol, message.ping_id, done), "answer a ping")
        elif isinstance(message, incoming.SystemInfoRequest):
            self._tracker.run(self._answer_system_info(protocol, done), "send system_info")
        elif isinstance(message, incoming.InvalidCommand):
            self._answer_invalid(message, done)
        else:
            self.log.debug(
                "ignored a frame from the Panel ({reason}, type {frame_type})",
                reason=message.reason,
                frame_type=printable(message.frame_type, 60),
            )
            done()

    def _answer_invalid(self, message: incoming.InvalidCommand, done: Callable[[], None]) -> None:
        """A frame that cannot run: a response with its id, or an ``error`` frame without one."""
        self.log.warn(  # noqa: G010
            "unusable frame {command_id} from the Panel: {code} {error}",
            command_id=printable(message.command_id, 80),
            code=message.error.code,
            error=printable(message.error.message),
        )
        now = self._reactor.seconds()
        if message.command_id is not None:
            frame = outgoing.response_for_error(
                message.command_id, message.error, now, id_field=message.id_field
            )
        else:
            frame = outgoing.error_frame(message.error, now, frameType=message.legacy)
        self._emit_answer((self._encode_answer(frame, message.command_id, message.id_field),), done)

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

    async def _gather(
        self, source: Callable[[], Awaitable[object]], what: str
    ) -> dict[str, Any]:
        """
        Call ``source`` (Deferred or coroutine), waiting at most ``timeouts.host_info``.
        A failure is a warning naming ``what`` and an empty dict: the Panel
        still gets its frame, with what the agent knows.
        """
        # maybeDeferred wraps a returned coroutine, so both kinds of callable work.
        d: Deferred[Any] = maybeDeferred(source)
        try:
            result = await d.addTimeout(self._config.timeouts.host_info, self._reactor)
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn("could not {what}: {error}", what=what, error=str(e))  # noqa: G010
            return {}
        # A record (``wire.node``) or a plain mapping: read as its JSON object.
        result = to_json(result)
        return dict(result) if isinstance(result, Mapping) else {}

    async def _send_system_info(self, protocol: PanelProtocol) -> None:
        # The Panel needs a system_info to list the node, even an empty one.
        info = await self._gather(self._system_info, "gather system information")
        if protocol is self._protocol:
            frame = outgoing.system_info(info, self._config.node_id, self._reactor.seconds())
            protocol.send_frame(encode(frame))

    async def _answer_system_info(self, protocol: PanelProtocol, done: Callable[[], None]) -> None:
        """The answer to a ``system_info_request`` (for this connection only)."""
        try:
            info = await self._gather(self._system_info, "gather system information")
            frame = outgoing.system_info(info, self._config.node_id, self._reactor.seconds())
            self._emit_answer((encode(frame),), done, connection=protocol)
        except BaseException:
            done()  # no answer coming: free the slot
            raise

    def _flush_outbox(self, protocol: PanelProtocol) -> None:
        if not protocol.is_writable():
            # Closing: everything stays queued for the next connection.
            return
        dropped, reasons = self.outbox.take_drops()
        self._drop_warned = False
        if dropped:
            self.log.warn(  # noqa: G010
                "{dropped} Panel events were dropped while they waited ({why}; outbox holds "
                "{size} events); no answer was dropped",
                dropped=dropped,
                why=", ".join(
                    "{}: {}".format(_DROP_REASONS.get(reason, reason), count)
                    for reason, count in sorted(reasons.items())
                ),
                size=self.outbox.size,
            )
            frame = outgoing.events_dropped(
                self._config.node_id, dropped, self._reactor.seconds(), reasons
            )
            protocol.send_frame(encode(frame))
        while (
            self.outbox
            and not self._paused
            and protocol is self._protocol
            and protocol.is_writable()
        ):
            entry, on_sent, receipts = self.outbox.pop_group()
            self._write(protocol, entry, receipts)
            if on_sent is not None:
                on_sent()

    def _send_snapshot(self, protocol: PanelProtocol) -> None:
        """The current state of every server, as status changes from what the Panel last heard."""
        now = self._reactor.seconds()
        # Rebuilt from the manager's list, so deleted servers are forgotten.
        reported: dict[str, str] = {}
        for status in self._listing():
            if not isinstance(status, Mapping):
                continue
            server_id = status.get("serverId")
            current = status.get("status")
            if not isinstance(server_id, str) or not isinstance(current, str):
                continue
            previous = self._reported.get(server_id, current)
            reported[server_id] = current
            container_id = status.get("containerId")
            frames = outgoing.status_changed_frames(
                server_id,
                previous,
                current,
                now,
                container_id=container_id if isinstance(container_id, str) else None,
                with_legacy=self._panel.legacy_frames,
            )
            for frame in frames:
                protocol.send_frame(encode(frame))
        self._reported = reported

    def _listing(self) -> list[Any]:
        """
        The manager's servers as the Panel sees them (``serverId``, ``status``,
        ``containerId``), whether it returns records or mappings.
        """
        listing = to_json(self._servers.list_servers())
        return listing if isinstance(listing, list) else []

    def _send_heartbeat(self, protocol: PanelProtocol) -> None:
        if protocol is self._protocol:
            frame = outgoing.heartbeat(self._config.node_id, self._reactor.seconds())
            protocol.send_frame(encode(frame))

    async def _answer_ping(
        self, protocol: PanelProtocol, ping_id: Any, done: Callable[[], None]
    ) -> None:
        try:
            load = await self._gather(self._load, "measure the system load for a pong")
            active = sum(
                1
                for status in self._listing()
                if isinstance(status, Mapping) and status.get("status") in ("running", "starting")
            )
            frame = outgoing.pong(
                ping_id, self._reactor.seconds(), active_servers=active, system_load=load
            )
            self._emit_answer((encode(frame),), done, connection=protocol)
        except BaseException:
            done()  # no answer coming: free the slot
            raise

    # --- commands ---------------------------------------------------------------------------

    def _start_command(self, frame: incoming.CommandFrame, done: Callable[[], None]) -> None:
        command = frame.command
        if command.command_id is not None:
            key = incoming.id_key(command.command_id)
            if key in self._in_flight:
                # One final response per id: a retransmitted command is already
                # being answered.
                self.log.warn(  # noqa: G010
                    "command {command_id} is already running; duplicate ignored",
                    command_id=printable(command.command_id, 80),
                )
                done()
                return
            self._in_flight.add(key)
        self._tracker.run(
            self._run_command(frame, done), "Panel command " + printable(command.action, 60)
        )

    async def _run_command(self, frame: incoming.CommandFrame, done: Callable[[], None]) -> None:
        try:
            await self._answer_command(frame, done)
        except BaseException:
            done()  # no answer coming (cancelled at shutdown): free the slot
            raise

    async def _answer_command(
        self, frame: incoming.CommandFrame, done: Callable[[], None]
    ) -> None:
        """Dispatch ``frame``'s command and hand over its single answer."""
        command = frame.command
        command_id = command.command_id
        action = printable(command.action, 60)
        error: CtrlAgentError | None = None
        try:
            try:
                result = await maybeDeferred(self._dispatcher.dispatch, command)
            except CtrlAgentError as e:
                self.log.info(
                    "command {action} {command_id} failed: {code} {message}",
                    action=action,
                    command_id=printable(command_id, 80),
                    code=e.code,
                    message=printable(e.message),
                )
                error = e
                reply = outgoing.response_for_error(
                    command_id, e, self._reactor.seconds(), id_field=frame.id_field
                )
            except CancelledError:
                raise
            except Exception:
                self.log.failure(
                    "command {action} {command_id} raised an unexpected error",
                    action=action,
                    command_id=printable(command_id, 80),
                )
                error = CtrlAgentError("internal error running " + command.action[:100])
                reply = outgoing.response_for_error(
                    command_id, error, self._reactor.seconds(), id_field=frame.id_field
                )
            else:
                if isinstance(result, Mapping):
                    result = ActionResult(data=dict(result))
                elif not isinstance(result, ActionResult):
                    result = ActionResult()
                reply = outgoing.response_success(
                    command_id, result, self._reactor.seconds(), id_field=frame.id_field
                )
        finally:
            if command_id is not None:
                self._in_flight.discard(incoming.id_key(command_id))
        if command_id is None:
            # Nothing to correlate a reply with.  A command without an id
            # wants none, but a legacy frame (they come without one) is
            # answered in the shape its Panel reads (file_content,
            # server_status), and a failure is reported rather than lost.
            if error is None:
                if frame.legacy is None:
                    done()
                    return
                reply = self._legacy_answer(
                    frame, result if isinstance(result, ActionResult) else ActionResult()
                )
                self._emit_answer(
                    (self._encode_answer(reply, command_id, frame.id_field),), done
                )
                return
            reply = outgoing.error_frame(
                error,
                self._reactor.seconds(),
                action=command.action,
                serverId=command.server_id,
                frameType=frame.legacy,
            )
        self._emit_answer((self._encode_answer(reply, command_id, frame.id_field),), done)

    def _legacy_answer(self, frame: incoming.CommandFrame, result: ActionResult) -> dict[str, Any]:
        """The frame answering a legacy typed frame that worked (``wire.frames.legacy_answer``)."""
        command = frame.command
        data = to_json(result.data)
        server_id = data.get("serverId") if isinstance(data, Mapping) else None
        if not isinstance(server_id, str):
            server_id = command.server_id
        status = None
        for listed in self._listing():
            if isinstance(listed, Mapping) and listed.get("serverId") == server_id:
                current = listed.get("status")
                status = current if isinstance(current, str) else None
        return outgoing.legacy_answer(
            frame.legacy or "", data, command.params, server_id, self._reactor.seconds(),
            status=status,
        )

    def _encode_answer(self, frame: dict[str, Any], command_id: Any, id_field: str) -> bytes:
        """
        ``frame`` encoded; should that ever fail, an ``EXECUTION_ERROR``
        answer with the same id instead, so the command is still answered once.
        """
        try:
            return encode(frame)
        except Exception as e:
            self.log.warn(  # noqa: G010
                "could not encode the answer to {command_id} ({error}); answering EXECUTION_ERROR",
                command_id=printable(command_id, 80),
                error=printable(repr(e)),
            )
            return encode(
                outgoing.response_failure(
                    command_id,
                    "EXECUTION_ERROR",
                    "the answer could not be encoded",
                    self._reactor.seconds(),
                    id_field=id_field,
                )
            )

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
                    outgoing.frames_for_status(event, with_legacy=self._panel.legacy_frames)
                )
            elif isinstance(event, ResourceUpdate):
                if self._link_down(self._protocol):
                    # The link is down: figures queued now would be stale when
                    # it is back (the servers are then sampled at the live
                    # rate again, from the stats hub's next tick), and would
                    # crowd console lines out of the outbox.
                    return
                self._emit_frames(
                    outgoing.resource_frames(
                        event,
                        self._reactor.seconds(),
                        status=self._reported.get(event.server_id),
                        with_legacy=self._panel.legacy_frames,
                    )
                )
        except Exception:
            self.log.failure("could not forward a server event to the Panel")
            if isinstance(event, ConsoleOutput) and event.receipt is not None:
                event.receipt()  # never to be sent: dropped

    def _on_backup_event(self, event: BackupEvent) -> None:
        """Listener registered with the backup manager; must never raise into it."""
        try:
            now = self._reactor.seconds()
            if isinstance(event, BackupProgress):
                self._emit_frames([outgoing.backup_progress(event, now)])
            elif isinstance(event, BackupStatusChanged):
                self._emit_frames([outgoing.backup_status_changed(event, now)])
        except Exception:
            self.log.failure("could not forward a backup event to the Panel")

    def _console_batch(
        self, server_id: str, stream: str, lines: list[str], timestamp: float, receipts: Receipts
    ) -> None:
        legacy = self._panel.legacy_frames

        def frames() -> Entry:
            return tuple(
                encode(frame)
                for frame in outgoing.console_frames(
                    server_id, stream, lines, timestamp, with_legacy=legacy
                )
            )

        # Encoded when written: now when the Panel is reading, else when the
        # outbox is flushed to it (never, for lines the outbox drops).
        self._emit(frames, receipts)

    def _emit_frames(self, frames: list[dict[str, Any]]) -> None:
        self._emit(tuple(encode(frame) for frame in frames))

    @staticmethod
    def _link_down(protocol: PanelProtocol | None) -> bool:
        """No connection, or one that is closing (nothing written to it arrives)."""
        return protocol is None or not protocol.is_writable()

    def _can_send_now(self, protocol: PanelProtocol | None) -> bool:
        return (
            protocol is not None
            and self._ready
            and not self._paused
            and not self.outbox
            and protocol.is_writable()
        )

    def _write(self, protocol: PanelProtocol, entry: Pending, receipts: Receipts) -> None:
        """Send an event's frames; its receipts settle once the kernel took them."""
        if not isinstance(entry, tuple):
            try:
                entry = entry()
            except Exception:
                self.log.failure("could not encode console lines for the Panel")
                settle(receipts)  # never to be sent: dropped
                return
        for data in entry:
            protocol.send_frame(data)
        if receipts:
            if protocol.drain is not None:
                protocol.drain.expect(entry, receipts)
            else:
                settle(receipts)

    def _emit(self, entry: Pending, receipts: Receipts = ()) -> None:
        """An event: send now when the link is up and draining, else queue behind the outbox."""
        protocol = self._protocol
        if protocol is not None and self._can_send_now(protocol):
            self._write(protocol, entry, receipts)
            return
        if self._link_down(protocol):
            reason = "linkDown"
        elif not self._ready:
            reason = "synchronising"
        else:
            reason = "panelNotReading"
        if self.outbox.append(entry, reason, receipts) and not self._drop_warned:
            self._drop_warned = True
            self.log.warn(  # noqa: G010
                "Panel outbox full ({size} events) while {why}: dropping the oldest events "
                "(answers are never dropped)",
                size=self.outbox.size,
                why=_DROP_REASONS[reason],
            )

    def _emit_answer(
        self,
        entry: Entry,
        done: Callable[[], None],
        *,
        connection: PanelProtocol | None = None,
    ) -> None:
        """
        An answer: never dropped while it can still mean something.  Sent now
        when possible, else queued (``done`` runs once it is handed over, which
        is what frees its intake slot).  A ``connection``-bound answer (pong,
        system_info) is dropped once that connection is closing or gone.
        """
        protocol = self._protocol
        if connection is not None and (connection is not protocol or not connection.is_writable()):
            done()
            return
        if protocol is not None and self._can_send_now(protocol):
            for data in entry:
                protocol.send_frame(data)
            done()
            return
        self.outbox.append_answer(entry, done)
