"""
``bench/scale.py``'s account of the host's CPU: how busy all its cores were,
and how much the hypervisor took, over the spans the benchmark measured.
"""

from __future__ import annotations

import time

from tests.rig.benchmods import load


def test_the_host_ticks_only_grow_and_busy_is_within_the_whole() -> None:
    scale = load("scale")
    before = scale.host_ticks()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # some work of our own, bounded
        pass
    time.sleep(0.05)
    after = scale.host_ticks()
    busy, steal, total = (b - a for a, b in zip(before, after, strict=True))
    assert total > 0
    assert 0 <= steal <= busy <= total


def test_spans_add_up_in_percent_of_all_cores() -> None:
    scale = load("scale")
    share = scale.HostShare()
    assert share.percent() == {"busy": 0.0, "steal": 0.0}
    share.span((100, 0, 1000), (150, 1, 1100))  # 50 of 100 busy, 1 stolen
    share.span((0, 0, 0), (30, 1, 100))  # 30 of 100, 1 stolen
    assert share.percent() == {"busy": 40.0, "steal": 1.0}
    assert scale._host_note({"host": share.percent()}) == (
        "; the host's cores 40 % busy, 1.0 % stolen")
    assert scale._host_note({}) == ""
