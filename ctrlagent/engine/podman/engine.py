"""
``PodmanEngine``: the container-engine seam over a Podman service.

Podman (``podman system service``) serves the Docker Engine API beside its
own (libpod) API, so this engine is ``DockerEngine`` over the same
``DockerClient`` with the differences of Podman 4.3 (Debian 12) corrected
where they show (docs/RUNTIMES.md lists them with the evidence):

- **Conflicts are 500s.**  A taken name and a kill of a container that does
  not run are answered 500 ("... already in use", "container state
  improper"), not 409: mapped to ``Conflict`` by their words.
- **No live update in the compat API.**  ``POST /containers/{id}/update`` is
  404 there; the libpod endpoint ``POST /libpod/containers/{id}/update``
  (an OCI ``LinuxResources`` body) changes the running container's cgroups
  but Podman 4.3 neither stores the change (inspect keeps the created
  limits) nor keeps it past the next start.  So the engine remembers what it
  applied to the current run, shows it in ``inspect``, and warns that a
  restart returns to the created limits (``last_warnings``).
- **Dropped limits are silent.**  Podman does not warn when the kernel has
  no block I/O weight (Docker does): the engine compares what it asked with
  what the container got and warns itself.
- **Whole-second log stamps.**  Log lines carry RFC 3339 stamps without a
  fraction, so many lines share one; a line's nanosecond is then its second
  plus its position among the lines of that second, which every read from
  the start of the second numbers alike (reads always start there).
- **Loopback registries.**  Docker pulls from a registry on loopback over
  plain HTTP; Podman's compat pull insists on TLS ("server gave HTTP
  response to HTTPS client").  Such pulls go through libpod's
  ``POST /libpod/images/pull`` with ``tlsVerify=false``, which the compat
  endpoint does not take.  Short names are pulled from Docker Hub, as
  Docker does (Podman's compat API enforces that itself).
- **Default rlimits above the host's.**  Docker starts a container with the
  daemon's own open-file and process limits; rootful Podman asks for
  1 048 576 of each, and where the host's hard limit is lower (and the
  service may not raise it) runc refuses to start the container ("error
  setting rlimits ... operation not permitted").  A spec that names no
  ``nofile`` or ``nproc`` gets the service's own hard limit for it (found
  through the socket's peer: Docker's behaviour, and what Podman itself
  does rootless), else this process's.
- **Stdin closes at the end of any attach.**  Conmon closes the
  container's stdin when an attach connection ends (Podman 4.3 never asks
  it to leave stdin open), so a closed pipe would end the game's console
  input for the rest of its run.  With a state directory (``stdin_dir``)
  the run's one stdin attach is held by a small process outside the agent
  (``holders.py``, ``stdinholder.py``) that the agent, and the agent after
  it, connects to; it ends with the run.  Without one (or on a TCP
  service) the engine keeps one attach per run within its own process and
  hands out views of it, which an agent restart ends.
- **An attach re-initializes a dead run.**  An attach that reaches a
  container whose run ended makes Podman initialize it again (a conmon and
  ``runc init`` waiting for a start; inspect says "created", the exit code
  gone), and the compatible SIGKILL's wait for the exit can then last for
  good.  ``open_stdin`` never attaches to a container that does not run,
  undoes a re-initialization its own attach raced into, and starts wait
  for it; the events drop that undo's ``die``; kills go through libpod's
  endpoint, which does not wait.
- **Partial lines stamped twice.**  A line written in pieces comes back from
  ``timestamps=1`` with each piece's stamp inside it (``join_partials``).
- **Event filters.**  An ``event=die`` filter matches nothing (Podman's own
  name is "died"): events are asked unfiltered by action and filtered here.
- **Received and sent swapped.**  Before 4.4 Podman's stats report the bytes
  a container sent as received and the other way round (podman#16618, fixed
  by #16628): the engine swaps them back for those versions
  (``NET_SWAPPED_BEFORE``).  The kernel reader of a local service reads the
  container's own interfaces and needs no correction.

Everything else (create bodies, start, wait, inspect, list, remove,
networks, attach for stdin, stats, event documents) behaves as Docker's.
"""

from __future__ import annotations

import functools
import json
import re
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent.engine.docker.bodies import blkio_weight, create_body
from ctrlagent.engine.docker.client import CONTAINER_EVENTS, DockerClient
from ctrlagent.engine.docker.engine import DockerEngine, _Events, _StatsSamples, container_state
from ctrlagent.engine.docker.errors import (
    DockerConflict,
    DockerError,
    DockerUnavailable,
    ImageNotFound,
)
from ctrlagent.engine.docker.eventstream import ResumableEvents
from ctrlagent.engine.docker.models import DockerEvent, parse_image_ref
from ctrlagent.engine.docker.streams import ItemStream
from ctrlagent.engine.docker.timefmt import split_timestamp
from ctrlagent.engine.interface import (
    ContainerSpec,
    ContainerState,
    EngineEvent,
    IContainerEngine,
    IEventStream,
    ILogStream,
    IStdinPipe,
    LogLine,
    ResourceLimits,
    StatsSample,
)
from ctrlagent.engine.podman.holders import HolderPipe, StdinHolders
from ctrlagent.errors import EngineError, NotFound

__all__ = [
    "PodmanEngine",
    "NumberedLines",
    "SharedStdinView",
    "update_body",
    "dropped_limits",
    "join_partials",
    "service_rlimits",
    "with_host_rlimits",
]

SECOND = 1_000_000_000
# The first Podman whose stats report received and sent bytes each as
# itself (4.4: podman#16628); before it they are swapped.
NET_SWAPPED_BEFORE = (4, 4)


@functools.lru_cache(maxsize=8)
def net_swapped(version: str | None) -> bool:
    """Whether Podman ``version`` ("4.3.1", "4.4.0-rc1") reports rx and tx swapped."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return found is not None and (int(found[1]), int(found[2])) < NET_SWAPPED_BEFORE


# Words of Podman's 500 answers that are conflicts (a name in use, a
# container in the wrong state).
_CONFLICT_WORDS = ("already in use", "container state improper")
RESTART_WARNING = (
    "Podman keeps a live limit change for the running container only: it starts "
    "again with the limits it was created with"
)


def _as_conflict(error: DockerError) -> DockerError:
    if not isinstance(error, DockerConflict) and any(
        w in error.message for w in _CONFLICT_WORDS
    ):
        return DockerConflict(error.message)
    return error


# The rlimits Podman would otherwise set to 1 048 576: the seam's name, the
# resource, and its line in /proc/<pid>/limits.
_HOST_RLIMITS = {
    "nofile": (resource.RLIMIT_NOFILE, "Max open files"),
    "nproc": (resource.RLIMIT_NPROC, "Max processes"),
}


def service_rlimits(socket_path: str) -> dict[str, int] | None:
    """
    The hard ``nofile``/``nproc`` limits of the process serving
    ``socket_path`` (its pid from the socket's peer credentials, its limits
    from ``/proc``; unlimited is ``RLIM_INFINITY``), or None when that cannot
    be told (another host, no ``/proc``).  With systemd's socket activation
    the peer is systemd, whose limits bound the service's.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(socket_path)
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        with open("/proc/{}/limits".format(pid)) as f:
            text = f.read(8192)
    except (OSError, ValueError, struct.error):
        return None
    out: dict[str, int] = {}
    for name, (_, label) in _HOST_RLIMITS.items():
        for line in text.splitlines():
            if line.startswith(label + " "):
                fields = line[len(label):].split()
                if len(fields) >= 2:
                    hard = fields[1]
                    out[name] = (resource.RLIM_INFINITY if hard == "unlimited"
                                 else int(hard) if hard.isdigit() else -1)
    return {k: v for k, v in out.items() if v != -1}


def with_host_rlimits(
    ulimits: Mapping[str, tuple[int, int]],
    hard_limits: Mapping[str, int] | None = None,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
) -> dict[str, tuple[int, int]]:
    """
    ``ulimits`` with a hard limit the service may grant (soft = hard) for
    each of ``nofile`` and ``nproc`` it does not name: the service's own
    (``hard_limits``, from ``service_rlimits``), else this process's (the
    service is local: a Unix socket).  An unlimited one is left to Podman
    (its default then fits).
    """
    out = dict(ulimits)
    for name, (which, _) in _HOST_RLIMITS.items():
        if name in out:
            continue
        hard = (hard_limits or {}).get(name)
        if hard is None:
            hard = getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY and hard >= 0:
            out[name] = (hard, hard)
    return out


@implementer(IStdinPipe)
class SharedStdinView:
    """
    One user's view of a container's one stdin attach (``PodmanEngine``):
    ``close()`` ends the view, not the attach (which would close the
    container's stdin for good on Podman).
    """

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._open = True

    @property
    def connected(self) -> bool:
        return self._open and bool(self._pipe.connected)

    def write(self, data: bytes) -> None:
        if not self._open:
            raise DockerUnavailable("console stdin is closed")
        self._pipe.write(data)

    def write_line(self, text: str) -> None:
        if not self._open:
            raise DockerUnavailable("console stdin is closed")
        self._pipe.write_line(text)

    def close(self) -> Deferred[None]:
        self._open = False
        return succeed(None)


def update_body(limits: ResourceLimits) -> dict[str, Any]:
    """The OCI ``LinuxResources`` body of libpod's update, as Docker's update would set."""
    body: dict[str, Any] = {}
    if limits.memory_bytes > 0:
        body["memory"] = {"limit": limits.memory_bytes, "swap": limits.memory_swap_bytes}
    period = 100_000
    quota = int(round(limits.cpu_percent / 100.0 * period)) if limits.cpu_percent > 0 else -1
    body["cpu"] = {"quota": quota, "period": period}
    body["blockIO"] = {"weight": blkio_weight(limits.io_weight)}
    if limits.pids > 0:
        body["pids"] = {"limit": limits.pids}
    return body


def dropped_limits(asked: ResourceLimits, got: ResourceLimits) -> list[str]:
    """Warnings, in Docker's words, for the limits the engine took but does not apply."""
    warnings = []
    if got.io_weight != blkio_weight(asked.io_weight):
        warnings.append("Block I/O weight {} was discarded: the kernel does not support it"
                        .format(blkio_weight(asked.io_weight)))
    if asked.pids > 0 and got.pids != asked.pids:
        warnings.append("PID limit {} was discarded".format(asked.pids))
    return warnings


# A stamp as Podman writes it (whole seconds, UTC) followed by the space.
_INNER_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z ")
# How far after its line's stamp an inner stamp may be to be Podman's own.
_PARTIAL_WINDOW = 60


def join_partials(text: str, ns: int) -> str:
    """
    ``text`` with the stamps Podman puts inside a line removed.

    When a line reaches the log in pieces (a partial write: conmon's
    ``P`` records), Podman 4.3's ``timestamps=1`` output stamps every piece
    and joins them without a newline: ``...Z 3`` + ``...Z 499`` arrives as
    one line ``...Z 32026-12-02T00:13:10Z 499``.  An inner stamp in that
    exact form (whole seconds, ``Z``, a space) dated from the line's own
    second to a minute after it is such a seam; anything else is the game's
    text and stays.  (A game printing the current time in exactly that form
    mid-line loses it: the price of not losing its lines.)
    """
    second = ns // SECOND
    out: list[str] = []
    pos = 0
    for m in _INNER_STAMP.finditer(text):
        inner = split_timestamp(m.group(0))[0] // SECOND
        if second <= inner <= second + _PARTIAL_WINDOW:
            out.append(text[pos:m.start()])
            pos = m.end()
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


class _Numbering:
    """Each line's nanosecond: its stamp plus its position among the lines of that stamp."""

    def __init__(self) -> None:
        self._stamp = -1
        self._seen = 0

    def lines(self, batch: list[tuple[str, str]]) -> list[LogLine]:
        out: list[LogLine] = []
        for stream, raw in batch:
            ns, text = split_timestamp(raw)
            if not ns:
                # No stamp: no identity, and no break in the second's count.
                out.append(LogLine(0, stream, text))
                continue
            if "Z " in text:
                text = join_partials(text, ns)
            if ns == self._stamp:
                self._seen += 1
            else:
                self._stamp, self._seen = ns, 0
            out.append(LogLine(ns + self._seen, stream, text))
        return out

    def after(self, batch: list[tuple[str, str]], after: int) -> list[LogLine]:
        """The numbered lines of ``batch`` stamped after ``after`` (or not stamped)."""
        return [line for line in self.lines(batch) if line.ns > after or not line.ns]


@implementer(ILogStream)
class NumberedLines:
    """
    A Podman container's output as ``LogLine`` batches with exact nanoseconds.

    Every read starts at the first line of a whole second (the engine's
    stamps have no fraction), so that the lines of that second are numbered
    the same by every reader: after ``since_ns`` it starts at its second;
    for the last ``tail`` lines it first finds their first second.
    """

    def __init__(self, client: DockerClient, cid: str, *, follow: bool,
                 since_ns: int | None, tail: int | None) -> None:
        self._client = client
        self._cid = cid
        self._follow = follow
        self._since = since_ns
        self._tail = tail
        self._stream: ItemStream[tuple[str, str]] | None = None
        self._closed = False

    def _open(self, *, follow: bool, second: int | None,
              tail: int | None = None) -> ItemStream[tuple[str, str]]:
        self._stream = self._client.logs(
            self._cid,
            follow=follow,
            tail="all" if tail is None else tail,
            since_ns=None if second is None else second * SECOND,
            timestamps=True,
        )
        return self._stream

    async def _read(self, stream: ItemStream[tuple[str, str]]) -> list[LogLine]:
        numbering = _Numbering()
        lines: list[LogLine] = []
        while not self._closed:
            batch = await stream.next_batch(10_000)
            if not batch:
                break
            lines.extend(numbering.lines(batch))
        return lines

    async def _tail_start(self, tail: int) -> tuple[int | None, int, list[LogLine]]:
        """
        ``(second, after, lines)``: where to read from, the nanosecond the
        tail comes after, and (without follow) the tail itself.
        """
        probe = await self._read(self._open(follow=False, second=None, tail=max(tail, 1)))
        stamped = [line for line in probe if line.ns]
        if not stamped:
            return None, -1, probe[-tail:] if tail else []
        second = stamped[0].ns // SECOND
        lines = await self._read(self._open(follow=False, second=second))
        kept = lines[-tail:] if tail else []
        if len(lines) > len(kept):
            after = lines[len(lines) - len(kept) - 1].ns
        else:
            after = second * SECOND - 1
        return second, after, kept

    async def _plan(self) -> tuple[int | None, int, list[LogLine] | None] | None:
        """
        ``(second, after, kept)``: the second to read from and the nanosecond
        the lines come after; ``kept`` is the whole answer when there is no
        stream to read (the last lines, not followed).  None once closed.
        """
        after = -1
        second: int | None = None
        if self._tail is not None:
            second, after, kept = await self._tail_start(max(0, self._tail))
            if self._since is not None and self._since > after:
                # Both: the last lines, those after ``since_ns`` only.
                after = self._since
                second = max(second or 0, self._since // SECOND)
                kept = [line for line in kept if line.ns > after]
            if not self._follow:
                return second, after, kept
        elif self._since is not None:
            second, after = self._since // SECOND, self._since
        if self._closed:
            return None
        return second, after, None

    async def batches(self, max_items: int = 1000) -> AsyncIterator[list[Any]]:
        plan = await self._plan()
        if plan is None:
            return
        second, after, kept = plan
        if kept is not None:
            for start in range(0, len(kept), max_items):
                yield kept[start:start + max_items]
            return
        stream = self._open(follow=self._follow, second=second)
        numbering = _Numbering()
        while True:
            batch = await stream.next_batch(max_items)
            if not batch:
                return
            lines = numbering.after(batch, after)
            if lines:
                yield lines

    def drain(self, sink: Callable[[list[Any]], None], max_items: int = 1000) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drain(sink, max_items))

    async def _drain(self, sink: Callable[[list[Any]], None], max_items: int) -> None:
        plan = await self._plan()
        if plan is None:
            return
        second, after, kept = plan
        if kept is not None:
            for start in range(0, len(kept), max_items):
                if self._closed:
                    return
                sink(kept[start:start + max_items])
            return
        numbering = _Numbering()

        def take(batch: list[tuple[str, str]]) -> None:
            lines = numbering.after(batch, after)
            if lines:
                sink(lines)

        await self._open(follow=self._follow, second=second).drain(take, max_items)

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.close()


@implementer(IEventStream)
class _PodmanEvents(_Events):
    """
    Events asked without an action filter, the container actions kept here.

    The ``die`` of a re-initialized container (``PodmanEngine._undo_reinit``
    stops it) is not the end of a run, and is dropped: a ``die`` whose
    container's last lifecycle event was an ``init`` (no ``start`` since);
    or, when this stream has seen nothing of the container (its ``init``
    came before an agent restart), a ``die`` stamped after the engine began
    undoing it (``undoing``: full id -> nanoseconds on the engine host's
    clock, kept for a local engine only).  A run's own ``die`` read late is
    stamped before that, and kept.
    """

    def __init__(self, events: ResumableEvents, since_ns: int,
                 undoing: dict[str, int],
                 removed: Callable[[str], None] = lambda cid: None) -> None:
        super().__init__(events, since_ns, removed)
        self._undoing = undoing
        # Container id -> its last lifecycle event seen here: init, start or die.
        self._last: dict[str, str] = {}

    async def __anext__(self) -> EngineEvent:
        while True:
            event = await super().__anext__()
            action, cid = event.action, event.container_id
            if action in ("init", "start"):
                self._last[cid] = action
                if action == "start":
                    self._undoing.pop(cid, None)
            elif action == "die":
                last = self._last.get(cid)
                self._last[cid] = action
                began = self._undoing.get(cid)
                if last == "init" or (last is None and began is not None
                                      and event.at_ns >= began):
                    self._undoing.pop(cid, None)
                    continue
            elif action in ("remove", "destroy"):
                self._last.pop(cid, None)
                self._undoing.pop(cid, None)
            if action in CONTAINER_EVENTS:
                return event


def _not_running(cid: str) -> str:
    return "container {} is not running: its console input cannot be opened".format(cid[:12])


def _loopback(registry: str) -> bool:
    """True for a registry on this machine's loopback (``localhost``, ``127.x``, ``[::1]``)."""
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _pull_error(ref: str, registry: str, answer: bytes) -> DockerError | None:
    """The failure a libpod pull answer ends with (JSON lines, the last ``error``), if any."""
    for line in reversed(answer.decode("utf-8", "replace").splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("error"):
            # Classified in Docker's words (not found, auth, unreachable).
            return DockerClient._pull_error(ref, registry, 0, str(doc["error"])[:1000])
        if isinstance(doc, dict) and (doc.get("id") or doc.get("images")):
            return None
    return None


@implementer(IContainerEngine)
class PodmanEngine(DockerEngine):
    """``IContainerEngine`` over a Podman service (see the module docstring)."""

    name = "podman"
    log = Logger()

    def __init__(self, client: DockerClient, clock: IReactorTime, *,
                 stdin_dir: str | None = None, **kw: Any) -> None:
        """
        ``stdin_dir``: where the stdin holders listen (the agent's state
        directory's ``stdin``); None keeps console input within this process.
        """
        super().__init__(client, clock, **kw)
        self.holders: StdinHolders | None = None
        host = client.host
        if stdin_dir is not None and host.kind == "unix":
            holders = StdinHolders(clock, stdin_dir, host.path,
                                   timeout=client.config.call_timeout)
            if holders.fits():
                self.holders = holders
            else:
                self.log.warn(  # noqa: G010 - twisted.logger's method
                    "the stdin holders' sockets would not fit a Unix socket "
                    "address under {dir}: console input ends with the agent",
                    dir=stdin_dir)
        # Container id -> (the run's start, the limits applied to it live).
        self._live: dict[str, tuple[int | None, ResourceLimits]] = {}
        self._hard_limits: dict[str, int] | None = None
        # Container id -> its one stdin attach of the current run, and the
        # lock that makes concurrent opens share it.
        self._stdin: dict[str, Any] = {}
        self._stdin_locks: dict[str, DeferredLock] = {}
        # Full id -> when (wall clock, ns) the engine began undoing its
        # re-initialization: the ``die`` stamped after is that stop's
        # (``_PodmanEvents``).  A local engine only: its clock is this host's.
        self._undoing: dict[str, int] = {}

    def _service_limits(self) -> dict[str, int]:
        """The service's hard rlimits, read once (a local connect and a /proc read)."""
        if self._hard_limits is None:
            host = self.client.host
            found = service_rlimits(host.path) if host.kind == "unix" else None
            self._hard_limits = found or {}
        return self._hard_limits

    async def ensure_image(self, ref: str) -> None:
        registry = parse_image_ref(ref).registry
        if not _loopback(registry):
            await super().ensure_image(ref)
            return
        policy = self.client.config.pull_policy
        if policy != "always":
            try:
                await self.client.image_inspect(ref)
                return
            except ImageNotFound:
                if policy == "never":
                    raise ImageNotFound(
                        "image {} is not present and the pull policy is 'never'".format(ref)
                    ) from None
        auth = self.client.registry_auth(registry)
        answer = await self.client.call(
            "POST", ("libpod", "images", "pull"),
            query={"reference": ref, "tlsVerify": False, "quiet": True},
            headers={"X-Registry-Auth": auth} if auth else None,
            kind="image", raw=True, timeout=None,
        )
        error = _pull_error(ref, registry, answer)
        if error is not None:
            raise error

    async def create(self, spec: ContainerSpec) -> str:
        spec = replace(spec, ulimits=with_host_rlimits(spec.ulimits, self._service_limits()))
        try:
            cid, warnings = await self.client.container_create_warned(
                spec.name, create_body(spec))
        except DockerError as e:
            raise _as_conflict(e) from None
        try:
            got = (await self.inspect(cid)).limits
        except DockerError:
            got = None  # created; what it kept cannot be told now
        if got is not None:
            warnings = [*warnings, *dropped_limits(spec.limits, got)]
        self._remember(cid, warnings)
        return cid

    async def start(self, cid: str) -> None:
        # Not while ``open_stdin`` of the container may undo a
        # re-initialization: that would stop the run this starts.
        lock = self._stdin_locks.setdefault(cid, DeferredLock())
        await lock.acquire()
        try:
            # A container another client's attach re-initialized would start
            # with the mounts of that moment (a data directory swapped since
            # would not be the one the game writes to): undone first.
            try:
                doc = await self.client.container_inspect(cid)
            except NotFound:
                raise
            except DockerError:
                pass  # the start itself says what the engine has to say
            else:
                await self._undo_reinit(doc, "another client's attach")
            await super().start(cid)
        finally:
            lock.release()

    async def kill(self, cid: str, signal: str = "SIGKILL") -> None:
        # libpod's kill answers once the signal is sent.  The compatible
        # endpoint's SIGKILL then waits for Podman to see the container
        # exited, which a re-initialization (see ``open_stdin``) can hold
        # off for good; the agent waits for the death itself, bounded.
        try:
            await self.client.container_kill(cid, signal, libpod=True)
        except DockerError as e:
            raise _as_conflict(e) from None

    def forget(self, cid_or_name: str) -> None:
        super().forget(cid_or_name)
        self._live.pop(cid_or_name, None)
        shared = self._stdin.pop(cid_or_name, None)
        self._stdin_locks.pop(cid_or_name, None)
        if shared is not None:
            shared.close()
        if self.holders is not None:
            self.holders.forget(cid_or_name)

    async def open_stdin(self, cid: str) -> IStdinPipe:
        """
        A pipe to the stdin of the container's current run.

        Podman re-initializes a container that an attach reaches after its
        run ended (for Docker clients, which attach before they start): a
        new conmon and ``runc init`` wait for a start, inspect says
        "created" without an exit code, its mounts are fixed until that
        start, and the compatible kill's wait for the exit may never end.
        So a container that does not run is refused (``Conflict``), never
        attached to; and when the run ends between the look and an attach
        made now, the re-initialization is undone (a stop of the initialized
        container, whose ``die`` the events drop) and the open is refused
        the same way.  Starts of the container wait for this (``start``),
        so the undo never stops a new run.
        """
        lock = self._stdin_locks.setdefault(cid, DeferredLock())
        await lock.acquire()
        try:
            state = await self.inspect(cid)
            if not state.running:
                raise DockerConflict(_not_running(cid))
            if self.holders is not None and state.started_at_ns:
                pipe = await self.holders.open(
                    state.id, state.started_at_ns, self._attach_path(state.id))
                if isinstance(pipe, HolderPipe) and pipe.attached_now:
                    await self._still_running(state.id, pipe)
                return pipe
            shared = self._stdin.get(cid)
            if shared is None or not shared.connected:
                shared = await self.client.attach_stdin(cid)
                await self._still_running(state.id, shared)
                self._stdin[cid] = shared
                shared.closed.addBoth(self._stdin_gone, cid, shared)
        finally:
            lock.release()
        return SharedStdinView(shared)

    async def _still_running(self, cid: str, pipe: IStdinPipe) -> None:
        """
        After an attach made now: refuse it (and undo a re-initialization)
        if the run ended.  An engine that does not answer leaves the pipe as
        it is (closing an attach would close a running game's stdin; the
        next start undoes a re-initialization anyway).
        """
        try:
            doc = await self.client.container_inspect(cid)
        except NotFound:
            pipe.close()
            raise
        except DockerError:
            return
        if (doc.get("State") or {}).get("Running"):
            return
        pipe.close()
        await self._undo_reinit(doc, "the attach that opened its stdin after its run ended")
        raise DockerConflict(_not_running(cid))

    async def _undo_reinit(self, doc: Mapping[str, Any], by: str) -> None:
        """
        Stop the container of inspect document ``doc`` if an attach
        re-initialized it ("created" with a process: ``runc init`` waiting
        for a start); its ``die`` is dropped by the events.
        """
        state = doc.get("State") or {}
        if state.get("Running") or state.get("Status") != "created" or not state.get("Pid"):
            return
        cid = str(doc.get("Id") or "")
        self.log.info(  # noqa: G010 - twisted.logger's method
            "container {cid}: re-initialized by {by}: stopping that", cid=cid[:12], by=by)
        if self.client.host.kind == "unix":
            self._undoing[cid] = time.time_ns()
        try:
            await self.client.call("POST", ("libpod", "containers", cid, "stop"),
                                   query={"timeout": 0}, kind="container", raw=True)
        except NotFound:
            raise
        except DockerError as e:
            self.log.warn(  # noqa: G010 - twisted.logger's method
                "container {cid}: the re-initialized container could not be stopped: "
                "{error}", cid=cid[:12], error=e.message)

    def _attach_path(self, cid: str) -> str:
        """The path and query of the stdin attach the holder sends."""
        url = self.client.url(
            "containers", cid, "attach", query={"stream": True, "stdin": True, "stderr": True})
        return url[url.index("/", url.index("//") + 2):]

    def _stdin_gone(self, result: object, cid: str, shared: Any) -> None:
        if self._stdin.get(cid) is shared:
            del self._stdin[cid]

    async def inspect(self, cid: str) -> ContainerState:
        state = container_state(await self.client.container_inspect(cid))
        live = self._live.get(state.id)
        if live is not None:
            started, limits = live
            if state.running and state.started_at_ns == started:
                return replace(state, limits=limits)
            del self._live[state.id]  # a new run: back to the created limits
        return state

    # -- stats -------------------------------------------------------------

    def _fix_net(self, sample: StatsSample) -> StatsSample:
        if not net_swapped(self.client.engine_version):
            return sample
        return replace(sample, rx_bytes=sample.tx_bytes, tx_bytes=sample.rx_bytes)

    async def stats(self, cid: str) -> StatsSample:
        return self._fix_net(await super().stats(cid))

    def stats_stream(self, cid: str) -> ILogStream:
        return _StatsSamples(self.client.stats_stream(cid), fix=self._fix_net)

    async def update_limits(self, cid: str, limits: ResourceLimits) -> None:
        state = await self.inspect(cid)
        if not state.running:
            raise DockerConflict("container {} is not running: Podman updates running "
                                 "containers only".format(cid))
        body = update_body(limits)
        try:
            await self._update(state.id, body)
        except NotFound:
            raise
        except DockerError as e:
            if e.status != 500 or "exit status" not in e.message:
                raise
            # The OCI runtime's update failed.  A kernel without block I/O
            # weight (no blkio.weight) makes runc's fail as a whole: the rest
            # goes in without it (a failure of its own is raised).
            del body["blockIO"]
            await self._update(state.id, body)
            weightless = True
        else:
            created = container_state(await self.client.container_inspect(state.id)).limits
            weightless = created is not None and created.io_weight == 0
        warnings = [RESTART_WARNING]
        if weightless:
            # No block I/O weight on this kernel: the update cannot apply it either.
            warnings += dropped_limits(limits, ResourceLimits(
                limits.memory_bytes, limits.memory_swap_bytes, limits.cpu_percent, 0,
                limits.pids))
            limits = ResourceLimits(limits.memory_bytes, limits.memory_swap_bytes,
                                    limits.cpu_percent, 0, limits.pids)
        self._live[state.id] = (state.started_at_ns, limits)
        self._remember(state.id, warnings)

    async def _update(self, cid: str, body: dict[str, Any]) -> None:
        try:
            await self.client.call("POST", ("libpod", "containers", cid, "update"),
                                   body=body, kind="container", raw=True)
        except NotFound:
            raise
        except DockerError as e:
            raise _as_conflict(e) from None

    def output(
        self, cid: str, *, follow: bool, since_ns: int | None = None, tail: int | None = None
    ) -> ILogStream:
        return NumberedLines(self.client, cid, follow=follow, since_ns=since_ns, tail=tail)

    def events(
        self,
        labels: Mapping[str, str],
        *,
        since_ns: int | None,
        on_break: Callable[[EngineError], None],
        on_resume: Callable[[], None],
    ) -> IEventStream:
        wanted = dict(labels)

        def open_stream(start: float, on_open: Callable[[], None]) -> ItemStream[DockerEvent]:
            return self.client.events(wanted, since=start, actions=None, on_open=on_open)

        events = ResumableEvents(
            open_stream,
            self._clock,
            since=(since_ns - 1_000) / 1e9 if since_ns is not None else None,
            retry_delay=self._events_retry,
            max_retry_delay=self._events_retry_max,
            on_break=on_break,
            on_resume=on_resume,
        )
        return _PodmanEvents(events, since_ns or 0, self._undoing, self.forget)
