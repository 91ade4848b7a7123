"""
Docker's time formats, to and from exact nanoseconds.

- ``split_timestamp``: the RFC 3339 prefix of a ``timestamps=1`` log line, as
  nanoseconds since the epoch (the identity of a console line across agent
  restarts, so exact integer arithmetic, never a float);
- ``parse_started_at`` / ``parse_docker_time``: ``State.StartedAt`` of an
  inspect document (None for Docker's zero time);
- ``format_since`` / ``format_since_ns``: the ``since``/``until`` query values.

Pure: no reactor.
"""

from __future__ import annotations

import calendar
import functools
import re

__all__ = [
    "split_timestamp",
    "parse_started_at",
    "parse_docker_time",
    "format_since",
    "format_since_ns",
]

# Docker's ``timestamps=1`` prefix: RFC 3339 with up to nanoseconds, then a space.
_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2}) "
)
_MINUTE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
# 10 ** (9 - n): scales a fraction of n digits to nanoseconds.
_NANO_SCALE = tuple(10 ** (9 - n) for n in range(10))


def _utc_seconds(prefix: str) -> int | None:
    """Epoch seconds of ``YYYY-MM-DDTHH:MM:SS`` (UTC), or None when it is not one."""
    if prefix[16:17] != ":":
        return None
    second = prefix[17:19]
    if len(second) != 2 or not (second.isascii() and second.isdigit()):
        return None
    minute = _utc_minute(prefix[:16])
    return None if minute is None else minute + int(second)


@functools.lru_cache(maxsize=256)
def _utc_minute(prefix: str) -> int | None:
    """
    Epoch seconds of ``YYYY-MM-DDTHH:MM`` (UTC), or None when it is not one.

    Cached by the minute: a flood's lines share it, and so do the kept lines
    of hundreds of servers replayed at a re-attach (cached by the second,
    those missed nearly every time).
    """
    if _MINUTE.fullmatch(prefix) is None:
        return None
    try:
        return calendar.timegm(
            (int(prefix[0:4]), int(prefix[5:7]), int(prefix[8:10]),
             int(prefix[11:13]), int(prefix[14:16]), 0, 0, 0, 0)
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
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return 0, line
    zone = m.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = (m.group(7) or "").ljust(9, "0")
    return seconds * 1_000_000_000 + int(fraction), line[m.end():]


def parse_started_at(value: str | None) -> int | None:
    """Nanoseconds since the epoch of Docker's RFC 3339 ``StartedAt`` (None for the zero time)."""
    if not value or value.startswith("0001-"):
        return None
    ns, _ = split_timestamp(value + " ")
    return ns or None


def parse_docker_time(value: str | None) -> float | None:
    """Epoch seconds of Docker's RFC 3339 ``StartedAt`` (None for the zero time)."""
    ns = parse_started_at(value)
    return ns / 1e9 if ns else None


def format_since(value: float) -> str:
    """A ``since``/``until`` query value with nanosecond precision, from seconds."""
    whole = int(value)
    nanos = int(round((value - whole) * 1e9))
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return "{}.{:09d}".format(whole, nanos)


def format_since_ns(ns: int) -> str:
    """A ``since``/``until`` query value from exact nanoseconds."""
    whole, nanos = divmod(int(ns), 1_000_000_000)
    return "{}.{:09d}".format(whole, nanos)
