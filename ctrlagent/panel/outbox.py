"""
What the link holds between the agent and the Panel's socket, with the bounds
that keep it small whatever the Panel does:

- the ``Outbox``: frames produced while the link is down or the socket is not
  draining.  Answers (responses, pongs, error frames) are never dropped; events
  are bounded, oldest dropped first and counted under the reason they waited
  (the link was down, or the Panel was not reading);
- the ``ConsoleBatcher``: console lines grouped per server into a few frames so
  that a flooding server cannot flood the Panel (a batch's lines are not
  delivered before it goes out);
- one ``CommandIntake`` per connection: back-pressure on the reader.  At most
  ``max_in_flight`` frames are handled at once (an answer that cannot be
  delivered keeps its slot), later ones wait undecoded, and reading from the
  transport pauses while too many bytes wait, so a burst of commands is
  answered in full with bounded memory.

Console receipts (``ctrlagent.servers.delivery``) travel with their frames and
are settled (``settle``) once the kernel took them or they were dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ctrlagent.events import ConsoleOutput

# Frame groups: one logical event may be several frames (the event plus its
# legacy twin); they are queued, dropped and sent together.
Entry = tuple[bytes, ...]
# A queued event group, or what makes it: console lines queued while the
# link is down are encoded when they go out, not as they come (most are
# dropped unencoded when the outbox overflows during a long outage).
Pending = Entry | Callable[[], Entry]
# The console receipts a frame group settles once it is delivered or dropped
# (``ctrlagent.servers.delivery``).
Receipts = tuple[Callable[[], None], ...]


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
        self._events: deque[tuple[int, Pending, Receipts]] = deque()
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

    def append(self, entry: Pending, reason: str = "linkDown", receipts: Receipts = ()) -> bool:
        """Queue an event group; True when an older one was dropped to make room."""
        if self.size <= 0:
            self._count_drop(reason)
            settle(receipts)
            return True
        dropped = False
        if len(self._events) >= self.size:
            self._count_drop(reason)
            settle(self._events.popleft()[2])
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
                settle(receipts)
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

    def pop_group(self) -> tuple[Pending, Callable[[], None] | None, Receipts]:
        """The oldest queued group, event or answer, with its ``on_sent`` and receipts."""
        if self._answers and (not self._events or self._answers[0][0] < self._events[0][0]):
            _, answer, on_sent = self._answers.popleft()
            return answer, on_sent, ()
        _, event, receipts = self._events.popleft()
        return event, None, receipts

    def pop_next(self) -> tuple[Pending, Callable[[], None] | None]:
        """The oldest queued group with its ``on_sent`` callback (receipts: the caller's)."""
        entry, on_sent, _ = self.pop_group()
        return entry, on_sent

    def popleft(self) -> Pending:
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


def settle(receipts: Receipts) -> None:
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
    seconds have passed since its first line (at most ``slack`` seconds
    more: batches of many servers due within ``slack`` of each other go out
    on one timer, in one reactor wake), when the stream changes (so
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
        slack: float = 0.0,
    ) -> None:
        self._clock = clock
        self._max_lines = max(1, max_lines)
        self._window = window
        self._slack = max(0.0, slack)
        self._deliver = deliver
        self._pending: dict[str, _Batch] = {}
        # When each pending batch is due, in the order the batches began:
        # with one window for all, that is the order they are due in, so one
        # timer (for the first) serves every server, not a timer per line.
        self._due: dict[str, float] = {}
        self._timer: IDelayedCall | None = None

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
        if server_id in self._pending and server_id not in self._due:
            self._due[server_id] = self._clock.seconds() + self._window
            if self._timer is None:
                self._timer = self._clock.callLater(self._window + self._slack, self._expire)

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
        self._due.pop(server_id, None)
        if not self._due and self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """Deliver every batch whose window is over; wait for the next one."""
        self._timer = None
        now = self._clock.seconds()
        while self._due:
            server_id, due = next(iter(self._due.items()))
            if due > now + 1e-6:
                self._timer = self._clock.callLater(due - now + self._slack, self._expire)
                return
            self.flush(server_id)

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
