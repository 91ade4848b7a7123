"""Unit tests of Docker's time formats (engine/docker/timefmt.py)."""

from __future__ import annotations

import calendar
import time

from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.engine.docker.timefmt import (
    format_since,
    format_since_ns,
    parse_docker_time,
    parse_started_at,
    split_timestamp,
)

LINES = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda s, n, t: "{}.{}Z {}".format(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)), n, t),
        st.integers(min_value=0, max_value=4_000_000_000),
        st.integers(min_value=0, max_value=999_999_999),
        st.text(max_size=20),
    ),
)


@given(
    seconds=st.integers(min_value=0, max_value=4_000_000_000),
    nanos=st.integers(min_value=0, max_value=999_999_999),
    text=st.text(max_size=30),
)
def test_log_timestamps_are_exact_nanoseconds(seconds: int, nanos: int, text: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = "{:09d}".format(nanos).rstrip("0")
    line = "{}{}Z {}".format(stamp, "." + digits if digits else "", text)
    assert split_timestamp(line) == (seconds * 1_000_000_000 + nanos, text)


def test_offsets_no_prefix_and_impossible_dates() -> None:
    base = calendar.timegm((2026, 1, 2, 3, 4, 5, 0, 0, 0))
    assert split_timestamp("2026-01-02T04:04:05.5+01:00 x")[0] == base * 10**9 + 500_000_000
    assert split_timestamp("plain line") == (0, "plain line")
    assert split_timestamp("2026-13-45T04:04:05+01:00 x") == (0, "2026-13-45T04:04:05+01:00 x")


@given(LINES)
def test_the_engine_reads_every_log_line_as_split_timestamp_does(line: str) -> None:
    # The console's LogLines come from here: the stamp is the line's identity.
    from ctrlagent.engine.docker.engine import log_lines

    assert [(x.ns, x.text) for x in log_lines([("stdout", line)], -1)] == [split_timestamp(line)]


def test_started_at_of_a_container_and_of_one_never_started() -> None:
    ns = parse_started_at("2026-01-02T03:04:05.123456789Z")
    assert ns == calendar.timegm((2026, 1, 2, 3, 4, 5, 0, 0, 0)) * 10**9 + 123456789
    assert parse_started_at("0001-01-01T00:00:00Z") is None
    assert parse_started_at("") is None and parse_started_at(None) is None
    assert parse_docker_time("2026-01-02T03:04:05.5Z") == ns // 10**9 + 0.5


def test_since_values_have_nanosecond_precision() -> None:
    assert format_since(1700000000.5) == "1700000000.500000000"
    assert format_since(12) == "12.000000000"
    assert format_since_ns(1_700_000_000_000_000_001) == "1700000000.000000001"


def test_lines_of_hundreds_of_minutes_interleaved_are_exact() -> None:
    # A re-attach replays the kept lines of hundreds of servers, interleaved:
    # far more distinct seconds and minutes than any cache holds.
    base = calendar.timegm((2026, 12, 2, 17, 0, 0, 0, 0, 0))
    for i in range(3000):
        seconds = base + (i * 7919) % 40_000
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        line = "{}.{}Z tick {}".format(stamp, 100 + i, i)
        assert split_timestamp(line) == (seconds * 10**9 + (100 + i) * 10**(9 - len(str(100 + i))),
                                         "tick {}".format(i))


def test_a_seconds_field_that_is_not_two_ascii_digits_is_not_taken_as_one() -> None:
    assert split_timestamp("2026-01-02T03:04:5.5Z x") == (0, "2026-01-02T03:04:5.5Z x")
    assert split_timestamp("2026-01-02T03:04-05.5Z x") == (0, "2026-01-02T03:04-05.5Z x")
    minute = calendar.timegm((2026, 1, 2, 3, 4, 0, 0, 0, 0))
    # What the engine never writes but the general form reads: a leap second.
    assert split_timestamp("2026-01-02T03:04:60.5Z x") == ((minute + 60) * 10**9 + 5 * 10**8, "x")
