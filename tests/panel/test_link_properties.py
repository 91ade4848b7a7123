"""
Properties of the link as a whole, through the real Autobahn protocols on iosim:

- whatever the sequence of outages, socket stalls and events, the Panel
  receives the link's events in order, without duplicates, and everything it
  misses is accounted for by ``events_dropped`` (only when an outage overflowed
  the outbox, oldest first);
- whatever JSON the Panel sends (lone surrogates, deep nesting, out-of-range
  numbers, ids of every JSON type), every command with an id is answered
  exactly once, with the id as sent, in strict UTF-8 JSON, and nothing the
  Panel sends can put a lone surrogate into a log line.
"""

from __future__ import annotations

import io
import json
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher, textFileLogObserver

from ctrlagent.events import StatusChanged
from ctrlagent.wire.tables import LEGACY_FRAME_TYPES

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


# --- every command id is answered exactly once, as sent ------------------------------------


class Raw:
    """A JSON literal written as it is (``1e999``, ``NaN``, a 5,000-digit integer, deep nesting)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return "Raw({!r})".format(self.text[:40])


def to_json(value: Any) -> str:
    """``value`` as JSON text; lone surrogates as ``\\u`` escapes, ``Raw`` literals verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(
            json.dumps(key) + ":" + to_json(item) for key, item in value.items()
        ) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    return json.dumps(value)


class NonJson:
    """What ``NaN``/``Infinity`` decode to here: no JSON value, so nothing to echo."""


def canonical(value: Any) -> Any:
    """A decoded JSON value by type and value (numbers as Decimals: 1, 1.0, 1e0 are one)."""
    if isinstance(value, NonJson):
        return ("non-json",)
    if value is None or isinstance(value, bool):
        return ("literal", value)
    if isinstance(value, Decimal):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(canonical(item) for item in value))
    return ("object", tuple(sorted((key, canonical(item)) for key, item in value.items())))


def as_sent(value: Any) -> Any:
    """``canonical`` of what the JSON text written for ``value`` means (surrogate pairs join)."""
    return canonical(
        json.loads(
            to_json(value),
            parse_int=Decimal,
            parse_float=Decimal,
            parse_constant=lambda literal: NonJson(),
        )
    )


def strict_json(raw: bytes) -> Any:
    """Decode one frame the agent sent as a strict JSON parser would (UTF-8, no NaN)."""

    def refuse(literal: str) -> Any:
        raise AssertionError("the agent sent a non-JSON literal {}".format(literal))

    return json.loads(
        raw.decode("utf-8"), parse_int=Decimal, parse_float=Decimal, parse_constant=refuse
    )


any_text = st.text(st.characters(blacklist_categories=()), max_size=8) | st.sampled_from(
    ["\ud800", "\udcff", "a\udfffb", "\ud83d", "\ud83d\ude00"]
)
odd_numbers = st.sampled_from(
    [Raw("1e999"), Raw("-1e999"), Raw("1" * 5000), Raw("NaN"), Raw("Infinity"), Raw("-Infinity")]
)
deep = st.integers(min_value=40, max_value=1500).map(lambda n: Raw("[" * n + "]" * n))
ids = st.one_of(
    any_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
    odd_numbers,
)
payload_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text
    | odd_numbers | deep,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(any_text, children, max_size=3),
    max_leaves=6,
)
actions = st.sampled_from(
    ["system.ping", "get_server_status", "list_servers", "create_server", "read_file",
     "write_file", "list_files", "start_server", "console:history", "launch_rockets"]
) | any_text
server_ids = st.sampled_from(["s1", "nope"]) | any_text | st.integers() | odd_numbers
legacy_types = st.sampled_from(sorted(LEGACY_FRAME_TYPES) + ["server_power"])


def answered_as(value: Any) -> Any:
    """The id the agent's answer must carry for a frame sent with ``value``."""
    sent = as_sent(value)
    return ("literal", None) if sent == ("non-json",) else sent


@st.composite
def frames(draw: st.DrawFn, frame_id: Any) -> tuple[str, str, dict[str, Any]]:
    """(kind, id field, frame) for one frame carrying ``frame_id``."""
    kind = draw(st.sampled_from(["flat", "nested", "untyped", "legacy", "ping", "ignored"]))
    payload = draw(st.dictionaries(any_text, payload_values, max_size=3))
    action, server_id = draw(actions), draw(server_ids)
    if kind == "flat":
        frame = {"id": frame_id, "type": "command", "action": action, "serverId": server_id,
                 "payload": payload, "timestamp": draw(st.sampled_from([Raw("1e999"), 5, "x"]))}
        return kind, "id", frame
    if kind == "nested":
        data = {"action": action, "serverId": server_id, **payload}
        return kind, "id", {"id": frame_id, "type": "command", "data": data}
    if kind == "untyped":
        return kind, "id", {"id": frame_id, "action": action, "payload": payload}
    if kind == "legacy":
        field = draw(st.sampled_from(["id", "requestId", "messageId"]))
        data = {"serverId": server_id, "action": draw(st.sampled_from(["start", "boom"])),
                **payload}
        return kind, field, {"type": draw(legacy_types), field: frame_id, "data": data}
    if kind == "ping":
        return kind, "id", {"type": "ping", "id": frame_id}
    return kind, "id", {"type": "stats", "id": frame_id, "data": payload}


@st.composite
def bursts(draw: st.DrawFn) -> list[tuple[str, str, dict[str, Any]]]:
    # NaN/Infinity ids come back as null (JSON has no such value): one of
    # those or a null id per burst, so that every reply's id names one frame.
    chosen = draw(st.lists(ids, min_size=1, max_size=8, unique_by=answered_as))
    return [draw(frames(frame_id)) for frame_id in chosen]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(burst=bursts(), max_in_flight=st.integers(min_value=1, max_value=4))
def test_every_command_with_an_id_is_answered_exactly_once_with_the_id_as_sent(
    burst: list[tuple[str, str, dict[str, Any]]], max_in_flight: int
) -> None:
    # A strict UTF-8 text log, as twistd writes one: a lone surrogate in a log
    # line would disable it, which the suite reports as a logged error.
    log_file = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    text_log = textFileLogObserver(log_file)
    globalLogPublisher.addObserver(text_log)
    try:
        rig = Harness(legacy_frames=False)
        rig.link.max_in_flight = max_in_flight
        rig.create_server("s1")
        rig.start()
        before = len(rig.panel.received)
        for _, _, frame in burst:
            rig.panel.send(to_json(frame))
        rig.flush()
        rig.advance(30.0)  # past the long-action deadline
        rig.advance(30.0)
        assert rig.link.connected
    finally:
        globalLogPublisher.removeObserver(text_log)

    replies = [strict_json(r.raw) for r in rig.panel.received[before:]]
    answers = [f for f in replies if f.get("type") in ("response", "pong")]
    for kind, field, frame in burst:
        sent, expected = as_sent(frame.get(field)), answered_as(frame.get(field))
        reply_type = "pong" if kind == "ping" else "response"
        mine = [f for f in answers if f["type"] == reply_type and canonical(f["id"]) == expected]
        if kind == "ignored" or (sent == ("literal", None) and kind != "ping"):
            assert mine == [], (kind, frame)  # nothing to answer, or nothing to answer with
            continue
        assert len(mine) == 1, (kind, frame, mine)
        if field != "id":
            assert canonical(mine[0][field]) == expected
    assert rig.link.stats()["commandsInFlight"] == 0
