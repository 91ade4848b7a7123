"""
The one timestamp format of the wire (``wire.time``): ``iso_ms`` writes what
``datetime`` would, to the millisecond, and never raises; ``parse_timestamp``
reads what Panels send.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from ctrlagent.wire import time as wiretime
from tests.wire.samples import NOW, odd_timestamps


@given(odd_timestamps)
def test_parse_timestamp_accepts_anything(value: Any) -> None:
    result = wiretime.parse_timestamp(value)
    assert result is None or (math.isfinite(result) and result >= -86400 * 366 * 3000)


def test_parse_timestamp_reads_iso_seconds_and_milliseconds() -> None:
    assert wiretime.parse_timestamp("2026-11-24T01:00:53.257Z") == NOW
    assert wiretime.parse_timestamp("2026-11-24T02:00:53.257+01:00") == NOW
    assert wiretime.parse_timestamp(1795482053257) == 1795482053.257
    assert wiretime.parse_timestamp(1795482053) == 1795482053.0
    assert wiretime.parse_timestamp(None) is None
    assert wiretime.parse_timestamp("yesterday") is None


@given(st.floats() | st.integers(min_value=-(10**30), max_value=10**30))
def test_iso_ms_never_raises_and_ends_in_z(value: float) -> None:
    text = wiretime.iso_ms(value)
    assert text.endswith("Z")
    datetime.fromisoformat(text.replace("Z", "+00:00"))


@given(st.floats(min_value=0, max_value=253402300799.0))
# A fraction that rounds up to the next second (the short path leaves it to
# the checked one), a whole second, the first and last representable times.
@example(1795482053.9999996)
@example(1795482053.0)
@example(0.0)
@example(253402300798.9999)
def test_iso_ms_reads_as_datetime_would_write_it(value: float) -> None:
    expected = datetime.fromtimestamp(value, tz=UTC).isoformat(timespec="milliseconds")
    assert wiretime.iso_ms(value) == expected.replace("+00:00", "Z")


def test_iso_ms_or_none_stamps_a_time_and_passes_none() -> None:
    assert wiretime.iso_ms_or_none(NOW) == "2026-11-24T01:00:53.257Z" == wiretime.iso_ms(NOW)
    assert wiretime.iso_ms_or_none(None) is None
