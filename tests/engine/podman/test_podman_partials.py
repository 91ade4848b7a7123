"""``join_partials``: the seams of a line Podman logged in pieces (unit)."""

from __future__ import annotations

from ctrlagent.engine.docker.timefmt import split_timestamp
from ctrlagent.engine.podman.engine import _Numbering, join_partials

STAMP = "2026-12-02T00:13:10Z"
NS = split_timestamp(STAMP + " x")[0]


def test_a_seam_of_the_same_second_is_removed() -> None:
    assert join_partials("32026-12-02T00:13:10Z 499", NS) == "3499"


def test_seams_seconds_later_are_removed_too() -> None:
    text = "ab2026-12-02T00:13:11Z cd2026-12-02T00:13:40Z ef"
    assert join_partials(text, NS) == "abcdef"


def test_a_games_own_dates_stay() -> None:
    for text in (
        "backup of 2026-12-01T10:00:00Z done",           # before the line's second
        "next restart 2026-12-02T06:00:00Z (in 6 h)",    # hours after it
        "at 2026-12-02T00:13:10.5Z fraction",             # not Podman's form
        "at 2026-12-02T00:13:10Z",                        # no space after it
    ):
        assert join_partials(text, NS) == text


def test_numbering_joins_the_pieces_into_one_line() -> None:
    lines = _Numbering().lines([
        ("stdout", STAMP + " 3498"),
        ("stdout", STAMP + " 3" + STAMP + " 499"),
        ("stdout", STAMP + " 3500"),
    ])
    assert [line.text for line in lines] == ["3498", "3499", "3500"]
    assert [line.ns - NS for line in lines] == [0, 1, 2]
