"""
The console decoding is lossless and order-preserving under any chunking.

Frames are cut at random points by the "network", lines span frames, and
over-long lines are cut and marked, never dropped silently.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ctrlagent.engine.docker.mux import (
    STDERR,
    STDOUT,
    ConsoleDecoder,
    FrameDemuxer,
    LineSplitter,
)


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


line_text = st.text(
    alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
    max_size=40,
)


@given(
    lines=st.lists(st.tuples(st.sampled_from([STDOUT, STDERR]), line_text), max_size=30),
    frame_size=st.integers(min_value=1, max_value=50),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
@settings(max_examples=300, deadline=None)
def test_demux_and_split_reassemble_every_line_in_order(
    lines: list[tuple[int, str]], frame_size: int, cuts: list[int]
) -> None:
    # Each line is written as several frames of at most frame_size bytes.
    wire = b""
    for stream, text in lines:
        data = (text + "\n").encode("utf-8")
        for i in range(0, len(data), frame_size):
            wire += frame(stream, data[i : i + frame_size])
    decoder = ConsoleDecoder(tty=False, cap=10_000)
    got: list[tuple[str, str]] = []
    for chunk in chunked(wire, cuts):
        got.extend(decoder.feed(chunk))
    got.extend(decoder.flush())
    expected = [("stderr" if s == STDERR else "stdout", t) for s, t in lines]
    assert got == expected


@given(
    payloads=st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.binary(max_size=30)), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=5_000), max_size=30),
)
@settings(max_examples=300, deadline=None)
def test_demuxer_yields_every_payload_byte_with_its_stream(
    payloads: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(frame(s, p) for s, p in payloads)
    demux = FrameDemuxer()
    pieces: list[tuple[int, bytes]] = []
    for chunk in chunked(wire, cuts):
        pieces.extend(demux.feed(chunk))
    assert demux.flush() == []
    assert not demux.raw
    # Merge consecutive pieces of one stream, compare with the frames merged alike.
    def merge(items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for s, p in items:
            if not p:
                continue
            if out and out[-1][0] == s:
                out[-1] = (s, out[-1][1] + p)
            else:
                out.append((s, p))
        return out

    assert merge(pieces) == merge(payloads)


@given(
    text=st.lists(line_text, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
@settings(max_examples=200, deadline=None)
def test_tty_bytes_pass_through_as_stdout_lines(text: list[str], cuts: list[int]) -> None:
    wire = "".join(t + "\r\n" for t in text).encode("utf-8")
    decoder = ConsoleDecoder(tty=True, cap=10_000)
    got = []
    for chunk in chunked(wire, cuts):
        got.extend(decoder.feed(chunk))
    got.extend(decoder.flush())
    assert got == [("stdout", t) for t in text]


@given(
    lengths=st.lists(st.integers(min_value=0, max_value=120), max_size=20),
    cap=st.integers(min_value=1, max_value=60),
    cuts=st.lists(st.integers(min_value=0, max_value=3_000), max_size=30),
)
@settings(max_examples=300, deadline=None)
def test_long_lines_are_cut_at_the_cap_and_marked_with_what_was_dropped(
    lengths: list[int], cap: int, cuts: list[int]
) -> None:
    lines = [bytes([97 + i % 26]) * n for i, n in enumerate(lengths)]
    wire = b"".join(line + b"\n" for line in lines)
    splitter = LineSplitter(cap)
    got: list[str] = []
    for chunk in chunked(wire, cuts):
        got.extend(splitter.feed(chunk))
    got.extend(splitter.flush())
    expected = []
    for line in lines:
        if len(line) <= cap:
            expected.append(line.decode())
        else:
            expected.append(line[:cap].decode() + " [truncated {} bytes]".format(len(line) - cap))
    assert got == expected


def test_cut_falls_on_a_character_boundary() -> None:
    splitter = LineSplitter(cap=5)
    # "aaaé" is 5 bytes: a, a, a, 0xC3 0xA9; "aaaaé" would split é at the cap.
    assert splitter.feed("aaaaébc\n".encode()) == ["aaaa [truncated 4 bytes]"]


def test_unterminated_last_line_is_flushed_not_lost() -> None:
    decoder = ConsoleDecoder(tty=False, cap=100)
    assert decoder.feed(frame(STDOUT, b"partial")) == []
    assert decoder.flush() == [("stdout", "partial")]


def test_interleaved_streams_keep_their_partial_lines_apart() -> None:
    decoder = ConsoleDecoder(tty=False, cap=100)
    wire = frame(STDOUT, b"hel") + frame(STDERR, b"oops\n") + frame(STDOUT, b"lo\n")
    assert decoder.feed(wire) == [("stderr", "oops"), ("stdout", "hello")]


def test_raw_bytes_read_as_frames_fall_back_to_pass_through() -> None:
    decoder = ConsoleDecoder(tty=False, cap=100)
    assert decoder.feed(b"Hello, TTY world\r\nsecond\n") == [
        ("stdout", "Hello, TTY world"),
        ("stdout", "second"),
    ]


def test_invalid_utf8_is_replaced_not_dropped() -> None:
    splitter = LineSplitter(cap=100)
    assert splitter.feed(b"ab\xffcd\n") == ["ab\ufffdcd"]
