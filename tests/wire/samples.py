"""
What the wire tests feed the decoders and encoders: hypothesis strategies of
JSON values and timestamps, and HTTP bodies that must not decode (shared by
``tests/wire`` and ``tests/api``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from hypothesis import strategies as st

from ctrlagent.wire.json import MAX_BODY_DEPTH

NOW = 1_795_482_053.257

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# What a command payload may hold: numbers within +/-2**53 (see check_payload).
usable_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(min_value=-(2.0**53), max_value=2.0**53) | st.text()
)
usable_values = st.recursive(
    usable_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
odd_timestamps = (
    st.none()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats()
    | st.text(max_size=30)
    | st.datetimes().map(lambda d: d.isoformat())
    | st.datetimes().map(lambda d: d.isoformat() + "Z")
    | st.just("2026-11-24T02:20:30.123Z")
)
ids = st.text(min_size=1, max_size=30) | st.integers(min_value=0, max_value=10**15)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


DEEP = 1000

BAD_BODIES = {
    "array nested 1,000 deep": b"[" * DEEP + b"]" * DEEP,
    "object nested 1,000 deep": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "command whose payload is nested 1,000 deep": (
        b'{"action":"system.ping","payload":{"x":' + b"[" * DEEP + b"]" * DEEP + b"}}"
    ),
    "nested past the recursion limit": b"[" * (sys.getrecursionlimit() * 3),
    "nested one level past the limit": b"[" * (MAX_BODY_DEPTH + 1) + b"]" * (MAX_BODY_DEPTH + 1),
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

