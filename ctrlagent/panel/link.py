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
- the ``Outbox``: frames produced while the link is down or the socket is not
  draining.  Answers (responses, pongs, error frames) are never dropped; events
  are bounded, oldest dropped first and counted under the reason they waited
  (the link was down, or the Panel was not reading);
- one ``_Drain`` per connection: a pull producer on the socket's transport
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
sent (see ``messages`` for ids and for frames that cannot be decoded); a
failure of one without an id is reported by an ``error`` frame.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from ctrlagent import __version__
from ctrlagent.config import AgentConfig
from ctrlagent.errors import ConfigInvalid, CtrlAgentError
from ctrlagent.events import ConsoleOutput, ResourceUpdate, ServerEvent, StatusChanged
from ctrlagent.interfaces import IConsoleConsumer
from ctrlagent.wire import frames as messages
from ctrlagent.wire import incoming
from ctrlagent.wire.command import ActionResult, IDispatcher, printable
from ctrlagent.wire.json import encode
from ctrlagent.work import DeferredTracker

# Frame groups: one logical event may be several frames (the event plus its
# legacy twin); they are queued, dropped and sent together.
Entry = tuple[bytes, ...]
# The console receipts a frame group settles once it is delivered or dropped
# (``ctrlagent.servers.delivery``).
Receipts = tuple[Callable[[], None], ...]

# How long gathering system_info / the load for a pong may take before the
# link sends what it has.
_INFO_TIMEOUT = 5.0

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
    FIFO of frame groups waiting for the Panel, of two kinds.

    - Answers (responses, pongs, ``error`` frames) are never dropped: their
      number is bounded by the link's in-flight cap instead, which stops
      reading commands while answers cannot be delivered.  Each may carry an
      ``on_sent`` callback, called once it has been handed to a transport.
    - Events are bounded by ``size``: when full, the oldest event is dropped
      and counted under the reason it had to wait (``linkDown``,
      ``panelNotReading``, ``synchronising``).  Recent state matters more than
      old, and the snapshot after a reconnect repairs any lost status.  An
      event may carry console receipts; a dropped event's receipts are
      settled at once (its lines will never be delivered, and the Panel is
      told how many events were dropped).

    Both kinds leave in the order they came.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._events: deque[tuple[int, Entry, Receipts]] = deque()
        self._answers: deque[tuple[int, Entry, Callable[[], None] | None]] = deque()
        self._seq = 0
        self._front = 0  # sequence numbers of groups put back before all others
        self.dropped = 0  # since the last take_dropped()
        self.dropped_total = 0
        self.dropped_reasons: dict[str, int] = {}  # since the last take_dropped()

    def __len__(self) -> int:
        return len(self._events) + len(self._answers)

    @property
    def events(self) -> int:
        """How many event groups are queued."""
        return len(self._events)

    @property
    def answers(self) -> int:
        """How many answers are queued."""
        return len(self._answers)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _count_drop(self, reason: str) -> None:
        self.dropped += 1
        self.dropped_total += 1
        self.dropped_reasons[reason] = self.dropped_reasons.get(reason, 0) + 1

    def append(self, entry: Entry, reason: str = "linkDown", receipts: Receipts = ()) -> bool:
        """Queue an event group; True when an older one was dropped to make room."""
        if self.size <= 0:
            self._count_drop(reason)
            _settle(receipts)
            return True
        dropped = False
        if len(self._events) >= self.size:
            self._count_drop(reason)
            _settle(self._events.popleft()[2])
            dropped = True
        self._events.append((self._next(), entry, receipts))
        return dropped

    def put_back(self, groups: list[tuple[Entry, Receipts]], reason: str = "linkDown") -> int:
        """
        Queue ``groups`` (in their order) before everything queued: they were
        written to a connection that failed before the kernel took them.
        Returns how many of them the bound dropped at once.
        """
        dropped = 0
        for entry, receipts in reversed(groups):
            if self.size <= 0 or len(self._events) >= self.size:
                # Full of newer events: the oldest (these) go first.
                self._count_drop(reason)
                _settle(receipts)
                dropped += 1
                continue
            # Below every sequence number queued (those start at 1), and
            # below earlier put-backs: these were taken out after them.
            self._front -= 1
            self._events.appendleft((self._front, entry, receipts))
        return dropped

    def append_answer(self, entry: Entry, on_sent: Callable[[], None] | None = None) -> None:
        """Queue an answer; never dropped."""
        self._answers.append((self._next(), entry, on_sent))

    def pop_group(self) -> tuple[Entry, Callable[[], None] | None, Receipts]:
        """The oldest queued group, event or answer, with its ``on_sent`` and receipts."""
        if self._answers and (not self._events or self._answers[0][0] < self._events[0][0]):
            _, entry, on_sent = self._answers.popleft()
            return entry, on_sent, ()
        _, entry, receipts = self._events.popleft()
        return entry, None, receipts

    def pop_next(self) -> tuple[Entry, Callable[[], None] | None]:
        """The oldest queued group with its ``on_sent`` callback (receipts: the caller's)."""
        entry, on_sent, _ = self.pop_group()
        return entry, on_sent

    def popleft(self) -> Entry:
        """The oldest queued group (its ``on_sent`` callback is the caller's to run)."""
        return self.pop_group()[0]

    def take_drops(self) -> tuple[int, dict[str, int]]:
        """How many event groups were dropped since the last call, and why."""
        dropped, reasons = self.dropped, self.dropped_reasons
        self.dropped, self.dropped_reasons = 0, {}
        return dropped, reasons

    def take_dropped(self) -> int:
        """How many event groups were dropped since the last call."""
        return self.take_drops()[0]


def _settle(receipts: Receipts) -> None:
    """Settle console receipts (lines delivered, or dropped for good)."""
    for receipt in receipts:
        receipt()


class _Batch:
    """The pending console lines of one server and stream."""

    __slots__ = ("stream", "lines", "stamps", "receipts")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.lines: list[str] = []
        # (index of an event's first line, its timestamp): each frame is
        # stamped with its own first line's time, at a cost per event.
        self.stamps: list[tuple[int, float]] = []
        # (index after an event's last line, its receipt): the receipt goes
        # with the frame that carries that last line.
        self.receipts: list[tuple[int, Callable[[], None]]] = []


class ConsoleBatcher:
    """
    Groups console lines into batches per server.

    A batch is delivered when it holds ``max_lines`` lines, when ``window``
    seconds have passed since its first line, when the stream changes (so
    stdout/stderr interleaving survives), or when ``flush`` is called (before a
    status change of the same server, so a crash's last lines precede it).
    A batch never goes out with more than ``max_lines`` lines: a larger event
    is cut into several.  An event's console receipt goes out with the frame
    that carries its last line (``deliver``'s last argument); an event
    without lines settles its receipt at once.
    """

    def __init__(
        self,
        clock: Any,
        max_lines: int,
        window: float,
        deliver: Callable[[str, str, list[str], float, Receipts], None],
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
            if event.receipt is not None:
                event.receipt()
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
        if event.receipt is not None:
            batch.receipts.append((len(batch.lines), event.receipt))
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
            rest.receipts = [(end - cut, r) for end, r in batch.receipts if end > cut]
            self._pending[server_id] = rest
        else:
            self._drop(server_id)

    def _send(self, server_id: str, batch: _Batch, end: int) -> None:
        """Deliver the batch's first ``end`` lines in frames of at most ``max_lines``."""
        size, lines, receipts = self._max_lines, batch.lines, batch.receipts
        taken = 0
        for start in range(0, end, size):
            stop = min(start + size, end)
            first = taken
            while taken < len(receipts) and receipts[taken][0] <= stop:
                taken += 1
            settles = tuple(r for _, r in receipts[first:taken])
            self._deliver(
                server_id, batch.stream, lines[start:stop], _stamp_at(batch.stamps, start), settles
            )

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


@implementer(IPullProducer)
class _Drain:
    """
    Learns when the bytes written to one connection have left the agent.

    Registered as a pull (non-streaming) producer on the connection's lowest
    transport, the TCP socket's (below TLS): Twisted calls ``resumeProducing``
    each time that transport's write buffer has been emptied into the kernel.
    The console frames written before then have been taken by the kernel,
    unless bytes still wait above that buffer (Autobahn's send queue, TLS's
    buffers; see ``_held_above``): their receipts are settled then, in the
    same call (``ctrlagent.servers.delivery``).  Frames not taken when the
    connection fails are put back at the head of the outbox by the link.

    It is also the write flow control: past ``high_water`` bytes written and
    not yet drained, the link queues events in its outbox (``writes_paused``)
    until the next drain (``writes_resumed``).  A pull producer keeps a
    transport from closing, so it lets go once the transport is closing.
    """

    log = Logger()

    def __init__(self, link: PanelLink, protocol: PanelProtocol) -> None:
        self._link = link
        self._protocol = protocol
        self.socket: Any = _socket_transport(protocol.transport)
        self.high_water = int(getattr(self.socket, "bufferSize", 0) or 65536)
        self.unsent = 0  # bytes written since the last drain
        self.groups: list[tuple[Entry, Receipts]] = []  # console frames written, not yet taken
        self.paused = False
        self.registered = False

    def start(self) -> None:
        """Register with the socket's transport (it calls ``resumeProducing`` at once)."""
        try:
            self.socket.registerProducer(self, False)
        except Exception as e:
            # Never expected (the link registers nothing else there); without
            # drain reports a frame counts as delivered once written.
            self.log.warn(  # noqa: G010
                "cannot watch the Panel connection's write buffer ({error}): console lines"
                " count as delivered when written, so a SIGKILL may lose a few",
                error=str(e),
            )
            return
        self.registered = True

    def wrote(self, size: int) -> None:
        """``size`` bytes were written to the connection."""
        self.unsent += size
        if not self.paused and self.registered and self.unsent >= self.high_water:
            self.paused = True
            self._link.writes_paused(self._protocol)

    def expect(self, entry: Entry, receipts: Receipts) -> None:
        """``entry`` was written: settle its receipts once the kernel has it."""
        if self.registered:
            self.groups.append((entry, receipts))
        else:
            _settle(receipts)

    def take_unsent(self) -> list[tuple[Entry, Receipts]]:
        """The frames written and not yet taken by the kernel (the connection failed)."""
        groups, self.groups = self.groups, []
        return groups

    def resumeProducing(self) -> None:
        """The socket's write buffer is empty: what was written is the kernel's."""
        if not _held_above(self._protocol, self.socket):
            groups, self.groups = self.groups, []
            self.unsent = 0
            for _, receipts in groups:
                _settle(receipts)
            if self.paused:
                self.paused = False
                self._link.writes_resumed(self._protocol)
        if self.registered and getattr(self.socket, "disconnecting", False):
            self.registered = False
            self.socket.unregisterProducer()

    def stopProducing(self) -> None:
        """The connection is gone; ``connection_closed`` puts back what was not taken."""
        self.registered = False


def _socket_transport(transport: Any) -> Any:
    """The lowest transport under ``transport`` (below TLS and other protocol wrappers)."""
    for _ in range(16):
        if not isinstance(transport, ProtocolWrapper):
            break
        transport = transport.transport
    return transport


def _held_above(protocol: Any, socket: Any) -> bool:
    """
    True while bytes written to ``protocol`` wait above ``socket``'s buffer,
    where a drain of that buffer says nothing about them.  Those places are
    Autobahn's send queue (used only for chopped or synchronous writes, which
    the link never asks for), TLS's plaintext buffer (data written before the
    handshake or while OpenSSL must read first) and the small-write gathering
    of Twisted's buffering TLS transport (flushed on the next reactor turn).
    The last two are private attributes: ``tests/panel`` pins their names.
    """
    if getattr(protocol, "send_queue", None):
        return True
    layer = getattr(protocol, "transport", None)
    for _ in range(16):
        if layer is None or layer is socket:
            return False
        if getattr(layer, "_appSendBuffer", None):
            return True
        aggregator = getattr(layer, "_aggregator", None)
        if aggregator is not None and getattr(aggregator, "_buffer", None):
            return True
        layer = getattr(layer, "transport", None)
    return False


# What a held frame costs beyond its bytes (the bytes object and its queue
# slot), so that a flood of empty frames is bounded as surely as large ones.
_HELD_FRAME_OVERHEAD = 64


class CommandIntake:
    """
    The frames read from one connection, with back-pressure on its reader.

    At most ``max_in_flight`` frames are being handled at once.  A frame counts
    from the moment it is taken up until its answer has been handed to a
    transport (or, when it needs none, until it is done), so answers that
    cannot be delivered (the Panel is not reading, or the link went down)
    hold slots too.  Frames arriving at the cap are held, undecoded and in
    order; once they add up to ``max_held_bytes`` the intake stops reading
    from the transport (``pauseProducing``), so further frames wait in the
    Panel's TCP buffers, and it reads again once half of that was taken up.

    Pausing takes effect after the transport's current read, whose frames are
    still held: the held bytes stay below ``max_held_bytes`` plus one read.
    Nothing is dropped: frames held when the connection closes are still
    taken up as slots free, their answers going to the outbox for the next
    connection.  ``handle(payload, done)`` must call ``done`` once its answer
    was handed over (extra calls are ignored).
    """

    log = Logger()

    def __init__(
        self,
        transport: Any,
        handle: Callable[[bytes, Callable[[], None]], None],
        *,
        max_in_flight: int,
        max_held_bytes: int,
    ) -> None:
        self._transport = transport
        self._handle = handle
        self.max_in_flight = max(1, max_in_flight)
        self.max_held_bytes = max(1, max_held_bytes)
        self.in_flight = 0
        self.held: deque[bytes] = deque()
        self.held_bytes = 0
        self.reading_paused = False
        self.read_pauses = 0  # how often reading was paused, for tests and diagnostics
        self.open = True
        self._taking = False

    def idle(self) -> bool:
        """Nothing held and nothing in flight."""
        return not self.held and not self.in_flight

    def receive(self, payload: bytes) -> None:
        """One message read from the connection."""
        if self.held or self.in_flight >= self.max_in_flight:
            self.held.append(payload)
            self.held_bytes += len(payload) + _HELD_FRAME_OVERHEAD
            if self.held_bytes >= self.max_held_bytes:
                self._pause_reading()
            return
        self._take(payload)

    def closed(self) -> None:
        """The connection is gone: never touch its transport again."""
        self.open = False
        self.reading_paused = False

    def discard_held(self) -> int:
        """Forget the held frames (shutdown); how many there were."""
        count = len(self.held)
        self.held.clear()
        self.held_bytes = 0
        return count

    def _take(self, payload: bytes) -> None:
        self.in_flight += 1
        finished = False

        def done() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.in_flight -= 1
            self._take_held()

        try:
            self._handle(payload, done)
        except Exception:
            self.log.failure("handling a frame from the Panel failed")
            done()

    def _take_held(self) -> None:
        # Answers are often handed over synchronously, from inside _take: the
        # outermost call does the loop, so the stack stays flat.
        if self._taking:
            return
        self._taking = True
        try:
            while self.held and self.in_flight < self.max_in_flight:
                payload = self.held.popleft()
                self.held_bytes -= len(payload) + _HELD_FRAME_OVERHEAD
                self._take(payload)
        finally:
            self._taking = False
        if self.reading_paused and self.held_bytes <= self.max_held_bytes // 2:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if self.reading_paused or not self.open:
            return
        self.reading_paused = True
        self.read_pauses += 1
        self._transport.pauseProducing()

    def _resume_reading(self) -> None:
        self.reading_paused = False
        if self.open:
            self._transport.resumeProducing()


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


class PanelProtocol(WebSocketClientProtocol):
    """Thin Autobahn protocol: every callback is forwarded to the ``PanelLink``."""

    factory: PanelClientFactory
    intake: CommandIntake | None = None
    drain: _Drain | None = None

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        # Built per attempt so that the credential headers are always current.
        return self.factory.link.connecting_request(self.factory)

    def onOpen(self) -> None:
        self.drain = _Drain(self.factory.link, self)
        self.drain.start()
        self.factory.link.connection_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.link.frame_received(self, payload)

    def unregisterProducer(self) -> None:
        """
        Autobahn calls this as it drops the connection, which would take the
        link's drain off the socket before its last drain: frames already
        taken by the kernel would never be settled, and would be sent again.
        The drain lets go by itself once the transport is closing.
        """

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
        if self.drain is not None:
            self.drain.wrote(len(data))
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
    - ``random``: the jitter source;
    - ``max_in_flight`` / ``max_held_bytes``: the back-pressure bounds of each
      connection's ``CommandIntake`` (frames handled at once; bytes of frames
      waiting for a slot before reading from the Panel pauses).

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
        max_in_flight: int = 128,
        max_held_bytes: int = 8 * 1024 * 1024,
        tracker: DeferredTracker | None = None,
    ) -> None:
        super().__init__()
        self.setName("panel-link")
        self.max_in_flight = max_in_flight
        self.max_held_bytes = max_held_bytes
        self._reactor = reactor
        self._config = config
        self._panel = config.panel
        self._dispatcher = dispatcher
        self._servers = servers
        self._system_info = system_info
        self._load = load
        # The link's share of the agent's background work (tap.py passes a scope).
        self._tracker = tracker if tracker is not None else DeferredTracker()

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
            maxMessagePayloadSize=self._panel.max_message_bytes,
            # The link decodes every frame itself and answers a text frame that
            # is not UTF-8 with an error frame, instead of Autobahn failing the
            # whole connection (1007) over one bad frame.
            utf8validateIncoming=False,
        )
        if endpoint is None:
            endpoint = self._endpoint_for(self.url)
        self._client = ClientService(
            endpoint, self.factory, retryPolicy=self.backoff, clock=reactor
        )
        self._client.setServiceParent(self)
        if self._panel.enabled:
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
        """What ``/health`` reports as ``connected``: the link state, or true when disabled."""
        return self.connected or not self._panel.enabled

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
        if not self._panel.enabled:
            # Still a service in the tree, so the composition root stays uniform;
            # it simply never dials.
            service.Service.startService(self)
            self.log.info("Panel WebSocket link disabled")
            return
        self._listen()
        self.log.info("dialling the Panel at {url}", url=self._log_url)
        super().startService()

    def _listen(self) -> None:
        if not self._listening:
            self._listening = True
            self._servers.add_listener(self.consumer)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if not self._panel.enabled:
            service.Service.stopService(self)
            return
        self._servers.remove_listener(self.consumer)
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
        if protocol.intake is not None:
            protocol.intake.closed()
        if protocol.drain is not None:
            # Console frames the kernel never took go out first on the next
            # connection (answers written meanwhile are not tracked).
            self.outbox.put_back(protocol.drain.take_unsent())
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
            frame = messages.response_for_error(
                message.command_id, message.error, now, id_field=message.id_field
            )
        else:
            frame = messages.error_frame(message.error, now, frameType=message.legacy)
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
        self, source: Callable[[], Awaitable[dict[str, Any]]], what: str
    ) -> dict[str, Any]:
        """
        Call ``source`` (Deferred or coroutine), waiting at most ``_INFO_TIMEOUT``.
        A failure is a warning naming ``what`` and an empty dict: the Panel
        still gets its frame, with what the agent knows.
        """
        # maybeDeferred wraps a returned coroutine, so both kinds of callable work.
        d: Deferred[Any] = maybeDeferred(source)
        try:
            result = await d.addTimeout(_INFO_TIMEOUT, self._reactor)
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn("could not {what}: {error}", what=what, error=str(e))  # noqa: G010
            return {}
        return dict(result) if isinstance(result, Mapping) else {}

    async def _send_system_info(self, protocol: PanelProtocol) -> None:
        # The Panel needs a system_info to list the node, even an empty one.
        info = await self._gather(self._system_info, "gather system information")
        if protocol is self._protocol:
            frame = messages.system_info(info, self._config.node_id, self._reactor.seconds())
            protocol.send_frame(encode(frame))

    async def _answer_system_info(self, protocol: PanelProtocol, done: Callable[[], None]) -> None:
        """The answer to a ``system_info_request`` (for this connection only)."""
        try:
            info = await self._gather(self._system_info, "gather system information")
            frame = messages.system_info(info, self._config.node_id, self._reactor.seconds())
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
            frame = messages.events_dropped(
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
                protocol.send_frame(encode(frame))
        self._reported = reported

    def _send_heartbeat(self, protocol: PanelProtocol) -> None:
        if protocol is self._protocol:
            frame = messages.heartbeat(self._config.node_id, self._reactor.seconds())
            protocol.send_frame(encode(frame))

    async def _answer_ping(
        self, protocol: PanelProtocol, ping_id: Any, done: Callable[[], None]
    ) -> None:
        try:
            load = await self._gather(self._load, "measure the system load for a pong")
            active = sum(
                1
                for status in self._servers.list_servers()
                if isinstance(status, Mapping) and status.get("status") in ("running", "starting")
            )
            frame = messages.pong(
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
                reply = messages.response_for_error(
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
                reply = messages.response_for_error(
                    command_id, error, self._reactor.seconds(), id_field=frame.id_field
                )
            else:
                if isinstance(result, Mapping):
                    result = ActionResult(data=dict(result))
                elif not isinstance(result, ActionResult):
                    result = ActionResult()
                reply = messages.response_success(
                    command_id, result, self._reactor.seconds(), id_field=frame.id_field
                )
        finally:
            if command_id is not None:
                self._in_flight.discard(incoming.id_key(command_id))
        if command_id is None:
            # Nothing to correlate a reply with (legacy frames come without an
            # id), but a failure is still reported rather than lost.
            if error is None:
                done()
                return
            reply = messages.error_frame(
                error,
                self._reactor.seconds(),
                action=command.action,
                serverId=command.server_id,
                frameType=frame.legacy,
            )
        self._emit_answer((self._encode_answer(reply, command_id, frame.id_field),), done)

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
                messages.response_failure(
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
            if isinstance(event, ConsoleOutput) and event.receipt is not None:
                event.receipt()  # never to be sent: dropped

    def _console_batch(
        self, server_id: str, stream: str, lines: list[str], timestamp: float, receipts: Receipts
    ) -> None:
        try:
            frames = messages.console_frames(
                server_id, stream, lines, timestamp, with_legacy=self._panel.legacy_frames
            )
            entry = tuple(encode(frame) for frame in frames)
        except Exception:
            self.log.failure("could not encode console lines for the Panel")
            _settle(receipts)  # never to be sent: dropped
            return
        self._emit(entry, receipts)

    def _emit_frames(self, frames: list[dict[str, Any]]) -> None:
        self._emit(tuple(encode(frame) for frame in frames))

    def _can_send_now(self, protocol: PanelProtocol | None) -> bool:
        return (
            protocol is not None
            and self._ready
            and not self._paused
            and not self.outbox
            and protocol.is_writable()
        )

    def _write(self, protocol: PanelProtocol, entry: Entry, receipts: Receipts) -> None:
        """Send an event's frames; its receipts settle once the kernel took them."""
        for data in entry:
            protocol.send_frame(data)
        if receipts:
            if protocol.drain is not None:
                protocol.drain.expect(entry, receipts)
            else:
                _settle(receipts)

    def _emit(self, entry: Entry, receipts: Receipts = ()) -> None:
        """An event: send now when the link is up and draining, else queue behind the outbox."""
        protocol = self._protocol
        if protocol is not None and self._can_send_now(protocol):
            self._write(protocol, entry, receipts)
            return
        if protocol is None or not protocol.is_writable():
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
