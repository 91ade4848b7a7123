"""Unit tests of the stdin holder's framing and the names of its files (no engine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.engine.docker.errors import DockerError
from ctrlagent.engine.podman.holders import SOCKET_PATH_MAX, StdinHolders, holder_pids
from ctrlagent.engine.podman.stdinholder import MAX_FRAME, FrameReader, frame

CID = "ab" * 32


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50))
def test_frames_come_out_whole_whatever_the_reads_cut(payloads: list[bytes], cut: int) -> None:
    stream = b"".join(frame(p) for p in payloads)
    reader = FrameReader()
    out: list[bytes] = []
    for i in range(0, len(stream), cut):
        out.extend(reader.feed(stream[i:i + cut]))
    assert out == payloads


def test_a_frame_longer_than_the_bound_is_refused_on_both_ends() -> None:
    with pytest.raises(ValueError):
        frame(b"x" * (MAX_FRAME + 1))
    reader = FrameReader()
    with pytest.raises(ValueError):
        reader.feed((MAX_FRAME + 1).to_bytes(4, "big"))


def test_holder_sockets_are_named_by_container_id_and_run_only(tmp_path: Path) -> None:
    holders = StdinHolders(None, str(tmp_path), "/run/podman/podman.sock")
    path = holders.socket_path(CID, 1_796_000_000_123_456_789)
    assert path == str(tmp_path / "{}-1796000000123456789.sock".format(CID[:24]))
    for bad in ("../../etc/x", "abc", CID.upper(), CID + "/x"):
        with pytest.raises(DockerError):
            holders.socket_path(bad, 1)


def test_a_directory_too_long_for_a_socket_address_is_reached_through_its_descriptor(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    holders = StdinHolders(None, str(deep), "/run/podman/podman.sock")
    path = holders.socket_path(CID, 1)
    assert len(path) > SOCKET_PATH_MAX and holders.fits()
    address = holders._address(path)
    assert len(address) <= SOCKET_PATH_MAX
    assert os.path.samefile(os.path.dirname(address), str(deep))


def test_holder_pids_reads_only_pid_files_holding_a_number(tmp_path: Path) -> None:
    (tmp_path / "a.pid").write_text("123\n")
    (tmp_path / "b.pid").write_text("not a pid")
    (tmp_path / "c.sock").write_text("456")
    assert list(holder_pids(str(tmp_path))) == [123]
    assert list(holder_pids(str(tmp_path / "missing"))) == []
