"""
The one timestamp format of the Panel's wire: ISO 8601 UTC with milliseconds
and a ``Z`` (``2026-11-24T01:00:53.257Z``), which the Panel's ``new Date()``
parses.  Every timestamp either transport writes goes through ``iso_ms``.

Pure: no clock.  Callers pass the time to stamp (seconds since the epoch), so
a transport decides what "now" is and tests stay deterministic.
"""

from __future__ import annotations

import functools
import math
import time
from datetime import UTC, datetime
from typing import Any

# The four-digit years of ISO 8601 that every parser reads (0001-01-01T00:00:00Z
# to 9999-12-31T23:59:59Z).  A time outside them (a game server's file times,
# an odd clock) is shown at the bound, never turned into an error.
MIN_EPOCH = -62_135_596_800.0
MAX_EPOCH = 253_402_300_799.0


@functools.lru_cache(maxsize=65536)
def _iso_second(whole: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of a whole epoch second; cached (frames, files share one)."""
    return "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}".format(*time.gmtime(whole)[:6])


def iso_ms(seconds: float) -> str:
    """
    ``seconds`` since the epoch as ISO 8601 UTC with milliseconds and a ``Z``
    (JavaScript's ``toISOString``).

    Never raises: times before the year 0001 or past 9999 (infinities too) are
    held at the bound, and NaN is the first of them.
    """
    if type(seconds) is float and 0.0 <= seconds < MAX_EPOCH:
        # Every answer and console frame is stamped now: the common case
        # without the checks below (which it would pass), and a third faster.
        whole = int(seconds)
        micros = round((seconds - whole) * 1e6)
        if micros < 1_000_000:
            return f"{_iso_second(whole)}.{micros // 1000:03d}Z"
    if not isinstance(seconds, (int, float)):
        seconds = 0.0
    if not MIN_EPOCH <= seconds < MAX_EPOCH + 1:  # NaN included
        return "9999-12-31T23:59:59.999Z" if seconds > 0 else "0001-01-01T00:00:00.000Z"
    # As datetime does it: round to the microsecond, then cut to milliseconds
    # (every console frame is stamped, so this avoids a datetime per frame).
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if whole > MAX_EPOCH:
        return "9999-12-31T23:59:59.999Z"
    return "{}.{:03d}Z".format(_iso_second(int(whole)), micros // 1000)


def iso_ms_or_none(seconds: float | None) -> str | None:
    """``iso_ms(seconds)``, or ``None`` when there is no time to tell."""
    return None if seconds is None else iso_ms(seconds)


def parse_timestamp(value: Any) -> float | None:
    """
    Seconds since the epoch from an incoming frame's ``timestamp``, or ``None``.

    Panels send ISO strings (``...Z`` or with an offset), JavaScript millisecond
    numbers, second numbers, or nothing; anything else is ``None``.  Never raises.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
        if not math.isfinite(number) or number < 0:
            return None
        # Anything past the year 5138 in seconds is surely JavaScript milliseconds.
        if number > 1e11:
            number /= 1000.0
        return number if number <= MAX_EPOCH else None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return parse_timestamp(float(text))
        except ValueError:
            pass
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        try:
            return parsed.timestamp()
        except (OverflowError, OSError, ValueError):
            return None
    return None


__all__ = ["MAX_EPOCH", "MIN_EPOCH", "iso_ms", "iso_ms_or_none", "parse_timestamp"]
