"""
A server's console: the ring buffer of recent lines, the flood throttle, and
the pipeline that follows the container's output (``ConsolePipeline``).

Both are reactor-free except for an injected ``IReactorTime`` (the throttle
schedules its once-per-interval notice), so unit tests drive them with
``twisted.internet.task.Clock``.

The buffer keeps *every* line (it is the history the Panel asks for and the
crash report's tail); the throttle only limits what is fanned out to
subscribers, which is where a flooding server would cost the agent and the
Panel link most.  Dropped lines are counted and reported once per interval.

Console output comes from the engine's kept output (``IContainerEngine.
output``), not from a plain attach: each line (``LogLine``) carries the
engine's nanosecond timestamp, which is the line's identity across agent
restarts.  The pipeline hands
lines on at once (``ConsoleDelivery``), which records the *mark* of what was
delivered (for the Panel link: what the kernel took; see
``ctrlagent.servers.delivery``); a re-attach after an agent restart replays
``output(since_ns=mark - 1 s)`` dropping the lines the mark covers
(``MarkFilter``): lines printed while the agent was down, or not yet
delivered when it died, are delivered, none twice, none lost.

When the container dies, ``catch_up`` delivers what it printed after the
mark up to the end of its output before the death is reported, whatever
came first: the death, the re-attach of a restarted agent, or the end of
the followed stream (see its docstring).
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import groupby
from operator import attrgetter
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ctrlagent.engine.interface import IContainerEngine, ILogStream, IStdinPipe, LogLine
from ctrlagent.errors import Conflict, EngineError, InvalidInput, NotFound
from ctrlagent.events import ConsoleOutput, console_stamp
from ctrlagent.records import record

# Bounds of the per-server console settings (``console:settings:update``).
HISTORY_MIN, HISTORY_MAX = 10, 100_000
THROTTLE_LINES_MAX = 1_000_000
THROTTLE_INTERVAL_MIN, THROTTLE_INTERVAL_MAX = 0.1, 60.0


@dataclass(frozen=True)
class ConsoleSettings:
    """
    One server's console settings, applied live to its ``ConsolePipeline``
    and kept in the store (``console_settings``):

    - ``history_size``: lines the console buffer keeps (the history the
      Panel reads, the replay after an agent restart, a crash report's tail);
    - ``throttle_lines`` per ``throttle_interval`` seconds: the lines handed
      on to the Panel at most (0: no throttle); every line is still kept in
      the history;
    - ``timestamps``: each line the Panel gets, and each line of the
      history, starts with its time (``[HH:MM:SS] ``, UTC).
    """

    history_size: int
    throttle_lines: int
    throttle_interval: float
    timestamps: bool = False

    def to_wire(self) -> dict[str, object]:
        """The Panel's shape: ``{historySize, throttleLines, throttleInterval, timestamps}``."""
        return {"historySize": self.history_size, "throttleLines": self.throttle_lines,
                "throttleInterval": self.throttle_interval, "timestamps": self.timestamps}

    def changed(self, raw: object) -> ConsoleSettings:
        """
        These settings with the keys of ``raw`` (the Panel's ``settings``
        object, or a stored one) changed, each checked; unknown keys are
        refused, all named, and nothing changes.
        """
        if not isinstance(raw, Mapping):
            raise InvalidInput("settings must be an object", field="settings")
        unknown = sorted(str(k) for k in raw if k not in _SETTING_KEYS)
        if unknown:
            raise InvalidInput(
                "unknown console settings: {} (known: {})".format(
                    ", ".join(unknown), ", ".join(_SETTING_KEYS)),
                field="settings", details={"unknown": unknown, "known": list(_SETTING_KEYS)})
        changes: dict[str, Any] = {_SETTING_KEYS[key]: _setting(key, value)
                                   for key, value in raw.items()}
        return replace(self, **changes)


_SETTING_KEYS = {"historySize": "history_size", "throttleLines": "throttle_lines",
                 "throttleInterval": "throttle_interval", "timestamps": "timestamps"}


def _setting(key: str, value: object) -> object:
    where = "settings.{}".format(key)
    if key == "timestamps":
        if not isinstance(value, bool):
            raise InvalidInput("{} must be true or false".format(where), field=where)
        return value
    if key == "throttleInterval":
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not THROTTLE_INTERVAL_MIN <= value <= THROTTLE_INTERVAL_MAX):
            raise InvalidInput("{} must be a number of seconds from {:g} to {:g}".format(
                where, THROTTLE_INTERVAL_MIN, THROTTLE_INTERVAL_MAX), field=where)
        return float(value)
    low, high = (HISTORY_MIN, HISTORY_MAX) if key == "historySize" else (0, THROTTLE_LINES_MAX)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput("{} must be a whole number from {} to {}".format(where, low, high),
                           field=where)
    return value


# The prefix of a line printed at ``at`` when timestamps are on.
stamp = console_stamp


# One is built for every console line of a flooding server: a record (frozen
# for mypy, a plain slotted dataclass at run time; ctrlagent.records).
@record
class ConsoleLine:
    """
    A console line the engine did not stamp: an agent notice, an install
    line, a line without the engine's time.  The engine's own lines are kept
    as they come (``LogLine``, with the same ``at``/``stream``/``text``/``ns``).
    """

    at: float  # seconds since the epoch
    stream: str  # stdout | stderr | agent | install
    text: str
    ns: int = 0  # the engine's nanosecond timestamp; 0 when it gave none


# A line of the console buffer: the engine's own, or one the agent made.
Line = ConsoleLine | LogLine


# The streams a console line can come from, by their code in ``ConsoleBuffer``.
_STREAMS: list[str] = ["stdout", "stderr", "agent", "install"]
_CODES: dict[str, int] = {name: code for code, name in enumerate(_STREAMS)}
# A line's code has this bit when the agent made it (no engine timestamp):
# its ``ns`` slot then holds the bits of its ``at`` (a float).
_MADE = 0x80
_FLOAT_BITS = struct.Struct("=d")
_INT_BITS = struct.Struct("=q")


def _at_bits(at: float) -> int:
    """``at`` as the stamp of a line the agent made (its float's bits)."""
    bits: int = _INT_BITS.unpack(_FLOAT_BITS.pack(at))[0]
    return bits


def _bits_at(bits: int) -> float:
    """The ``at`` that ``_at_bits`` gave ``bits``."""
    at: float = _FLOAT_BITS.unpack(_INT_BITS.pack(bits))[0]
    return at


def _code(stream: str) -> int:
    """The code of ``stream`` (streams are the agent's own names, never input)."""
    code = _CODES.get(stream)
    if code is None:
        if len(_STREAMS) >= _MADE:
            raise ValueError("too many console stream names")
        code = _CODES[stream] = len(_STREAMS)
        _STREAMS.append(stream)
    return code


def _encode(lines: list[Line]) -> tuple[list[str], array[int], bytearray]:
    """The texts, stamps and codes of ``lines`` (``ConsoleBuffer``'s three rings)."""
    texts = [line.text for line in lines]
    stamps = array("q", [line.ns for line in lines])
    try:
        codes = bytearray([_CODES[line.stream] for line in lines])
    except KeyError:
        codes = bytearray([_code(line.stream) for line in lines])
    if 0 in stamps:
        # Lines without the engine's time keep their own ``at``.
        for i, ns in enumerate(stamps):
            if not ns:
                stamps[i] = _at_bits(lines[i].at)
                codes[i] |= _MADE
    return texts, stamps, codes


class ConsoleBuffer:
    """
    A bounded ring buffer of the latest console lines of one server.

    It holds no line objects: a line's text, its engine timestamp and its
    stream code sit in three parallel rings (a list of the texts, an
    ``array`` of the stamps, a ``bytearray`` of the codes).  At 500 servers
    keeping 1,000 lines each, line objects cost about 160 bytes a line and
    every full collection walked all of them; this costs the text and 17
    bytes, and the collector sees one list per server.  ``tail`` and
    iteration build the lines again (``LogLine``, or ``ConsoleLine`` for the
    lines the agent made), equal to those put in.
    """

    def __init__(self, size: int) -> None:
        self._size = max(1, size)
        self._texts: list[str] = []
        self._ns = array("q")
        self._codes = bytearray()
        self._start = 0  # where the oldest line sits once the rings are full
        self.last_activity: float | None = None
        self.clears = 0  # how many times it was emptied

    def __len__(self) -> int:
        return len(self._texts)

    def __iter__(self) -> Iterator[Line]:
        return iter(self.tail(len(self._texts)))

    @property
    def capacity(self) -> int:
        """How many lines the buffer holds at most."""
        return self._size

    def append(self, line: Line) -> None:
        """Add a line, dropping the oldest when full."""
        ns, code = line.ns, _CODES.get(line.stream)
        if code is None:
            code = _code(line.stream)
        if not ns:
            ns = _at_bits(line.at)
            code |= _MADE
        self.last_activity = line.at
        texts = self._texts
        if len(texts) < self._size:
            texts.append(line.text)
            self._ns.append(ns)
            self._codes.append(code)
            return
        start = self._start
        texts[start] = line.text
        self._ns[start] = ns
        self._codes[start] = code
        self._start = (start + 1) % self._size

    def extend(self, lines: list[Line]) -> None:
        """Add lines in order, dropping the oldest when full."""
        if len(lines) <= 2:
            # An idle server's usual batch: one line.
            for line in lines:
                self.append(line)
            return
        self.last_activity = lines[-1].at
        self._put(*_encode(lines))

    def prepend(self, lines: list[Line]) -> None:
        """Put older lines in front of those held (the newest are kept when it overflows)."""
        if not lines:
            return
        texts, stamps, codes = _encode(lines)
        held = self._last(len(self._texts))
        texts += held[0]
        stamps += held[1]
        codes += held[2]
        size = self._size
        self._texts, self._ns, self._codes = texts[-size:], stamps[-size:], codes[-size:]
        self._start = 0
        if self.last_activity is None:
            self.last_activity = lines[-1].at

    def _put(self, texts: list[str], stamps: array[int], codes: bytearray) -> None:
        size, count = self._size, len(texts)
        if count >= size:
            self._texts, self._ns, self._codes = texts[-size:], stamps[-size:], codes[-size:]
            self._start = 0
            return
        room = size - len(self._texts)
        if room > 0:
            if count <= room:
                self._texts.extend(texts)
                self._ns.extend(stamps)
                self._codes.extend(codes)
                return
            self._texts.extend(texts[:room])
            self._ns.extend(stamps[:room])
            self._codes.extend(codes[:room])
            texts, stamps, codes = texts[room:], stamps[room:], codes[room:]
            count -= room
        # Full: overwrite the oldest, wrapping round the end once at most.
        start = self._start
        first = min(count, size - start)
        self._texts[start:start + first] = texts[:first]
        self._ns[start:start + first] = stamps[:first]
        self._codes[start:start + first] = codes[:first]
        rest = count - first
        if rest:
            self._texts[:rest] = texts[first:]
            self._ns[:rest] = stamps[first:]
            self._codes[:rest] = codes[first:]
        self._start = (start + count) % size

    def _last(self, count: int) -> tuple[list[str], array[int], bytearray]:
        """The rings' last ``count`` entries, oldest first."""
        total = len(self._texts)
        count = min(count, total)
        if count <= 0:
            return [], array("q"), bytearray()
        begin = (self._start + total - count) % total
        end = begin + count
        if end <= total:
            return self._texts[begin:end], self._ns[begin:end], self._codes[begin:end]
        end -= total
        return (self._texts[begin:] + self._texts[:end], self._ns[begin:] + self._ns[:end],
                self._codes[begin:] + self._codes[:end])

    def tail(self, count: int) -> list[Line]:
        """The last ``count`` lines, oldest first."""
        texts, stamps, codes = self._last(count)
        lines: list[Line] = []
        for text, ns, code in zip(texts, stamps, codes, strict=True):
            if code & _MADE:
                lines.append(ConsoleLine(_bits_at(ns), _STREAMS[code & ~_MADE], text, 0))
            else:
                lines.append(LogLine(ns, _STREAMS[code], text))
        return lines

    def texts(self, count: int, stamped: bool = False) -> list[str]:
        """The texts of the last ``count`` lines, oldest first; ``stamped``: each after its time."""
        if not stamped:
            return self._last(count)[0]
        return [stamp(line.at) + line.text for line in self.tail(count)]

    def clear(self) -> None:
        """Forget every line."""
        self._texts, self._ns, self._codes = [], array("q"), bytearray()
        self._start = 0
        self.clears += 1

    def resize(self, size: int) -> None:
        """Keep at most ``size`` lines from now on (the newest, when it shrinks)."""
        size = max(1, size)
        if size != self._size:
            texts, stamps, codes = self._last(size)
            self._size = size
            self._texts, self._ns, self._codes = texts, stamps, codes
            self._start = 0


class ConsoleThrottle:
    """
    Admit at most ``limit`` lines per ``interval`` seconds.

    Lines over the limit are refused and counted; when an interval that
    dropped lines ends, ``on_dropped(count, interval)`` is called once, so a
    flood shows up as one console notice per interval, never silently.
    """

    def __init__(
        self,
        clock: IReactorTime,
        limit: int,
        interval: float,
        on_dropped: Callable[[int, float], None],
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.interval = interval
        self._on_dropped = on_dropped
        self._window_start = -1e18
        self._admitted = 0
        self._dropped = 0
        self.total_dropped = 0
        self._notice: IDelayedCall | None = None

    def admit(self) -> bool:
        """True when the next line may go to subscribers."""
        return self.admit_many(1) == 1

    def admit_many(self, count: int) -> int:
        """How many of the next ``count`` lines may go to subscribers (the first ones)."""
        if self.limit <= 0 or count <= 0:
            return max(count, 0)
        now = self._clock.seconds()
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._admitted = 0
        admitted = min(count, self.limit - self._admitted)
        self._admitted += admitted
        dropped = count - admitted
        if dropped:
            self._dropped += dropped
            self.total_dropped += dropped
            if self._notice is None:
                delay = max(0.0, self._window_start + self.interval - now)
                self._notice = self._clock.callLater(delay, self._report)
        return admitted

    def _report(self) -> None:
        self._notice = None
        count, self._dropped = self._dropped, 0
        if count:
            self._on_dropped(count, self.interval)

    def flush(self) -> None:
        """Report pending drops now (used when the server stops)."""
        if self._notice is not None and self._notice.active():
            self._notice.cancel()
        self._report()

    def restart(self) -> None:
        """Begin a new window now (the rule changed)."""
        self._window_start = -1e18
        self._admitted = 0

    def cancel(self) -> None:
        """Stop the pending notice timer (shutdown); drops are still counted."""
        if self._notice is not None and self._notice.active():
            self._notice.cancel()
        self._notice = None


_STREAM = attrgetter("stream")
Mark = tuple[int, int]


def _marks_at(lines: list[Line], ends: list[int], before: Mark) -> Iterator[Mark]:
    """
    The mark after ``lines[:end]`` for each of ``ends`` (ascending), starting
    from ``before``: the same arithmetic as ``ConsolePipeline.take``.
    """
    mark, count = before
    i = 0
    for end in ends:
        for line in lines[i:end]:
            ns = line.ns
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


# ``catch_up``: how many times it follows an attach that overtook its read.
_CATCH_UP_ROUNDS = 4
# The longest read of a restarted agent's history (``_backfill``).
HISTORY_READ_SECONDS = 60.0


class _Expiry:
    """Closes ``stream`` once ``seconds`` have passed; ``expired`` then says so."""

    def __init__(self, clock: IReactorTime, seconds: float, stream: ILogStream) -> None:
        self.expired = False
        self._stream = stream
        self._timer = clock.callLater(seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._stream.close()

    def cancel(self) -> None:
        """The read ended first."""
        if self._timer.active():
            self._timer.cancel()


Deliver = Callable[[str, list[ConsoleOutput], list["Mark | None"], "Mark | None"], None]


class ConsolePipeline:
    """
    One server's console: the buffer and throttle, the followed output
    stream (recovered from the mark after a restart), and stdin.

    ``deliver`` hands events on (``ConsoleDelivery.deliver``);
    ``startup_seen(lines)`` says whether taken lines finish the start-up and
    ``startup_done()`` is then called once they were handed on.
    """

    log = Logger()

    def __init__(
        self,
        server_id: str,
        *,
        engine: IContainerEngine,
        clock: Any,
        tracker: Any,
        deadlines: Any,
        buffer_lines: int,
        throttle_lines: int,
        throttle_interval: float,
        deliver: Deliver,
        startup_seen: Callable[[list[Line]], bool],
        startup_done: Callable[[], None],
        mark: int = 0,
        mark_count: int = 0,
        history_slots: DeferredSemaphore | None = None,
    ) -> None:
        self.server_id = server_id
        self._engine = engine
        self._clock = clock
        self._tracker = tracker
        self._deadlines = deadlines
        self._deliver = deliver
        self._startup_seen = startup_seen
        self._startup_done = startup_done
        self.buffer = ConsoleBuffer(buffer_lines)
        self.lines_total = 0
        self.throttle = ConsoleThrottle(clock, throttle_lines, throttle_interval, self._dropped)
        self.timestamps = False
        self.mark = mark
        self.mark_count = mark_count
        # What the agent before this one delivered (the mark before anything
        # is followed): a restarted agent reads those lines back into the
        # buffer (history only), once, behind the followed console
        # (``_backfill``).
        self._history_mark: Mark | None = None
        self._history_clears = 0  # the buffer's clears when the mark was taken
        self._history_read = False  # read back, or nothing to read
        self._history_lock = DeferredLock()
        self._history_slots = history_slots
        self._history_stream: ILogStream | None = None
        self._output: ILogStream | None = None
        self._attach_epoch = 0  # bumped by every detach (and so every attach)
        self._output_done: Deferred[None] | None = None
        # One catch-up read at a time (two would deliver the same lines).
        self._catching_up = DeferredLock()
        # The agent stops (or died): nothing is followed or opened any more.
        self.closed = False
        self._stdin: IStdinPipe | None = None
        # Held by a write that (re)opens stdin; later writes queue behind it.
        self._writing = DeferredLock()

    # -- settings ---------------------------------------------------------

    @property
    def settings(self) -> ConsoleSettings:
        """The settings in force."""
        return ConsoleSettings(self.buffer.capacity, self.throttle.limit,
                               self.throttle.interval, self.timestamps)

    def apply(self, settings: ConsoleSettings) -> None:
        """Put ``settings`` in force at once (the next line already follows them)."""
        self.buffer.resize(settings.history_size)
        throttle = self.throttle
        if (throttle.limit, throttle.interval) != (settings.throttle_lines,
                                                   settings.throttle_interval):
            # A new window under the new rule; drops pending are still reported.
            throttle.flush()
            throttle.limit = settings.throttle_lines
            throttle.interval = settings.throttle_interval
            throttle.restart()
        self.timestamps = settings.timestamps

    def _texts(self, lines: list[Line]) -> list[str]:
        if self.timestamps:
            return [stamp(line.at) + line.text for line in lines]
        return [line.text for line in lines]

    # -- lines ------------------------------------------------------------

    def notice(self, text: str) -> None:
        """Write an agent notice into the console (buffer and subscribers)."""
        now = self._clock.seconds()
        line = ConsoleLine(at=now, stream="agent", text="[ctrlagent] " + text)
        self.buffer.append(line)
        self.lines_total += 1
        self._deliver(
            self.server_id, [ConsoleOutput(self.server_id, "agent", self._texts([line]), now)],
            [None], None
        )

    def _dropped(self, count: int, interval: float) -> None:
        self.notice(
            "console throttled: {} lines not forwarded in the last {:g} s".format(count, interval)
        )

    def take(self, batch: list[LogLine], filt: MarkFilter | None) -> None:
        """
        Handle a batch of ``LogLine`` from the followed output stream.

        Every line goes into the buffer; the throttle's share goes out as one
        ``ConsoleOutput`` per run of a stream, each with the mark that covers
        it.  This is the agent's hottest loop under a flood: per line it only
        advances the read position (``self.mark``); the engine's line itself
        goes into the buffer.
        """
        kept: list[Line] = []
        before = (self.mark, self.mark_count)
        mark, mark_count = before
        now: float | None = None
        for line in batch:
            ns = line.ns
            if ns:
                if filt is not None and filt.seen(ns):
                    continue
                if ns > mark:
                    mark, mark_count = ns, 1
                elif ns == mark:
                    mark_count += 1
                kept.append(line)
            else:
                if now is None:
                    now = self._clock.seconds()
                kept.append(ConsoleLine(now, line.stream, line.text, 0))
        self.mark, self.mark_count = mark, mark_count
        self.buffer.extend(kept)
        self.lines_total += len(kept)
        started = self._startup_seen(kept)
        admitted = self.throttle.admit_many(len(kept))
        forwarded = kept if admitted == len(kept) else kept[:admitted]
        events: list[ConsoleOutput] = []
        ends: list[int] = []
        for stream, group in groupby(forwarded, _STREAM):
            lines = list(group)
            events.append(
                ConsoleOutput(
                    self.server_id, stream,
                    [stamp(line.at) + line.text for line in lines] if self.timestamps
                    else [line.text for line in lines],
                    lines[0].at,
                )
            )
            ends.append((ends[-1] if ends else 0) + len(lines))
        if forwarded is kept and len(events) == 1:
            marks: list[Mark | None] = [(mark, mark_count)]
        else:
            marks = list(_marks_at(forwarded, ends, before))
        self._deliver(self.server_id, events, marks, (mark, mark_count))
        if started:
            self._startup_done()

    def take_history(self, batch: list[LogLine], filt: MarkFilter) -> None:
        """
        Lines delivered before an agent restart: history only, no events, in
        front of the lines followed since.

        Exactly those the mark covers (``filt``): a line after it, or one
        sharing its nanosecond beyond the count, comes from the followed
        stream, as new, and must not be in the history twice.
        """
        kept: list[Line] = [line for line in batch if not line.ns or filt.seen(line.ns)]
        self.buffer.prepend(kept)
        self.lines_total += len(kept)

    def history(self, lines: int) -> list[str]:
        """The last ``lines`` console lines (stamped when timestamps are on)."""
        return self.buffer.texts(lines, self.timestamps)

    # -- the followed stream and stdin -------------------------------------

    @property
    def attached(self) -> bool:
        """True while the console stream is being followed."""
        return self._output_done is not None and not self._output_done.called

    @property
    def stdin_connected(self) -> bool:
        """True while stdin is open."""
        return self._stdin is not None and bool(self._stdin.connected)

    async def send_line(self, cid: str, line: str) -> None:
        """Write one line to the container's stdin (opened when needed)."""
        await self._write(cid, lambda pipe: pipe.write_line(line))

    async def send_raw(self, cid: str, data: bytes) -> None:
        """Write ``data`` to the container's stdin as it is, no newline added."""
        await self._write(cid, lambda pipe: pipe.write(data))

    async def _write(self, cid: str, write: Callable[[IStdinPipe], None]) -> None:
        """
        Writes go in the order they are asked: one that finds stdin closed
        opens it again holding ``_writing``, and every write asked meanwhile
        waits its turn behind it (the Panel's commands run side by side: a
        key typed after another must not overtake it).
        """
        pipe = self._stdin
        if pipe is not None and pipe.connected and not self._writing.locked:
            write(pipe)
            return
        async with self._writing:
            pipe = self._stdin
            if pipe is None or not pipe.connected:
                pipe = await self._open_stdin(cid)
            write(pipe)

    async def _open_stdin(self, cid: str) -> IStdinPipe:
        pipe = await self._engine.open_stdin(cid)
        old, self._stdin = self._stdin, pipe
        if old is not None and old is not pipe:
            old.close()
        return pipe

    async def attach(self, cid: str, recover: bool) -> bool:
        """
        Follow the container's console and open stdin; False when a newer
        attach (or a detach) overtook this one.

        ``recover``: after an agent restart, new lines are followed from the
        mark, and the history up to the mark is read back behind them into
        the buffer (no events; ``_backfill``).
        """
        self.detach()
        if self.closed:
            # Work of a stopped agent still under way (a reconcile): it opens nothing.
            return False
        self._take_history_mark()
        if not recover:
            # A new run: the one the agent before this one saw is not read back.
            self._history_read = True
        # One console stream delivers at a time: an attach that a newer one
        # (or a detach) overtook while it opened stdin gives up, or two
        # pumps would deliver every line twice.
        epoch = self._attach_epoch
        self._follow(cid, recover)
        pipe: IStdinPipe | None
        try:
            pipe = await self._open_stdin(cid)
        except (NotFound, Conflict):
            # Gone, or it died while the console attached: the next command
            # opens stdin again (on the next run).
            pipe = None
        if epoch != self._attach_epoch:
            if pipe is not None and self._stdin is pipe:
                self._stdin = None
                pipe.close()
            return False
        return True

    def _follow(self, cid: str, recover: bool) -> None:
        """The followed stream from the mark; when recovering, the history read behind it."""
        filt = MarkFilter(self.mark, self.mark_count) if self.mark else None
        # From a second before the mark: the engine's ``since`` may include
        # lines stamped at it, and lines can share a nanosecond, so the
        # filter, not the engine, drops exactly what was delivered.
        since_ns = self.mark - 1_000_000_000 if self.mark else None
        stream = self._engine.output(cid, follow=True, since_ns=since_ns)
        self._output = stream
        self._output_done = self._tracker.run(
            self._pump(stream, filt), "console of server {}".format(self.server_id)
        )
        if recover and self._wants_history():
            self._tracker.run(self._backfill(cid),
                              "console history of server {}".format(self.server_id))

    async def _backfill(self, cid: str) -> None:
        """
        A restarted agent's history: the lines the agent before it delivered
        (up to its mark), read back into the buffer in front of the lines
        followed since; no events.  Once: a second call (the death's
        ``catch_up`` while the attach's read runs) waits for the first and
        finds it done.  A failed read is left for the next attach.
        """
        async with self._history_lock:
            self._take_history_mark()
            if not self._wants_history():
                return
            slots = self._history_slots
            if slots is not None:
                await slots.acquire()
            try:
                if self._wants_history():  # again: it may have waited for its slot
                    await self._read_history(cid)
            except (EngineError, NotFound) as e:
                self.log.debug("console of {server_id}: reading the history failed: {e}",
                               server_id=self.server_id, e=e)
            finally:
                if slots is not None:
                    slots.release()

    def _take_history_mark(self) -> None:
        """The mark the history ends at: the mark before anything is followed."""
        if self._history_mark is None:
            self._history_mark = (self.mark, self.mark_count)
            self._history_clears = self.buffer.clears
            if not self.mark:
                self._history_read = True  # nothing was delivered before

    def _wants_history(self) -> bool:
        """
        The history is still to be read: not read yet, the agent not
        stopping, no new run attached, the buffer not emptied meanwhile
        (``console:clear``: the history goes with it).
        """
        return (not self._history_read and not self.closed
                and self.buffer.clears == self._history_clears)

    async def _read_history(self, cid: str) -> None:
        history = self._history_stream = self._engine.output(
            cid, follow=False, tail=self.buffer.capacity)
        assert self._history_mark is not None
        delivered = MarkFilter(*self._history_mark)
        lines: list[LogLine] = []
        # A read the engine never finishes must not hold its slot for ever.
        expiry = _Expiry(self._clock, HISTORY_READ_SECONDS, history)
        try:
            async for batch in history.batches():
                if self.closed or expiry.expired:
                    break
                lines.extend(batch)
        finally:
            expiry.cancel()
            self._history_stream = None
            history.close()
        if expiry.expired:
            self.log.info(
                "console of server {server_id}: its history was not read back within {seconds} s;"
                " the next re-attach reads it", server_id=self.server_id,
                seconds=HISTORY_READ_SECONDS)
            return
        if self._wants_history():
            self.take_history(lines, delivered)
            self._history_read = True

    async def catch_up(self, cid: str, timeout: float) -> None:
        """
        The container died: deliver every line it printed after the mark, up
        to the end of its output, before its death is reported.

        Whatever the order of the death, the re-attach of a restarted agent
        and the end of the followed stream (an attach follows at once; a
        restarted agent's history is read behind it, and ``_read_rest``
        waits for that read): the followed stream's end is waited for (it
        ends with the container), and then the rest is read from the mark to the end
        of the kept output, without following (a death seen before any
        attach, or a stream that did not end, leaves lines only that read
        finds; otherwise it finds none).  An attach that overtakes the read
        is waited for in turn.  Each wait is bounded by ``timeout``; the
        rounds are bounded too.  Concurrent calls run one after the other:
        the second finds nothing new.
        """
        async with self._catching_up:
            for _ in range(_CATCH_UP_ROUNDS):
                if self.closed:
                    return
                done = self._output_done
                if done is not None and not done.called:
                    await self._deadlines.within(done, timeout)
                # Followed to its end (or for long enough): stop it, read the rest.
                self.detach_output()
                if await self._read_rest(cid, self._attach_epoch, timeout):
                    return
            self.log.info(
                "console of server {server_id}: the last lines were not all read back"
                " within {rounds} rounds of {timeout} s; the next start delivers them",
                server_id=self.server_id, rounds=_CATCH_UP_ROUNDS, timeout=timeout,
            )

    async def _read_rest(self, cid: str, epoch: int, timeout: float) -> bool:
        """
        The lines after the mark to the end of the kept output, delivered;
        False when an attach overtook the read (it follows from there) or the
        read took longer than ``timeout``.
        """
        # A restarted agent's history first (read by the attach, or here
        # when the agent never attached): a crash report's tail needs it.
        # Bounded: the reads of other servers may hold every slot, and the
        # read goes on (in front of the buffer) when the wait ends.
        await self._deadlines.within(
            self._tracker.run(self._backfill(cid),
                              "console history of server {}".format(self.server_id)),
            timeout)
        if epoch != self._attach_epoch:
            return False
        filt = MarkFilter(self.mark, self.mark_count) if self.mark else None
        since_ns = self.mark - 1_000_000_000 if self.mark else None
        try:
            stream = self._engine.output(cid, follow=False, since_ns=since_ns)
        except (EngineError, NotFound) as e:
            # Removed already: nothing more can be read.
            self.log.debug("console of {server_id}: reading the last lines failed: {e}",
                           server_id=self.server_id, e=e)
            return True
        self._output = stream  # a detach (an attach, the agent stopping) ends it
        expiry = _Expiry(self._clock, timeout, stream)
        try:
            async for batch in stream.batches(2000):
                if epoch != self._attach_epoch or expiry.expired:
                    return False
                self.take(batch, filt)
        except (EngineError, NotFound) as e:
            # Removed meanwhile, or the engine went away: nothing more can be read.
            self.log.debug("console of {server_id}: reading the last lines failed: {e}",
                           server_id=self.server_id, e=e)
            return True
        finally:
            expiry.cancel()
            if self._output is stream:
                self._output = None
            stream.close()
        return epoch == self._attach_epoch and not expiry.expired

    async def _pump(self, stream: ILogStream, filt: MarkFilter | None) -> None:
        # Each batch is taken in the reactor turn it was read in (``drain``):
        # no coroutine is woken per line, the console's cost at hundreds of
        # servers.
        def take(batch: list[LogLine]) -> None:
            if self._output is not stream:
                stream.close()  # detached (or replaced): the next attach resumes from the mark
                return
            self.take(batch, filt)

        try:
            await stream.drain(take, 2000)
        except EngineError as e:
            # The engine went away or the container vanished: the manager
            # learns of it through events/reconcile; nothing is lost, the
            # next attach resumes from the mark.
            self.log.debug("console of {server_id} ended: {e}", server_id=self.server_id, e=e)
        finally:
            if self._output is stream:
                self._output = None

    def detach(self) -> None:
        """Stop following the console and close stdin (the container keeps running)."""
        self.detach_output()
        self.close_stdin()

    def detach_output(self) -> None:
        """Stop following the console (and any attach or read in progress)."""
        self._attach_epoch += 1
        if self._output is not None:
            self._output.close()
            self._output = None

    def close(self) -> None:
        """The agent stops (or died): detach, and never attach again."""
        self.closed = True
        self.detach()
        if self._history_stream is not None:
            self._history_stream.close()
        self.throttle.cancel()

    def close_stdin(self) -> None:
        """Close stdin (the container died)."""
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
