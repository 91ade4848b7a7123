"""
The security table: every way out of a server directory, each tried against a
real tree with a canary outside it, for both resolvers (manual walk and
openat2).  Refused cases must change nothing at all (inside or outside);
cases that succeed must stay inside the root.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.errors import FileNotFound, InvalidInput, PermissionDenied
from ctrlagent.files.manager import FileManager
from ctrlagent.interfaces import ServerRoot
from ctrlagent.wire.json import to_json
from tests.files.conftest import Tree

Op = Callable[[FileManager, ServerRoot], Awaitable[Any]]

ESCAPES = [
    "../outside/secret.txt",
    "/../outside/secret.txt",
    "./../outside/secret.txt",
    "sub/../../outside/secret.txt",
    "sub/../../../etc/passwd",
    "sub/inner.txt/../../../outside/secret.txt",
    "a/b/../../../outside/secret.txt",
    "..",
    "../",
    "//..//outside//secret.txt",
    "sub/..//../outside/dir/x.txt",
]


def _per_action(path: str) -> list[tuple[str, Op]]:
    """Every action, pointed at ``path``."""
    b64 = "aGVsbG8="
    # A chunk of "..": "...chunk0" would be a plain name, so name a file beneath it.
    chunk = path.rstrip("/") + ("/x.chunk0" if path.rstrip("/").endswith("..") else ".chunk0")
    return [
        ("read", lambda fm, r: fm.read_file(r, path)),
        ("write", lambda fm, r: fm.write_file(r, path, "pwned")),
        ("delete", lambda fm, r: fm.delete_file(r, path)),
        ("chmod", lambda fm, r: fm.set_file_permissions(r, path, "777")),
        ("info", lambda fm, r: fm.get_file_info(r, path)),
        ("list", lambda fm, r: fm.list_files(r, path)),
        ("search", lambda fm, r: fm.search_files(r, path, "secret")),
        ("download", lambda fm, r: fm.download_file(r, path)),
        ("upload", lambda fm, r: fm.upload_file(r, path, b64)),
        ("upload_chunk", lambda fm, r: fm.upload_file(r, chunk, b64)),
        ("mkdir", lambda fm, r: fm.create_directory(r, path + "/new")),
        ("rename_from", lambda fm, r: fm.rename_file(r, path, "stolen.txt")),
        ("rename_to", lambda fm, r: fm.rename_file(r, "config.txt", path + "/c.txt")),
        ("archive_files", lambda fm, r: fm.create_archive(r, [path], "a.tar.gz", "tar.gz")),
        ("archive_target", lambda fm, r: fm.create_archive(r, ["config.txt"],
                                                           path + "/a.zip", "zip")),
        ("extract_from", lambda fm, r: fm.extract_archive(r, path, "/")),
        ("extract_to", lambda fm, r: fm.extract_archive(r, "ok.tar", path)),
    ]


# (case id, operation, expected error or None for "succeeds, inside the root")
CASES: list[tuple[str, Op, type[Exception] | None]] = []
for _i, _p in enumerate(ESCAPES):
    for _name, _op in _per_action(_p):
        CASES.append(("dotdot{}-{}".format(_i, _name), _op, PermissionDenied))

# NUL bytes: refused before any system call.
for _name, _op in _per_action("config.txt\x00/../../outside/secret.txt"):
    CASES.append(("nul-" + _name, _op, InvalidInput))

# Symlinks that leave the root, absolute and relative, as file and directory.
for _link in ("link_passwd", "link_rel_secret"):
    for _name in ("read", "write", "chmod", "download", "upload", "extract_from"):
        _op = dict(_per_action(_link))[_name]
        CASES.append(("{}-{}".format(_link, _name), _op, PermissionDenied))
for _link in ("link_out_dir", "link_rel_out"):
    for _name, _op in _per_action(_link + "/secret.txt"):
        CASES.append(("{}-{}".format(_link, _name), _op, PermissionDenied))
    for _name in ("list", "search", "extract_to"):
        CASES.append(("{}-{}-dir".format(_link, _name), dict(_per_action(_link))[_name],
                      PermissionDenied))
    CASES.append(("{}-write-through".format(_link),
                  lambda fm, r, _l=_link: fm.write_file(r, _l + "/new.txt", "x"),
                  PermissionDenied))
    CASES.append(("{}-mkdir-through".format(_link),
                  lambda fm, r, _l=_link: fm.create_directory(r, _l + "/a/b"), PermissionDenied))

# Setuid/setgid are never set, even inside the root.
for _mode in ("4755", "2755", "6777"):
    CASES.append(("setuid-" + _mode,
                  lambda fm, r, _m=_mode: fm.set_file_permissions(r, "config.txt", _m),
                  PermissionDenied))
# The root itself cannot be deleted or moved.
CASES.append(("delete-root", lambda fm, r: fm.delete_file(r, "/"), PermissionDenied))
CASES.append(("rename-root", lambda fm, r: fm.rename_file(r, "/", "x"), PermissionDenied))


@pytest.mark.parametrize("case,op,expected", CASES, ids=[c[0] for c in CASES])
@pytest_twisted.ensureDeferred
async def test_escape_is_refused_and_changes_nothing(
    tree: Tree, fm: FileManager, case: str, op: Op, expected: type[Exception]
) -> None:
    _write_ok_tar(tree)
    before = tree.all_state()
    with pytest.raises(expected):
        await op(fm, tree.root)
    assert tree.all_state() == before


def _write_ok_tar(tree: Tree) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    (tree.root_path / "ok.tar").write_bytes(buf.getvalue())


# Cases that succeed but must stay inside the root.
INSIDE: list[tuple[str, Op, str]] = [
    # Absolute paths mean the server root.
    ("absolute-write", lambda fm, r: fm.write_file(r, "/etc/passwd", "mine"), "etc/passwd"),
    ("absolute-mkdir", lambda fm, r: fm.create_directory(r, "/etc/cron.d"), "etc/cron.d"),
    # URL-encoded forms are literal names, never decoded into "..".
    ("urlenc-write", lambda fm, r: fm.write_file(r, "%2e%2e/outside/secret.txt", "x"),
     "%2e%2e/outside/secret.txt"),
    ("urlenc-slash", lambda fm, r: fm.write_file(r, "..%2f..%2fsecret.txt", "x"),
     "..%2f..%2fsecret.txt"),
    ("urlenc-double", lambda fm, r: fm.write_file(r, "%252e%252e/x", "x"), "%252e%252e/x"),
    ("backslash", lambda fm, r: fm.write_file(r, "..\\..\\secret.txt", "x"),
     "..\\..\\secret.txt"),
    # Doubled separators collapse.
    ("doubled", lambda fm, r: fm.write_file(r, "sub//new.txt", "x"), "sub/new.txt"),
    # Deleting or moving a link acts on the link, never its target.
    ("delete-link-passwd", lambda fm, r: fm.delete_file(r, "link_passwd"), "!link_passwd"),
    ("delete-link-dir", lambda fm, r: fm.delete_file(r, "link_out_dir"), "!link_out_dir"),
    ("rename-link", lambda fm, r: fm.rename_file(r, "link_passwd", "sub/moved"), "sub/moved"),
    # Links that stay inside are followed.
    ("write-inside-link", lambda fm, r: fm.write_file(r, "link_in", "via link"), "config.txt"),
    ("write-inside-dirlink", lambda fm, r: fm.write_file(r, "link_in_dir/n.txt", "x"),
     "sub/n.txt"),
]


@pytest.mark.parametrize("case,op,where", INSIDE, ids=[c[0] for c in INSIDE])
@pytest_twisted.ensureDeferred
async def test_allowed_operation_stays_inside(
    tree: Tree, fm: FileManager, case: str, op: Op, where: str
) -> None:
    before = tree.outside_state()
    await op(fm, tree.root)
    assert tree.outside_state() == before
    if where.startswith("!"):
        assert not os.path.lexists(tree.root_path / where[1:])
    else:
        assert os.path.lexists(tree.root_path / where)


@pytest_twisted.ensureDeferred
async def test_symlinks_inside_the_root_may_be_read(tree: Tree, fm: FileManager) -> None:
    assert to_json(await fm.read_file(tree.root, "link_in"))["content"] == "hello\n"
    assert to_json(await fm.read_file(tree.root, "link_in_dotdot"))["content"] == "hello\n"
    assert to_json(await fm.read_file(tree.root, "link_in_dir/inner.txt"))["content"] == "inner\n"
    listing = to_json(await fm.list_files(tree.root, "link_in_dir"))
    assert [f["name"] for f in listing["files"]] == ["inner.txt"]


@pytest_twisted.ensureDeferred
async def test_listing_reports_symlinks_without_following_out(tree: Tree, fm: FileManager) -> None:
    files = {f["name"]: f for f in to_json(await fm.list_files(tree.root, "/"))["files"]}
    assert files["link_passwd"]["symlink"] is True
    assert files["link_passwd"]["broken"] is True
    assert files["link_out_dir"]["type"] == "file"
    assert files["link_in_dir"]["type"] == "directory"
    assert files["link_in"]["size"] == len("hello\n")
    assert "broken" not in files["link_in"]


@pytest_twisted.ensureDeferred
async def test_chmod_on_symlink_to_inside_file_is_refused(tree: Tree, fm: FileManager) -> None:
    mode = os.stat(tree.root_path / "config.txt").st_mode
    with pytest.raises(PermissionDenied):
        await fm.set_file_permissions(tree.root, "link_in", "777")
    assert os.stat(tree.root_path / "config.txt").st_mode == mode


@pytest_twisted.ensureDeferred
async def test_symlink_loop_is_refused(tree: Tree, fm: FileManager) -> None:
    os.symlink("loop_b", tree.root_path / "loop_a")
    os.symlink("loop_a", tree.root_path / "loop_b")
    with pytest.raises((PermissionDenied, FileNotFound)):
        await fm.read_file(tree.root, "loop_a")


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:" + compression) as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _file(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


@pytest.mark.parametrize("member", ["../evil.txt", "a/../../evil.txt", "../outside/secret.txt",
                                    "./../../evil.txt"])
@pytest_twisted.ensureDeferred
async def test_archive_with_dotdot_entry_is_refused_entirely(
    tree: Tree, fm: FileManager, member: str
) -> None:
    data = _tar([(_file("first.txt"), b"1"), (_file(member), b"evil")])
    (tree.root_path / "evil.tar").write_bytes(data)
    before = tree.rolled_back_state()
    with pytest.raises(PermissionDenied):
        await fm.extract_archive(tree.root, "evil.tar", "sub")
    # first.txt was created, then rolled back.
    assert tree.rolled_back_state() == before


@pytest_twisted.ensureDeferred
async def test_a_failed_extraction_puts_back_the_files_it_overwrote(
    tree: Tree, fm: FileManager
) -> None:
    config = tree.root_path / "config.txt"
    inode = config.stat().st_ino
    data = _tar([
        (_file("config.txt"), b"from the archive\n"),   # overwrites an existing file
        (_file("sub/inner.txt"), b"first\n"),           # overwritten twice
        (_file("sub/inner.txt"), b"second\n"),
        (_file("fresh.txt"), b"1"),                      # new, then overwritten
        (_file("fresh.txt"), b"2"),
        (_file("../evil.txt"), b"evil"),                 # the failure
    ])
    (tree.root_path / "evil.tar").write_bytes(data)
    before = tree.rolled_back_state()
    with pytest.raises(PermissionDenied):
        await fm.extract_archive(tree.root, "evil.tar", "/")
    # Content, mode, owner and mtime all as before: the very same file is back.
    assert tree.rolled_back_state() == before
    assert config.stat().st_ino == inode


@pytest_twisted.ensureDeferred
async def test_extraction_over_files_still_works_where_hard_links_are_refused(
    tree: Tree, fm: FileManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    data = _tar([(_file("config.txt"), b"new\n")])
    (tree.root_path / "update.tar").write_bytes(data)
    await fm.extract_archive(tree.root, "update.tar", "/")
    assert (tree.root_path / "config.txt").read_bytes() == b"new\n"


@pytest_twisted.ensureDeferred
async def test_a_successful_extraction_leaves_no_kept_originals(
    tree: Tree, fm: FileManager
) -> None:
    data = _tar([(_file("config.txt"), b"new\n"), (_file("sub/inner.txt"), b"new inner\n")])
    (tree.root_path / "update.tar").write_bytes(data)
    await fm.extract_archive(tree.root, "update.tar", "/")
    assert (tree.root_path / "config.txt").read_bytes() == b"new\n"
    assert (tree.root_path / "sub" / "inner.txt").read_bytes() == b"new inner\n"
    leftovers = [p for p in tree.root_path.rglob("*") if p.name.startswith(".ctrlagent-")]
    assert leftovers == []


@pytest_twisted.ensureDeferred
async def test_zip_with_dotdot_entry_is_refused(tree: Tree, fm: FileManager) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok/a.txt", "a")
        zf.writestr("../../evil.txt", "evil")
    (tree.root_path / "evil.zip").write_bytes(buf.getvalue())
    before = tree.rolled_back_state()
    with pytest.raises(PermissionDenied):
        await fm.extract_archive(tree.root, "evil.zip", "/")
    assert tree.rolled_back_state() == before


@pytest.mark.parametrize("target", [None, "outside_placeholder", "/etc"])
@pytest_twisted.ensureDeferred
async def test_archive_symlink_entry_then_file_through_it_stays_inside(
    tree: Tree, fm: FileManager, target: str | None
) -> None:
    link_target = str(tree.outside) if target in (None, "outside_placeholder") else target
    if target is None:
        link_target = "../../outside"
    data = _tar([
        (_link("escape", link_target), None),
        (_link("hard", str(tree.outside / "secret.txt"), hard=True), None),
        (_file("escape/secret.txt"), b"overwritten"),
        (_file("escape/new.txt"), b"new"),
    ], "gz")
    (tree.root_path / "links.tar.gz").write_bytes(data)
    before = tree.outside_state()
    result = to_json(await fm.extract_archive(tree.root, "links.tar.gz", "x"))
    assert tree.outside_state() == before
    assert result["skipped"] == 2
    # The link was never created: "escape" is a plain directory inside the root.
    assert not os.path.islink(tree.root_path / "x" / "escape")
    assert (tree.root_path / "x" / "escape" / "secret.txt").read_bytes() == b"overwritten"
    assert not (tree.root_path / "x" / "hard").exists()


@pytest_twisted.ensureDeferred
async def test_zip_symlink_entry_is_not_created(tree: Tree, fm: FileManager) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("escape")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, str(tree.outside))
        zf.writestr("escape/secret.txt", "overwritten")
    (tree.root_path / "links.zip").write_bytes(buf.getvalue())
    before = tree.outside_state()
    await fm.extract_archive(tree.root, "links.zip", "/")
    assert tree.outside_state() == before
    assert not os.path.islink(tree.root_path / "escape")


@pytest_twisted.ensureDeferred
async def test_archive_special_and_setuid_members_are_neutralised(
    tree: Tree, fm: FileManager
) -> None:
    dev = tarfile.TarInfo("dev_null")
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 3
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    data = _tar([(dev, None), (fifo, None), (_file("suid", 0o4755), b"#!/bin/sh\n"),
                 (_file("/abs/path.txt"), b"abs")])
    (tree.root_path / "special.tar").write_bytes(data)
    result = to_json(await fm.extract_archive(tree.root, "special.tar", "/"))
    assert result["skipped"] == 2
    assert not os.path.lexists(tree.root_path / "dev_null")
    assert not os.path.lexists(tree.root_path / "fifo")
    assert os.stat(tree.root_path / "suid").st_mode & 0o7777 == 0o755
    # A leading "/" is neutralised: the member lands inside the root.
    assert (tree.root_path / "abs" / "path.txt").read_bytes() == b"abs"


@pytest_twisted.ensureDeferred
async def test_archive_that_expands_1000x_is_stopped_and_rolled_back(
    tree: Tree, fm: FileManager
) -> None:
    data = _tar([(_file("small.txt"), b"ok"), (_file("bomb.bin"), b"\0" * (20 * 1024 * 1024))],
                "gz")
    assert len(data) * 1000 < 20 * 1024 * 1024 * 1.1  # really ~1000x
    (tree.root_path / "bomb.tar.gz").write_bytes(data)
    before = tree.rolled_back_state()
    from ctrlagent.errors import InsufficientResources

    with pytest.raises(InsufficientResources):
        await fm.extract_archive(tree.root, "bomb.tar.gz", "out")
    assert tree.rolled_back_state() == before
    assert not any(n.startswith(".ctrlagent-tmp") for n in os.listdir(tree.root_path))


@pytest_twisted.ensureDeferred
async def test_zip_bomb_is_stopped(tree: Tree, fm: FileManager) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.bin", b"\0" * (20 * 1024 * 1024))
    (tree.root_path / "bomb.zip").write_bytes(buf.getvalue())
    before = tree.rolled_back_state()
    from ctrlagent.errors import InsufficientResources

    with pytest.raises(InsufficientResources):
        await fm.extract_archive(tree.root, "bomb.zip", "/")
    assert tree.rolled_back_state() == before


@pytest_twisted.ensureDeferred
async def test_giant_pax_header_is_refused_without_filling_memory(
    tree: Tree, fm: FileManager
) -> None:
    import gzip

    # A PAX header of 80 MiB: tarfile would read it all into memory.
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 80 * 1024 * 1024
    raw = header.tobuf(format=tarfile.USTAR_FORMAT)
    body = b"\0" * header.size
    data = gzip.compress(raw + body, compresslevel=9)
    (tree.root_path / "pax.tar.gz").write_bytes(data)
    from ctrlagent.errors import InsufficientResources

    with pytest.raises(InsufficientResources):
        await fm.extract_archive(tree.root, "pax.tar.gz", "/")


@pytest_twisted.ensureDeferred
async def test_chmod_of_hard_linked_file_is_refused(tree: Tree, fm: FileManager) -> None:
    # A hard link shares the inode with a name outside the root.
    os.link(tree.outside / "secret.txt", tree.root_path / "hard.txt")
    before = tree.outside_state()
    with pytest.raises(PermissionDenied):
        await fm.set_file_permissions(tree.root, "hard.txt", "777")
    # Writing replaces the name inside, never the shared inode.
    await fm.write_file(tree.root, "hard.txt", "replaced")
    assert tree.outside_state() == before
    assert (tree.root_path / "hard.txt").read_text() == "replaced"
