"""
When a console line counts as delivered, and how that survives a SIGKILL.

A server's *mark* is the engine's nanosecond stamp of the newest console line
delivered plus how many lines carried exactly that stamp (two lines may share
a nanosecond).  A restarted agent replays the engine's log after the mark
(``MarkFilter``), so a mark that runs ahead of delivery loses lines and one
that lags behind repeats them.  Three rules keep it exact.

**Delivered means handed to the kernel.**  With a Panel link, a line is
delivered once the frame carrying it has left the agent: its bytes were taken
by the kernel on the Panel's socket.  The link is the manager's *acknowledging
consumer* (``IConsoleConsumer``): every ``ConsoleOutput`` it gets carries a
``receipt``, which the link settles when Twisted's write buffer has drained
after the frame was written (a pull producer on the socket's transport, see
``ctrlagent.panel.link``).  Lines waiting in the link's batcher, its outbox or
Twisted's buffer are not delivered: a SIGKILL loses them with the process and
the restart replays them from the engine.  Events the outbox drops (only while the
link is down or the Panel is not reading; counted and reported to the Panel as
``events_dropped``) are settled as dropped, so a mark never stalls behind
them.  Console frames still in Twisted's buffer when a connection fails are
sent first on the next one.  The link registers as the consumer when it is
built, before the manager starts reading consoles; once it has left (the
agent is stopping), nothing counts as delivered any more.  Without a Panel
link, handing a line to the event listeners is delivering it.

"Taken by the kernel" is as far as the agent can know: the protocol has no
acknowledgement of events, so bytes the kernel took and a failing network
then lost are not sent again.

**In order.**  ``MarkLedger`` keeps, per server, the marks of the events handed
on, in order.  Receipts may be settled in any order; the delivered mark only
advances over the settled prefix.  Lines the flood throttle kept from the
listeners enter settled: they are never sent, and the mark passes them once
everything before them is delivered.

**Durable at once.**  Every advance is appended to ``MarkJournal`` in the same
call that settled it: one small ``os.write`` to a file in the state directory,
without fsync.  A SIGKILLed process cannot lose a write the kernel took (the
page cache belongs to the kernel, not to the process); only a power cut can,
and then the store's copy, written in the background every
``servers.console_mark_interval`` seconds, takes over: some lines repeat, none
is lost.  On start each server's mark is the newer of the two, and the
journal is rewritten compactly; it is compacted again (written aside, then
renamed over) whenever it grows.  Every record carries a CRC: a torn last
record (a SIGKILL in the middle of a write), a damaged record or a file that
is not a journal at all is skipped with one warning, never fatal; the store's
mark then stands.

**The one window.**  The kernel takes a frame (``send``) and then the
journal record (``write``): two system calls in one Python call, with no
reactor turn between them.  A SIGKILL landing between the two repeats, after
the restart, the lines of the console events that send completed (an event
cut across frames by the batcher repeats whole); the opposite order would
lose them instead.  The window is microseconds of the agent's time, but a
busy host's scheduler may run another process in it (a loopback Panel's
reader, which the send woke) for a few milliseconds.  On a plain ``ws://``
link frames are settled send by send, with the collector held off from the
send to the settlement (``ctrlagent.panel.protocol._Drain``), so a Panel that
reads slowly does not widen the window: when the kernel takes Twisted's
buffer a part at a time, each send settles the frames it took whole.  Under
TLS they settle when that buffer is empty, so a SIGKILL while a slow Panel
lets the buffer fill can repeat the frames of several sends.  Every case
errs on the side of a repeat, never a loss.
"""

from __future__ import annotations

import binascii
import functools
import json
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ctrlagent.events import ConsoleOutput, EventListener, ServerEvent
from ctrlagent.interfaces import IConsoleConsumer

# (engine nanosecond of the newest delivered line, lines carrying exactly it)
Mark = tuple[int, int]

JOURNAL_NAME = "console-marks.journal"
_HEADER = b"ctrlagent console marks 1\n"
# Read at most this much of a journal at start (a healthy one is compacted
# long before); the newest records are at its end.
MAX_JOURNAL_READ = 16 * 1024 * 1024
# Compact once the journal has grown past this (or past 8 times its compact size).
COMPACT_AFTER = 256 * 1024
_MAX_NS = 2**63 - 1


class _Entry:
    """One event's mark, waiting for its receipt."""

    __slots__ = ("mark", "settled")

    def __init__(self, mark: Mark, settled: bool) -> None:
        self.mark = mark
        self.settled = settled


class MarkLedger:
    """
    Per server, the marks of console events handed on and not yet settled.

    ``on_advance(server_id, mark)`` is called, in the call that settled it,
    whenever a server's delivered mark moves forward: the newest mark of the
    settled prefix of its queue.
    """

    def __init__(self, on_advance: Callable[[str, Mark], None]) -> None:
        self._on_advance = on_advance
        self._queues: dict[str, deque[_Entry]] = {}

    def pending(self, server_id: str) -> int:
        """How many of the server's events are handed on and not yet settled."""
        queue = self._queues.get(server_id)
        return len(queue) if queue is not None else 0

    def expect(self, server_id: str, mark: Mark) -> Callable[[], None]:
        """Queue an event's ``mark``; returns its receipt (call it once delivered or dropped)."""
        entry = _Entry(mark, False)
        queue = self._queues.get(server_id)
        if queue is None:
            queue = self._queues[server_id] = deque()
        queue.append(entry)

        def settle() -> None:
            if entry.settled:
                return
            entry.settled = True
            if self._queues.get(server_id) is queue:
                self._advance(server_id, queue)

        return settle

    def passed(self, server_id: str, mark: Mark) -> None:
        """A mark with nothing to deliver (throttled lines): settled once all before it are."""
        queue = self._queues.get(server_id)
        if not queue:
            self._on_advance(server_id, mark)
            return
        queue.append(_Entry(mark, True))

    def forget(self, server_id: str) -> None:
        """The server is gone: its unsettled entries never advance anything."""
        self._queues.pop(server_id, None)

    def _advance(self, server_id: str, queue: deque[_Entry]) -> None:
        newest: Mark | None = None
        while queue and queue[0].settled:
            newest = queue.popleft().mark
        if not queue:
            del self._queues[server_id]
        if newest is not None:
            self._on_advance(server_id, newest)


@functools.lru_cache(maxsize=8192)
def _record_head(server_id: str) -> bytes:
    """``["id",`` of a server's journal records (encoded once per server, not per line)."""
    return b"[" + json.dumps(server_id).encode("ascii") + b","


def encode_record(server_id: str, mark: Mark) -> bytes:
    """One journal line: ``["id",ns,count] crc32`` (the JSON of ``[id, ns, count]``)."""
    payload = _record_head(server_id) + b"%d,%d]" % (mark[0], mark[1])
    return payload + b" %08x\n" % binascii.crc32(payload)


def decode_record(line: bytes) -> tuple[str, Mark] | None:
    """The record of one journal line, or None when it is not a sound one."""
    payload, _, crc = line.rpartition(b" ")
    if not payload or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != binascii.crc32(payload):
            return None
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list) or len(value) != 3:
        return None
    server_id, ns, count = value
    if (
        not isinstance(server_id, str)
        or type(ns) is not int
        or type(count) is not int
        or not 0 <= ns <= _MAX_NS
        or not 0 <= count <= _MAX_NS
    ):
        return None
    return server_id, (ns, count)


def parse_journal(data: bytes) -> tuple[dict[str, Mark], int, bool]:
    """
    ``(marks, bad records, has header)`` of a journal's bytes: for each
    server its last sound record (a later record supersedes, including a
    reset to ``(0, 0)`` when the server was deleted).
    """
    marks: dict[str, Mark] = {}
    bad = 0
    header = data.startswith(_HEADER)
    if header:
        data = data[len(_HEADER):]
    for line in data.split(b"\n"):
        if not line:
            continue
        record = decode_record(line)
        if record is None:
            bad += 1
            continue
        marks[record[0]] = record[1]
    return marks, bad, header


class MarkJournal:
    """
    The append-only journal of delivered marks (see the module docstring).

    Never raises: a journal that cannot be read, written or compacted is
    reported once (``log``) and the store's marks stand.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = 0
        self._compact_size = 0
        self._torn = False  # the last write may have left half a record
        self._failing = False

    @property
    def usable(self) -> bool:
        """True while the journal is open for appending."""
        return self._fd is not None

    def load(self) -> dict[str, Mark]:
        """The marks the journal holds (``{}`` when it is missing or unusable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn_unreadable(e.strerror or str(e))
            return {}
        try:
            size = os.fstat(fd).st_size
            skipped = max(0, size - MAX_JOURNAL_READ)
            if skipped:
                os.lseek(fd, skipped, os.SEEK_SET)
            chunks = []
            left = size - skipped
            while left > 0:
                chunk = os.read(fd, min(left, 1024 * 1024))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as e:
            self._warn_unreadable(e.strerror or str(e))
            return {}
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if skipped:
            # Start at the first whole record of what was read.
            data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
        marks, bad, header = parse_journal(data)
        if data and not header and not marks and not skipped:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "console marks journal {path} is not a journal; it is ignored and rewritten"
                " (the store's marks stand)",
                path=self.path,
            )
        elif bad:
            self.log.warn(  # noqa: G010
                "console marks journal {path}: {bad} damaged or torn record(s) skipped"
                " (the store's marks stand for them)",
                path=self.path,
                bad=bad,
            )
        if skipped:
            self.log.warn(  # noqa: G010
                "console marks journal {path} is {size} bytes; only its last {read} were read",
                path=self.path,
                size=size,
                read=MAX_JOURNAL_READ,
            )
        return marks

    def _warn_unreadable(self, why: str) -> None:
        self.log.warn(  # noqa: G010
            "console marks journal {path} cannot be read ({why}); the store's marks stand",
            path=self.path,
            why=why,
        )

    def open(self, marks: dict[str, Mark]) -> None:
        """Start a fresh journal holding ``marks`` (compaction), then append to it."""
        self.compact(marks)
        if self._fd is None:
            try:
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                )
                self._size = os.fstat(self._fd).st_size
                self._torn = True  # whatever ends the old file, start on a new line
            except OSError as e:
                self._fd = None
                self.log.warn(  # noqa: G010
                    "console marks journal {path} cannot be opened ({why}): console marks"
                    " are kept in the store only, so a SIGKILL may repeat recent lines",
                    path=self.path,
                    why=e.strerror or str(e),
                )

    def record(self, server_id: str, mark: Mark) -> None:
        """Append ``mark`` for ``server_id`` now (one write; no fsync)."""
        if self._fd is None:
            return
        data = encode_record(server_id, mark)
        if self._torn:
            data = b"\n" + data
        self._write(data)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError as e:
            # Part of a record may be on disk: the next one starts on a new line.
            self._torn = True
            if not self._failing:
                self._failing = True
                self.log.warn(  # noqa: G010
                    "console marks journal {path} cannot be written ({why}): marks are kept"
                    " in the store only until it can, so a SIGKILL may repeat recent lines",
                    path=self.path,
                    why=e.strerror or str(e),
                )
            return
        self._torn = False
        if self._failing:
            self._failing = False
            self.log.info("console marks journal {path} is written again", path=self.path)

    def due(self) -> bool:
        """True when the journal has grown enough to be compacted."""
        return self._fd is not None and self._size > max(COMPACT_AFTER, 8 * self._compact_size)

    def compact(self, marks: dict[str, Mark]) -> None:
        """
        Replace the journal with one record per server (written aside, then
        renamed over it: a SIGKILL leaves the old journal or the new one).
        """
        body = _HEADER + b"".join(encode_record(sid, mark) for sid, mark in marks.items())
        tmp = self.path + ".tmp"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            )
        except OSError as e:
            _unlink_quietly(tmp)
            if not self._failing:
                self._failing = True
                self.log.warn(  # noqa: G010
                    "console marks journal {path} cannot be compacted ({why})",
                    path=self.path,
                    why=e.strerror or str(e),
                )
            if self._fd is not None:
                # Keep appending to the old one; try again when it has grown.
                self._compact_size = self._size
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = self._compact_size = len(body)
        self._torn = False
        if self._failing:
            self._failing = False
            self.log.info("console marks journal {path} is written again", path=self.path)

    def close(self) -> None:
        """Stop appending (what was written stays)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def newer(a: Mark | None, b: Mark | None) -> Mark:
    """The later of two marks (marks only ever advance; None is no mark)."""
    if a is None:
        return b if b is not None else (0, 0)
    if b is None:
        return a
    return max(a, b)



class EventBus:
    """
    The listeners of the servers' events (the Panel link, tests).

    At most one of them is the acknowledging console consumer
    (``IConsoleConsumer``), which settles console receipts.  A listener added
    with ``console=False`` gets every event but the console's (at hundreds
    of servers, a call per line saved for each).  A failing listener is
    logged and the others still get the event.  ``dead``: the
    agent died (tests' SIGKILL), nothing is published any more.
    """

    log = Logger()

    def __init__(self) -> None:
        self.listeners: list[EventListener] = []
        # Those of them that get console events, in the same order.
        self.console_listeners: list[EventListener] = []
        self.consumer: Any = None
        # Once a consumer was there and left (the agent is stopping), nothing
        # counts as delivered any more.
        self.had_consumer = False
        self.dead = False

    def add(self, listener: Any, console: bool = True) -> None:
        """
        Subscribe ``listener`` (at most one acknowledging consumer, which
        gets console events whatever ``console`` says).
        """
        if IConsoleConsumer.providedBy(listener):
            if self.consumer is not None and self.consumer is not listener:
                raise RuntimeError("the manager already has an acknowledging console consumer")
            self.consumer = listener
            self.had_consumer = True
            console = True
        if listener in self.listeners:
            return
        self.listeners.append(listener)
        if console:
            self.console_listeners.append(listener)

    def remove(self, listener: Any) -> None:
        """Unsubscribe (a consumer's unsettled lines then count as not delivered)."""
        if listener is self.consumer:
            self.consumer = None
        if listener in self.listeners:
            self.listeners.remove(listener)
        if listener in self.console_listeners:
            self.console_listeners.remove(listener)

    def emit(self, event: ServerEvent) -> None:
        """Publish an event to every listener; a failing listener is logged."""
        if self.dead:
            return
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                self.log.failure("event listener failed")

    def fan_out(self, events: list[ConsoleOutput]) -> None:
        """Publish console events; a receipt the failing consumer took is settled as dropped."""
        for event in events:
            for listener in list(self.console_listeners):
                try:
                    listener(event)
                except Exception:
                    self.log.failure("event listener failed")
                    if listener is self.consumer and event.receipt is not None:
                        # It will never settle it: count those lines as dropped
                        # rather than hold every later mark back.
                        event.receipt()


class ConsoleDelivery:
    """
    Console events out to the listeners, and the marks of what was delivered
    recorded: at once in the journal, in the background in the store (one
    write in flight, whatever queued meanwhile next, at most every
    ``interval`` seconds).  Only the servers ``serve`` named have marks.
    """

    log = Logger()

    def __init__(
        self, bus: EventBus, journal: MarkJournal, store: Any, clock: Any, interval: float
    ) -> None:
        self.bus = bus
        self.journal = journal
        self.store = store
        self.clock = clock
        self.interval = interval
        self.ledger = MarkLedger(self._delivered)
        self.delivered_marks: dict[str, Mark] = {}
        self._served: set[str] = set()
        self.pending_marks: dict[str, Mark] = {}
        self._writing = False
        self._mark_timer: IDelayedCall | None = None
        self._last_mark_write = -1e18
        self._flushing = False
        self.closed = False
        self._idle_waiters: list[Deferred[None]] = []
        # True while console mark writes fail (reported once per episode).
        self._marks_failing = False

    def serve(self, server_id: str) -> None:
        """``server_id``'s marks are recorded from now on."""
        self._served.add(server_id)

    def load(self, server_id: str, stored: Mark, journal: dict[str, Mark]) -> Mark:
        """
        A loaded server's mark: the newer of the store's and the journal's
        (the store catches up when the journal is ahead: a SIGKILL).
        """
        mark = newer(stored, journal.get(server_id))
        if mark[0]:
            self.delivered_marks[server_id] = mark
            if mark != stored:
                self.pending_marks[server_id] = mark
        return mark

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
        bus = self.bus
        if bus.dead:
            return
        consumer = bus.consumer
        if consumer is not None:
            ledger = self.ledger
            for event, event_mark in zip(events, marks, strict=True):
                if event_mark is not None and event_mark[0]:
                    event.receipt = ledger.expect(server_id, event_mark)
        bus.fan_out(events)
        if mark is not None and mark[0] and (consumer is not None or not bus.had_consumer):
            self.ledger.passed(server_id, mark)

    def _delivered(self, server_id: str, mark: Mark) -> None:
        """The ledger advanced: record the mark now (journal), and soon (store)."""
        if self.bus.dead or self.closed or server_id not in self._served:
            return
        if mark <= self.delivered_marks.get(server_id, (0, 0)):
            return
        self.delivered_marks[server_id] = mark
        self.journal.record(server_id, mark)
        if self.journal.due():
            self.journal.compact(self.delivered_marks)
        self.pending_marks[server_id] = mark
        self.schedule()

    def forget(self, server_id: str) -> None:
        """A deleted server: no mark of it may outlive it (its id can come back)."""
        self._served.discard(server_id)
        self.ledger.forget(server_id)
        self.pending_marks.pop(server_id, None)
        if self.delivered_marks.pop(server_id, None) is not None:
            self.journal.record(server_id, (0, 0))

    def schedule(self) -> None:
        """Copy the pending marks to the store: at once, or when the interval is up."""
        if self._writing or self._mark_timer is not None or not self.pending_marks:
            return
        if self.bus.dead or self.closed:
            return
        wait = self._last_mark_write + self.interval
        delay = wait - self.clock.seconds()
        if delay > 0 and not self._flushing:
            self._mark_timer = self.clock.callLater(delay, self._write_marks)
        else:
            self._write_marks()

    def _write_marks(self) -> None:
        """One store transaction of every pending mark; the next one queues behind it."""
        self._mark_timer = None
        marks, self.pending_marks = self.pending_marks, {}
        served = self._served
        changes = {sid: mark for sid, mark in marks.items() if sid in served}
        if not changes or self.bus.dead:
            self._release_idle()
            return
        self._writing = True
        self._last_mark_write = self.clock.seconds()
        try:
            d = self.store.update_marks(changes)
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
            if self.bus.dead:
                return
            self.schedule()
            self._release_idle()

        d.addBoth(written)

    def _release_idle(self) -> None:
        if self._writing or self._mark_timer is not None:
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def flush(self) -> None:
        """Copy every pending mark to the store now and wait for it (shutdown)."""
        self._flushing = True
        if self._mark_timer is not None:
            if self._mark_timer.active():
                self._mark_timer.cancel()
            self._mark_timer = None
        self.schedule()
        if self._writing:
            waiter: Deferred[None] = Deferred()
            self._idle_waiters.append(waiter)
            await waiter

    def die(self) -> None:
        """The agent died (tests' SIGKILL): timers dropped, pending marks lost to the store."""
        self.bus.dead = True
        if self._mark_timer is not None and self._mark_timer.active():
            self._mark_timer.cancel()
        self._mark_timer = None
        self.pending_marks.clear()
        self.journal.close()
