"""
An in-memory Docker engine for unit tests of the server manager.

It speaks the subset of ``DockerClient`` the manager uses, runs a tiny
scripted game (stdin ``stop`` exits 0, ``crash N`` exits N, SIGTERM exits 0
unless ``ignore_term``), timestamps every log line with a strictly increasing
nanosecond, and lets tests break and restore the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from ctrlagent.engine.docker.errors import ContainerGone, DockerConflict, NetworkNotFound
from ctrlagent.engine.docker.models import DockerEvent
from ctrlagent.engine.docker.stats import ContainerStats
from ctrlagent.errors import DockerError, DockerUnavailable


class FakeLines:
    """A LineStream look-alike fed by the fake engine."""

    def __init__(
        self, items: list[tuple[str, str]], follow: bool, gate: Deferred[None] | None = None
    ) -> None:
        self.items = list(items)
        self.ended = not follow
        self._waiter: Deferred[None] | None = None
        self._gate = gate

    def push(self, item: tuple[str, str]) -> None:
        self.items.append(item)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    async def batches(self, max_items: int = 1000) -> AsyncIterator[list[tuple[str, str]]]:
        if self._gate is not None:
            await self._gate
        while True:
            if self.items:
                batch, self.items = self.items[:max_items], self.items[max_items:]
                yield batch
                continue
            if self.ended:
                return
            self._waiter = Deferred()
            await self._waiter

    def close(self) -> None:
        self.items = []
        self.end()


class FakePipe:
    """A StdinPipe look-alike."""

    def __init__(self, engine: FakeEngine, cid: str) -> None:
        self.engine = engine
        self.cid = cid
        self.connected = True

    def write_line(self, text: str) -> None:
        self.engine.stdin(self.cid, text)

    def close(self) -> Deferred[None]:
        self.connected = False
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


class FakeEvents:
    """A ResumableEvents look-alike."""

    def __init__(self, on_break: Any, on_resume: Any) -> None:
        self.on_break = on_break
        self.on_resume = on_resume
        self.stream = FakeLines([], follow=True)

    def __aiter__(self) -> FakeEvents:
        return self

    async def __anext__(self) -> DockerEvent:
        async for batch in self.stream.batches(1):
            return batch[0]  # type: ignore[return-value]
        raise StopAsyncIteration

    def close(self) -> None:
        self.stream.close()


@dataclass
class FakeContainer:
    cid: str
    name: str
    body: dict[str, Any]
    running: bool = False
    exit_code: int = 0
    oom: bool = False
    log: list[tuple[str, str]] = field(default_factory=list)
    followers: list[FakeLines] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    waiters: list[Deferred[int]] = field(default_factory=list)


class FakeEngine:
    """The fake engine: containers, logs, events."""

    def __init__(self) -> None:
        self.containers: dict[str, FakeContainer] = {}
        self.up = True
        self.events: FakeEvents | None = None
        self._ids = itertools.count(1)
        self._ns = itertools.count(1_700_000_000_000_000_000, 1000)
        self.kills: list[tuple[str, str]] = []
        self.starts = 0
        self.created: list[tuple[str | None, dict[str, Any]]] = []  # every create body
        self.networks: dict[str, dict[str, Any]] = {}
        # When set, reading a log without following waits for it (a slow history).
        self.history_gate: Deferred[None] | None = None

    # -- helpers for tests -------------------------------------------------

    def _check(self) -> None:
        if not self.up:
            raise DockerUnavailable("engine down")

    def _get(self, cid: str) -> FakeContainer:
        for c in self.containers.values():
            if c.cid == cid or c.name == cid:
                return c
        raise ContainerGone("no such container: " + cid)

    def print(self, cid: str, text: str, stream: str = "stdout") -> None:
        c = self._get(cid)
        ns = next(self._ns)
        seconds, nanos = divmod(ns, 1_000_000_000)
        import time

        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        item = (stream, "{}.{:09d}Z {}".format(stamp, nanos, text))
        c.log.append(item)
        for follower in c.followers:
            follower.push(item)

    def die(self, cid: str, code: int, oom: bool = False, external_kill: bool = False) -> None:
        c = self._get(cid)
        if not c.running:
            return
        c.running = False
        c.exit_code = code
        c.oom = oom
        for follower in c.followers:
            follower.end()
        c.followers = []
        waiters, c.waiters = c.waiters, []
        for waiter in waiters:
            waiter.callback(code)
        if external_kill:
            self._event("kill", c)
        if oom:
            self._event("oom", c)
        self._event("die", c, code)

    def _event(self, action: str, c: FakeContainer, code: int | None = None) -> None:
        if self.events is not None:
            labels = dict(c.body.get("Labels") or {})
            self.events.stream.push(
                DockerEvent(action=action, container_id=c.cid, labels=labels, exit_code=code)
            )  # type: ignore[arg-type]

    def stdin(self, cid: str, text: str) -> None:
        c = self._get(cid)
        if not c.running:
            return
        self.print(cid, "> " + text)
        if text == "stop":
            self.die(cid, 0)
        elif text.startswith("crash "):
            self.die(cid, int(text.split()[1]))
        elif text.startswith("say "):
            self.print(cid, "[Server] " + text[4:])

    def break_engine(self) -> None:
        self.up = False
        for c in self.containers.values():
            for follower in c.followers:
                follower.end()
            c.followers = []
        if self.events is not None:
            self.events.on_break(DockerUnavailable("engine down"))

    def restore_engine(self) -> None:
        self.up = True
        if self.events is not None:
            self.events.on_resume()

    # -- the client API ----------------------------------------------------

    def resumable_events(self, labels: Any, since: Any = None, **kw: Any) -> FakeEvents:
        self.events = FakeEvents(kw.get("on_break"), kw.get("on_resume"))
        return self.events

    async def ensure_image(self, ref: str, policy: str | None = None) -> None:
        self._check()

    async def network_ensure(self, name: str, subnet: str | None = None,
                             labels: dict[str, str] | None = None) -> dict[str, Any]:
        self._check()
        network = self.networks.setdefault(name, {"Name": name, "Labels": dict(labels or {})})
        return network

    async def container_create(self, name: str | None, body: dict[str, Any]) -> str:
        self._check()
        mode = body.get("HostConfig", {}).get("NetworkMode", "bridge")
        if mode not in ("bridge", "host", "none", "default") and mode not in self.networks:
            raise NetworkNotFound("network {} not found".format(mode))
        if any(c.name == name for c in self.containers.values()):
            raise DockerConflict("name taken")
        if "INSTALL_CREATE_FAILS=1" in body.get("Env", []) and (
            (body.get("Labels") or {}).get("ctrl-alt-play.role") == "install"
        ):
            raise DockerError(500, "the engine refused the install container")
        cid = "{:064x}".format(next(self._ids))
        self.created.append((name, body))
        env = dict(e.split("=", 1) for e in body.get("Env", []))
        self.containers[cid] = FakeContainer(cid, name or cid, body, env=env)
        return cid

    async def container_start(self, cid: str) -> None:
        self._check()
        c = self._get(cid)
        if c.running:
            return
        c.running = True
        self.starts += 1
        self._event("start", c)
        if (c.body.get("Labels") or {}).get("ctrl-alt-play.role") == "install":
            # INSTALL_HANG: the script never ends; INSTALL_VANISH: the
            # container is removed behind the agent's back; else it exits.
            if c.env.get("INSTALL_VANISH") == "1":
                del self.containers[c.cid]
            elif c.env.get("INSTALL_HANG") != "1":
                self.print(cid, "installing")
                self.die(cid, int(c.env.get("INSTALL_EXIT", "0")))
            return
        self.print(cid, "Starting")
        self.print(cid, c.env.get("STARTUP_LINE", "Done (0.1s)!"))

    async def container_kill(self, cid: str, signal: str = "SIGKILL") -> None:
        self._check()
        c = self._get(cid)
        if not c.running:
            raise DockerConflict("not running")
        self.kills.append((cid, signal))
        if signal == "SIGKILL":
            self.die(cid, 137)
        elif c.env.get("IGNORE_SIGTERM") != "1":
            self.print(cid, "Stopping server ({})".format(signal))
            self.die(cid, 0)

    async def container_remove(self, cid: str, force: bool = False, volumes: bool = False) -> None:
        self._check()
        c = self._get(cid)
        del self.containers[c.cid]
        # Forced removal: followers end, a waiter learns the container is gone.
        c.running = False
        for follower in c.followers:
            follower.end()
        c.followers = []
        waiters, c.waiters = c.waiters, []
        for waiter in waiters:
            waiter.errback(ContainerGone("no such container: " + c.cid))

    async def container_inspect(self, cid: str) -> dict[str, Any]:
        self._check()
        c = self._get(cid)
        return {
            "Id": c.cid,
            "Config": {"Labels": dict(c.body.get("Labels") or {})},
            "State": {"Running": c.running, "ExitCode": c.exit_code, "OOMKilled": c.oom,
                      "StartedAt": "2026-01-01T00:00:00Z"},
        }

    async def container_list(self, labels: Any = None, all: bool = True) -> list[dict[str, Any]]:
        self._check()
        return [
            {"Id": c.cid, "Names": ["/" + c.name], "State": "running" if c.running else "exited",
             "Labels": dict(c.body.get("Labels") or {})}
            for c in self.containers.values()
        ]

    async def container_update(self, cid: str, resources: dict[str, Any]) -> None:
        self._check()
        self._get(cid).body["HostConfig"].update(resources)

    async def container_wait(self, cid: str, condition: str = "not-running") -> int:
        c = self._get(cid)
        if not c.running:
            return c.exit_code
        waiter: Deferred[int] = Deferred()
        c.waiters.append(waiter)
        return await waiter

    def logs(self, cid: str, *, follow: bool, tail: Any = "all", since: float | None = None,
             timestamps: bool = False, tty: bool = False) -> FakeLines:
        c = self._get(cid)
        items = list(c.log)
        if tail != "all":
            items = items[-int(tail):]
        stream = FakeLines(items, follow=follow and c.running,
                           gate=None if follow else self.history_gate)
        if follow and c.running:
            c.followers.append(stream)
        return stream

    async def attach_stdin(self, cid: str) -> FakePipe:
        self._check()
        self._get(cid)
        return FakePipe(self, cid)

    async def stats_once(self, cid: str, one_shot: bool = False) -> ContainerStats:
        self._check()
        self._get(cid)
        return ContainerStats(12.5, 50 * 1024 * 1024, 64 * 1024 * 1024, 100, 200, 0, 0, 3)
