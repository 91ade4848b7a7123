"""
The fault suite's rig: the real agent as a subprocess, and what the fault
tests need around it.

- ``FaultAgent``: an ``AgentProcess`` that logs JSON lines
  (``--logger=ctrlagent.logs.json_observer``), so that a logged failure is a
  structured field (``log_failure``) and not a guess at text; it can be
  launched without waiting for ``/health`` (start-up failure tests) and
  answers ``call()`` with the parsed JSON of ``POST /api/command``.
- ``logged_tracebacks``: every traceback, "Unhandled error" and
  ``log_failure`` event in an agent's log; the group's fixture fails a test
  on any of them.
- ``coded_failure`` / ``assert_answer``: a command answer is a success or a
  coded error (PROTOCOL.md section 1), never anything else.
- ``tree_state``: a byte-for-byte picture of a directory tree (iterative,
  never following a link) to prove that something outside the agent's reach
  stayed unchanged.
- ``mounted_tmpfs``: a small tmpfs on a directory of the test's own, for
  full-filesystem faults.

Synchronous on purpose, like ``AgentProcess``: async tests call the blocking
parts through ``deferToThread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.rig.agentproc import ROOT, AgentProcess, _twistd
from tests.rig.processes import spawn_logged, wait_until_ready

# A protocol error code: UPPER_SNAKE (PROTOCOL.md section 3).
CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")

# Text that means a traceback reached the log (or stderr) one way or another.
TRACEBACK_MARKERS = (
    "Traceback (most recent call last)",
    "Unhandled error in Deferred",
    "Unhandled Error",
)


class FaultAgent(AgentProcess):
    """``twistd -n ctrlagent`` with the JSON log observer, for fault tests."""

    logger = "ctrlagent.logs.json_observer"
    # Soft limit of open files for the agent (None: inherit the test's).
    # systemd starts services with a soft limit of 1024.
    nofile: int | None = None

    def argv(self) -> list[str]:
        """The command line: the operator's, with JSON lines on stdout."""
        return [
            _twistd(),
            "--nodaemon",
            "--pidfile=",
            "--logger=" + self.logger,
            "ctrlagent",
            "--config",
            str(self.config_path),
        ]

    def launch(self) -> None:
        """Start twistd and return at once (it may be about to fail)."""
        self._write_config()
        env = dict(os.environ)
        env.pop("AGENT_SECRET", None)
        env.pop("DOCKER_HOST", None)
        env["PYTHONPATH"] = str(ROOT)
        env.update(self.extra_env)
        popen: dict[str, Any] = {}
        if self.nofile is not None:
            soft = self.nofile

            def limit_files() -> None:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))

            popen["preexec_fn"] = limit_files
        self.process = spawn_logged(
            self.argv(), self.log_path, cwd=str(self.workdir), env=env, **popen
        )

    def start(self, timeout: float = 30.0) -> FaultAgent:
        """Start twistd and wait until ``/health`` answers."""
        self.launch()
        assert self.process is not None
        try:
            wait_until_ready(self.process, self._answers, timeout, "the agent", self.log_path)
        except RuntimeError as e:
            # The rig's message carries the raw JSON tail: say it in words.
            first = str(e).splitlines()[0]
            tail = "\n".join(log_messages(self.log_path)[-25:])
            raise AssertionError("{}\n{}".format(first, tail)) from None
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.poll() is None, "agent not running"
        return self.process.pid

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None when the process still runs after ``timeout`` s."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def call(
        self,
        action: str,
        server_id: str | None = None,
        payload: dict[str, Any] | None = None,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        """
        ``POST /api/command`` as the Panel sends it; the parsed answer.

        Fails the test when the answer is not HTTP 200 with a JSON object: the
        Panel marks the node offline on any non-2xx (PROTOCOL.md section 1).
        """
        body: dict[str, Any] = {"action": action}
        if server_id is not None:
            body["serverId"] = server_id
        if payload is not None:
            body["payload"] = payload
        request = urllib.request.Request(
            self.base_url + "/api/command",
            data=json.dumps(body).encode(),
            headers=self.headers(),
            method="POST",
        )
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            raise AssertionError(
                "{} answered HTTP {}: {!r}".format(action, e.code, e.read()[:500])
            ) from None
        except OSError as e:
            raise AssertionError(
                "{} got no answer after {:.1f}s: {}".format(action, time.monotonic() - started, e)
            ) from None
        assert status == 200, (action, status, raw[:500])
        answer = json.loads(raw)
        assert isinstance(answer, dict), (action, raw[:500])
        return answer

    def rss_kib(self) -> int:
        """The agent's resident memory (VmRSS) in KiB."""
        return proc_rss_kib(self.pid)


def proc_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from ``/proc/<pid>/status``."""
    for line in Path("/proc/{}/status".format(pid)).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS for pid {}".format(pid))


def open_file_bytes(pid: int, exclude: tuple[Path, ...] = ()) -> int:
    """
    Bytes held in regular files ``pid`` has open (deleted temp files included),
    apart from ``exclude`` (its own log, say).
    """
    excluded = set()
    for path in exclude:
        with contextlib.suppress(OSError):
            st = path.stat()
            excluded.add((st.st_dev, st.st_ino))
    total = 0
    fd_dir = Path("/proc/{}/fd".format(pid))
    for fd in os.listdir(fd_dir):
        try:
            st = os.stat(fd_dir / fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in excluded:
            total += st.st_size
    return total


# -- the log ----------------------------------------------------------------------


def _describe_event(event: dict[str, Any], line: str) -> str:
    """A logged failure event as text: its message and its traceback."""
    from twisted.logger import eventFromJSON, formatEvent

    try:
        restored = eventFromJSON(line)
        text = formatEvent(restored)
        failure = restored.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        return "[{}] {}".format(event.get("log_namespace", "?"), text)
    except Exception:
        return line[:2000]


def logged_tracebacks(log_path: Path) -> list[str]:
    """
    Every logged failure in an agent's log: JSON events carrying
    ``log_failure`` (``log.failure``, "Unhandled error in Deferred", legacy
    ``log.err``) and any line, JSON or raw stderr, showing a traceback.
    """
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        event: Any = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
        if isinstance(event, dict) and (event.get("log_failure") or event.get("failure")):
            found.append(_describe_event(event, line))
        elif any(marker in line for marker in TRACEBACK_MARKERS):
            found.append(line[:2000])
    return found


def log_events(log_path: Path) -> list[dict[str, Any]]:
    """The JSON events of an agent's log (raw lines skipped)."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
    return events


def log_messages(log_path: Path) -> list[str]:
    """Every line of an agent's log as text (JSON events formatted)."""
    from twisted.logger import eventFromJSON, formatEvent

    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(formatEvent(eventFromJSON(line)))
                continue
            except Exception:
                pass
        out.append(line)
    return out


# -- answers ----------------------------------------------------------------------


def coded_failure(answer: dict[str, Any]) -> str | None:
    """The code of a well-formed failure answer, None for a success; else fail."""
    if answer.get("success") is True:
        return None
    assert answer.get("success") is False, "neither success nor failure: {!r}".format(answer)
    code = answer.get("code")
    assert isinstance(code, str) and CODE.match(code), "failure without a code: {!r}".format(
        answer
    )
    error = answer.get("error")
    assert isinstance(error, str) and error.strip(), "failure without a message: {!r}".format(
        answer
    )
    return code


def assert_answer(answer: dict[str, Any], what: str) -> str | None:
    """A success or a coded error; returns the code (None on success)."""
    try:
        return coded_failure(answer)
    except AssertionError as e:
        raise AssertionError("{}: {}".format(what, e)) from None


# -- trees ------------------------------------------------------------------------


def tree_state(root: Path, max_entries: int = 20_000) -> dict[str, tuple[Any, ...]]:
    """
    Every entry under ``root`` (and ``root`` itself): type, mode, owner, and
    the content digest of files or the target of links.  Iterative and never
    following a link, so a hostile tree cannot make it recurse or escape.
    """
    out: dict[str, tuple[Any, ...]] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        path = root / rel if rel else root
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            out[rel] = ("absent",)
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                digest = "vanished while read"
            out[rel] = ("file", mode, st.st_uid, st.st_gid, digest)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", mode, st.st_uid, st.st_gid)
            try:
                names = sorted(os.listdir(path))
            except FileNotFoundError:
                names = []
            for name in names:
                pending.append(os.path.join(rel, name) if rel else name)
        else:
            out[rel] = ("special", stat.S_IFMT(st.st_mode), mode, st.st_rdev)
        assert len(out) <= max_entries, "more than {} entries under {}".format(max_entries, root)
    return out


def tree_diff(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> list[str]:
    """What changed between two ``tree_state`` pictures, one line per entry."""
    changes = []
    for rel in sorted(set(before) | set(after)):
        if before.get(rel) != after.get(rel):
            changes.append("{!r}: {} -> {}".format(rel or ".", before.get(rel), after.get(rel)))
    return changes


# -- the machine ------------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -t tmpfs -o size=2m``) on ``path``, unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size={},mode=0755".format(size), "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            # Something (a container's mount namespace) still holds it: detach.
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_filesystem(path: Path, chunk: int = 64 * 1024, limit: int = 64 * 1024 * 1024) -> int:
    """
    Write ``path`` until its filesystem is full (ENOSPC); the bytes written.

    Bounded by ``limit`` so that a mistake never fills a real disk.
    """
    written = 0
    block = b"\0" * chunk
    with open(path, "wb", buffering=0) as f:
        while written < limit:
            try:
                written += f.write(block)
            except OSError as e:
                if e.errno != 28:  # ENOSPC
                    raise
                # Fill the last partial block too.
                size = chunk // 2
                while size >= 512:
                    try:
                        written += f.write(block[:size])
                    except OSError:
                        size //= 2
                return written
    raise AssertionError("{} is not a small filesystem ({} bytes written)".format(path, written))


def remove_tree(path: Path, max_steps: int = 1_000_000) -> None:
    """
    ``rm -rf`` without recursion and without following links.

    A game server's tree may be 1,000 levels deep: ``shutil.rmtree`` (and so
    pytest's own clean-up of old temporary directories) dies of a
    ``RecursionError`` on it, so a test that plants one removes it with this.
    """
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    stack = [str(path)]
    steps = 0
    while stack and steps < max_steps:
        steps += 1
        current = stack[-1]
        try:
            entries = list(os.scandir(current))
        except FileNotFoundError:
            stack.pop()
            continue
        subdirs = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        if subdirs:
            stack.extend(subdirs)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(current)
            stack.pop()


def docker_inspect(docker_host: str, container_id: str) -> dict[str, Any]:
    """``docker inspect`` of one container (the engine's own view)."""
    out = subprocess.run(
        ["docker", "inspect", container_id],
        capture_output=True,
        text=True,
        env=dict(os.environ, DOCKER_HOST=docker_host),
        check=True,
    ).stdout
    return dict(json.loads(out)[0])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy (its value), failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after {}s waiting for {}".format(timeout, what))
        time.sleep(interval)
