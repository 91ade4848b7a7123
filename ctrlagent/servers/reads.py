"""
Status and metrics reads answered from each server's last answer.

The Panel reads the same servers' status and metrics again and again, and
between two samples nothing in those answers changes but the time: the
``timestamp`` of the figures (the time of the answer) and the ``uptime``
(that time less the start).  Building a status read through the registry
(its records, their JSON shapes, the envelope and the encoder) is most of
what a read costs the agent, so ``ReadAnswers`` keeps, per server and read,
the encoded answer cut where the time goes (a template), and fills the
template with the time of each read while the server's ``read_key`` (every
other thing the answer shows) stays the same.

A template is made from two renderings of the answer at two times far
apart (``_FIRST``, ``_SECOND``): the first is cut wherever that time's
``timestamp`` or ``uptime`` appears, and the template filled with the second
time must give the second rendering byte for byte, else the answer is not
kept (a name that holds such a time, a field that moves with the time in a
way the template does not know) and every read of it takes the registry's
path, as before.  An ``uptime`` outside the range where every JSON encoder
writes a float alike (under a millisecond, or absurdly long) is not filled
either.  The registry stays the reference: ``read_answer`` returning None
means "answer as ever".

Pure but for the server it reads: no reactor, no I/O of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from ctrlagent.wire.json import encode
from ctrlagent.wire.time import iso_ms

if TYPE_CHECKING:
    from ctrlagent.servers.server import Server

__all__ = ["ReadAnswers", "Render", "STATUS", "METRICS"]

STATUS = "get_server_status"
METRICS = "get_server_metrics"

# ``(action, server, now)`` -> the encoded success answer of the read at ``now``.
Render = Callable[[str, "Server", float], bytes]

# The two times a template is made from: far from any real time (2100 and
# 2101), with milliseconds that no rounding blurs.
_FIRST = 4102444800.125
_SECOND = 4133980800.375
# An uptime is filled only in this range: there ``json`` and orjson write a
# float the same way (no exponent).
_UPTIME_MIN = 1e-3
_UPTIME_MAX = 1e15


class _Now:
    """Where a template takes the time's ``timestamp``."""


class _Uptime:
    """Where a template takes the time less the start."""


_NOW = _Now()
_UPTIME = _Uptime()
Piece = bytes | _Now | _Uptime


class _Kept:
    """One read's answer for one ``read_key``: its template, or None (not kept)."""

    __slots__ = ("key", "pieces", "started_at")

    def __init__(
        self, key: tuple[object, ...], pieces: tuple[Piece, ...] | None, started_at: float | None
    ) -> None:
        self.key = key
        self.pieces = pieces
        self.started_at = started_at


def _marks(now: float, started_at: float | None) -> dict[bytes, Piece]:
    """The bytes that stand for ``now`` in an answer at ``now``."""
    marks: dict[bytes, Piece] = {iso_ms(now).encode("ascii"): _NOW}
    if started_at is not None:
        marks[encode(max(0.0, now - started_at))] = _UPTIME
    return marks


def fill(pieces: tuple[Piece, ...], now: float, started_at: float | None) -> bytes | None:
    """The answer at ``now`` (None: an uptime this template does not write)."""
    stamp = iso_ms(now).encode("ascii")
    uptime = b""
    if started_at is not None:
        value = max(0.0, now - started_at)
        if not _UPTIME_MIN <= value < _UPTIME_MAX:
            return None
        uptime = encode(value)
    return b"".join(
        piece if type(piece) is bytes else stamp if piece is _NOW else uptime
        for piece in pieces
    )


def template(
    first: bytes, second: bytes, started_at: float | None
) -> tuple[Piece, ...] | None:
    """
    ``first`` (the answer at ``_FIRST``) cut where the time goes, checked
    against ``second`` (the answer at ``_SECOND``); None when the cut does
    not give ``second`` back.
    """
    marks = _marks(_FIRST, started_at)
    pattern = re.compile(b"|".join(re.escape(m) for m in sorted(marks, key=len, reverse=True)))
    pieces: list[Piece] = []
    at = 0
    for found in pattern.finditer(first):
        pieces.append(first[at : found.start()])
        pieces.append(marks[found.group()])
        at = found.end()
    pieces.append(first[at:])
    kept = tuple(p for p in pieces if p != b"")
    if fill(kept, _SECOND, started_at) != second:
        return None
    return kept


class ReadAnswers:
    """
    Each server's status and metrics answers, kept by its ``read_key`` and
    filled with the time of each read (see the module).  ``render`` makes an
    answer the registry's way (``ServerManager._render_read``).
    """

    def __init__(self, render: Render) -> None:
        self._render = render
        #: Answers filled from a template, and templates made (tests, benchmarks).
        self.filled = 0
        self.made = 0

    def answer(self, action: str, server: Server, now: float) -> bytes | None:
        """``action``'s answer for ``server`` at ``now``, or None: answer it as ever."""
        key = server.read_key()
        kept = server.kept_answers.get(action)
        if kept is None or kept.key != key:
            kept = self._make(action, server, key)
            server.kept_answers[action] = kept
        if kept.pieces is None:
            return None
        answer = fill(kept.pieces, now, kept.started_at)
        if answer is not None:
            self.filled += 1
        return answer

    def _make(self, action: str, server: Server, key: tuple[object, ...]) -> _Kept:
        self.made += 1
        started_at = server.started_at
        first = self._render(action, server, _FIRST)
        second = self._render(action, server, _SECOND)
        return _Kept(key, template(first, second, started_at), started_at)
