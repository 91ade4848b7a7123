"""
The fault suite's judge of repeated console lines (``test_agent_kills._in_flight_repeats``):
the one repeat the design allows passes, every other pattern fails.
"""

from __future__ import annotations

from typing import Any

from ctrlagent.testing.panel import Received
from tests.faults.test_agent_kills import _in_flight_repeats, _lines_but, _numbers


def _log(connection: int, server_id: str, first: int, last: int) -> Received:
    lines = ["seq {}".format(n) for n in range(first, last + 1)]
    frame: Any = {"event": "server_log", "data": {"serverId": server_id, "lines": lines}}
    return Received(0.0, frame, connection)


def _other(connection: int) -> Received:
    return Received(0.0, {"event": "resource_update", "data": {}}, connection)


def test_the_send_in_flight_at_a_kill_may_repeat_once() -> None:
    # What CI saw: 111..120 taken by the kernel, the agent killed before the journal write.
    received = [
        _log(0, "a", 1, 110), _log(0, "b", 1, 100), _log(0, "a", 111, 120), _other(0),
        _log(1, "b", 101, 110), _log(1, "a", 111, 120), _log(1, "a", 121, 200),
    ]
    skipped = _in_flight_repeats(received, ["a", "b"])
    assert skipped == {5: 10}
    assert _numbers(_lines_but(received, "a", skipped)) == list(range(1, 201))


def test_the_frames_of_one_send_for_two_servers_may_repeat_together() -> None:
    received = [
        _log(0, "a", 1, 10), _log(0, "b", 1, 10),
        _log(1, "a", 1, 10), _log(1, "b", 1, 10), _log(1, "a", 11, 20),
    ]
    assert _in_flight_repeats(received, ["a", "b"]) == {2: 10, 3: 10}


def test_a_replayed_frame_may_go_on_with_new_lines() -> None:
    received = [
        _log(0, "a", 1, 100), _log(0, "a", 101, 110), _log(1, "a", 101, 130),
        _log(1, "a", 131, 140),
    ]
    skipped = _in_flight_repeats(received, ["a"])
    assert skipped == {2: 10}
    assert _numbers(_lines_but(received, "a", skipped)) == list(range(1, 141))


def test_no_repeat_is_nothing_to_skip() -> None:
    received = [_log(0, "a", 1, 10), _log(1, "a", 11, 20)]
    assert _in_flight_repeats(received, ["a"]) == {}


def test_repeats_after_two_kills_fail() -> None:
    received = [
        _log(0, "a", 1, 10), _log(1, "a", 1, 10), _log(1, "a", 11, 20),
        _log(2, "a", 11, 20), _log(2, "a", 21, 30),
    ]
    assert "more than one kill" in str(_in_flight_repeats(received, ["a"]))


def test_a_repeat_of_frames_followed_by_others_on_their_connection_fails() -> None:
    # The mark lagged: 1..10 was followed by 11..20 and still sent again.
    received = [
        _log(0, "a", 1, 10), _log(0, "a", 11, 20), _log(1, "a", 1, 10), _log(1, "a", 21, 30),
    ]
    assert "not the send in flight" in str(_in_flight_repeats(received, ["a"]))
    # Another server's frame after it on that connection, not repeated: the same.
    received = [
        _log(0, "a", 1, 10), _log(0, "b", 1, 10), _log(1, "a", 1, 10), _log(1, "b", 11, 20),
    ]
    assert "not the send in flight" in str(_in_flight_repeats(received, ["a", "b"]))


def test_a_repeat_after_new_lines_or_of_part_of_a_frame_fails() -> None:
    received = [_log(0, "a", 1, 10), _log(1, "a", 11, 20), _log(1, "a", 5, 10)]
    assert "not a replay" in str(_in_flight_repeats(received, ["a"]))
    received = [_log(0, "a", 1, 10), _log(1, "a", 5, 10), _log(1, "a", 11, 20)]
    assert "no earlier frame carried whole" in str(_in_flight_repeats(received, ["a"]))
    received = [_log(0, "a", 1, 10), _log(0, "a", 1, 10)]
    assert "not a replay" in str(_in_flight_repeats(received, ["a"]))
    # A replay that skips lines, or that does not go on where the server was.
    received = [_log(0, "a", 1, 10), _log(1, "a", 1, 5), _log(1, "a", 11, 20)]
    assert "no earlier frame carried whole" in str(_in_flight_repeats(received, ["a"]))
    received = [_log(0, "a", 1, 10), _log(1, "a", 1, 10), _log(1, "a", 12, 20)]
    assert _in_flight_repeats(received, ["a"]) == {1: 10}  # the loss is judged elsewhere
    received = [_log(0, "a", 1, 10), _log(1, "a", 5, 8), _log(1, "a", 11, 20)]
    assert "no earlier frame carried whole" in str(_in_flight_repeats(received, ["a"]))
