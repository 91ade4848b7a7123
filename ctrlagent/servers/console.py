"""
A server's console: the ring buffer of recent lines and the flood throttle.

Both are reactor-free except for an injected ``IReactorTime`` (the throttle
schedules its once-per-interval notice), so unit tests drive them with
``twisted.internet.task.Clock``.

The buffer keeps *every* line (it is the history the Panel asks for and the
crash report's tail); the throttle only limits what is fanned out to
subscribers, which is where a flooding server would cost the agent and the
Panel link most.  Dropped lines are counted and reported once per interval.
"""

from __future__ import annotations

import calendar
import functools
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

# Docker's ``timestamps=1`` prefix: RFC 3339 with up to nanoseconds, then a space.
_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2}) "
)


# Not frozen: a frozen dataclass costs four times as much to build, and one is
# built for every console line of a flooding server.  Treat it as immutable.
@dataclass(slots=True)
class ConsoleLine:
    """One line of console output."""

    timestamp: float  # seconds since the epoch
    stream: str  # stdout | stderr | agent
    text: str
    mark: int = 0  # Docker's nanosecond timestamp; 0 for agent notices


_SECOND = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
# 10 ** (9 - n): scales a fraction of n digits to nanoseconds.
_NANO_SCALE = tuple(10 ** (9 - n) for n in range(10))


@functools.lru_cache(maxsize=64)
def _utc_seconds(prefix: str) -> int | None:
    """
    Epoch seconds of ``YYYY-MM-DDTHH:MM:SS`` (UTC), or None when it is not one.

    Cached: a flood's lines share their second, so this runs about once a second.
    """
    if _SECOND.fullmatch(prefix) is None:
        return None
    try:
        return calendar.timegm(
            (int(prefix[0:4]), int(prefix[5:7]), int(prefix[8:10]),
             int(prefix[11:13]), int(prefix[14:16]), int(prefix[17:19]), 0, 0, 0)
        )
    except ValueError:
        return None


def split_timestamp(line: str) -> tuple[int, str]:
    """
    Split Docker's timestamp prefix off a log line.

    Returns ``(nanoseconds since the epoch, rest)``; a line without a prefix
    returns ``(0, line)``.  Exact integer arithmetic: the nanosecond is the
    identity of a line across agent restarts, so no float rounding.
    """
    # Fast path for what the engine writes on every line of a flood: UTC with
    # a fraction (RFC 3339, trailing zeros trimmed) and a space.  It runs once
    # per console line, so it does the least work that still checks the form;
    # anything else takes the general form below.
    z = line.find("Z ", 21, 31)
    if z > 0 and line[19] == ".":
        fraction = line[20:z]
        if fraction.isdigit() and fraction.isascii():
            seconds = _utc_seconds(line[:19])
            if seconds is not None:
                return seconds * 1_000_000_000 + int(fraction) * _NANO_SCALE[z - 20], line[z + 2 :]
    m = _TIMESTAMP.match(line)
    if m is None:
        return 0, line
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    zone = m.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = (m.group(7) or "").ljust(9, "0")
    return seconds * 1_000_000_000 + int(fraction), line[m.end():]


class ConsoleBuffer:
    """A bounded ring buffer of the latest console lines of one server."""

    def __init__(self, size: int) -> None:
        self._lines: deque[ConsoleLine] = deque(maxlen=max(1, size))
        self.last_activity: float | None = None

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[ConsoleLine]:
        return iter(self._lines)

    @property
    def capacity(self) -> int:
        """How many lines the buffer holds at most."""
        return self._lines.maxlen or 0

    def append(self, line: ConsoleLine) -> None:
        """Add a line, dropping the oldest when full."""
        self._lines.append(line)
        self.last_activity = line.timestamp

    def extend(self, lines: list[ConsoleLine]) -> None:
        """Add lines in order, dropping the oldest when full."""
        if lines:
            self._lines.extend(lines)
            self.last_activity = lines[-1].timestamp

    def tail(self, count: int) -> list[ConsoleLine]:
        """The last ``count`` lines, oldest first."""
        if count <= 0:
            return []
        if count >= len(self._lines):
            return list(self._lines)
        return list(self._lines)[-count:]

    def clear(self) -> None:
        """Forget every line."""
        self._lines.clear()


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

    def cancel(self) -> None:
        """Stop the pending notice timer (shutdown); drops are still counted."""
        if self._notice is not None and self._notice.active():
            self._notice.cancel()
        self._notice = None
