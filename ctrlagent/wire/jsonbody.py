"""
Decoding an HTTP request body as JSON, where every failure is a ``ParseError``.

``json.loads`` fails in more ways than ``ValueError``: a document nested a
thousand levels deep raises ``RecursionError``, and it happily returns strings
holding lone surrogates (``"\\ud800"``) that fail later, wherever the agent
encodes them (a reply, a log line, a file name).  A body is therefore accepted
only when it is

- valid UTF-8 (no BOM-less UTF-16 guessing surprises either: bytes are decoded
  strictly as UTF-8 first),
- JSON, where a number no action can use (``1e999``, ``NaN``, ``Infinity``,
  an integer past Python's digit limit) decodes to a marker that the
  dispatcher's ``check_payload`` refuses as ``INVALID_PAYLOAD`` naming the
  field, exactly as on the WebSocket link,
- nested at most ``MAX_DEPTH`` levels (checked on the text before the parser
  recurses, so the parser never can), and
- free of lone surrogates in any string or key (checked by an iterative walk),
  but for U+DC80..U+DCFF: those spell the bytes of a non-UTF-8 file name,
  as listings report them, and both transports accept them back.

This module is pure: no reactor, no I/O.
"""

from __future__ import annotations

from typing import Any

from ctrlagent.errors import ParseError
from ctrlagent.wire.command import PAYLOAD_DECODER, unusable_text

# Deep enough for any command the Panel sends (a few levels), far from the
# interpreter's recursion limit so that nothing downstream can overflow.
MAX_DEPTH = 64

_OPENERS = frozenset(b"[{")
_CLOSERS = frozenset(b"]}")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


def nesting_depth(raw: bytes, limit: int = MAX_DEPTH) -> int:
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


_has_lone_surrogate = unusable_text


def _check_strings(value: Any) -> None:
    """Refuse a lone surrogate anywhere in ``value`` (iterative: no recursion)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _has_lone_surrogate(item):
                raise ParseError("request body holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        elif isinstance(item, dict):
            for key, inner in item.items():
                if _has_lone_surrogate(key):
                    raise ParseError(
                        "request body holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
                    )
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def decode_json(raw: bytes) -> Any:
    """The JSON value in ``raw``, or ``ParseError`` saying why there is none."""
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
    if nesting_depth(raw) > MAX_DEPTH:
        raise ParseError("request body is nested deeper than {} levels".format(MAX_DEPTH))
    try:
        value = PAYLOAD_DECODER.decode(text)
    except (ValueError, RecursionError, MemoryError) as e:
        # ValueError covers JSONDecodeError and integers past the digit limit.
        raise ParseError("request body is not valid JSON: {}".format(_short(e))) from None
    _check_strings(value)
    return value


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."
