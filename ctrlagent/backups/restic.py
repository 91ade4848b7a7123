"""
The restic driver: our own tar stream, uncompressed, handed to
``restic backup --stdin``; restored with ``restic dump``.  Blocking;
thread-side.

Why a stream rather than letting restic walk the server's directory:
restic opens what it backs up by path, as root, while the game server
(hostile) may swap any directory for a symlink to ``/etc`` in the middle of
the walk.  Our walker (``archive.write_archive``) never follows a link and
never leaves the root fd, so the stream holds only the server's files, with
the same ignore rules as every other driver.  restic still deduplicates:
its content-defined chunks find unchanged files inside the tar, so a second
backup after a small change stores little (see ``bench/backups.py``), and it
compresses the chunks itself (so the stream is not zstd-compressed by us).

The password never appears on a command line or in a log: it is handed to
restic through ``RESTIC_PASSWORD_FILE`` (the configured file), or in the
child's environment (``RESTIC_PASSWORD``, readable only by the agent's own
user through ``/proc``).  restic's ``--json`` output is read line by line,
each line bounded, and only its summary is kept; stderr keeps a bounded
tail for the error message.  A wrong password is ``ResticError`` saying so.
Deleting a backup is ``restic forget <snapshot> --prune``; retention forgets all
the snapshots it removes in one run, so the prune runs once.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from ctrlagent.backups.archive import (
    MAX_BACKUP_DEPTH,
    ArchiveStats,
    BackupCancelled,
    Progress,
    widen_pipe,
)
from ctrlagent.backups.config import ResticConfig
from ctrlagent.backups.drivers import safe_component
from ctrlagent.backups.ignore import IgnoreRules
from ctrlagent.errors import CtrlAgentError, NotFound
from ctrlagent.files import trees
from ctrlagent.files.paths import WORK_PREFIXES

MAX_LINE = 64 * 1024
STDERR_TAIL = 4096
STREAM_NAME = "/backup.tar"
TREE_PREFIX = "tree:"
UNSHARE = "unshare"
# Bytes of excluded paths beyond which a tar stream is made instead.
MAX_EXCLUDE_ARGS = 512 * 1024
# A name restic cannot be handed as an exclude pattern.
_CONTROL = re.compile(r"[\x00-\x1f]")


class ResticError(CtrlAgentError):
    """restic failed; the message says why (never with the password)."""


def _explain(stderr: str, code: int | None) -> str:
    low = stderr.lower()
    if "wrong password" in low or "no key found" in low:
        return "restic: wrong repository password"
    if "unable to open config file" in low or "does not exist" in low or \
            "is there a repository" in low:
        return "restic: no repository at the configured location"
    last = " ".join(stderr.strip().splitlines()[-2:])[-300:]
    return "restic failed (exit {}): {}".format(code, last or "no message")


class _Output:
    """Reads a child's stdout (JSON lines, bounded) and stderr (a tail) in threads."""

    def __init__(self, proc: subprocess.Popen[bytes], progress: Progress | None = None) -> None:
        self.progress = progress
        self.summary: dict[str, Any] | None = None
        self.messages = 0
        self.err = b""
        self._threads = [threading.Thread(target=self._stdout, args=(proc.stdout,), daemon=True),
                         threading.Thread(target=self._stderr, args=(proc.stderr,), daemon=True)]
        for t in self._threads:
            t.start()

    def _stdout(self, f: IO[bytes]) -> None:
        while True:
            line = f.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith(b"\n"):
                # An overlong line: drop the rest of it.
                while (more := f.readline(MAX_LINE)) and not more.endswith(b"\n"):
                    pass
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self.messages += 1
            if isinstance(msg, dict) and msg.get("message_type") == "summary":
                self.summary = msg
            elif isinstance(msg, dict) and msg.get("message_type") == "status" \
                    and self.progress is not None:
                done, files = msg.get("bytes_done", 0), msg.get("files_done", 0)
                if isinstance(done, int) and isinstance(files, int):
                    self.progress(done, files)

    def _stderr(self, f: IO[bytes]) -> None:
        while chunk := f.read(4096):
            self.err = (self.err + chunk)[-STDERR_TAIL:]

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")


class ResticDriver:
    """
    Snapshots in one restic repository.  A backup's location is its snapshot
    id (a tar stream, ``--stdin``), or ``tree:<id>:<path>`` (a directory
    snapshot of ``path``, the server's private view; see ``backup_tree``).
    """

    name = "restic"
    compressed = False  # restic compresses (and deduplicates) itself

    def __init__(self, config: ResticConfig, cache_dir: str | None = None,
                 source_dir: str | None = None, progress_interval: float = 1.0) -> None:
        self.config = config
        self.cache_dir = cache_dir
        # restic's status lines per second: with --json it prints 60 (and
        # we would parse and forward each), where the Panel gets one per
        # ``progress_interval``.
        self.progress_fps = max(0.01, min(60.0, 1.0 / max(progress_interval, 0.01)))
        # Where a server's private no-symlink view is mounted for restic
        # (one fixed path per server, so restic finds its parent snapshot);
        # None: tar streams only.
        self.source_dir = source_dir
        self._ready = False
        self._lock = threading.Lock()
        self._tree_ok: bool | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        env["RESTIC_REPOSITORY"] = self.config.repository or ""
        if self.config.password_file is not None:
            env["RESTIC_PASSWORD_FILE"] = self.config.password_file
        elif self.config.password is not None:
            env["RESTIC_PASSWORD"] = self.config.password
        if self.cache_dir is not None:
            env["RESTIC_CACHE_DIR"] = self.cache_dir
        env["RESTIC_PROGRESS_FPS"] = "{:g}".format(self.progress_fps)
        return env

    def _popen(self, args: list[str], stdin: int | None = None) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen([self.config.binary, *args], stdin=stdin,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=self._env(), close_fds=True)
        except OSError as e:
            raise ResticError("restic cannot be run ({}): is it installed?".format(
                e.strerror)) from None

    def run(self, args: list[str], timeout: float | None = None) -> tuple[str, str]:
        """Run restic to its end; ``(stdout, stderr)``, or ``ResticError``."""
        proc = self._popen(args)
        try:
            out, err = proc.communicate(timeout=timeout or self.config.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ResticError("restic {} timed out".format(args[0])) from None
        stderr = err[-STDERR_TAIL:].decode("utf-8", "replace")
        if proc.returncode != 0:
            raise ResticError(_explain(stderr, proc.returncode))
        return out[-1024 * 1024:].decode("utf-8", "replace"), stderr

    def ensure_repository(self) -> None:
        """Open the repository (checks the password); create it when there is none."""
        with self._lock:
            if self._ready:
                return
            try:
                self.run(["cat", "config"], timeout=120)
            except ResticError as e:
                if "no repository" not in str(e):
                    raise
                self.run(["init"], timeout=120)
            self._ready = True

    def open_writer(self, server_id: str, backup_id: str) -> _ResticUpload:
        self.ensure_repository()
        tags = "ctrlagent,server:{},backup:{}".format(safe_component(server_id),
                                                      safe_component(backup_id))
        proc = self._popen(["backup", "--json", "--stdin", "--stdin-filename",
                            STREAM_NAME.lstrip("/"), "--host", "ctrlagent", "--tag", tags],
                           stdin=subprocess.PIPE)
        return _ResticUpload(self, proc)

    # -- directory snapshots ---------------------------------------------------

    def _private_view(self, source: str, target: str, args: list[str]) -> list[str]:
        """
        ``args`` (a restic command line) run in a mount namespace of its own
        where ``target`` is a read-only, non-recursive, ``nosymfollow`` bind
        mount of ``source``: restic opens paths there, and no symlink the
        game server plants (or swaps in mid-walk) is ever followed, no mount
        beneath is entered, and the view ends with the child.
        """
        script = ('mount --bind -- "$1" "$2" && '
                  'mount -o remount,bind,ro,nosymfollow -- "$2" && shift 2 && exec "$@"')
        return [UNSHARE, "--mount", "--propagation", "private", "--", "sh", "-c", script,
                "sh", source, target, *args]

    def tree_available(self) -> bool:
        """Whether directory snapshots can be made here (a private nosymfollow mount works)."""
        if self.source_dir is None:
            return False
        if self._tree_ok is None:
            probe = os.path.join(self.source_dir, ".probe")
            try:
                os.makedirs(probe, 0o700, exist_ok=True)
                ok = subprocess.run(self._private_view(probe, probe, ["true"]),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, timeout=30).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            self._tree_ok = ok
        return self._tree_ok

    def backup_tree(self, server_id: str, backup_id: str, root_path: str, root_fd: int,
                    rules: IgnoreRules, progress: Progress | None = None,
                    cancelled: Callable[[], bool] | None = None,
                    planned: Callable[[int], None] | None = None
                    ) -> tuple[ArchiveStats, str] | None:
        """
        Back the directory up as a restic directory snapshot: incremental
        (restic reads only files whose size, mtime or inode changed since
        the parent snapshot of the same path).  None when it cannot be done
        here (no mount namespace, an excluded name restic cannot be told):
        the caller then streams a tar as before.  ``planned(bytes)`` is told
        the content the snapshot will hold (from the planning walk, so the
        caller needs no walk of its own for its progress total) before
        restic reads what to leave out.
        """
        if not self.tree_available():
            return None
        assert self.source_dir is not None
        target = os.path.join(self.source_dir, safe_component(server_id))
        os.makedirs(target, 0o700, exist_ok=True)
        self.ensure_repository()
        tags = "ctrlagent,server:{},backup:{}".format(safe_component(server_id),
                                                      safe_component(backup_id))
        excludes: list[str] = []
        for prefix in WORK_PREFIXES:
            excludes += ["--exclude", _escape(prefix) + "*"]
        # What restic must leave out comes from our planning walk, which
        # runs while restic starts: restic reads its --exclude-file only
        # once it has derived the key and taken its lock (0.5-1 s; the
        # walk takes 0.1-0.2 s for 13,000 files), so the walk is off the
        # backup's time.  The list goes through a pipe that holds it whole
        # (a longer list falls back to a tar stream), so writing it never
        # waits on a restic that has not come to read it yet: a restic
        # stuck before that is ended by the deadline below, not by us
        # blocked in a write.
        listing, feed = os.pipe()
        room = widen_pipe(feed)
        args = [self.config.binary, "backup", "--json", "--host", "ctrlagent", "--tag", tags,
                *excludes, "--exclude-file", "/proc/self/fd/{}".format(listing), target]
        # The mount's source is the directory we walked, by its fd (the
        # child's copy of it), not its path looked up once more.
        source = "/proc/self/fd/{}".format(root_fd)
        try:
            proc = subprocess.Popen(self._private_view(source, target, args),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self._env(), close_fds=True,
                                    pass_fds=(root_fd, listing))
        except OSError as e:
            os.close(feed)
            raise ResticError("restic cannot be run ({})".format(e.strerror)) from None
        finally:
            os.close(listing)
        out = _Output(proc, progress)
        try:
            try:
                plan = plan_tree(root_fd, rules)
                lines = None if plan is None else exclude_file(target, plan[1])
                if plan is None or lines is None or len(lines) > room:
                    # Not for restic after all: it ends (SIGTERM, so its lock
                    # goes) before it has read a single pattern.
                    _end(proc)
                    out.join(10)
                    return None
                stats = plan[0]
                if planned is not None:
                    planned(stats.bytes)
                try:
                    _write_all(feed, lines)
                except BrokenPipeError:
                    pass  # restic ended already: its exit says why
            except BaseException:
                # Ended before it reads the end of an unfinished list (it
                # would back up what the list did not name yet).
                _end(proc)
                raise
            finally:
                os.close(feed)
            deadline = time.monotonic() + self.config.timeout
            while True:
                try:
                    code = proc.wait(0.5)
                    break
                except subprocess.TimeoutExpired:
                    if cancelled is not None and cancelled():
                        raise BackupCancelled(
                            "the backup was cancelled: the agent is stopping") from None
                    if time.monotonic() > deadline:
                        raise ResticError("restic backup timed out") from None
        except BaseException:
            _end(proc)
            out.join(10)
            raise
        out.join(30)
        # 3: some files could not be read (they changed or went meanwhile);
        # the snapshot holds the rest.
        if code not in (0, 3):
            raise ResticError(_explain(out.stderr, code))
        summary = out.summary or {}
        snapshot = summary.get("snapshot_id")
        if not isinstance(snapshot, str):
            raise ResticError("restic backup gave no snapshot id")
        if code == 3:
            stats.changed += 1
            stats.note("some files could not be read by restic (changed while being backed up)")
        added = summary.get("data_added")
        stats.size = added if isinstance(added, int) and added >= 0 else 0
        stats.checksum = ""
        if progress is not None:
            progress(stats.bytes, stats.files)  # a final one always, as write_archive
        return stats, "{}{}:{}".format(TREE_PREFIX, snapshot, target)

    def tree_strip(self, location: str) -> tuple[str, ...] | None:
        """The leading components a directory snapshot's dump names; None for a tar stream."""
        if not location.startswith(TREE_PREFIX):
            return None
        _, path = _tree_location(location)
        return tuple(p for p in path.split("/") if p)

    def open_reader(self, location: str, start: int = 0, length: int | None = None
                    ) -> IO[bytes]:
        if location.startswith(TREE_PREFIX):
            snapshot, path = _tree_location(location)
            self.ensure_repository()
            proc = self._popen(["dump", snapshot, path])
            return _Dump(proc, start, length)  # type: ignore[return-value]
        _check_snapshot(location)
        self.ensure_repository()
        proc = self._popen(["dump", location, STREAM_NAME])
        return _Dump(proc, start, length)  # type: ignore[return-value]

    def delete(self, location: str) -> None:
        self.delete_all([location])

    def delete_all(self, locations: Sequence[str]) -> None:
        """
        ``restic forget --prune`` of every snapshot at once: the prune, which
        reads the whole repository's index and rewrites its packs, runs once
        however many backups go (a snapshot gone already is ignored).
        """
        snapshots: dict[str, None] = {}
        for location in locations:
            if location.startswith(TREE_PREFIX):
                location, _ = _tree_location(location)
            _check_snapshot(location)
            snapshots[location] = None
        if not snapshots:
            return
        self.ensure_repository()
        forget = ["forget", "--prune", *snapshots]
        try:
            try:
                self.run(forget)
            except ResticError as e:
                if "lock" not in str(e):
                    raise
                # A lock left by a restic that died: `unlock` removes only
                # stale ones, then try once more.
                self.run(["unlock"])
                self.run(forget)
        except ResticError as e:
            if "no matching ID" not in str(e) and "not found" not in str(e):
                raise

    def discard_partial(self, server_id: str, backup_id: str) -> None:
        # A killed `restic backup` makes no snapshot; its unreferenced data
        # goes at the next prune (every delete prunes).
        return None

    def free_bytes(self) -> int | None:
        return None


def _end(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """
    Stop a restic child: SIGTERM first, so that it removes its repository
    lock (a SIGKILLed restic leaves a stale lock behind), then SIGKILL.
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _tree_location(location: str) -> tuple[str, str]:
    """``tree:<snapshot>:<path>`` -> (snapshot, path); ``NotFound`` when malformed."""
    snapshot, _, path = location[len(TREE_PREFIX):].partition(":")
    _check_snapshot(snapshot)
    if not path.startswith("/") or "\x00" in path:
        raise NotFound("restic location {!r} is not valid".format(location))
    return snapshot, path


def _escape(path: str) -> str:
    """``path`` as a restic exclude pattern matching it literally."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in path)


# A line restic 0.14 reads whole (bufio.Scanner's limit is 64 KiB).
MAX_EXCLUDE_LINE = 60 * 1024


def exclude_file(target: str, excluded: list[str]) -> bytes | None:
    """
    The ``--exclude-file`` naming exactly the paths ``excluded`` (relative
    to ``target``), or None when they cannot be told that way (too long).
    restic trims each line's white space, skips lines starting with ``#``
    and expands ``$NAME``: every path line starts with ``/``, a ``$`` is
    written ``$$`` (restic's own escape) and a trailing white space
    character as a class of one (``[ ]``), so a hostile name is matched as
    it is and nothing else.
    """
    lines = []
    for rel in excluded:
        line = _escape(target + "/" + rel).replace("$", "$$")
        if line[-1].isspace() or line[-1] in "\x85\xa0":
            line = line[:-1] + "[" + line[-1] + "]"
        raw = os.fsencode(line)
        if len(raw) > MAX_EXCLUDE_LINE:
            return None
        lines.append(raw)
    data = b"".join(line + b"\n" for line in lines)
    return data if len(data) <= MAX_EXCLUDE_ARGS else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def plan_tree(root_fd: int, rules: IgnoreRules) -> tuple[ArchiveStats, list[str]] | None:
    """
    Walk the directory as the tar writer would (confined, never through a
    link) and list what restic must leave out: ignored paths and special
    files.  Returns what the snapshot will hold and that list, or None when
    a name cannot be handed to restic as a pattern (a control character).
    """
    stats = ArchiveStats()
    excluded: list[str] = []
    walk = trees.Walk(root_fd, max_depth=MAX_BACKUP_DEPTH, sort=False, hide=WORK_PREFIXES)
    try:
        for e in walk:
            # Only the entry's own name: its directories' names were
            # checked when they were met.
            if _CONTROL.search(e.name):
                return None
            rel = "/".join(e.rel)
            try:
                st = e.lstat()
            except OSError:
                e.descend = False
                continue
            if stat.S_ISDIR(st.st_mode):
                if not e.is_dir or rules.matches(rel + "/"):
                    e.descend = False
                    excluded.append(rel)
                    continue
            else:
                e.descend = False
                if rules.matches(rel):
                    excluded.append(rel)
                    continue
                if stat.S_ISREG(st.st_mode):
                    stats.files += 1
                    stats.bytes += st.st_size
                elif not stat.S_ISLNK(st.st_mode):
                    stats.skipped += 1
                    stats.note("special file left out: {}".format(rel))
                    excluded.append(rel)
                    continue
            stats.entries += 1
    except trees.TreeChanged:
        return None
    finally:
        walk.close()
    if walk.truncated:
        return None  # a too deep subtree or a mount: the tar stream knows how to leave it out
    return stats, excluded


def _check_snapshot(location: str) -> None:
    if not (8 <= len(location) <= 64) or any(c not in "0123456789abcdef" for c in location):
        raise NotFound("restic snapshot id {!r} is not valid".format(location))


class _ResticUpload:
    """``restic backup --stdin`` running: write feeds it, commit waits for its snapshot."""

    file_fd = None  # a pipe to restic: written through ``write``

    def __init__(self, driver: ResticDriver, proc: subprocess.Popen[bytes]) -> None:
        self.driver = driver
        self.proc = proc
        self.out = _Output(proc)

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            self.proc.wait(60)
            self.out.join(10)
            raise ResticError(_explain(self.out.stderr, self.proc.returncode)) from None

    def commit(self) -> str:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            code = self.proc.wait(self.driver.config.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ResticError("restic backup timed out") from None
        self.out.join(30)
        if code != 0:
            raise ResticError(_explain(self.out.stderr, code))
        summary = self.out.summary or {}
        snapshot = summary.get("snapshot_id")
        if not isinstance(snapshot, str):
            raise ResticError("restic backup gave no snapshot id")
        return snapshot

    def abort(self) -> None:
        _end(self.proc)
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        self.out.join(10)


class _Dump:
    """``restic dump`` stdout as a file; a failure at the end is ``ResticError``."""

    def __init__(self, proc: subprocess.Popen[bytes], start: int, length: int | None) -> None:
        self.proc = proc
        self.err = b""
        self._t = threading.Thread(target=self._stderr, daemon=True)
        self._t.start()
        self.left = length
        assert proc.stdout is not None
        self.f = proc.stdout
        while start > 0:
            skipped = self.f.read(min(start, 1024 * 1024))
            if not skipped:
                break
            start -= len(skipped)

    def _stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read(4096):
            self.err = (self.err + chunk)[-STDERR_TAIL:]

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1024 * 1024
        if self.left is not None:
            n = min(n, self.left)
        data = self.f.read(n) if n else b""
        if self.left is not None:
            self.left -= len(data)
        if not data and n:
            code = self.proc.wait(60)
            self._t.join(10)
            if code != 0:
                raise ResticError(_explain(self.err.decode("utf-8", "replace"), code))
        return data

    def close(self) -> None:
        self.f.close()
        _end(self.proc)
        self._t.join(10)

    def __enter__(self) -> _Dump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
