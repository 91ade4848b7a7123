"""
The line raw console input has typed so far (``TypedLine``).

``console:input`` writes characters to a game's stdin exactly as given: a
terminal-like console sends each key as it is pressed, so the server's stop
command may arrive as ``s``, ``t``, ``o``, ``p``, then a line end.  The game
reads its stdin as a pipe (the container has no terminal, so no line
editing): the line it reads is every character since the last CR or LF.  The
server uses this to know when raw input completes the stop command, which is
then the Stop a player asked for, as when it comes whole through
``send_server_command``.

Only a short tail is kept: a line longer than ``limit`` characters cannot be
anybody's stop command, and is remembered as such, not stored.
"""

from __future__ import annotations

from collections.abc import Iterator

_ENDS = ("\r", "\n")


class TypedLine:
    """What the current run's stdin holds since its last line end."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._run: object = None
        # The characters since the last line end; None: more than ``limit``.
        self._tail: str | None = ""

    def _since_end(self, run: object) -> str | None:
        return self._tail if run == self._run else ""

    def lines(self, run: object, data: str) -> Iterator[tuple[str | None, int]]:
        """
        Each line ``data`` ends on ``run``'s stdin, with the index of its
        end in ``data``; a line is ``None`` when it is longer than ``limit``.
        """
        before = self._since_end(run)
        start = 0
        while True:
            end = _first_end(data, start)
            if end < 0:
                return
            if before is None or len(before) + end - start > self.limit:
                yield None, end
            else:
                yield before + data[start:end], end
            before, start = "", end + 1

    def wrote(self, run: object, data: str) -> None:
        """``data`` went to ``run``'s stdin."""
        tail = self._since_end(run)
        last = max(data.rfind(end) for end in _ENDS)
        if last >= 0:
            tail, data = "", data[last + 1:]
        if tail is not None and len(tail) + len(data) <= self.limit:
            tail += data
        else:
            tail = None
        self._run, self._tail = run, tail

    def ended(self, run: object) -> None:
        """A whole line (ending with LF) went to ``run``'s stdin."""
        self._run, self._tail = run, ""


def _first_end(data: str, start: int) -> int:
    ends = [i for i in (data.find(end, start) for end in _ENDS) if i >= 0]
    return min(ends) if ends else -1
