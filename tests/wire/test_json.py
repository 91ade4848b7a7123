"""
JSON on the wire (``wire.json``).  Out: one encoder for both transports that
never fails and writes strict, compact UTF-8 JSON.  In: every HTTP body that
does not decode to JSON is a ``ParseError`` (deep nesting, invalid UTF-8, lone
surrogates, whatever hypothesis makes of arbitrary bytes); numbers no action
can use decode to markers; nesting is measured without decoding.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrlagent.errors import ParseError
from ctrlagent.wire.command import UnrepresentableNumber
from ctrlagent.wire.json import (
    MAX_BODY_DEPTH,
    decode_body,
    encode,
    nested_deeper_than,
    nesting_depth,
)
from tests.wire.samples import BAD_BODIES

# --- decoding HTTP bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_undecodable_bodies_are_parse_errors(raw: bytes) -> None:
    with pytest.raises(ParseError):
        decode_body(raw)


def test_file_name_surrogates_decode_for_a_round_trip() -> None:
    # U+DC80..U+DCFF spell a non-UTF-8 file name's bytes (surrogateescape).
    assert decode_body(b'{"path":"caf\\udce9.txt"}') == {
        "path": "caf\udce9.txt"
    }



def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"a": "[" * 5000 + '\\"{' * 100})
    assert nesting_depth(text.encode()) == 1
    assert decode_body(text.encode()) == {"a": "[" * 5000 + '\\"{' * 100}


def test_valid_unicode_survives_decoding() -> None:
    value = {"name": "Überserver 🎮", "motd": "\u2028 line sep", "esc": "\ud83c\udfae"}
    assert decode_body(json.dumps(value).encode()) == {**value, "esc": "🎮"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_parse_error(raw: bytes) -> None:
    try:
        value = decode_body(raw)
    except ParseError:
        return
    # Whatever decodes can be encoded back (no unusable lone surrogate got
    # through; file-name surrogates map back to their bytes).
    json.dumps(value, ensure_ascii=False, default=repr).encode("utf-8", "surrogateescape")


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=30,
    ),
    st.integers(min_value=0, max_value=200),
)
def test_wrapped_values_decode_unless_too_deep(value: object, depth: int) -> None:
    text = json.dumps(value)
    raw = ("[" * depth + text + "]" * depth).encode("utf-8")
    too_deep = depth + nesting_depth(text.encode()) > MAX_BODY_DEPTH
    try:
        decoded = decode_body(raw)
    except ParseError:
        assert too_deep
        return
    assert not too_deep
    for _ in range(depth):
        assert isinstance(decoded, list) and len(decoded) == 1
        decoded = decoded[0]
    assert decoded == value


# --- nesting of frames ------------------------------------------------------------------------

nested_json = st.recursive(
    st.none() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=6),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), children, max_size=3),
    max_leaves=20,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@given(nested_json, st.integers(min_value=0, max_value=6))
def test_nesting_is_measured_without_counting_brackets_in_strings(value: Any, limit: int) -> None:
    assert nested_deeper_than(json.dumps(value), limit) == (_depth(value) > limit)


# --- the one encoder --------------------------------------------------------------------------


def test_encode_is_compact_utf8_json_and_tolerates_odd_values() -> None:
    data = encode({"a": "é", "when": datetime(2026, 1, 1)})
    assert data == '{"a":"é","when":"2026-01-01 00:00:00"}'.encode()


odd_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats() | st.text(st.characters(blacklist_categories=()))
    | st.sampled_from([UnrepresentableNumber("1e999"), UnrepresentableNumber("NaN"),
                       datetime(2026, 1, 1), frozenset({1, 2}), b"bytes"])
    | st.builds(pow, st.just(10), st.just(5000)),  # an int too long to write in decimal
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(st.characters(blacklist_categories=()), max_size=4) | st.integers(),
                      children, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=5), odd_values, max_size=4), odd_values)
def test_encode_never_fails_and_always_writes_strict_utf8_json(
    frame: dict[str, Any], frame_id: Any,
) -> None:
    frame["id"] = frame_id
    data = encode(frame)

    def refuse(literal: str) -> Any:
        raise AssertionError(literal)

    decoded = json.loads(data.decode("utf-8"), parse_int=Decimal, parse_float=Decimal,
                         parse_constant=refuse)
    if isinstance(frame_id, str):
        # What the Panel reads back is the very string (surrogate pairs aside,
        # which JSON joins into one character either way).
        assert decoded["id"] == json.loads(json.dumps(frame_id))
    if isinstance(frame_id, UnrepresentableNumber) and frame_id.is_json:
        assert data.startswith(b'{"id":1e999')


def test_console_frames_keep_utf8_compact_and_escape_only_lone_surrogates() -> None:
    assert encode({"a": "é"}) == '{"a":"é"}'.encode()
    assert encode({"a": "\udcff"}) == b'{"a":"\\udcff"}'
    assert encode({"a": float("nan"), "b": [float("inf")]}) == b'{"a":null,"b":[null]}'


def test_values_other_than_objects_follow_the_same_policy() -> None:
    assert encode([float("nan"), float("-inf"), "é"]) == '[null,null,"é"]'.encode()
    assert encode("\ud800") == b'"\\ud800"'
    assert encode(UnrepresentableNumber("1e999")) == b"null"
    assert encode({"id": UnrepresentableNumber("1e999"), "x": float("inf")}) == (
        b'{"id":1e999,"x":null}'
    )
