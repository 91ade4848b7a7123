"""
Docker console stream decoding: the 8-byte-header frame demultiplexer and the
line splitter.

Pure code: no reactor, no I/O.  Bytes go in as the network delivers them, in
chunks of any size; whole lines come out, in order, tagged with the stream
they were written to.

- Non-TTY containers multiplex stdout and stderr in frames
  ``[stream u8][0 0 0][size u32 big-endian][payload]``.  A frame may be cut
  anywhere by the transport and a line may span several frames.
- TTY containers send raw bytes (everything is "stdout").
- A line longer than the cap is cut at the cap (on a UTF-8 character
  boundary) and marked with ``" [truncated N bytes]"``, N being the bytes
  dropped, so nothing is ever lost silently.
"""

from __future__ import annotations

import codecs
import struct

__all__ = [
    "STDOUT",
    "STDERR",
    "FrameDemuxer",
    "LineSplitter",
    "ConsoleDecoder",
    "TRUNCATED_MARKER",
    "stream_name",
]

STDIN = 0
STDOUT = 1
STDERR = 2
SYSTEMERR = 3

TRUNCATED_MARKER = " [truncated {} bytes]"

_HEADER = struct.Struct(">BxxxL")
_HEADER_SIZE = _HEADER.size
# The header as two words: stream << 24 (the padding must be zero), size.
_WORDS = struct.Struct(">LL")
_MAX_WORD = SYSTEMERR << 24


def stream_name(stream_id: int) -> str:
    """The name of a frame's stream as callers see it: "stdout" or "stderr"."""
    return "stderr" if stream_id in (STDERR, SYSTEMERR) else "stdout"


class FrameDemuxer:
    """
    Split a multiplexed Docker stream into ``(stream_id, payload piece)`` items.

    Payload pieces are emitted as soon as they arrive (a frame split by the
    transport yields several pieces with the same stream id), so memory use
    does not depend on frame size.  When the bytes are not frames at all (a
    TTY container read as if it were not), the demuxer falls back to passing
    everything through as stdout rather than misreading lengths and stalling.
    """

    def __init__(self) -> None:
        self._header = b""
        self._stream = STDOUT
        self._remaining = 0
        self.raw = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Consume ``data``; return the payload pieces it completes."""
        if self.raw:
            return [(STDOUT, data)] if data else []
        out: list[tuple[int, bytes]] = []
        append = out.append
        unpack_from = _WORDS.unpack_from
        pos = 0
        end = len(data)
        if self._remaining and end:
            take = min(self._remaining, end)
            append((self._stream, data[:take]))
            self._remaining -= take
            pos = take
        if self._header and pos < end:
            need = _HEADER_SIZE - len(self._header)
            self._header += data[pos : pos + need]
            pos += min(need, end - pos)
            if len(self._header) < _HEADER_SIZE:
                return out
            header, self._header = self._header, b""
            return out + self._start_frame(header, data, pos)
        while end - pos >= _HEADER_SIZE:
            word, size = unpack_from(data, pos)
            if word & 0x00FFFFFF or word > _MAX_WORD:
                return out + self._go_raw(data[pos:])
            stream = word >> 24
            pos += _HEADER_SIZE
            stop = pos + size
            if stop <= end:
                append((stream, data[pos:stop]))
                pos = stop
            else:
                append((stream, data[pos:]))
                self._stream, self._remaining = stream, stop - end
                return out
        if pos < end:
            self._header = data[pos:]
        return out

    def _start_frame(self, header: bytes, data: bytes, pos: int) -> list[tuple[int, bytes]]:
        word, size = _WORDS.unpack(header)
        if word & 0x00FFFFFF or word > _MAX_WORD:
            return self._go_raw(header + data[pos:])
        self._stream, self._remaining = word >> 24, size
        return self.feed(data[pos:]) if pos < len(data) else []

    def _go_raw(self, rest: bytes) -> list[tuple[int, bytes]]:
        # Not a frame: this is a raw (TTY) stream.  Pass it through.
        self.raw = True
        return [(STDOUT, rest)] if rest else []

    def flush(self) -> list[tuple[int, bytes]]:
        """At end of stream: return any incomplete header bytes as stdout."""
        header, self._header = self._header, b""
        return [(STDOUT, header)] if header else []


class LineSplitter:
    """
    Reassemble lines from byte chunks of one stream.

    Lines come out as ``str`` without their ``\\n`` (or ``\\r\\n``), decoded as
    UTF-8 with replacement of invalid bytes.  A line longer than ``cap`` bytes
    keeps its first ``cap`` bytes (cut on a character boundary) followed by the
    truncation marker.
    """

    def __init__(self, cap: int = 16 * 1024, marker: str = TRUNCATED_MARKER) -> None:
        if cap < 1:
            raise ValueError("line cap must be positive")
        self.cap = cap
        self.marker = marker
        self._pending = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> list[str]:
        """Consume ``data``; return the lines it completes."""
        if not self._pending and not self._dropped:
            # Fast path: nothing pending and no line in ``data`` too long.
            cut = data.rfind(b"\n")
            if cut < 0:
                if len(data) > self.cap:
                    self._append(data)
                else:
                    self._pending += data
                return []
            whole = data[:cut]
            if len(data) > self.cap and (
                max(map(len, whole.split(b"\n"))) > self.cap or len(data) - cut - 1 > self.cap
            ):
                return self._feed_slow(data)
            if cut + 1 < len(data):
                self._pending += data[cut + 1 :]
            if b"\r" in whole:
                whole = whole.replace(b"\r\n", b"\n")
                if whole.endswith(b"\r"):
                    whole = whole[:-1]
            return whole.decode("utf-8", "replace").split("\n")
        return self._feed_slow(data)

    def _feed_slow(self, data: bytes) -> list[str]:
        out: list[str] = []
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._append(data[pos:])
                return out
            self._append(data[pos:nl])
            out.append(self._take())
            pos = nl + 1

    def flush(self) -> list[str]:
        """At end of stream: return the unterminated last line, if any."""
        if self._pending or self._dropped:
            return [self._take()]
        return []

    def _append(self, piece: bytes) -> None:
        room = self.cap - len(self._pending)
        if len(piece) <= room:
            self._pending += piece
        else:
            if room > 0:
                self._pending += piece[:room]
            self._dropped += len(piece) - max(room, 0)

    def _take(self) -> str:
        line = bytes(self._pending)
        dropped = self._dropped
        self._pending.clear()
        self._dropped = 0
        if not dropped:
            if line.endswith(b"\r"):
                line = line[:-1]
            return line.decode("utf-8", "replace")
        # Cut on a character boundary: bytes of a character split by the cap
        # count as dropped rather than becoming a replacement character.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(line, final=False)
        dropped += len(decoder.getstate()[0])
        return text + self.marker.format(dropped)


class ConsoleDecoder:
    """
    Bytes of a console stream in, ``(stream, line)`` items out.

    ``tty`` says whether the container has a TTY (raw bytes, all stdout) or
    not (multiplexed frames).  Each stream has its own splitter, so a partial
    stdout line is not broken by an interleaved stderr frame.
    """

    def __init__(self, tty: bool, cap: int = 16 * 1024) -> None:
        self._demux: FrameDemuxer | None = None if tty else FrameDemuxer()
        self._splitters = {"stdout": LineSplitter(cap), "stderr": LineSplitter(cap)}
        self._stdout = self._splitters["stdout"]

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        """Consume ``data``; return the ``(stream, line)`` items it completes."""
        if self._demux is None:
            return [("stdout", line) for line in self._stdout.feed(data)]
        out: list[tuple[str, str]] = []
        # Join runs of pieces of one stream so the splitter works in bulk.
        run: list[bytes] = []
        run_name = ""
        for stream_id, piece in self._demux.feed(data):
            name = stream_name(stream_id)
            if name != run_name and run:
                self._split_run(run_name, run, out)
                run = []
            run_name = name
            run.append(piece)
        if run:
            self._split_run(run_name, run, out)
        return out

    def _split_run(self, name: str, run: list[bytes], out: list[tuple[str, str]]) -> None:
        data = run[0] if len(run) == 1 else b"".join(run)
        out.extend([(name, line) for line in self._splitters[name].feed(data)])

    def flush(self) -> list[tuple[str, str]]:
        """At end of stream: return every unterminated line."""
        out: list[tuple[str, str]] = []
        if self._demux is not None:
            for _, piece in self._demux.flush():
                for line in self._stdout.feed(piece):
                    out.append(("stdout", line))
        for name, splitter in self._splitters.items():
            out.extend((name, line) for line in splitter.flush())
        return out
