"""
The fault suite's judge of repeated console lines (``test_agent_kills._in_flight_repeats``):
the one repeat the design allows passes, every other pattern fails.
"""

from __future__ import annotations

from typing import Any

from ctrlagent.testing.panel import Received
from tests.faults.test_agent_kills import _first_times, _in_flight_repeats, _numbers


def _log(connection: int, read: int, server_id: str, first: int, last: int) -> Received:
    lines = ["seq {}".format(n) for n in range(first, last + 1)]
    frame: Any = {"event": "server_log", "data": {"serverId": server_id, "lines": lines}}
    return Received(0.0, frame, connection, b"", read)


def _lines(received: list[Received], server_id: str) -> list[int]:
    return _numbers([
        line for r in received if r.frame["data"]["serverId"] == server_id
        for line in r.frame["data"]["lines"]
    ])


def test_the_send_in_flight_at_a_kill_may_repeat_once() -> None:
    # What CI saw: 111..120 taken by the kernel, the agent killed before the journal write.
    received = [
        _log(0, 1, "a", 1, 110), _log(0, 2, "b", 1, 100), _log(0, 3, "a", 111, 120),
        _log(1, 1, "b", 101, 110), _log(1, 2, "a", 111, 120), _log(1, 3, "a", 121, 200),
    ]
    assert _in_flight_repeats(received, ["a", "b"]) is None
    assert _first_times(_lines(received, "a")) == list(range(1, 201))


def test_one_send_for_two_servers_over_two_reads_may_repeat() -> None:
    received = [
        _log(0, 1, "a", 1, 10), _log(0, 2, "a", 11, 12), _log(0, 2, "b", 1, 10),
        _log(0, 3, "b", 11, 12),
        _log(1, 1, "a", 11, 20), _log(1, 1, "b", 11, 12), _log(1, 2, "b", 13, 20),
    ]
    assert _in_flight_repeats(received, ["a", "b"]) is None


def test_a_replay_cut_or_merged_differently_from_the_original_frames_passes() -> None:
    # The replay splits the repeated lines elsewhere, and starts inside an original frame.
    received = [_log(0, 1, "a", 1, 10), _log(1, 1, "a", 1, 5), _log(1, 1, "a", 6, 20)]
    assert _in_flight_repeats(received, ["a"]) is None
    received = [_log(0, 1, "a", 1, 10), _log(0, 1, "a", 11, 14), _log(1, 1, "a", 8, 30)]
    assert _in_flight_repeats(received, ["a"]) is None


def test_no_repeat_is_nothing_to_judge() -> None:
    received = [_log(0, 1, "a", 1, 10), _log(1, 1, "a", 11, 20)]
    assert _in_flight_repeats(received, ["a"]) is None


def test_repeats_after_two_kills_fail() -> None:
    received = [
        _log(0, 1, "a", 1, 10), _log(1, 1, "a", 1, 10), _log(1, 2, "a", 11, 20),
        _log(2, 1, "a", 11, 20), _log(2, 2, "a", 21, 30),
    ]
    assert "more than one kill" in str(_in_flight_repeats(received, ["a"]))


def test_lines_that_came_before_the_last_two_reads_fail() -> None:
    # The marks lagged over many sends: 490 lines of 49 reads sent again.
    received = [_log(0, k + 1, "a", 10 * k + 1, 10 * k + 10) for k in range(50)]
    received.append(_log(1, 1, "a", 11, 600))
    assert "not the send in flight" in str(_in_flight_repeats(received, ["a"]))
    # One frame more than the send in flight, a read earlier.
    received = [_log(0, 1, "a", 1, 10), _log(0, 2, "a", 11, 20), _log(0, 3, "a", 21, 30),
                _log(0, 4, "a", 31, 40), _log(1, 1, "a", 11, 50)]
    assert "not the send in flight" in str(_in_flight_repeats(received, ["a"]))


def test_a_repeat_that_is_not_a_replay_of_the_newest_lines_fails() -> None:
    received = [_log(0, 1, "a", 1, 10), _log(1, 1, "a", 11, 20), _log(1, 2, "a", 5, 10)]
    assert "not a replay" in str(_in_flight_repeats(received, ["a"]))
    received = [_log(0, 1, "a", 1, 10), _log(0, 2, "a", 1, 10)]
    assert "not a replay" in str(_in_flight_repeats(received, ["a"]))
    # A replay that does not reach the newest line before it.
    received = [_log(0, 1, "a", 1, 10), _log(1, 1, "a", 1, 5), _log(1, 1, "a", 11, 20)]
    assert "stop short" in str(_in_flight_repeats(received, ["a"]))
    received = [_log(0, 1, "a", 1, 10), _log(1, 1, "a", 5, 8)]
    assert "stop short" in str(_in_flight_repeats(received, ["a"]))
    # A replay with a gap in it.
    received = [_log(0, 1, "a", 1, 10), _log(1, 1, "a", 5, 6), _log(1, 1, "a", 8, 12)]
    assert "not a replay" in str(_in_flight_repeats(received, ["a"]))
