"""
The archive format and its round trip: a server tree written to a
tar+zstd stream and restored through a staging directory comes back whole
(paths, contents, modes, links kept as links), and every fault leaves the
server's files exactly as they were.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.backups import archive
from ctrlagent.backups.archive import BackupCorrupt, ustar_header, write_archive
from ctrlagent.backups.ignore import load_rules
from ctrlagent.backups.restore import (
    STAGING_PREFIX,
    link_stays_inside,
    member_components,
    sweep_staging,
)
from ctrlagent.errors import PermissionDenied
from tests.backups.conftest import Layout, populate, tree
from tests.backups.helpers import archive_bytes, restore_bytes


def _tamper(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A hand-made archive (as a hostile store could hold)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    return info


def test_round_trip_brings_back_the_whole_tree(layout: Layout) -> None:
    populate(layout.root)
    before = tree(layout.root, mtimes=True)
    data, stats = archive_bytes(layout.root)
    assert stats.checksum == hashlib.sha256(data).hexdigest()
    assert stats.size == len(data)
    assert stats.files == 7 and stats.summary() is None
    # Wreck the tree, then restore.
    (layout.root / "server.properties").write_text("motd=broken\n")
    (layout.root / "world" / "level.dat").unlink()
    (layout.root / "new-file").write_text("made after the backup")
    restore_bytes(layout.root, data, stats, truncate=True)
    assert tree(layout.root, mtimes=True) == before
    assert os.path.islink(layout.root / "level-link")
    assert not [n for n in os.listdir(layout.data_dir) if n.startswith(STAGING_PREFIX)]


def test_restore_without_truncate_keeps_files_the_backup_does_not_hold(layout: Layout) -> None:
    populate(layout.root)
    data, stats = archive_bytes(layout.root)
    (layout.root / "server.properties").write_text("motd=changed\n")
    (layout.root / "world" / "new-chunk").write_text("kept")
    (layout.root / "newdir" / "deep").mkdir(parents=True)
    (layout.root / "newdir" / "deep" / "f").write_text("kept too")
    result = restore_bytes(layout.root, data, stats, truncate=False)
    assert (layout.root / "server.properties").read_text() == "motd=hello\n"
    assert (layout.root / "world" / "new-chunk").read_text() == "kept"
    assert (layout.root / "newdir" / "deep" / "f").read_text() == "kept too"
    assert result.kept == 2


def test_restore_with_truncate_removes_files_the_backup_does_not_hold(layout: Layout) -> None:
    populate(layout.root)
    data, stats = archive_bytes(layout.root)
    (layout.root / "world" / "new-chunk").write_text("gone")
    restore_bytes(layout.root, data, stats, truncate=True)
    assert not (layout.root / "world" / "new-chunk").exists()


def test_links_are_stored_as_links_and_never_followed(layout: Layout) -> None:
    (layout.root / "a").write_text("inside")
    os.symlink(str(layout.outside), layout.root / "out-dir")
    os.symlink(str(layout.outside / "secret.txt"), layout.root / "out-file")
    data, stats = archive_bytes(layout.root)
    with tarfile.open(fileobj=io.BytesIO(zstandard.ZstdDecompressor().decompressobj()
                                         .decompress(data))) as tf:
        names = {m.name: m for m in tf.getmembers()}
    assert names["out-dir"].issym() and names["out-file"].issym()
    assert not any("secret" in n for n in names)
    assert stats.files == 1


def test_links_leading_out_are_not_restored(layout: Layout) -> None:
    (layout.root / "a").write_text("inside")
    os.symlink(str(layout.outside), layout.root / "absolute")
    os.symlink("../../outside", layout.root / "climbing")
    os.symlink("a", layout.root / "fine")
    data, stats = archive_bytes(layout.root)
    result = restore_bytes(layout.root, data, stats)
    assert sorted(os.listdir(layout.root)) == ["a", "fine"]
    assert result.skipped == 2


def test_ignore_rules_from_pteroignore_and_the_request(layout: Layout) -> None:
    populate(layout.root)
    (layout.root / ".pteroignore").write_text("logs/\n*.mca\n# comment\n")
    data, stats = archive_bytes(layout.root, ignore=["private.key"])
    restore_bytes(layout.root, data, stats, truncate=True)
    names = set(tree(layout.root))
    assert "logs" not in names and "world/region/r.0.0.mca" not in names
    assert "private.key" not in names
    assert "world/level.dat" in names and ".pteroignore" in names


def test_pteroignore_that_is_a_link_is_not_read(layout: Layout) -> None:
    (layout.outside / "rules").write_text("*\n")
    os.symlink(str(layout.outside / "rules"), layout.root / ".pteroignore")
    (layout.root / "keep").write_text("x")
    _, stats = archive_bytes(layout.root)
    assert stats.files == 1


def test_special_files_are_left_out_with_a_note(layout: Layout) -> None:
    (layout.root / "a").write_text("x")
    os.mkfifo(layout.root / "pipe")
    data, stats = archive_bytes(layout.root)
    assert stats.skipped == 1 and "pipe" in stats.notes[0]
    restore_bytes(layout.root, data, stats)
    assert sorted(os.listdir(layout.root)) == ["a"]


def test_a_file_changing_during_the_walk_completes_with_a_note(layout: Layout) -> None:
    (layout.root / "a").write_bytes(b"1" * 10_000)
    (layout.root / "b-shrinks").write_bytes(b"2" * 10_000)
    (layout.root / "c-vanishes").write_bytes(b"3" * 10)
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        # The shrink lands after the header promised 10,000 bytes.
        if os.readlink("/proc/self/fd/{}".format(fd)).endswith("b-shrinks"):
            with open(layout.root / "b-shrinks", "r+b") as f:
                f.truncate(100)
        return real_read(fd, n)

    def meddle(rel: str) -> None:
        if rel == "a":
            (layout.root / "c-vanishes").unlink()

    os.read = read  # type: ignore[assignment]
    try:
        data, stats = archive_bytes(layout.root, on_member=meddle)
    finally:
        os.read = real_read
    assert stats.changed == 1 and stats.summary() is not None
    assert "b-shrinks" in stats.notes[0]
    restore_bytes(layout.root, data, stats)
    # The shrunk file is padded to the size its header promised.
    assert (layout.root / "b-shrinks").read_bytes() == b"2" * 100 + b"\x00" * 9_900
    assert sorted(os.listdir(layout.root)) == ["a", "b-shrinks"]


def test_a_file_growing_while_read_is_cut_at_its_size(layout: Layout) -> None:
    (layout.root / "log").write_bytes(b"x" * 5000)
    real_read = os.read
    grown = []

    def read(fd: int, n: int) -> bytes:
        # The first read of the log itself (os.read has other callers: the
        # compressor child's start).
        if not grown and os.readlink("/proc/self/fd/{}".format(fd)).endswith("/log"):
            grown.append(1)
            with open(layout.root / "log", "ab") as f:
                f.write(b"y" * 5000)
        return real_read(fd, n)

    os.read = read  # type: ignore[assignment]
    try:
        data, stats = archive_bytes(layout.root)
    finally:
        os.read = real_read
    restore_bytes(layout.root, data, stats)
    assert (layout.root / "log").read_bytes() == b"x" * 5000
    assert stats.changed == 1


def test_names_that_are_not_utf8_round_trip(layout: Layout) -> None:
    name = os.fsdecode(b"caf\xe9-\xff.txt")
    (layout.root / name).write_text("bytes")
    before = tree(layout.root)
    data, stats = archive_bytes(layout.root)
    (layout.root / name).unlink()
    restore_bytes(layout.root, data, stats)
    assert tree(layout.root) == before


def test_a_deep_tree_round_trips(layout: Layout) -> None:
    d = layout.root
    for i in range(200):
        d = d / "d{}".format(i % 7)
    d.mkdir(parents=True)
    (d / "bottom").write_text("deep")
    before = tree(layout.root)
    data, stats = archive_bytes(layout.root)
    restore_bytes(layout.root, data, stats)
    assert tree(layout.root) == before


def test_a_truncated_archive_is_an_error_and_touches_nothing(layout: Layout) -> None:
    populate(layout.root)
    data, stats = archive_bytes(layout.root)
    (layout.root / "after").write_text("still here")
    before = tree(layout.root, mtimes=True)
    for cut in (len(data) // 2, len(data) - 1, 10):
        with pytest.raises(BackupCorrupt):
            restore_bytes(layout.root, data[:cut], stats)
        assert tree(layout.root, mtimes=True) == before
    assert not [n for n in os.listdir(layout.data_dir) if n.startswith(STAGING_PREFIX)]


def test_a_corrupted_archive_is_an_error_and_touches_nothing(layout: Layout) -> None:
    populate(layout.root)
    data, stats = archive_bytes(layout.root)
    before = tree(layout.root, mtimes=True)
    for pos in (20, len(data) // 2, len(data) - 5):
        bad = bytearray(data)
        bad[pos] ^= 0x55
        with pytest.raises(BackupCorrupt):
            restore_bytes(layout.root, bytes(bad), stats)
        assert tree(layout.root, mtimes=True) == before


def test_a_different_archive_of_the_right_shape_fails_its_checksum(layout: Layout) -> None:
    (layout.root / "a").write_text("one")
    data, stats = archive_bytes(layout.root)
    (layout.root / "a").write_text("two")
    other, _ = archive_bytes(layout.root)
    with pytest.raises(BackupCorrupt, match="checksum|truncated"):
        restore_bytes(layout.root, other, stats)
    assert (layout.root / "a").read_text() == "two"


@pytest.mark.parametrize("member", [
    _member("/etc/evil"),
    _member("../evil"),
    _member("a/../../evil"),
])
def test_members_that_would_escape_refuse_the_whole_archive(
        layout: Layout, member: tarfile.TarInfo) -> None:
    (layout.root / "keep").write_text("mine")
    data = _tamper([(_member("fine"), b"ok"), (member, b"evil")])
    before = tree(layout.root, mtimes=True)
    with pytest.raises(PermissionDenied):
        restore_bytes(layout.root, data, None)
    assert tree(layout.root, mtimes=True) == before
    assert os.listdir(layout.outside) == ["secret.txt"]
    assert not (layout.data_dir / "evil").exists()


def test_a_link_then_a_file_through_it_cannot_write_outside(layout: Layout) -> None:
    data = _tamper([
        (_member("sub", tarfile.SYMTYPE, str(layout.outside)), None),
        (_member("sub/secret.txt"), b"overwritten"),
        (_member("up", tarfile.SYMTYPE, "../../outside"), None),
        (_member("up/x"), b"x"),
        (_member("dev", tarfile.CHRTYPE), None),
        (_member("hard", tarfile.LNKTYPE, "/etc/passwd"), None),
    ])
    restore_bytes(layout.root, data, None)
    assert (layout.outside / "secret.txt").read_text() == "not yours"
    assert os.listdir(layout.outside) == ["secret.txt"]
    assert (layout.root / "sub").is_dir() and not (layout.root / "sub").is_symlink()
    assert not (layout.root / "dev").exists() and not (layout.root / "hard").exists()


def test_setuid_bits_never_travel(layout: Layout) -> None:
    info = _member("tool")
    info.mode = 0o4755
    restore_bytes(layout.root, _tamper([(info, b"#!")]), None)
    assert os.stat(layout.root / "tool").st_mode & 0o7777 == 0o755


def test_an_archive_expanding_beyond_its_record_is_refused(layout: Layout) -> None:
    (layout.root / "big").write_bytes(b"\x00" * (1 << 20))
    data, stats = archive_bytes(layout.root)
    import io as _io

    from ctrlagent.backups import archive as arch
    from ctrlagent.backups.restore import restore_root

    old = arch.MAX_OVERHEAD
    import ctrlagent.backups.restore as rest
    rest.MAX_OVERHEAD = 0  # type: ignore[attr-defined]
    try:
        with pytest.raises(BackupCorrupt, match="expands"):
            restore_root(str(layout.root), _io.BytesIO(data), size=None, checksum=None,
                         content_bytes=1000, uid=os.getuid(), gid=os.getgid(), truncate=True)
    finally:
        rest.MAX_OVERHEAD = old  # type: ignore[attr-defined]
    assert (layout.root / "big").stat().st_size == 1 << 20


def test_a_crash_before_the_swap_leaves_the_tree_and_the_sweep_cleans_up(
        layout: Layout) -> None:
    populate(layout.root)
    data, stats = archive_bytes(layout.root)
    (layout.root / "server.properties").write_text("motd=live\n")
    before = tree(layout.root, mtimes=True)

    class Crash(BaseException):
        pass

    def crash() -> None:
        raise Crash()

    # A BaseException stands for the process dying: the cleanup in finally
    # still runs here, so leave a staging directory behind by hand as well.
    with pytest.raises(Crash):
        restore_bytes(layout.root, data, stats, before_swap=crash)
    assert tree(layout.root, mtimes=True) == before
    leftover = layout.data_dir / (STAGING_PREFIX + "srv1-0123456789ab")
    (leftover / "x").mkdir(parents=True)
    other = layout.data_dir / (STAGING_PREFIX + "srv1-other-0123456789ab")
    other.mkdir()
    assert sweep_staging(str(layout.data_dir), "srv1") == 1
    assert other.exists() and not leftover.exists()
    assert sweep_staging(str(layout.data_dir)) == 1
    assert sorted(os.listdir(layout.data_dir)) == ["srv1"]


def test_a_backup_that_is_empty_round_trips(layout: Layout) -> None:
    data, stats = archive_bytes(layout.root)
    (layout.root / "x").write_text("x")
    restore_bytes(layout.root, data, stats)
    assert os.listdir(layout.root) == []
    _ = Path


def test_a_mount_inside_the_server_directory_refuses_the_restore(layout: Layout) -> None:
    (layout.root / "a").write_text("x")
    data, stats = archive_bytes(layout.root)
    (layout.root / "mnt").mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(layout.root / "mnt")],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (layout.root / "mnt" / "on-the-mount").write_text("y")
        before = tree(layout.root, mtimes=True)
        for truncate in (True, False):
            with pytest.raises(PermissionDenied, match="mount point"):
                restore_bytes(layout.root, data, stats, truncate=truncate)
            assert tree(layout.root, mtimes=True) == before
    finally:
        subprocess.run(["umount", "-l", str(layout.root / "mnt")], check=False)


def test_mountinfo_paths_with_spaces_are_read(tmp_path: Path) -> None:
    from ctrlagent.backups.restore import mounts_beneath

    info = tmp_path / "mountinfo"
    info.write_text("36 35 98:0 / /srv/data/my\\040server/x rw - ext4 /dev/x rw\n"
                    "37 35 98:0 / /srv/data/my\\040server rw - ext4 /dev/x rw\n"
                    "38 35 98:0 / /srv/data/other rw - ext4 /dev/x rw\n")
    assert mounts_beneath("/srv/data/my server", str(info)) == ["/srv/data/my server/x"]
    assert mounts_beneath("/srv/data/my", str(info)) == []


@given(st.lists(st.sampled_from(["a", "b", ".", "..", ""]), max_size=8),
       st.lists(st.sampled_from(["a", "b", ".", "..", ""]), min_size=1, max_size=8))
def test_link_stays_inside_agrees_with_resolving_the_path(link_dir: list[str],
                                                          target: list[str]) -> None:
    rel = tuple(p for p in link_dir if p not in ("", ".", "..")) + ("link",)
    text = "/".join(target)
    # Reference: resolve step by step from the link's directory, failing on
    # any climb above the root.
    depth, inside = len(rel) - 1, bool(text) and not text.startswith("/")
    for part in text.split("/"):
        if part == "..":
            depth -= 1
            inside = inside and depth >= 0
        elif part not in ("", "."):
            depth += 1
    assert link_stays_inside(rel, text) == inside


@given(st.text(alphabet="ab./", max_size=20))
def test_member_names_never_yield_climbing_or_empty_components(name: str) -> None:
    try:
        comps = member_components(name)
    except PermissionDenied:
        assert name.startswith("/") or ".." in name.split("/")
        return
    assert all(c not in ("", ".", "..") for c in comps)


def test_a_crash_after_the_swap_leaves_the_restored_files_and_the_sweep_the_rest(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(layout.root)
    restored = tree(layout.root)
    data, stats = archive_bytes(layout.root)
    (layout.root / "server.properties").write_text("motd=live\n")
    from ctrlagent.backups import restore as rest

    def dies(dir_fd: int, name: str, **kw: object) -> int:
        raise OSError(5, "the agent died here")

    monkeypatch.setattr(rest.trees, "remove_tree", dies)
    result = restore_bytes(layout.root, data, stats)
    monkeypatch.undo()
    assert tree(layout.root) == restored
    assert "old files not yet removed" in result.notes[-1]
    (left,) = [n for n in os.listdir(layout.data_dir) if n.startswith(STAGING_PREFIX)]
    assert (layout.data_dir / left / "server.properties").read_text() == "motd=live\n"
    assert sweep_staging(str(layout.data_dir)) == 1
    assert os.listdir(layout.data_dir) == ["srv1"]


_NAMES = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF),
                 min_size=1, max_size=120)


@given(name=_NAMES, link=_NAMES, kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE,
                                                        tarfile.SYMTYPE]),
       size=st.integers(0, 2 ** 40), mtime=st.integers(-5, 2 ** 34),
       mode=st.integers(0, 0o7777))
def test_the_fast_tar_header_is_byte_for_byte_tarfiles_or_none(
    name: str, link: str, kind: bytes, size: int, mtime: int, mode: int
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if kind == tarfile.SYMTYPE:
        info.linkname = link
    elif kind == tarfile.REGTYPE:
        info.size = size
    fast = ustar_header(info)
    if fast is not None:
        assert fast == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    elif name.isascii() and len(name) < 99 and 0 <= mtime < 8 ** 11 and size < 8 ** 11 \
            and (kind != tarfile.SYMTYPE or (link.isascii() and len(link) <= 100)):
        raise AssertionError("the common member took the slow path")


@given(name=_NAMES, link=_NAMES, kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE,
                                                        tarfile.SYMTYPE]),
       size=st.integers(0, 2 ** 40), mtime=st.integers(-5, 2 ** 34),
       mode=st.integers(0, 0o7777))
def test_every_member_header_the_writer_builds_is_byte_for_byte_tarfiles(
    name: str, link: str, kind: bytes, size: int, mtime: int, mode: int
) -> None:
    # What the archive writer emits for a member (its own header, or
    # tarfile's for an uncommon one), from the member's stat.
    file_type = {tarfile.REGTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
                 tarfile.SYMTYPE: stat.S_IFLNK}[kind]
    st_ = os.stat_result((file_type | mode, 1, 1, 1, 0, 0, size, 0, mtime, 0))
    size = size if kind == tarfile.REGTYPE else 0
    link = link if kind == tarfile.SYMTYPE else ""
    out: list[bytes] = []
    writer = archive._TarWriter(out.append)
    writer.member(name, st_, kind, size, link)
    writer.flush()
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime, info.linkname = kind, size, mtime, link
    info.mode = 0o777 if kind == tarfile.SYMTYPE else mode & 0o777
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    assert b"".join(out) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_gnu_tar_reads_our_archive_as_we_wrote_it(layout: Layout) -> None:
    populate(layout.root)
    (layout.root / ("long-" * 30 + "name")).write_text("a name beyond 100 bytes")
    (layout.root / "naïve.txt").write_text("not ascii")
    for i in range(300):
        (layout.root / "many{}".format(i)).write_bytes(os.urandom(i * 7))
    data, stats = archive_bytes(layout.root)
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    assert len(plain) % tarfile.RECORDSIZE == 0
    listed = subprocess.run(["tar", "-tf", "-"], input=plain, capture_output=True, check=True)
    names = {n.rstrip("/") for n in listed.stdout.decode().splitlines()}
    assert names == set(tree(layout.root))
    assert stats.files == sum(1 for v in tree(layout.root).values() if v[0] == "file")


# -- the compressor process ----------------------------------------------------


def _children_named(name: str) -> list[int]:
    """Live children of this process running ``name``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(pid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open("/proc/{}/comm".format(pid)) as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and comm == name and fields[0] != "Z":
            found.append(int(pid))
    return found


def test_the_archive_is_compressed_by_a_zstd_process_of_its_own(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(layout.root)
    seen: list[list[int]] = []
    real_write = archive._Compressor.write

    def write(self: Any, data: Any) -> int:
        if not seen:
            seen.append(_children_named("zstd"))
        return real_write(self, data)

    monkeypatch.setattr(archive._Compressor, "write", write)
    data, stats = archive_bytes(layout.root)
    assert len(seen[0]) == 1  # the zstd program, fed by the walk
    assert _children_named("zstd") == []  # and gone once the archive is whole
    assert stats.checksum == hashlib.sha256(data).hexdigest() and stats.size == len(data)
    restore_bytes(layout.root, data, stats)


def test_the_archive_is_the_frames_zstd_T0_makes_of_the_same_tar_stream(
        layout: Layout) -> None:
    # What ``tar -I 'zstd -T0 -3'`` gives for our tar stream, byte for byte:
    # the same compression work (level, threads, job size) as the command
    # a backup's speed is measured against.  More than two of zstd's
    # default jobs (8 MiB), half compressible, so a job size of its own
    # would show.
    for i in range(3):
        (layout.root / "half{}".format(i)).write_bytes(
            os.urandom(3 * 1024 * 1024) + bytes(3 * 1024 * 1024))
    data, stats = archive_bytes(layout.root)
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    assert len(plain) > 2 * 8 * 1024 * 1024
    again = subprocess.run(["zstd", "-q", "-c", "-T0", "-3"], input=plain,
                           capture_output=True, check=True).stdout
    assert data == again


def test_without_the_zstd_program_the_same_archive_is_made_in_process(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(layout.root)
    (layout.root / "big").write_bytes(os.urandom(3 * archive.SMALL_WRITE))
    before = tree(layout.root)
    monkeypatch.setattr(archive, "ZSTD_PROGRAM", "no-such-zstd-program")
    data, stats = archive_bytes(layout.root)
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    assert len(plain) % tarfile.RECORDSIZE == 0
    restore_bytes(layout.root, data, stats)
    assert tree(layout.root) == before


def test_a_compressor_that_dies_fails_the_backup_with_its_message(
        layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (layout.root / "big").write_bytes(os.urandom(8 * archive.SMALL_WRITE))
    fake = tmp_path / "bin" / "zstd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nhead -c 1000 >/dev/null\necho 'zstd: out of luck' >&2\nexit 7\n")
    fake.chmod(0o755)
    monkeypatch.setattr(archive, "ZSTD_PROGRAM", str(fake))
    with pytest.raises(archive.CompressorFailed, match="exit 7.*out of luck"):
        archive_bytes(layout.root)


def test_a_driver_write_that_fails_ends_the_compressor_and_raises_its_error(
        layout: Layout) -> None:
    for i in range(4):
        (layout.root / "big{}".format(i)).write_bytes(os.urandom(4 * 1024 * 1024))
    fd = os.open(layout.root, os.O_PATH | os.O_DIRECTORY)

    def write(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError, match="No space left"):
            write_archive(fd, write, load_rules(fd, []))
    finally:
        os.close(fd)
    assert _children_named("zstd") == []


def test_the_pipe_to_zstd_is_as_wide_as_the_host_allows(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wider than fs.pipe-max-size: refused without CAP_SYS_RESOURCE (an
    # agent in a container); the pipe is then the widest allowed, not
    # the 64 KiB default.
    with open("/proc/sys/fs/pipe-max-size") as f:
        allowed = int(f.read())
    monkeypatch.setattr(archive, "PIPE_SIZE", 4 * allowed)
    (layout.root / "big").write_bytes(os.urandom(2 * archive.SMALL_WRITE))
    sizes: list[int] = []
    real_write = archive._Compressor.write

    def write(self: Any, data: Any) -> int:
        sizes.append(fcntl.fcntl(self._in, 1032))  # F_GETPIPE_SZ
        return real_write(self, data)

    monkeypatch.setattr(archive._Compressor, "write", write)
    data, stats = archive_bytes(layout.root)
    assert sizes and min(sizes) >= allowed
    restore_bytes(layout.root, data, stats)


def test_a_large_file_shrinking_while_spliced_is_padded_to_its_size(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 4 * archive.SMALL_WRITE
    (layout.root / "region").write_bytes(b"r" * size)
    real_splice = os.splice
    calls = []

    def splice(src: int, dst: int, count: int, *a: Any) -> int:
        calls.append(count)
        if len(calls) == 1:
            with open(layout.root / "region", "r+b") as f:
                f.truncate(1000)
        return real_splice(src, dst, count, *a)

    monkeypatch.setattr(os, "splice", splice)
    data, stats = archive_bytes(layout.root)
    assert calls  # the large file went through splice
    assert stats.changed == 1 and "region" in stats.notes[0]
    restore_bytes(layout.root, data, stats)
    assert (layout.root / "region").read_bytes() == b"r" * 1000 + bytes(size - 1000)


# -- the local driver's file, written by zstd itself ---------------------------


def _archive_to_local(root: Path, directory: Path, write: Any = None
                      ) -> tuple[archive.ArchiveStats, Path]:
    """Archive ``root`` as the manager does for the local driver; (stats, the archive)."""
    from ctrlagent.backups.drivers import LocalDriver

    writer = LocalDriver(str(directory)).open_writer("srv1", "b1")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        stats = write_archive(fd, write or writer.write, load_rules(fd, []),
                              file_fd=writer.file_fd)
    except BaseException:
        writer.abort()
        raise
    finally:
        os.close(fd)
    return stats, directory / writer.commit()


def test_the_local_archive_is_written_by_zstd_and_hashed_behind_it(
        layout: Layout, tmp_path: Path) -> None:
    populate(layout.root)
    (layout.root / "big").write_bytes(os.urandom(6 * 1024 * 1024))
    before = tree(layout.root)
    through_agent: list[int] = []
    stats, path = _archive_to_local(layout.root, tmp_path / "archives",
                                    write=lambda data: through_agent.append(len(data)))
    data = path.read_bytes()
    # Not one byte of the compressed stream passed through the agent's write.
    assert through_agent == []
    assert stats.size == len(data) and stats.checksum == hashlib.sha256(data).hexdigest()
    restore_bytes(layout.root, data, stats)
    assert tree(layout.root) == before


@pytest.mark.parametrize("piece", [300 * 1024, archive.HASH_READ - 1,
                                   2 * archive.HASH_READ + 1])
def test_a_local_archive_trickling_out_of_zstd_is_hashed_whole(
        layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int) -> None:
    # A zstd that writes its output in pieces (shorter and longer than the
    # hasher's read, never a multiple of it) with pauses longer than the
    # hasher's wait: it catches up mid-read, waits, reads on, and reads
    # the last pieces after the child's end.
    (layout.root / "big").write_bytes(os.urandom(2 * 1024 * 1024))
    fake = tmp_path / "bin" / "zstd"
    fake.parent.mkdir()
    fake.write_text(
        "#!{}\nimport subprocess, sys, time\n"
        "out = subprocess.run(['zstd'] + sys.argv[1:], stdin=sys.stdin,\n"
        "                     capture_output=True, check=True).stdout\n"
        "for i in range(0, len(out), {piece}):\n"
        "    sys.stdout.buffer.write(out[i:i + {piece}])\n"
        "    sys.stdout.buffer.flush()\n"
        "    time.sleep({pause})\n".format(sys.executable, piece=piece,
                                           pause=1.5 * archive.FOLLOW_POLL))
    fake.chmod(0o755)
    monkeypatch.setattr(archive, "ZSTD_PROGRAM", str(fake))
    stats, path = _archive_to_local(layout.root, tmp_path / "archives")
    data = path.read_bytes()
    assert len(data) > 4 * archive.HASH_READ and len(data) % archive.HASH_READ != 0
    assert stats.size == len(data) and stats.checksum == hashlib.sha256(data).hexdigest()


def test_without_the_zstd_program_the_local_archive_goes_through_the_driver(
        layout: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    populate(layout.root)
    before = tree(layout.root)
    monkeypatch.setattr(archive, "ZSTD_PROGRAM", "no-such-zstd-program")
    stats, path = _archive_to_local(layout.root, tmp_path / "archives")
    data = path.read_bytes()
    assert stats.size == len(data) and stats.checksum == hashlib.sha256(data).hexdigest()
    restore_bytes(layout.root, data, stats)
    assert tree(layout.root) == before


def test_a_full_disk_under_zstd_is_insufficient_resources_and_leaves_nothing(
        layout: Layout, tmp_path: Path) -> None:
    from ctrlagent.errors import InsufficientResources

    disk = tmp_path / "archives"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (layout.root / "noise").write_bytes(os.urandom(3 * 1024 * 1024))
        with pytest.raises(InsufficientResources, match="No space left on device"):
            _archive_to_local(layout.root, disk)
        assert os.listdir(disk / "srv1") == []
        assert _children_named("zstd") == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
