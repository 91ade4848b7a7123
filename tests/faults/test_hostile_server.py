"""
A hostile game server, and every file action of the protocol run against it.

Everything inside a server's data directory is written by the game server,
so it is input from the internet.  Here the "game" (a busybox shell script in
the scripted image, running in its container as the game would) plants:

- symbolic links to host files and trees: ``/etc/passwd``, ``/``, a canary
  tree outside the data directory (by absolute path and by ``..``), a
  neighbour server's directory, a link inside a subdirectory climbing out;
- a directory tree about 1,000 levels deep;
- a FIFO, and a chunk file of a chunked upload that is a link to the canary;
- forged mods manifests (``mods/.ctrlagent-mods.json``) whose file names are
  ``../../../canary/...``, absolute, a neighbour's file, ``../..``;
- and it keeps swapping ``race`` between a real directory and a link to the
  canary while the actions run (a time-of-check/time-of-use race).

The test adds, as root, what an unprivileged game cannot make: device nodes
and a Unix socket, and crafted archives (``..`` members, absolute members,
members through links, symlink and hard-link members leading out, device
and setuid members).

Then every file action runs against that server (list, search, read,
download, info, write, upload, chunked upload, mkdir, rename, copy/move where
the agent has them, delete, chmod, archive create/extract, install/uninstall/
list mods, ``delete_server`` with ``purgeFiles``), each one checked at once:

- the answer is HTTP 200 with a success or a coded error, within 15 s (a FIFO
  must never hang a worker);
- no answer carries a byte of the canary, the neighbour or the host's passwd
  (base64 included), and no listing or search shows their names;
- the canary tree, the neighbour's directory, ``/etc/passwd`` and the
  directories around the data directory are byte-for-byte unchanged.

Safety of the machine running this test: the actions that write, move,
chmod, archive or delete are only ever aimed at the canary and the neighbour;
the links to ``/etc/passwd`` and ``/`` are only read, listed and searched,
then unlinked by the test before any other action runs.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import json
import os
import socket
import stat
import tarfile
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.rig import (
    FaultAgent,
    assert_answer,
    remove_tree,
    tree_diff,
    tree_state,
    wait_for,
)
from tests.rig.agentproc import remove_containers_under
from tests.rig.sockets import bind_unix

# Docker only: file confinement on the data directory; Podman's share of the fault suite is
# test_agent_kills
pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.docker, pytest.mark.slow,
              pytest.mark.runtimes("docker")]

DEPTH = 1000
CANARY_SECRET = "canary-secret-" + uuid.uuid4().hex
NEIGHBOUR_SECRET = "neighbour-secret-" + uuid.uuid4().hex

# The game: plant everything, say so, then race.  Host paths arrive in the
# environment as plain strings (a link target is only a string).  `ln`,
# `mkfifo` and `mv` are busybox applets without links in the image.
GAME = (
    "cd /home/container; B=/bin/busybox; "
    '$B ln -s /etc/passwd passwd_link; $B ln -s / root_link; '
    '$B ln -s "$CANARY/canary-victim.txt" canary_link; $B ln -s "$CANARY" canary_dir_link; '
    '$B ln -s "$NEIGHBOUR" neighbour_link; $B ln -s ../../canary rel_escape; '
    'mkdir -p sub mods; $B ln -s ../../../canary/canary-victim.txt sub/up_link; '
    '$B ln -s "$CANARY" mods/mod_link; '
    '$B mkfifo fifo; $B ln -s "$CANARY/canary-victim.txt" up.bin.chunk0; '
    'printf "%s" "$MANIFEST" > mods/.ctrlagent-mods.json; '
    "echo mine > mine.txt; echo jar > upload.jar; "
    "mkdir deep; cd deep; i=0; while [ $i -lt {depth} ]; do mkdir d; cd d; i=$((i+1)); done; "
    "echo leaf > leaf.txt; cd /home/container; echo planted; "
    "n=0; while [ $n -lt 100000 ]; do "
    'rm -rf race; mkdir race; echo decoy > race/x.txt; rm -rf race; $B ln -s "$CANARY" race; '
    "n=$((n+1)); sleep 0.01; done; exec sleep 3600"
).replace("{depth}", str(DEPTH))

DEEP = "deep/" + "d/" * DEPTH


def _manifest(canary: Path, neighbour: Path) -> str:
    """What the game writes as its mods manifest: every name leads out."""
    neighbour_rel = "../../{}/neighbour-world.dat".format(neighbour.name)
    entries = [
        ("evil-rel", "../../../canary/canary-victim.txt"),
        ("evil-tree", "../../../canary/canary-tree"),
        ("evil-abs", str(canary / "canary-abs.txt")),
        ("evil-abs-dir", str(canary / "canary-tree")),
        ("evil-neighbour", neighbour_rel),
        ("evil-up", "../.."),
        ("evil-link", "mod_link"),
        ("evil-link-into", "mod_link/canary-victim.txt"),
    ]
    return json.dumps(
        {"version": 1, "mods": [
            {"id": mod_id, "name": mod_id, "fileName": name, "enabled": True, "size": 1}
            for mod_id, name in entries
        ]}
    )


def _make_canary(root: Path) -> None:
    (root / "canary-tree" / "canary-sub").mkdir(parents=True)
    (root / "canary-victim.txt").write_text(CANARY_SECRET + "\n")
    (root / "canary-abs.txt").write_text(CANARY_SECRET + " abs\n")
    (root / "canary-tree" / "canary-leaf.txt").write_text(CANARY_SECRET + " leaf\n")
    (root / "canary-tree" / "canary-sub" / "canary-deeper.txt").write_text(CANARY_SECRET)
    for path in (root / "canary-victim.txt", root / "canary-abs.txt"):
        path.chmod(0o640)


def _passwd_marker() -> str:
    """A line of the host's /etc/passwd that the image's own passwd does not have."""
    for line in Path("/etc/passwd").read_text().splitlines():
        if line and not line.startswith(("root:", "container:")):
            return line
    return Path("/etc/passwd").read_text().splitlines()[0]


def _passwd_state() -> tuple[Any, ...]:
    try:
        st = os.stat("/etc/passwd")
    except FileNotFoundError:
        return ("absent",)
    digest = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    return (digest, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _leaks(answer: Any, markers: list[str]) -> list[str]:
    """The markers an answer carries, in clear or in base64."""
    found = []
    for text in _strings(answer):
        candidates = [text]
        if len(text) >= 8 and len(text) % 4 == 0:
            try:
                candidates.append(base64.b64decode(text, validate=True).decode("latin-1"))
            except (binascii.Error, ValueError):
                pass
        for marker in markers:
            if any(marker in c for c in candidates):
                found.append(marker)
    return found


def _listed_names(answer: dict[str, Any]) -> list[str]:
    files = (answer.get("data") or {}).get("files") or []
    names = []
    for entry in files:
        if isinstance(entry, dict):
            names.append(str(entry.get("name", "")))
            names.append(str(entry.get("path", "")))
    return names


def _file_bytes_with_members(data: bytes) -> Iterator[bytes]:
    """A file's bytes, and what is inside them when they are a gzip or a zip."""
    yield data
    if data[:2] == b"\x1f\x8b":
        try:
            yield gzip.decompress(data)
        except (OSError, EOFError):
            pass
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for info in z.infolist():
                    yield z.read(info)
        except (zipfile.BadZipFile, OSError, NotImplementedError):
            pass


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _scan_server_dir(root: Path, markers: list[str], planted_special: set[str]) -> list[str]:
    """
    Problems left inside the hostile server's directory: host bytes copied in
    (archives looked into), special files or set-id bits it did not plant.

    Iterative, and it never follows a link, even one the still-racing game
    swaps in between a look and a read: every directory and file is opened
    relative to its parent's descriptor with ``O_NOFOLLOW``.
    """
    problems: list[str] = []
    pending: list[tuple[int, str]] = [(os.open(root, _NOFOLLOW_DIR), "")]
    seen = 0
    try:
        while pending and seen < 50_000:
            fd, prefix = pending.pop()
            try:
                entries = list(os.scandir(fd))
            except OSError:
                os.close(fd)
                continue
            for entry in entries:
                seen += 1
                rel = prefix + entry.name
                try:
                    st = os.lstat(entry.name, dir_fd=fd)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    try:
                        pending.append((os.open(entry.name, _NOFOLLOW_DIR, dir_fd=fd), rel + "/"))
                    except OSError:
                        continue  # swapped for a link or gone since
                elif stat.S_ISREG(st.st_mode):
                    if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                        problems.append("{}: set-id bits {:o}".format(rel, st.st_mode))
                    if st.st_size > 50 * 1024 * 1024:
                        problems.append("{}: {} bytes".format(rel, st.st_size))
                        continue
                    try:
                        file_fd = os.open(entry.name, _NOFOLLOW_FILE, dir_fd=fd)
                    except OSError:
                        continue
                    with os.fdopen(file_fd, "rb") as f:
                        data = f.read(50 * 1024 * 1024 + 1)
                    for blob in _file_bytes_with_members(data):
                        text = blob.decode("latin-1")
                        for marker in markers:
                            if marker in text:
                                problems.append("{} holds host data ({}...)".format(
                                    rel, marker[:20]))
                elif not stat.S_ISLNK(st.st_mode) and rel not in planted_special:
                    problems.append("{}: a special file the game did not plant ({:o})".format(
                        rel, st.st_mode))
            os.close(fd)
    finally:
        for fd, _ in pending:
            os.close(fd)
    return problems


def _plant_deep_tree(top: Path, depth: int) -> None:
    """``top/d/d/.../d`` (``depth`` levels), made through directory fds."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return out.getvalue()


def _evil_archives(canary: Path) -> dict[str, bytes]:
    """One small archive per way out, so that each reaches its own check."""

    def member(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = kw.pop("mode", 0o644)
        for key, value in kw.items():
            setattr(info, key, value)
        return info

    pwned = b"pwned by an archive\n"
    tars = {
        "dotdot.tar": [(member("../../canary/canary-victim.txt"), pwned)],
        "absolute.tar": [(member(str(canary / "canary-abs.txt")), pwned)],
        "through-link.tar": [(member("canary_dir_link/canary-victim.txt"), pwned),
                             (member("canary_dir_link/new-from-tar.txt"), pwned),
                             (member("neighbour_link/new-from-tar.txt"), pwned)],
        "race.tar": [(member("race/new-from-tar.txt"), pwned)],
        "symlink-out.tar": [
            (member("out_link", tarfile.SYMTYPE, linkname=str(canary)), None),
            (member("out_link/canary-victim.txt"), pwned)],
        "symlink-up.tar": [
            (member("up_rel", tarfile.SYMTYPE, linkname="../../canary"), None),
            (member("up_rel/canary-new.txt"), pwned)],
        "hardlink-out.tar": [
            (member("hard_out", tarfile.LNKTYPE,
                    linkname=str(canary / "canary-victim.txt")), None),
            (member("hard_out"), pwned)],
        "hardlink-up.tar": [
            (member("hard_up", tarfile.LNKTYPE, linkname="../../canary/canary-abs.txt"), None),
            (member("hard_up"), pwned)],
        "special.tar": [
            (member("dev_in_tar", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
            (member("fifo_in_tar", tarfile.FIFOTYPE), None),
            (member("setuid_in_tar", mode=0o4755), b"#!/bin/sh\n"),
            (member("setgid_in_tar", mode=0o2755), b"#!/bin/sh\n")],
    }
    out = {name: _tar(members) for name, members in tars.items()}

    def zipped(entries: list[tuple[zipfile.ZipInfo | str, bytes | str]]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            for info, data in entries:
                z.writestr(info, data)
        return buffer.getvalue()

    link = zipfile.ZipInfo("zip_link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    out["dotdot.zip"] = zipped([("../../canary/canary-zip.txt", b"pwned")])
    out["absolute.zip"] = zipped([(str(canary / "canary-abs.txt"), b"pwned")])
    out["through-link.zip"] = zipped([("canary_dir_link/canary-victim.txt", b"pwned")])
    out["symlink-out.zip"] = zipped([(link, str(canary)),
                                     ("zip_link/canary-victim.txt", b"pwned")])
    return out


class Hostile:
    """Runs actions against the hostile server and checks every guard after each."""

    def __init__(self, agent: FaultAgent, server_id: str, markers: list[str],
                 forbidden_names: tuple[str, ...]) -> None:
        self.agent = agent
        self.server_id = server_id
        self.markers = markers
        self.forbidden_names = forbidden_names
        self.guards: dict[str, tuple[Callable[[], Any], Any]] = {}
        self.problems: list[str] = []
        self.count = 0
        self.outcomes: Counter[str] = Counter()

    def guard(self, name: str, picture: Callable[[], Any]) -> None:
        self.guards[name] = (picture, picture())

    def act(self, action: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        label = "{} {}".format(action, json.dumps(payload)[:160])
        self.count += 1
        started = time.monotonic()
        answer = self.agent.call(action, self.server_id, payload or {}, timeout=15)
        took = time.monotonic() - started
        code = assert_answer(answer, label)
        self.outcomes["{} {}".format(action, code or "ok")] += 1
        leaked = _leaks(answer, self.markers)
        if leaked:
            self.problems.append("{}: the answer carries host data {}".format(label, leaked))
        if action in ("list_files", "search_files") and answer.get("success"):
            shown = [n for n in _listed_names(answer)
                     if os.path.basename(n).startswith(self.forbidden_names)]
            if shown:
                self.problems.append("{}: shows names from outside: {}".format(label, shown[:5]))
        for name, (picture, before) in self.guards.items():
            after = picture()
            if after != before:
                change = tree_diff(before, after) if isinstance(before, dict) else [
                    "{} -> {}".format(before, after)]
                self.problems.append("{}: {} changed: {}".format(label, name, change[:5]))
                # Report each change once, with the action that made it.
                self.guards[name] = (picture, after)
        if took > 10:
            self.problems.append("{}: took {:.1f}s".format(label, took))
        return answer


def test_a_hostile_game_server_cannot_reach_the_host_through_any_file_action(
    make_agent: Callable[..., FaultAgent], scripted_image: str
) -> None:
    agent = make_agent()
    workdir = agent.workdir
    canary = workdir / "canary"
    _make_canary(canary)
    agent.start()
    unix: socket.socket | None = None
    try:
        tag = uuid.uuid4().hex[:8]
        hostile, neighbour_id = "hostile-" + tag, "neighbour-" + tag

        created = agent.call("create_server", neighbour_id, {
            "name": "neighbour", "image": scripted_image, "startup": "/usr/local/bin/gameserver",
            "limits": {"memory": 64, "cpu": 50}})
        assert created["success"] is True, created
        neighbour = agent.data_dir / neighbour_id
        (neighbour / "neighbour-plugins").mkdir(parents=True, exist_ok=True)
        (neighbour / "neighbour-world.dat").write_text(NEIGHBOUR_SECRET + "\n")
        (neighbour / "neighbour-plugins" / "neighbour-p.jar").write_text(NEIGHBOUR_SECRET + " jar")

        created = agent.call("create_server", hostile, {
            "name": "hostile", "image": scripted_image, "startup": GAME,
            "environment": {"CANARY": str(canary), "NEIGHBOUR": str(neighbour),
                            "MANIFEST": _manifest(canary, neighbour)},
            "limits": {"memory": 64, "cpu": 50, "disk": 100}})
        assert created["success"] is True, created
        server_dir = agent.data_dir / hostile
        assert agent.call("start_server", hostile)["success"] is True

        def planted() -> bool:
            answer = agent.call("console:history", hostile, {"lines": 100})
            return "planted" in answer.get("data", {}).get("history", [])

        wait_for(planted, 60, "the game to plant its traps")
        # What an unprivileged game cannot make, planted as root.
        os.mknod(server_dir / "null_dev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(server_dir / "zero_dev", stat.S_IFCHR | 0o666, os.makedev(1, 5))
        os.mknod(server_dir / "random_dev", stat.S_IFCHR | 0o666, os.makedev(1, 8))
        unix = bind_unix(server_dir / "sock")
        archives = _evil_archives(canary)
        for name, data in archives.items():
            (server_dir / name).write_bytes(data)
        planted_special = {"fifo", "null_dev", "zero_dev", "random_dev", "sock"}

        markers = [CANARY_SECRET, NEIGHBOUR_SECRET, _passwd_marker()]
        canary_before, neighbour_before = tree_state(canary), tree_state(neighbour)
        passwd_before = _passwd_state()
        h = Hostile(agent, hostile, markers, ("canary-", "neighbour-"))
        h.guard("the canary tree", lambda: tree_state(canary))
        h.guard("the neighbour's directory", lambda: tree_state(neighbour))
        h.guard("/etc/passwd", _passwd_state)
        h.guard("the agent's work directory", lambda: sorted(os.listdir(workdir)))
        h.guard("the data directory", lambda: sorted(
            n for n in os.listdir(agent.data_dir) if n != hostile))
        manifest_path = server_dir / "mods" / ".ctrlagent-mods.json"
        manifest = _manifest(canary, neighbour)

        def plant_manifest() -> None:
            # Even after an action deleted more than it should: report, do not stop.
            manifest_path.parent.mkdir(parents=True, exist_ok=True)
            manifest_path.write_text(manifest)
            (server_dir / "upload.jar").write_text("jar\n")

        # -- look: every planted thing, read-only actions ----------------------------------
        looked_at = [
            "passwd_link", "root_link", "root_link/etc/passwd", "canary_link", "canary_dir_link",
            "canary_dir_link/canary-victim.txt", "neighbour_link",
            "neighbour_link/neighbour-world.dat", "rel_escape", "rel_escape/canary-victim.txt",
            "sub/up_link", "mods/mod_link", "fifo", "null_dev", "zero_dev", "random_dev", "sock",
            "deep", DEEP + "leaf.txt", "race", "race/x.txt", "up.bin.chunk0", "/",
        ]
        for path in looked_at:
            for action in ("read_file", "download_file", "get_file_info", "list_files",
                           "get_file_permissions"):
                h.act(action, {"path": path})
        for query in ("canary", "neighbour", "victim", "passwd", "leaf", "d"):
            h.act("search_files", {"path": "/", "query": query})
        h.act("search_files", {"path": "deep", "query": "leaf"})
        h.act("search_files", {"path": "canary_dir_link", "query": "canary"})
        # Links to the host's own files are only ever read: gone before anything
        # writes, moves, archives or deletes (a regression must not cost this
        # machine its /etc/passwd).
        (server_dir / "root_link").unlink()
        (server_dir / "passwd_link").unlink()

        # -- the deep tree on a disk-limited server: writes, archives, deletes -------------
        h.act("write_file", {"path": "beside-deep.txt", "content": "x"})
        h.act("upload_file", {"path": "beside-deep.bin", "content": "eA=="})
        h.act("write_file", {"path": DEEP + "new.txt", "content": "x"})
        h.act("create_directory", {"path": DEEP + "newdir"})
        h.act("create_archive", {"files": ["deep"], "archivePath": "deep.tar", "format": "tar"})
        h.act("extract_archive", {"archivePath": "through-link.tar", "extractPath": DEEP})
        h.act("delete_file", {"path": DEEP + "leaf.txt"})
        h.act("delete_file", {"path": "deep"})
        # The game removes what is left, so that the actions below reach their
        # own code even where a deep tree still breaks the disk-usage walk.
        remove_tree(server_dir / "deep")

        # -- write, upload, chunked upload, mkdir ------------------------------------------
        aimed = [
            "canary_link", "canary_dir_link/canary-victim.txt", "canary_dir_link/new.txt",
            "neighbour_link/neighbour-world.dat", "neighbour_link/new.txt",
            "rel_escape/canary-victim.txt", "sub/up_link", "mods/mod_link/canary-victim.txt",
            "race/x.txt", "race/new.txt", "fifo", "null_dev", "zero_dev", "sock",
            "../../canary/canary-victim.txt", "../canary-outside.txt",
        ]
        for path in aimed:
            h.act("write_file", {"path": path, "content": "pwned"})
            h.act("upload_file", {"path": path, "content": base64.b64encode(b"pwned").decode()})
        for path in ("canary_link", "canary_dir_link/big.bin", "race/big.bin",
                     "neighbour_link/big.bin"):
            for index in (0, 1):
                h.act("upload_file", {"path": "{}.chunk{}".format(path, index), "totalChunks": 2,
                                      "content": base64.b64encode(b"pwned").decode()})
        # The game planted up.bin.chunk0 as a link to the canary: assembling must not read it.
        h.act("upload_file", {"path": "up.bin.chunk1", "totalChunks": 2,
                              "content": base64.b64encode(b"tail").decode()})
        h.act("upload_file", {"path": "up.bin", "content": ""})
        for path in ("canary_dir_link/newdir", "neighbour_link/newdir", "race/newdir",
                     "rel_escape/newdir"):
            h.act("create_directory", {"path": path})

        # -- chmod -------------------------------------------------------------------------
        for path in ("canary_link", "canary_dir_link", "canary_dir_link/canary-victim.txt",
                     "neighbour_link", "neighbour_link/neighbour-world.dat", "rel_escape",
                     "sub/up_link", "race", "race/x.txt", "fifo", "null_dev", "mods/mod_link"):
            for mode in ("777", "4755"):
                h.act("set_file_permissions", {"path": path, "mode": mode})

        # -- rename, copy, move ------------------------------------------------------------
        moves = [
            ("canary_dir_link/canary-victim.txt", "stolen.txt"),
            ("neighbour_link/neighbour-world.dat", "stolen-world.dat"),
            ("rel_escape/canary-abs.txt", "stolen-abs.txt"),
            ("mine.txt", "canary_dir_link/mine.txt"),
            ("mine.txt", "neighbour_link/mine.txt"),
            ("mine.txt", "race/mine.txt"),
            ("mine.txt", "../mine.txt"),
            ("canary_dir_link/canary-tree", "tree-here"),
            ("race", "race-moved"),
            ("canary_link", "moved_link"),
            ("moved_link", "canary_link"),
        ]
        for old, new in moves:
            h.act("rename_file", {"oldPath": old, "newPath": new})
            h.act("copy_file", {"sourcePath": old, "destinationPath": new + ".copy"})
            h.act("move_file", {"sourcePath": old, "destinationPath": new + ".move"})

        # -- archives ----------------------------------------------------------------------
        everything = ["canary_link", "canary_dir_link", "neighbour_link",
                      "rel_escape", "sub", "mods", "fifo", "null_dev", "zero_dev", "sock",
                      "deep", "race", "up.bin.chunk0"]
        for fmt, name in (("tar", "all.tar"), ("zip", "all.zip"), ("tar.gz", "all.tar.gz")):
            h.act("create_archive", {"files": everything, "archivePath": name, "format": fmt})
            h.act("create_archive", {"files": ["/"], "archivePath": "root-" + name,
                                     "format": fmt})
        h.act("create_archive", {"files": ["mine.txt"], "archivePath": "canary_dir_link/x.tar",
                                 "format": "tar"})
        h.act("create_archive", {"files": ["mine.txt"], "archivePath": "race/x.tar",
                                 "format": "tar"})
        for archive in archives:
            for target in ("/", "extracted"):
                h.act("extract_archive", {"archivePath": archive, "extractPath": target})
        for target in ("canary_dir_link", "race", "neighbour_link", "rel_escape", "fifo"):
            h.act("extract_archive", {"archivePath": "race.tar", "extractPath": target})
        for archive in ("canary_link", "fifo", "zero_dev", "race/x.tar"):
            h.act("extract_archive", {"archivePath": archive, "extractPath": "/"})

        # -- mods: forged manifests, then a mods folder that is a link ---------------------
        h.act("list_mods")
        for mod_id in ("evil-rel", "evil-tree", "evil-abs", "evil-abs-dir", "evil-neighbour",
                       "evil-up", "evil-link", "evil-link-into"):
            plant_manifest()  # the game writes it back at will
            h.act("install_mod", {"modId": mod_id, "path": "upload.jar",
                                  "fileName": mod_id + ".jar"})
            plant_manifest()
            h.act("uninstall_mod", {"modId": mod_id})
            h.act("list_mods")
        for source in ("canary_link", "canary_dir_link/canary-abs.txt", "fifo", "zero_dev",
                       "neighbour_link", "neighbour_link/neighbour-world.dat", "race/x.txt"):
            h.act("install_mod", {"modId": "steal", "path": source})
        (server_dir / "mods").rename(server_dir / "mods-real")
        (server_dir / "mods").symlink_to(canary)
        h.act("list_mods")
        h.act("install_mod", {"modId": "into-link", "path": "upload.jar"})
        h.act("uninstall_mod", {"modId": "evil-rel"})

        # -- delete ------------------------------------------------------------------------
        for path in ("canary_dir_link/canary-victim.txt", "canary_dir_link/canary-tree",
                     "neighbour_link/neighbour-world.dat", "neighbour_link/neighbour-plugins",
                     "rel_escape/canary-abs.txt", "race/x.txt", "mods/canary-victim.txt",
                     "../" + neighbour_id, "..", "fifo", "null_dev", "sock",
                     "canary_link", "canary_dir_link", "neighbour_link", "rel_escape", "race",
                     "mods"):
            h.act("delete_file", {"path": path})

        problems = h.problems + _scan_server_dir(server_dir, markers, planted_special)
        assert h.count > 300, h.count

        # -- delete the server with its files (and a new deep tree) ------------------------
        _plant_deep_tree(server_dir / "deep-again", DEPTH)
        deleted = agent.call("delete_server", hostile, {"purgeFiles": True}, timeout=40)
        code = assert_answer(deleted, "delete_server purgeFiles")

        def settled() -> str | None:
            known = agent.call("get_server_status", hostile)
            if known.get("success"):
                return "kept" if code is not None else None
            return "gone" if not server_dir.exists() else "gone, files left"

        outcome = wait_for(settled, 30, "delete_server to finish or keep the server")
        if outcome == "gone, files left":
            problems.append("delete_server purged the record but left {}".format(server_dir))
        for name, (picture, before) in h.guards.items():
            if name == "the data directory":
                continue
            if picture() != before:
                problems.append("delete_server: {} changed".format(name))
        # Against the pictures taken before the first action, whatever happened between.
        for name, diff in (
            ("the canary tree", tree_diff(canary_before, tree_state(canary))),
            ("the neighbour's directory", tree_diff(neighbour_before, tree_state(neighbour))),
        ):
            if diff:
                problems.append("in the end {} differs: {}".format(name, diff[:5]))
        if _passwd_state() != passwd_before:
            problems.append("in the end /etc/passwd differs")
        listed = agent.call("list_servers")
        if neighbour_id not in {s["serverId"] for s in listed["data"]["servers"]}:
            problems.append("the neighbour server is no longer known")
        health = agent.health()
        assert health["status"] == "healthy", health
        assert not problems, "{} problems:\n{}\n(answers: {})".format(
            len(problems), "\n".join(problems[:40]), dict(sorted(h.outcomes.items()))
        )
    finally:
        if unix is not None:
            unix.close()
        # The 1,000-deep tree must not outlive the test: pytest's clean-up of
        # old temporary directories dies of a RecursionError on it.
        agent.stop()
        remove_containers_under(agent.docker_host, agent.data_dir)
        remove_tree(agent.data_dir)
