"""
When a console line counts as delivered, and how that survives a SIGKILL.

A server's *mark* is the engine's nanosecond stamp of the newest console line
delivered plus how many lines carried exactly that stamp (two lines may share
a nanosecond).  A restarted agent replays Docker's log after the mark
(``MarkFilter``), so a mark that runs ahead of delivery loses lines and one
that lags behind repeats them.  Three rules keep it exact.

**Delivered means handed to the kernel.**  With a Panel link, a line is
delivered once the frame carrying it has left the agent: its bytes were taken
by the kernel on the Panel's socket.  The link is the manager's *acknowledging
consumer* (``IConsoleConsumer``): every ``ConsoleOutput`` it gets carries a
``receipt``, which the link settles when Twisted's write buffer has drained
after the frame was written (a pull producer on the socket's transport, see
``ctrlagent.panel.link``).  Lines waiting in the link's batcher, its outbox or
Twisted's buffer are not delivered: a SIGKILL loses them with the process and
the restart replays them from Docker.  Events the outbox drops (only while the
link is down or the Panel is not reading; counted and reported to the Panel as
``events_dropped``) are settled as dropped, so a mark never stalls behind
them.  Console frames still in Twisted's buffer when a connection fails are
sent first on the next one.  The link registers as the consumer when it is
built, before the manager starts reading consoles; once it has left (the
agent is stopping), nothing counts as delivered any more.  Without a Panel
link, handing a line to the event listeners is delivering it.

"Taken by the kernel" is as far as the agent can know: the protocol has no
acknowledgement of events, so bytes the kernel took and a failing network
then lost are not sent again.

**In order.**  ``MarkLedger`` keeps, per server, the marks of the events handed
on, in order.  Receipts may be settled in any order; the delivered mark only
advances over the settled prefix.  Lines the flood throttle kept from the
listeners enter settled: they are never sent, and the mark passes them once
everything before them is delivered.

**Durable at once.**  Every advance is appended to ``MarkJournal`` in the same
call that settled it: one small ``os.write`` to a file in the state directory,
without fsync.  A SIGKILLed process cannot lose a write the kernel took (the
page cache belongs to the kernel, not to the process); only a power cut can,
and then the store's copy, written in the background every
``servers.console_mark_interval`` seconds, takes over: some lines repeat, none
is lost.  On start each server's mark is the newer of the two, and the
journal is rewritten compactly; it is compacted again (written aside, then
renamed over) whenever it grows.  Every record carries a CRC: a torn last
record (a SIGKILL in the middle of a write), a damaged record or a file that
is not a journal at all is skipped with one warning, never fatal; the store's
mark then stands.

**The two windows.**  The kernel takes a frame (``send``) and then the journal
record (``write``): two system calls a few microseconds apart in one Python
call, with no reactor turn between them.  A SIGKILL landing exactly between
the two repeats that frame's lines after the restart (the opposite order
would lose them instead).  Likewise, when the Panel's socket is backed up and
the kernel took only part of the buffered frames when the SIGKILL came, the
frames it took whole are repeated.  Both err on the side of a repeat, never
a loss.
"""

from __future__ import annotations

import binascii
import json
import os
from collections import deque
from collections.abc import Callable

from twisted.logger import Logger

# (engine nanosecond of the newest delivered line, lines carrying exactly it)
Mark = tuple[int, int]

JOURNAL_NAME = "console-marks.journal"
_HEADER = b"ctrlagent console marks 1\n"
# Read at most this much of a journal at start (a healthy one is compacted
# long before); the newest records are at its end.
MAX_JOURNAL_READ = 16 * 1024 * 1024
# Compact once the journal has grown past this (or past 8 times its compact size).
COMPACT_AFTER = 256 * 1024
_MAX_NS = 2**63 - 1


class _Entry:
    """One event's mark, waiting for its receipt."""

    __slots__ = ("mark", "settled")

    def __init__(self, mark: Mark, settled: bool) -> None:
        self.mark = mark
        self.settled = settled


class MarkLedger:
    """
    Per server, the marks of console events handed on and not yet settled.

    ``on_advance(server_id, mark)`` is called, in the call that settled it,
    whenever a server's delivered mark moves forward: the newest mark of the
    settled prefix of its queue.
    """

    def __init__(self, on_advance: Callable[[str, Mark], None]) -> None:
        self._on_advance = on_advance
        self._queues: dict[str, deque[_Entry]] = {}

    def pending(self, server_id: str) -> int:
        """How many of the server's events are handed on and not yet settled."""
        queue = self._queues.get(server_id)
        return len(queue) if queue is not None else 0

    def expect(self, server_id: str, mark: Mark) -> Callable[[], None]:
        """Queue an event's ``mark``; returns its receipt (call it once delivered or dropped)."""
        entry = _Entry(mark, False)
        queue = self._queues.get(server_id)
        if queue is None:
            queue = self._queues[server_id] = deque()
        queue.append(entry)

        def settle() -> None:
            if entry.settled:
                return
            entry.settled = True
            if self._queues.get(server_id) is queue:
                self._advance(server_id, queue)

        return settle

    def passed(self, server_id: str, mark: Mark) -> None:
        """A mark with nothing to deliver (throttled lines): settled once all before it are."""
        queue = self._queues.get(server_id)
        if not queue:
            self._on_advance(server_id, mark)
            return
        queue.append(_Entry(mark, True))

    def forget(self, server_id: str) -> None:
        """The server is gone: its unsettled entries never advance anything."""
        self._queues.pop(server_id, None)

    def _advance(self, server_id: str, queue: deque[_Entry]) -> None:
        newest: Mark | None = None
        while queue and queue[0].settled:
            newest = queue.popleft().mark
        if not queue:
            del self._queues[server_id]
        if newest is not None:
            self._on_advance(server_id, newest)


def encode_record(server_id: str, mark: Mark) -> bytes:
    """One journal line: ``["id",ns,count] crc32``."""
    payload = json.dumps([server_id, mark[0], mark[1]], separators=(",", ":")).encode("ascii")
    return payload + b" %08x\n" % binascii.crc32(payload)


def decode_record(line: bytes) -> tuple[str, Mark] | None:
    """The record of one journal line, or None when it is not a sound one."""
    payload, _, crc = line.rpartition(b" ")
    if not payload or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != binascii.crc32(payload):
            return None
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list) or len(value) != 3:
        return None
    server_id, ns, count = value
    if (
        not isinstance(server_id, str)
        or type(ns) is not int
        or type(count) is not int
        or not 0 <= ns <= _MAX_NS
        or not 0 <= count <= _MAX_NS
    ):
        return None
    return server_id, (ns, count)


def parse_journal(data: bytes) -> tuple[dict[str, Mark], int, bool]:
    """
    ``(marks, bad records, has header)`` of a journal's bytes: for each
    server its last sound record (a later record supersedes, including a
    reset to ``(0, 0)`` when the server was deleted).
    """
    marks: dict[str, Mark] = {}
    bad = 0
    header = data.startswith(_HEADER)
    if header:
        data = data[len(_HEADER):]
    for line in data.split(b"\n"):
        if not line:
            continue
        record = decode_record(line)
        if record is None:
            bad += 1
            continue
        marks[record[0]] = record[1]
    return marks, bad, header


class MarkJournal:
    """
    The append-only journal of delivered marks (see the module docstring).

    Never raises: a journal that cannot be read, written or compacted is
    reported once (``log``) and the store's marks stand.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = 0
        self._compact_size = 0
        self._torn = False  # the last write may have left half a record
        self._failing = False

    @property
    def usable(self) -> bool:
        """True while the journal is open for appending."""
        return self._fd is not None

    def load(self) -> dict[str, Mark]:
        """The marks the journal holds (``{}`` when it is missing or unusable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn_unreadable(e.strerror or str(e))
            return {}
        try:
            size = os.fstat(fd).st_size
            skipped = max(0, size - MAX_JOURNAL_READ)
            if skipped:
                os.lseek(fd, skipped, os.SEEK_SET)
            chunks = []
            left = size - skipped
            while left > 0:
                chunk = os.read(fd, min(left, 1024 * 1024))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as e:
            self._warn_unreadable(e.strerror or str(e))
            return {}
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if skipped:
            # Start at the first whole record of what was read.
            data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
        marks, bad, header = parse_journal(data)
        if data and not header and not marks and not skipped:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "console marks journal {path} is not a journal; it is ignored and rewritten"
                " (the store's marks stand)",
                path=self.path,
            )
        elif bad:
            self.log.warn(  # noqa: G010
                "console marks journal {path}: {bad} damaged or torn record(s) skipped"
                " (the store's marks stand for them)",
                path=self.path,
                bad=bad,
            )
        if skipped:
            self.log.warn(  # noqa: G010
                "console marks journal {path} is {size} bytes; only its last {read} were read",
                path=self.path,
                size=size,
                read=MAX_JOURNAL_READ,
            )
        return marks

    def _warn_unreadable(self, why: str) -> None:
        self.log.warn(  # noqa: G010
            "console marks journal {path} cannot be read ({why}); the store's marks stand",
            path=self.path,
            why=why,
        )

    def open(self, marks: dict[str, Mark]) -> None:
        """Start a fresh journal holding ``marks`` (compaction), then append to it."""
        self.compact(marks)
        if self._fd is None:
            try:
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                )
                self._size = os.fstat(self._fd).st_size
                self._torn = True  # whatever ends the old file, start on a new line
            except OSError as e:
                self._fd = None
                self.log.warn(  # noqa: G010
                    "console marks journal {path} cannot be opened ({why}): console marks"
                    " are kept in the store only, so a SIGKILL may repeat recent lines",
                    path=self.path,
                    why=e.strerror or str(e),
                )

    def record(self, server_id: str, mark: Mark) -> None:
        """Append ``mark`` for ``server_id`` now (one write; no fsync)."""
        if self._fd is None:
            return
        data = encode_record(server_id, mark)
        if self._torn:
            data = b"\n" + data
        self._write(data)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError as e:
            # Part of a record may be on disk: the next one starts on a new line.
            self._torn = True
            if not self._failing:
                self._failing = True
                self.log.warn(  # noqa: G010
                    "console marks journal {path} cannot be written ({why}): marks are kept"
                    " in the store only until it can, so a SIGKILL may repeat recent lines",
                    path=self.path,
                    why=e.strerror or str(e),
                )
            return
        self._torn = False
        if self._failing:
            self._failing = False
            self.log.info("console marks journal {path} is written again", path=self.path)

    def due(self) -> bool:
        """True when the journal has grown enough to be compacted."""
        return self._fd is not None and self._size > max(COMPACT_AFTER, 8 * self._compact_size)

    def compact(self, marks: dict[str, Mark]) -> None:
        """
        Replace the journal with one record per server (written aside, then
        renamed over it: a SIGKILL leaves the old journal or the new one).
        """
        body = _HEADER + b"".join(encode_record(sid, mark) for sid, mark in marks.items())
        tmp = self.path + ".tmp"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            )
        except OSError as e:
            _unlink_quietly(tmp)
            if not self._failing:
                self._failing = True
                self.log.warn(  # noqa: G010
                    "console marks journal {path} cannot be compacted ({why})",
                    path=self.path,
                    why=e.strerror or str(e),
                )
            if self._fd is not None:
                # Keep appending to the old one; try again when it has grown.
                self._compact_size = self._size
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = self._compact_size = len(body)
        self._torn = False
        if self._failing:
            self._failing = False
            self.log.info("console marks journal {path} is written again", path=self.path)

    def close(self) -> None:
        """Stop appending (what was written stays)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def newer(a: Mark | None, b: Mark | None) -> Mark:
    """The later of two marks (marks only ever advance; None is no mark)."""
    if a is None:
        return b if b is not None else (0, 0)
    if b is None:
        return a
    return max(a, b)

