"""
``ctrlagent.records.record``: what mypy sees as a frozen dataclass is at run
time a slotted dataclass that compares and hashes by its fields (cheaper to
build than a frozen one: a speed for ``bench/``, not asserted here).
"""

from __future__ import annotations

import dataclasses

from ctrlagent.records import record


@record
class _Point:
    x: int
    y: int = 0


def test_a_record_compares_and_hashes_by_its_fields_like_a_frozen_dataclass() -> None:
    assert _Point(1, 2) == _Point(1, 2)
    assert _Point(1, 2) != _Point(2, 1)
    assert hash(_Point(1, 2)) == hash(_Point(1, 2))
    assert {_Point(1, 2), _Point(1, 2)} == {_Point(1, 2)}
    assert dataclasses.is_dataclass(_Point)
    assert [f.name for f in dataclasses.fields(_Point)] == ["x", "y"]
    assert dataclasses.replace(_Point(1, 2), y=5) == _Point(1, 5)
    assert not hasattr(_Point(1), "__dict__")  # slotted

