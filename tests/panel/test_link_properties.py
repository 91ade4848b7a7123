"""
Property: whatever the sequence of outages, socket stalls and events, the
Panel receives the link's events in order, without duplicates, and everything
it misses is accounted for by ``events_dropped`` (only when an outage overflowed
the outbox, oldest first).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrlagent.events import StatusChanged

from .harness import Harness

operations = st.lists(
    st.one_of(
        st.tuples(st.just("emit"), st.integers(min_value=1, max_value=12)),
        st.tuples(st.just("drop"), st.just(0)),
        st.tuples(st.just("reconnect"), st.just(0)),
        st.tuples(st.just("pause"), st.just(0)),
        st.tuples(st.just("resume"), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, outbox_size=st.integers(min_value=1, max_value=20))
def test_events_arrive_in_order_and_every_loss_is_reported(
    ops: list[tuple[str, int]], outbox_size: int
) -> None:
    rig = Harness(outbox_size=outbox_size, legacy_frames=False, stable_after=0.0)
    rig.start()
    emitted = 0
    queued_since_flush = 0
    overflowed = False
    for op, count in ops:
        if op == "emit":
            for _ in range(count):
                emitted += 1
                rig.link._on_event(StatusChanged("s", "x", str(emitted), float(emitted)))
            if not rig.link.connected or rig.link._paused:
                queued_since_flush += count
                overflowed |= queued_since_flush > outbox_size
        elif op == "drop" and rig.link.connected:
            rig.panel.drop()
        elif op == "reconnect" and not rig.link.connected:
            rig.advance(rig.next_retry_delay())
            queued_since_flush = 0
        elif op == "pause" and rig.link._protocol is not None:
            rig.link.writes_paused(rig.link._protocol)
        elif op == "resume" and rig.link._protocol is not None:
            rig.link.writes_resumed(rig.link._protocol)
            queued_since_flush = 0
        rig.flush()
    if not rig.link.connected:
        rig.advance(rig.next_retry_delay())
    if rig.link._protocol is not None:
        rig.link.writes_resumed(rig.link._protocol)
    rig.flush()

    received = [int(f["data"]["currentStatus"]) for f in rig.panel.frames("server_status_changed")]
    assert received == sorted(set(received)), "reordered or duplicated"
    reported = sum(f["data"]["dropped"] for f in rig.panel.frames("events_dropped"))
    assert len(received) + reported == emitted
    if not overflowed:
        assert received == list(range(1, emitted + 1))
