"""
Every body that does not decode to JSON answers 400 ``PARSE_ERROR``, on the
Panel's command endpoint and on the REST surface alike, and never logs a
traceback: deep nesting, invalid UTF-8, lone surrogates, and whatever
hypothesis makes of arbitrary bytes.  Numbers no action can use (``1e999``,
``NaN``, ``Infinity``, 5,000 digits) are JSON the dispatcher refuses as
``INVALID_PAYLOAD`` naming the field.
"""

from __future__ import annotations

import json
import sys

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctrlagent.errors import ParseError
from ctrlagent.wire.jsonbody import MAX_DEPTH, decode_json, nesting_depth
from tests.api.conftest import UUID, ApiRig, panel_headers

DEEP = 1000

BAD_BODIES = {
    "array nested 1,000 deep": b"[" * DEEP + b"]" * DEEP,
    "object nested 1,000 deep": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "command whose payload is nested 1,000 deep": (
        b'{"action":"system.ping","payload":{"x":' + b"[" * DEEP + b"]" * DEEP + b"}}"
    ),
    "nested past the recursion limit": b"[" * (sys.getrecursionlimit() * 3),
    "nested one level past the limit": b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    "invalid UTF-8": b'{"action":"system.ping","payload":{"x":"\xc3\x28"}}',
    "UTF-16 body": '{"action":"system.ping"}'.encode("utf-16"),
    "lone surrogate in a value": b'{"action":"system.ping","payload":{"x":"\\ud800"}}',
    "lone surrogate in the action": b'{"action":"\\udfff"}',
    "lone surrogate in a key": b'{"action":"system.ping","payload":{"\\udc00":1}}',
    "encoded surrogate (CESU)": b'{"action":"\xed\xa0\x80"}',
}

# JSON whose numbers no action can use: decoded (to a marker), then refused by
# the dispatcher's payload check as INVALID_PAYLOAD naming the field, exactly
# as the WebSocket link does.
NUMBER_BODIES = {
    "integer past the digit limit": (
        b'{"action":"system.ping","payload":{"n":' + b"9" * 5000 + b"}}", "n"),
    "NaN literal": (b'{"action":"system.ping","payload":{"x":NaN}}', "x"),
    "Infinity literal": (b'{"action":"system.ping","payload":{"x":-Infinity}}', "x"),
    "1e999": (b'{"action":"system.ping","payload":{"limits":{"cpu":1e999}}}', "limits.cpu"),
}


@pytest.mark.parametrize("raw,field", list(NUMBER_BODIES.values()), ids=list(NUMBER_BODIES))
@pytest_twisted.ensureDeferred
async def test_unusable_numbers_are_invalid_payload_naming_the_field(
    rig: ApiRig, raw: bytes, field: str
) -> None:
    code, body = await rig.command(raw)
    assert (code, body["success"], body["code"]) == (200, False, "INVALID_PAYLOAD")
    assert body.get("field") == field or field in body["error"]


def test_file_name_surrogates_decode_for_a_round_trip() -> None:
    # U+DC80..U+DCFF spell a non-UTF-8 file name's bytes (surrogateescape).
    assert decode_json(b'{"path":"caf\\udce9.txt"}') == {
        "path": "caf\udce9.txt"
    }


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
@pytest_twisted.ensureDeferred
async def test_undecodable_command_bodies_are_400_parse_error(rig: ApiRig, raw: bytes) -> None:
    code, body = await rig.command(raw)
    assert (code, body["success"], body["code"]) == (400, False, "PARSE_ERROR")
    assert body["error"]


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
@pytest_twisted.ensureDeferred
async def test_undecodable_rest_bodies_are_400_parse_error(rig: ApiRig, raw: bytes) -> None:
    response = await rig.http.post(
        "http://node.test:8081/api/servers/{}/power".format(UUID),
        data=raw,
        headers=panel_headers(),
    )
    body = json.loads(await response.content())
    assert (response.code, body["code"]) == (400, "PARSE_ERROR")


@pytest_twisted.ensureDeferred
async def test_nesting_within_the_limit_is_still_served(rig: ApiRig) -> None:
    inner = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2)
    raw = '{"action":"system.ping","payload":{"x":' + inner + "}}"
    assert nesting_depth(raw.encode()) == MAX_DEPTH
    code, body = await rig.command(raw.encode())
    # Decoded (no PARSE_ERROR); the dispatcher's own, tighter payload bound
    # then names the field.
    assert (code, body["success"], body["code"]) == (200, False, "INVALID_PAYLOAD")
    shallow = '{"action":"system.ping","payload":{"x":' + "[" * 8 + "]" * 8 + "}}"
    code, body = await rig.command(shallow.encode())
    assert (code, body["success"]) == (200, True)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"a": "[" * 5000 + '\\"{' * 100})
    assert nesting_depth(text.encode()) == 1
    assert decode_json(text.encode()) == {"a": "[" * 5000 + '\\"{' * 100}


def test_valid_unicode_survives_decoding() -> None:
    value = {"name": "Überserver 🎮", "motd": "\u2028 line sep", "esc": "\ud83c\udfae"}
    assert decode_json(json.dumps(value).encode()) == {**value, "esc": "🎮"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_parse_error(raw: bytes) -> None:
    try:
        value = decode_json(raw)
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
    too_deep = depth + nesting_depth(text.encode()) > MAX_DEPTH
    try:
        decoded = decode_json(raw)
    except ParseError:
        assert too_deep
        return
    assert not too_deep
    for _ in range(depth):
        assert isinstance(decoded, list) and len(decoded) == 1
        decoded = decoded[0]
    assert decoded == value
