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

The template costs no rendering of its own.  The first read of a key is
rendered (as the registry would write it, at the time of that read) and
remembered with its time; the next read of the same key, at least
``_APART`` later, is rendered too, and the two make the template: the
first is cut wherever its time's ``timestamp`` or ``uptime`` appears, and
the template filled with the second read's time must give the second
rendering byte for byte, else the answer is not kept (a name that holds such
a time, a field that moves with the time in a way the template does not
know) and every read of that key takes the registry's path, as before.  So
a server read once per sample (a Panel polling) costs one rendering a read,
and one read many times per sample costs two renderings, then fills.  An
``uptime`` outside the range where every JSON encoder writes a float alike
(under a millisecond, or absurdly long) is not filled either.  The registry
stays the reference: ``read_answer`` returning None means "answer as ever".

Pure but for the server it reads: no reactor, no I/O of its own.
"""

from __future__ import annotations

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

# Two renderings make a template only this far apart (seconds): their
# times differ in their milliseconds, so that no field that holds one time
# passes the check by chance.
_APART = 0.002
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
    """
    One read's answer for one ``read_key``: its template (``pieces``), or
    the first rendering and its time while there is none yet, or neither
    (not kept: the registry answers).
    """

    __slots__ = ("key", "pieces", "started_at", "first", "at")

    def __init__(
        self, key: tuple[object, ...], started_at: float | None, first: bytes, at: float
    ) -> None:
        self.key = key
        self.pieces: tuple[Piece, ...] | None = None
        self.started_at = started_at
        self.first: bytes | None = first
        self.at = at


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


def _cut(answer: bytes, marks: dict[bytes, Piece]) -> list[Piece]:
    """``answer`` cut at every occurrence of a mark, left to right (the longer first)."""
    found: list[tuple[int, int, Piece]] = []
    for mark, piece in marks.items():
        at = answer.find(mark)
        while at >= 0:
            found.append((at, -len(mark), piece))
            at = answer.find(mark, at + len(mark))
    pieces: list[Piece] = []
    end = 0
    for at, negative_length, piece in sorted(found, key=lambda f: (f[0], f[1])):
        if at < end:
            continue  # inside the mark just cut
        pieces.append(answer[end:at])
        pieces.append(piece)
        end = at - negative_length
    pieces.append(answer[end:])
    return pieces


def template(
    first: bytes, first_at: float, second: bytes, second_at: float, started_at: float | None
) -> tuple[Piece, ...] | None:
    """
    ``first`` (the answer at ``first_at``) cut where the time goes, checked
    against ``second`` (the answer at ``second_at``, ``_APART`` or more
    later); None when the cut does not give ``second`` back.
    """
    kept = tuple(p for p in _cut(first, _marks(first_at, started_at)) if p != b"")
    if fill(kept, second_at, started_at) != second:
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
            first = self._render(action, server, now)
            server.kept_answers[action] = _Kept(key, server.started_at, first, now)
            return first
        pieces = kept.pieces
        if pieces is None:
            if kept.first is None:
                return None  # refused: no template for this key
            rendered = self._render(action, server, now)
            if now - kept.at >= _APART:
                kept.pieces = template(kept.first, kept.at, rendered, now, kept.started_at)
                kept.first = None
                self.made += 1
            return rendered
        answer = fill(pieces, now, kept.started_at)
        if answer is not None:
            self.filled += 1
        return answer
