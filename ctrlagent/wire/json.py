"""
JSON on the Panel's wire, both ways, for both transports.

Out: :func:`to_json` turns the agent's results into JSON values.  The domain
returns typed records (frozen dataclasses in ``wire/servers.py``,
``wire/files.py``, ``wire/node.py``); each record module registers its shape
with :func:`to_json` beside the record, so the two transports serialise every
result the same way.  Mappings, lists and tuples are walked; anything else
(``str``, ``int``, ``float``, ``bool``, ``None``) is passed through.
:func:`encode` then writes one HTTP body or WebSocket frame, with one policy
for every odd value (see its docstring): the same data is the same bytes on
HTTP and on the WebSocket link.

In: :func:`decode_body` reads an HTTP request body and :func:`decode_frame`
a WebSocket frame's text.  ``json.loads`` fails in more ways than
``ValueError``: a document nested a thousand levels deep raises
``RecursionError``, and it happily returns strings holding lone surrogates
(``"\\ud800"``) that fail later, wherever the agent encodes them.  Both
decoders therefore measure nesting on the text before the parser recurses,
and decode a number no action can use (``1e999``, ``NaN``, ``Infinity``, an
integer past Python's digit limit) to an ``UnrepresentableNumber`` marker
that the dispatcher's ``check_payload`` refuses as ``INVALID_PAYLOAD`` naming
the field, on both transports alike.  A body is accepted only when it is

- valid UTF-8 (bytes are decoded strictly as UTF-8, no encoding guessing),
- nested at most ``MAX_BODY_DEPTH`` levels, and
- free of lone surrogates in any string or key (checked by an iterative walk),
  but for U+DC80..U+DCFF: those spell the bytes of a non-UTF-8 file name,
  as listings report them, and both transports accept them back.

Frames are judged by ``wire.incoming``, which still answers a frame whose
payload holds a lone surrogate (its id is echoed as sent).

Pure: no reactor, no I/O.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

from ctrlagent.errors import ParseError
from ctrlagent.wire.command import UnrepresentableNumber, printable, unusable_text

# --- results as JSON values -----------------------------------------------------------------


# Values of exactly these types are JSON as they are, and plain dicts, lists
# and tuples are walked: ``_walk`` takes them without the dispatch (no record
# type is one of them; a subclass still goes through ``to_json``).
_LEAVES = frozenset((str, int, float, bool, type(None)))


def _walk(value: Any) -> Any:
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is dict:
        return {str(key): _walk(item) for key, item in value.items()}
    if kind is list or kind is tuple:
        return [_walk(item) for item in value]
    return to_json(value)


@functools.singledispatch
def to_json(value: Any) -> Any:
    """``value`` as plain JSON values (dicts, lists, strings, numbers, booleans, null)."""
    if isinstance(value, Mapping):
        return {str(key): _walk(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_walk(item) for item in value]
    return value


# --- the one encoder ------------------------------------------------------------------------


def _default(value: Any) -> Any:
    """What the encoder writes for values JSON has no type for."""
    if isinstance(value, UnrepresentableNumber):
        # Only an echoed id can hold one: at the top level it is written as
        # sent (see encode); nested inside an (invalid) object id, as null.
        return None
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, enum.Enum):
        return value.value  # as orjson writes one (see _encode_value)
    return str(value)  # datetimes, paths


# Built once: ``json.dumps`` with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
)
_ASCII_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_default
)
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
# Beyond this an int cannot be written in decimal (sys.get_int_max_str_digits).
_LARGEST_WRITABLE = 10**4000
_SANITISE_DEPTH = 100


def _sanitise(value: Any, depth: int = 0) -> Any:
    """
    ``value`` reduced to what JSON can hold: non-finite floats, unwritable
    numbers, circular or runaway nesting become null; other odd values strings.
    Only used when a value would not encode as it is.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value if -_LARGEST_WRITABLE < value < _LARGEST_WRITABLE else None
    if depth >= _SANITISE_DEPTH:
        return None
    if isinstance(value, Mapping):
        return {
            key if isinstance(key, str) else printable(key): _sanitise(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_sanitise(item, depth + 1) for item in value]
    if isinstance(value, UnrepresentableNumber):
        return None
    if isinstance(value, enum.Enum):
        return _sanitise(value.value, depth + 1)  # as _default writes one
    try:
        return str(value)
    except Exception:
        return None


# orjson writes plain JSON values (what ``to_json`` returns) five to ten
# times faster than ``json``, whose C encoder calls back into Python for
# every float: a status answer took 10 us, a third of its Python.  Whatever
# it will not write as ``_ENCODER`` would (a subclass of a JSON type, a
# dataclass, a datetime, a set, a key that is not a string, an integer past
# 64 bits, a lone surrogate, nesting past 254 levels) it refuses, and the
# value goes the ``json`` way below.  The two agree on every value but the
# spelling of some floats' exponents (``1e-07`` against ``1e-7``), which
# reads back as the same number; NaN and infinities are null in both.
_FAST_OPTIONS = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


# orjson writes into a buffer of at least 4 KiB and hands that very buffer
# over as the bytes object: a small document that is kept (a frame queued for
# the Panel, a console line's) would hold 4 KiB or more.  Below this size the
# result is copied into bytes of its own length (0.3 us for an answer).
_COPY_BELOW = 32 * 1024


def _encode_value(value: Any) -> bytes:
    try:
        out = orjson.dumps(value, option=_FAST_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is one
        return _encode_odd(value)
    return bytes(memoryview(out)) if len(out) < _COPY_BELOW else out


def _encode_odd(value: Any) -> bytes:
    """``value`` written by ``json``, whatever it holds (the reference policy)."""
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError):
        # NaN/Infinity, a circular or overly deep structure, an odd key.
        value = _sanitise(value)
        text = _ENCODER.encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (echoed from the Panel, or a file name that is not
        # UTF-8) cannot be UTF-8: write the whole value with \\uXXXX escapes,
        # which the Panel's JSON.parse reads back as the very same string.
        return _ASCII_ENCODER.encode(value).encode("ascii")


def encode(value: Any) -> bytes:
    """
    ``value`` (an HTTP body or a WebSocket frame) as compact UTF-8 JSON.

    Never fails, and treats every value alike on both transports: odd values
    (datetimes, paths) become strings, enums their value, sets lists, NaN and +/-Infinity
    ``null`` (strict JSON for the Panel's ``JSON.parse``), numbers too long to
    write and runaway nesting ``null``, lone surrogates ``\\uXXXX`` escapes
    (the whole value is then written in ASCII).  A top-level member that came
    as an out-of-range literal (an echoed id ``1e999``) is written back as
    that literal.
    """
    if not isinstance(value, Mapping):
        return _encode_value(value)
    literals = [key for key, item in value.items() if isinstance(item, UnrepresentableNumber)]
    if not literals:
        return _encode_value(value)
    # An echoed id (``id``, a legacy ``requestId``) that came as an
    # out-of-range literal: spliced in as that literal, which json cannot write.
    pairs = []
    for key in literals:
        text = value[key].text
        literal = text if _JSON_NUMBER.fullmatch(text) else "null"
        pairs.append(_encode_value(key) + b":" + literal.encode("ascii"))
    rest = _encode_value({key: item for key, item in value.items() if key not in literals})
    return b"{" + b",".join(pairs) + (b"," + rest[1:] if rest != b"{}" else b"}")


# --- the one decoder ------------------------------------------------------------------------


def _decode_float(text: str) -> float | UnrepresentableNumber:
    value = float(text)
    return value if math.isfinite(value) else UnrepresentableNumber(text)


def _decode_int(text: str) -> int | UnrepresentableNumber:
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return UnrepresentableNumber(text)


# The one JSON decoder of both transports: strict about nothing but never
# failing on a number (see UnrepresentableNumber), so that ``check_payload``
# names the field holding it and a frame's id can still be answered.
PAYLOAD_DECODER = json.JSONDecoder(
    parse_float=_decode_float, parse_int=_decode_int, parse_constant=UnrepresentableNumber
)


# --- HTTP request bodies --------------------------------------------------------------------

# Deep enough for any command the Panel sends (a few levels), far from the
# interpreter's recursion limit so that nothing downstream can overflow.
MAX_BODY_DEPTH = 64

_OPENERS = frozenset(b"[{")
_CLOSERS = frozenset(b"]}")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


def nesting_depth(raw: bytes, limit: int = MAX_BODY_DEPTH) -> int:
    """
    The deepest ``[``/``{`` nesting of ``raw`` outside strings, counting up to
    ``limit + 1`` at most (the scan stops there).  Malformed text is left for
    the parser to report.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif byte in _CLOSERS:
            depth -= 1
    return deepest


_LONE_SURROGATE = "request body holds a lone UTF-16 surrogate (\\ud800-\\udfff)"


def _check_strings(value: Any) -> None:
    """Refuse a lone surrogate anywhere in ``value`` (iterative: no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if unusable_text(item):
                raise ParseError(_LONE_SURROGATE)
        elif isinstance(item, dict):
            for key, inner in item.items():
                if unusable_text(key):
                    raise ParseError(_LONE_SURROGATE)
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def decode_body(raw: bytes) -> Any:
    """The JSON value of an HTTP request body, or ``ParseError`` saying why there is none."""
    if not raw.strip():
        raise ParseError("request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(
            "request body is not valid UTF-8 (byte {} at offset {})".format(
                hex(raw[e.start]), e.start
            )
        ) from None
    # No body can nest deeper than it has brackets: most pass on that count
    # alone, without the byte-by-byte scan.
    brackets = raw.count(b"{") + raw.count(b"[")
    if brackets > MAX_BODY_DEPTH and nesting_depth(raw) > MAX_BODY_DEPTH:
        raise ParseError("request body is nested deeper than {} levels".format(MAX_BODY_DEPTH))
    try:
        value = PAYLOAD_DECODER.decode(text)
    except (ValueError, RecursionError, MemoryError) as e:
        # ValueError covers JSONDecodeError and integers past the digit limit.
        raise ParseError("request body is not valid JSON: {}".format(_short(e))) from None
    if b"\\u" in raw:
        # Strict UTF-8 holds no surrogate: only a \u escape makes one.
        _check_strings(value)
    return value


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# --- WebSocket frames -----------------------------------------------------------------------

# Deepest nesting of a frame that is decoded at all; deeper ones are refused
# before the decoder sees them (it recurses), as PARSE_ERROR.
MAX_FRAME_DEPTH = 64

# A JSON string (skipped whole) or a bracket; enough to measure nesting without
# decoding.  The unrolled form stays linear on long strings.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def nested_deeper_than(text: str, limit: int) -> bool:
    """
    Whether ``text``'s arrays and objects nest more than ``limit`` levels deep;
    brackets inside strings do not count.  Iterative, stops at ``limit + 1``,
    and only scans when the text holds more brackets than ``limit`` at all.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _STRUCTURE.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def shallow(text: str, keep: int) -> str:
    """
    ``text`` with every array or object nested deeper than ``keep`` replaced by
    ``null`` (and the outer ones closed, should the text end inside one): the
    outline of a frame that cannot be decoded whole.
    """
    pieces: list[str] = []
    openers: list[str] = []  # the open containers up to depth ``keep``
    depth = 0
    copied_to = 0
    for match in _STRUCTURE.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth <= keep:
                openers.append(char)
            elif depth == keep + 1:
                pieces.append(text[copied_to : match.start()])
                pieces.append("null")
        elif char in "]}":
            if depth == keep + 1:
                copied_to = match.end()
            elif 0 < depth <= keep and openers:
                openers.pop()
            depth -= 1
    if depth <= keep:
        pieces.append(text[copied_to:])
    else:
        pieces.extend("]" if opener == "[" else "}" for opener in reversed(openers))
    return "".join(pieces)


def decode_frame(text: str) -> Any:
    """
    The JSON value of one WebSocket frame's text, or ``ParseError`` saying why
    there is none (nested deeper than ``MAX_FRAME_DEPTH``, not JSON).
    Out-of-range numbers decode to ``UnrepresentableNumber`` markers.
    """
    if nested_deeper_than(text, MAX_FRAME_DEPTH):
        raise ParseError("frame is nested deeper than {} levels".format(MAX_FRAME_DEPTH))
    try:
        return PAYLOAD_DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise ParseError("frame is not JSON ({} at char {})".format(e.msg, e.pos)) from None
    except (ValueError, RecursionError) as e:
        raise ParseError("frame is not JSON ({})".format(printable(str(e), 100))) from None


def decode_outline(text: str) -> Any:
    """
    The outer two levels of a frame that cannot be decoded whole (deeper
    containers read as null); ``ValueError`` when not even those decode.
    """
    return PAYLOAD_DECODER.decode(shallow(text, 2))


__all__ = [
    "MAX_BODY_DEPTH",
    "MAX_FRAME_DEPTH",
    "decode_body",
    "decode_frame",
    "decode_outline",
    "encode",
    "nested_deeper_than",
    "nesting_depth",
    "shallow",
    "to_json",
]
