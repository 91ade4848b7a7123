"""
JSON on the wire (``wire.json``).  Out: one encoder for both transports that
never fails and writes strict, compact UTF-8 JSON.  In: every HTTP body that
does not decode to JSON is a ``ParseError`` (deep nesting, invalid UTF-8, lone
surrogates, whatever hypothesis makes of arbitrary bytes); numbers no action
can use decode to markers; nesting is measured without decoding.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import tracemalloc
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ctrlagent.errors import ParseError
from ctrlagent.wire import json as wire_json
from ctrlagent.wire.command import UnrepresentableNumber, unusable_text
from ctrlagent.wire.json import (
    MAX_BODY_DEPTH,
    decode_body,
    encode,
    nested_deeper_than,
    nesting_depth,
    to_json,
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


# --- the plain-command path's shortcuts (``api/site.py``) --------------------------------------


def _has_unusable_text(value: Any) -> bool:
    if isinstance(value, str):
        return unusable_text(value)
    if isinstance(value, dict):
        return any(unusable_text(k) or _has_unusable_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_unusable_text(v) for v in value)
    return False


# Text with lone surrogates now and then: high, low, and the U+DC80..U+DCFF
# that spell a file name's bytes (accepted).
_TEXT = st.text(
    st.sampled_from("ab\u00e9\U0001f3ae\ud800\udbff\udc00\udc7f\udc80\udce9\udcff\udd00\udfff"),
    max_size=6,
)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)


@given(_JSON_VALUES)
def test_a_lone_surrogate_is_refused_wherever_it_is_and_nothing_else(value: Any) -> None:
    # json.dumps writes every surrogate as a \u escape: the only way one reaches
    # the decoder, as strict UTF-8 holds none.
    # A high surrogate escaped right before a low one is a pair: the decoder
    # reads the one character they spell, so what it reads is what counts.
    raw = json.dumps(value).encode()
    read = json.loads(raw)
    if _has_unusable_text(read):
        with pytest.raises(ParseError, match="surrogate"):
            decode_body(raw)
    else:
        assert decode_body(raw) == read


def test_a_body_without_escapes_is_not_walked_for_surrogates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    walked: list[object] = []
    monkeypatch.setattr(wire_json, "_check_strings", walked.append)
    assert decode_body(b'{"action": "get_server_status", "serverId": "s1"}')
    assert walked == []
    decode_body(b'{"action": "get_server_status", "serverId": "\\u0073"}')
    assert walked == [{"action": "get_server_status", "serverId": "s"}]


class _Count(int):
    """An int subclass a record module could register a shape for."""


def _reference_to_json(value: Any) -> Any:
    """``to_json`` as it walked every value before the shortcut."""
    if isinstance(value, Mapping):
        return {str(k): _reference_to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reference_to_json(v) for v in value]
    return value


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=4)
        | st.integers().map(_Count),
        lambda inner: st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(OrderedDict),
        max_leaves=15,
    )
)
def test_to_json_walks_plain_values_as_the_generic_walk_does(value: Any) -> None:
    assert to_json(value) == _reference_to_json(value)


class _Tally(int):
    """A test-only int subclass with a registered shape."""


@to_json.register
def _tally(value: _Tally) -> str:
    return "tally {}".format(int(value))


def test_to_json_still_dispatches_registered_types_inside_plain_containers() -> None:
    assert to_json({"a": [_Tally(3), 3], "b": (_Tally(1), {"c": _Tally(2)})}) == {
        "a": ["tally 3", 3],
        "b": ["tally 1", {"c": "tally 2"}],
    }


# --- the fast encoder agrees with the reference one ------------------------------------------


class _Colour(enum.Enum):
    RED = "red"


class _Level(enum.IntEnum):
    HIGH = 3


class _Name(str):
    pass


_FAST_OR_ODD = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats() | st.text(st.characters(blacklist_categories=()), max_size=8)
    | st.sampled_from([_Colour.RED, _Level.HIGH, _Name("sub"), datetime(2026, 1, 1),
                       frozenset({1}), UnrepresentableNumber("1e999"), "\x00\x1f\x7f\u2028"]),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
    max_leaves=12,
)


@given(_FAST_OR_ODD)
# Hypothesis found it: a non-finite float sends the value through the
# sanitiser, which wrote an enum as its name, not its value.
@example([math.inf, _Colour.RED])
@example({"state": _Colour.RED, "cpu": math.nan, "level": _Level.HIGH})
def test_the_fast_encoder_writes_what_the_reference_encoder_writes(value: Any) -> None:
    """
    Values go through orjson and fall back to ``json`` for what orjson
    refuses: either way the same JSON value as ``json`` alone writes (the
    same bytes unless a float is written, whose exponent orjson spells
    without a leading zero), for every kind of value a result can hold.
    (``encode`` then splices top-level number literals in: tested above.)
    """
    fast = wire_json._encode_value(value)
    reference = wire_json._encode_odd(value)
    read = functools.partial(json.loads, parse_float=Decimal, parse_int=Decimal)
    assert read(fast.decode("utf-8")) == read(reference.decode("utf-8"))
    if not _holds_float(value):
        assert fast == reference


def _holds_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_holds_float(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_float(v) for v in value)
    return False


def test_a_status_answer_takes_the_fast_encoder() -> None:
    answer = {"success": True, "data": {"serverId": "s1", "cpu": 0.5, "network": {"in": 1},
                                        "aliases": [], "uptime": None, "name": "Überserver 🎮"}}
    assert encode(answer) == json.dumps(answer, separators=(",", ":"),
                                        ensure_ascii=False).encode()
    assert wire_json.orjson.dumps(answer, option=wire_json._FAST_OPTIONS) == encode(answer)


def test_a_kept_small_document_holds_about_its_own_size() -> None:
    # orjson's own bytes hold its whole working buffer (4 KiB or more): a
    # thousand queued frames would hold 4 MB.  What encode returns holds
    # what it says.
    frame = {"event": "console output", "args": ["tick 1"]}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode({**frame, "n": i}) for i in range(1000)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000
    assert held < 1000 * 200
