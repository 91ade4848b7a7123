"""
In-memory fakes of the domain seams, for dispatcher and API tests.

``FakeServerManager`` provides ``IServerManager`` and ``FakeFileManager``
provides ``IFileManager``.  They keep real state (server lifecycle, aliases,
console buffers, a file tree per server) and real rules (conflicts, unknown
ids, path confinement, disk limits), so a test that passes against them says
something about the dispatcher, not about canned answers.

Slow work is simulated with *gates*: ``manager.hold("stop")`` returns a
Deferred that the next ``stop`` waits on before finishing, so a test can
observe an action that outlives the Panel's timeout.  Failures are injected
with ``manager.fail_next("start", SomeError(...))``.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.errors import (
    Conflict,
    FileNotFound,
    InsufficientResources,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ServerNotFound,
)
from ctrlagent.events import ConsoleOutput, ResourceUpdate, ServerEvent, StatusChanged
from ctrlagent.interfaces import IFileManager, IServerManager, ServerRoot

PANEL_STATUS = {
    "installing": "INSTALLING",
    "install_failed": "INSTALL_FAILED",
    "suspended": "SUSPENDED",
    "offline": "OFFLINE",
    "starting": "STARTING",
    "running": "RUNNING",
    "stopping": "STOPPING",
    "crashed": "CRASHED",
}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeServer:
    """One game server as the fake manager keeps it."""

    server_id: str
    params: dict[str, Any]
    container_id: str
    aliases: set[str] = field(default_factory=set)
    status: str = "offline"
    suspended: bool = False
    console: list[str] = field(default_factory=list)
    last_activity: float | None = None
    stdin: list[str] = field(default_factory=list)
    busy: str | None = None  # the power action in progress, if any


@implementer(IServerManager)
class FakeServerManager:
    """An ``IServerManager`` keeping servers in memory with real lifecycle rules."""

    def __init__(
        self,
        clock: IReactorTime | None = None,
        data_dir: str = "/srv/ctrlagent/servers",
        console_buffer_lines: int = 1000,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.data_dir = data_dir
        self.buffer_lines = console_buffer_lines
        self.servers: dict[str, FakeServer] = {}
        self.purged: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.metrics: dict[str, dict[str, Any]] = {}
        self._listeners: list[Callable[[ServerEvent], None]] = []
        self._gates: dict[str, Deferred[None]] = {}
        self._failures: dict[str, Exception] = {}
        self._next_container = 1

    # -- test controls -------------------------------------------------------

    def hold(self, operation: str) -> Deferred[None]:
        """Make the next ``operation`` (``create``, ``stop``, ...) wait for the returned gate."""
        gate: Deferred[None] = Deferred()
        self._gates[operation] = gate
        return gate

    def fail_next(self, operation: str, error: Exception) -> None:
        """Make the next ``operation`` raise ``error``."""
        self._failures[operation] = error

    def set_metrics(self, server_id: str, metrics: dict[str, Any]) -> None:
        """The sample a running server reports (Panel units)."""
        self.metrics[self.resolve(server_id)] = metrics

    def emit_console(self, server_id: str, line: str, stream: str = "stdout") -> None:
        """Pretend the server printed ``line``."""
        self._print(self._get(server_id), line, stream)

    # -- internals -----------------------------------------------------------

    def _enter(self, operation: str, server_id: str) -> None:
        self.calls.append((operation, server_id))
        error = self._failures.pop(operation, None)
        if error is not None:
            raise error

    async def _gate(self, operation: str) -> None:
        gate = self._gates.pop(operation, None)
        if gate is not None:
            await gate

    def _get(self, server_id: str) -> FakeServer:
        return self.servers[self.resolve(server_id)]

    def _emit(self, event: ServerEvent) -> None:
        for listener in list(self._listeners):
            listener(event)

    def _set_status(self, server: FakeServer, status: str, error: str | None = None) -> None:
        previous, server.status = server.status, status
        if previous != status:
            self._emit(
                StatusChanged(
                    server_id=server.server_id,
                    previous=previous,
                    current=status,
                    timestamp=self.clock.seconds(),
                    error=error,
                    container_id=server.container_id,
                )
            )

    def _print(self, server: FakeServer, line: str, stream: str = "stdout") -> None:
        server.console.append(line)
        del server.console[: -self.buffer_lines]
        server.last_activity = self.clock.seconds()
        self._emit(ConsoleOutput(server.server_id, stream, [line], self.clock.seconds()))

    def _claim(self, server: FakeServer, operation: str) -> None:
        """One power action at a time per server, as the real manager enforces."""
        if server.busy is not None:
            raise Conflict(
                "server {} is busy with {}".format(server.server_id, server.busy),
            )
        server.busy = operation

    def _state(self, server: FakeServer) -> dict[str, Any]:
        status = "suspended" if server.suspended and server.status == "offline" else server.status
        return {
            "serverId": server.server_id,
            "status": status,
            "panelStatus": PANEL_STATUS.get(status, "OFFLINE"),
            "containerId": server.container_id,
            "name": server.params.get("name") or server.server_id,
            "aliases": sorted(server.aliases),
        }

    # -- IServerManager --------------------------------------------------------

    def resolve(self, server_id: str) -> str:
        """The canonical id for an id, alias, container name or container id."""
        if server_id in self.servers:
            return server_id
        for server in self.servers.values():
            if (
                server_id in server.aliases
                or server_id == server.container_id
                or server_id == "ctrl-alt-play-" + server.server_id
            ):
                return server.server_id
        raise ServerNotFound("server {} not found".format(server_id))

    @async_to_deferred
    async def create_server(self, server_id: str, params: dict) -> dict[str, Any]:
        """Define a server; waits on the ``create`` gate as a slow pull would."""
        self._enter("create", server_id)
        image = params.get("image")
        if not isinstance(image, str) or not image:
            raise InvalidInput("image is required", field="image")
        aliases = {str(a) for a in params.get("aliases") or [] if a}
        if params.get("panelId"):
            aliases.add(str(params["panelId"]))
        aliases.discard(server_id)
        for name in {server_id, *aliases}:
            try:
                existing = self.resolve(name)
            except ServerNotFound:
                continue
            raise Conflict("server {} already exists (as {})".format(name, existing))
        server = FakeServer(
            server_id=server_id,
            params=dict(params),
            container_id="{:064x}".format(self._next_container),
            aliases=aliases,
            status="installing",
        )
        self._next_container += 1
        self.servers[server_id] = server
        await self._gate("create")
        if server_id in self.servers:
            self._set_status(server, "offline")
        return {
            "serverId": server_id,
            "containerId": server.container_id,
            "status": server.status,
        }

    @async_to_deferred
    async def start(self, server_id: str) -> dict[str, Any]:
        """Start: refused while suspended, installing or busy; idempotent when running."""
        server = self._get(server_id)
        self._enter("start", server.server_id)
        if server.suspended:
            raise Conflict("server {} is suspended".format(server.server_id))
        if server.status == "installing":
            raise Conflict("server {} is still installing".format(server.server_id))
        if server.status in ("running", "starting"):
            return {"serverId": server.server_id, "status": server.status}
        self._claim(server, "start")
        try:
            self._set_status(server, "starting")
            await self._gate("start")
            self._set_status(server, "running")
            self._print(server, "[fake] server started")
        finally:
            server.busy = None
        return {"serverId": server.server_id, "status": server.status}

    @async_to_deferred
    async def stop(
        self, server_id: str, signal: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Graceful stop (waits on the ``stop`` gate), or a kill for SIGKILL."""
        server = self._get(server_id)
        self._enter("stop", server.server_id)
        if signal == "SIGKILL":
            return await self.kill(server.server_id)
        if server.status in ("offline", "crashed", "install_failed"):
            return {"serverId": server.server_id, "status": server.status}
        self._claim(server, "stop")
        try:
            self._set_status(server, "stopping")
            await self._gate("stop")
            self._set_status(server, "offline")
        finally:
            server.busy = None
        return {"serverId": server.server_id, "status": server.status}

    @async_to_deferred
    async def restart(self, server_id: str) -> dict[str, Any]:
        """Stop then start."""
        await self.stop(server_id)
        return await self.start(server_id)

    def kill(self, server_id: str) -> Deferred[dict[str, Any]]:
        """Kill the process; the container and files stay."""
        try:
            server = self._get(server_id)
            self._enter("kill", server.server_id)
        except Exception as e:
            return fail(e)
        if server.status not in ("offline", "installing"):
            self._set_status(server, "offline")
        return succeed({"serverId": server.server_id, "status": server.status})

    @async_to_deferred
    async def delete(self, server_id: str, purge_files: bool = False) -> dict[str, Any]:
        """Forget the server (its files too when ``purge_files``)."""
        server = self._get(server_id)
        self._enter("delete", server.server_id)
        if server.busy is not None:
            raise Conflict("server {} is busy with {}".format(server.server_id, server.busy))
        await self._gate("delete")
        self._set_status(server, "offline")
        del self.servers[server.server_id]
        if purge_files:
            self.purged.append(server.server_id)
        return {"serverId": server.server_id, "status": "deleted", "purgedFiles": purge_files}

    @async_to_deferred
    async def suspend(self, server_id: str) -> dict[str, Any]:
        """Stop and refuse starts."""
        server = self._get(server_id)
        if server.status not in ("offline", "crashed"):
            await self.stop(server.server_id)
        server.suspended = True
        return self._state(server)

    def unsuspend(self, server_id: str) -> Deferred[dict[str, Any]]:
        """Allow starts again."""
        try:
            server = self._get(server_id)
        except Exception as e:
            return fail(e)
        server.suspended = False
        return succeed(self._state(server))

    @async_to_deferred
    async def reinstall(self, server_id: str) -> dict[str, Any]:
        """Install again; only while offline."""
        server = self._get(server_id)
        if server.status not in ("offline", "crashed", "install_failed"):
            raise Conflict("server {} must be offline to reinstall".format(server.server_id))
        self._set_status(server, "installing")
        await self._gate("reinstall")
        self._set_status(server, "offline")
        return self._state(server)

    def update(self, server_id: str, params: dict) -> Deferred[dict[str, Any]]:
        """Merge changed settings into the definition."""
        try:
            server = self._get(server_id)
        except Exception as e:
            return fail(e)
        aliases = params.get("aliases")
        if isinstance(aliases, list):
            for alias in aliases:
                try:
                    owner = self.resolve(str(alias))
                except ServerNotFound:
                    continue
                if owner != server.server_id:
                    return fail(Conflict("alias {} already names another server".format(alias)))
            server.aliases.update(str(a) for a in aliases if str(a) != server.server_id)
        server.params.update({k: v for k, v in params.items() if k != "aliases"})
        return succeed(self._state(server))

    def status(self, server_id: str) -> dict[str, Any]:
        """The status dict (sync)."""
        server = self._get(server_id)
        state = self._state(server)
        if server.status == "running":
            state["resources"] = self.server_metrics(server.server_id)
        return state

    def list_servers(self) -> list[dict[str, Any]]:
        """Every managed server's status dict."""
        return [self._state(s) for s in self.servers.values()]

    def server_metrics(self, server_id: str) -> dict[str, Any]:
        """The latest sample while running, zeroes otherwise."""
        server = self._get(server_id)
        sample = {
            "cpu": 0.0,
            "memory": 0.0,
            "disk": 0.0,
            "network": {"in": 0, "out": 0},
            "players": 0,
            "timestamp": _iso(self.clock.seconds()),
        }
        if server.status == "running":
            sample.update(self.metrics.get(server.server_id, {}))
            self._emit(ResourceUpdate(server.server_id, dict(sample)))
        return sample

    def send_command(self, server_id: str, command: str) -> Deferred[dict[str, Any]]:
        """Write a line to stdin; the fake server echoes it."""
        try:
            server = self._get(server_id)
            self._enter("send_command", server.server_id)
            if server.status != "running":
                raise Conflict("server {} is not running".format(server.server_id))
        except Exception as e:
            return fail(e)
        server.stdin.append(command)
        self._print(server, "> " + command)
        return succeed({"serverId": server.server_id})

    @async_to_deferred
    async def console_command(self, server_id: str, command: str, wait: float = 1.0) -> str:
        """Send ``command`` and answer with what the server printed in reply."""
        server = self._get(server_id)
        before = len(server.console)
        await self.send_command(server.server_id, command)
        return "\n".join(server.console[before:])

    def console_history(self, server_id: str, lines: int = 100) -> list[str]:
        """The last ``lines`` console lines."""
        server = self._get(server_id)
        return list(server.console[-lines:]) if lines > 0 else []

    def console_status(self, server_id: str) -> dict[str, Any]:
        """Whether the console is attached (i.e. running) and its buffer size."""
        server = self._get(server_id)
        return {
            "connected": server.status in ("starting", "running", "stopping"),
            "lastActivity": None if server.last_activity is None else _iso(server.last_activity),
            "bufferSize": len(server.console),
        }

    def console_clear(self, server_id: str) -> None:
        """Empty the buffer."""
        self._get(server_id).console.clear()

    def server_root(self, server_id: str) -> ServerRoot:
        """``<data_dir>/<canonical id>``, disk limit from ``limits.disk`` (MB)."""
        server = self._get(server_id)
        limits = server.params.get("limits") or {}
        disk_mb = limits.get("disk") if isinstance(limits, dict) else None
        return ServerRoot(
            server_id=server.server_id,
            path=posixpath.join(self.data_dir, server.server_id),
            disk_limit_bytes=int(disk_mb) * 1024 * 1024 if disk_mb else None,
            uid=1000,
            gid=1000,
        )

    def add_listener(self, listener: object) -> None:
        """Subscribe ``listener(event)`` to events."""
        assert callable(listener)
        self._listeners.append(listener)

    def remove_listener(self, listener: object) -> None:
        """Unsubscribe."""
        if listener in self._listeners:
            self._listeners.remove(listener)


# ---------------------------------------------------------------------------


@dataclass
class _Node:
    is_dir: bool
    data: bytes = b""
    mode: int = 0o644
    modified: float = 0.0


_ARCHIVE_MAGIC = b"FAKEARCHIVE\n"


def _deferred(f: Callable[[], Any]) -> Deferred[Any]:
    try:
        return succeed(f())
    except Exception as e:
        return fail(e)


@implementer(IFileManager)
class FakeFileManager:
    """
    An ``IFileManager`` over an in-memory tree per server root.

    Paths are confined to the root (``..`` past it is ``PERMISSION_DENIED``),
    writes count against ``disk_limit_bytes``, missing paths are
    ``FILE_NOT_FOUND``.  Archives are a fake format that round-trips.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock if clock is not None else Clock()
        self.trees: dict[str, dict[str, _Node]] = {}
        self.mods: dict[str, dict[str, dict[str, Any]]] = {}

    # -- internals -----------------------------------------------------------

    def _tree(self, root: ServerRoot) -> dict[str, _Node]:
        tree = self.trees.get(root.path)
        if tree is None:
            tree = self.trees[root.path] = {"": _Node(True, mode=0o755)}
        return tree

    @staticmethod
    def _norm(path: str) -> str:
        """``a/b`` relative to the root ('' is the root); refuse escapes."""
        if "\x00" in path:
            raise InvalidInput("path must not contain NUL", field="path")
        parts: list[str] = []
        for part in path.replace("\\", "/").split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise PermissionDenied("path {!r} leaves the server directory".format(path))
                parts.pop()
            else:
                parts.append(part)
        return "/".join(parts)

    def _node(self, root: ServerRoot, rel: str) -> _Node:
        node = self._tree(root).get(rel)
        if node is None:
            raise FileNotFound("{} does not exist".format("/" + rel))
        return node

    def _used(self, root: ServerRoot) -> int:
        return sum(len(n.data) for n in self._tree(root).values())

    def _put(self, root: ServerRoot, rel: str, data: bytes) -> _Node:
        if rel == "":
            raise InvalidInput("path must name a file", field="path")
        tree = self._tree(root)
        parent = posixpath.dirname(rel)
        if parent not in tree or not tree[parent].is_dir:
            raise FileNotFound("directory {} does not exist".format("/" + parent))
        existing = tree.get(rel)
        if existing is not None and existing.is_dir:
            raise Conflict("{} is a directory".format("/" + rel))
        if root.disk_limit_bytes is not None:
            growth = len(data) - (len(existing.data) if existing else 0)
            if self._used(root) + growth > root.disk_limit_bytes:
                raise InsufficientResources("disk limit of the server would be exceeded")
        node = _Node(False, data, existing.mode if existing else 0o644, self.clock.seconds())
        tree[rel] = node
        return node

    def _entry(self, rel: str, node: _Node) -> dict[str, Any]:
        name = posixpath.basename(rel) or "/"
        modified = _iso(node.modified)
        entry: dict[str, Any] = {
            "name": name,
            "type": "directory" if node.is_dir else "file",
            "size": 0 if node.is_dir else len(node.data),
            "modified": modified,
            "lastModified": modified,
            "permissions": "{:03o}".format(node.mode),
            "owner": "container",
            "group": "container",
            "path": "/" + rel,
        }
        if not node.is_dir and "." in name:
            entry["extension"] = name.rsplit(".", 1)[1]
        return entry

    def _children(self, root: ServerRoot, rel: str) -> list[str]:
        prefix = rel + "/" if rel else ""
        return sorted(
            k
            for k in self._tree(root)
            if k.startswith(prefix) and k != rel and "/" not in k[len(prefix) :]
        )

    def _descendants(self, root: ServerRoot, rel: str) -> list[str]:
        prefix = rel + "/" if rel else ""
        return sorted(k for k in self._tree(root) if k != rel and k.startswith(prefix))

    # -- IFileManager ----------------------------------------------------------

    def list_files(
        self, root: ServerRoot, path: str, limit: int | None = None, offset: int = 0
    ) -> Deferred[dict[str, Any]]:
        """Directory listing, directories first."""

        def run() -> dict[str, Any]:
            rel = self._norm(path)
            node = self._node(root, rel)
            if not node.is_dir:
                raise InvalidInput("{} is not a directory".format("/" + rel), field="path")
            tree = self._tree(root)
            entries = [self._entry(k, tree[k]) for k in self._children(root, rel)]
            entries.sort(key=lambda e: (e["type"] != "directory", e["name"]))
            end = None if limit is None else offset + limit
            return {"serverId": root.server_id, "path": "/" + rel, "files": entries[offset:end]}

        return _deferred(run)

    def search_files(
        self, root: ServerRoot, path: str, query: str, file_type: str = "all"
    ) -> Deferred[dict[str, Any]]:
        """Names containing ``query`` (case-insensitive) under ``path``."""

        def run() -> dict[str, Any]:
            rel = self._norm(path)
            self._node(root, rel)
            tree = self._tree(root)
            needle = query.lower()
            found = []
            for k in self._descendants(root, rel):
                node = tree[k]
                kind = "directory" if node.is_dir else "file"
                if file_type != "all" and kind != file_type:
                    continue
                if needle in posixpath.basename(k).lower():
                    found.append(self._entry(k, node))
            return {"serverId": root.server_id, "path": "/" + rel, "files": found}

        return _deferred(run)

    def read_file(self, root: ServerRoot, path: str) -> Deferred[dict[str, Any]]:
        """UTF-8 text of a file."""

        def run() -> dict[str, Any]:
            rel = self._norm(path)
            node = self._node(root, rel)
            if node.is_dir:
                raise InvalidInput("{} is a directory".format("/" + rel), field="path")
            try:
                text = node.data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    "{} is not UTF-8 text; use download_file".format("/" + rel), field="path"
                ) from None
            return {
                "serverId": root.server_id,
                "path": "/" + rel,
                "content": text,
                "size": len(node.data),
                "modified": _iso(node.modified),
                "encoding": "utf8",
            }

        return _deferred(run)

    def write_file(self, root: ServerRoot, path: str, content: str) -> Deferred[dict[str, Any]]:
        """Replace a file's content."""

        def run() -> dict[str, Any]:
            node = self._put(root, self._norm(path), content.encode("utf-8"))
            return {"size": len(node.data), "modified": _iso(node.modified)}

        return _deferred(run)

    def create_directory(self, root: ServerRoot, path: str) -> Deferred[dict[str, Any]]:
        """``mkdir -p``; a file in the way is a conflict."""

        def run() -> dict[str, Any]:
            rel = self._norm(path)
            tree = self._tree(root)
            parts = rel.split("/") if rel else []
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                node = tree.get(sub)
                if node is None:
                    tree[sub] = _Node(True, mode=0o755, modified=self.clock.seconds())
                elif not node.is_dir:
                    raise Conflict("{} is a file".format("/" + sub))
            return {"path": "/" + rel}

        return _deferred(run)

    def delete_file(self, root: ServerRoot, path: str) -> Deferred[dict[str, Any]]:
        """Remove a file or a whole directory; never the root itself."""

        def run() -> dict[str, Any]:
            rel = self._norm(path)
            if rel == "":
                raise PermissionDenied("refusing to delete the server directory itself")
            node = self._node(root, rel)
            tree = self._tree(root)
            if node.is_dir:
                for k in self._descendants(root, rel):
                    del tree[k]
            del tree[rel]
            return {"message": "{} deleted".format("/" + rel)}

        return _deferred(run)

    def rename_file(
        self, root: ServerRoot, old_path: str, new_path: str
    ) -> Deferred[dict[str, Any]]:
        """Move a file or directory; the target must not exist."""

        def run() -> dict[str, Any]:
            old, new = self._norm(old_path), self._norm(new_path)
            if old == "" or new == "":
                raise PermissionDenied("cannot rename the server directory itself")
            node = self._node(root, old)
            tree = self._tree(root)
            if new in tree:
                raise Conflict("{} already exists".format("/" + new))
            parent = posixpath.dirname(new)
            if parent not in tree or not tree[parent].is_dir:
                raise FileNotFound("directory {} does not exist".format("/" + parent))
            if node.is_dir and (new + "/").startswith(old + "/"):
                raise InvalidInput("cannot move a directory into itself", field="newPath")
            moves = [(k, new + k[len(old) :]) for k in [old, *self._descendants(root, old)]]
            for src, dst in moves:
                tree[dst] = tree.pop(src)
            return {"oldPath": "/" + old, "newPath": "/" + new}

        return _deferred(run)

    def download_file(self, root: ServerRoot, path: str) -> Deferred[dict[str, Any]]:
        """A file's bytes as base64."""

        def run() -> dict[str, Any]:
            rel = self._norm(path)
            node = self._node(root, rel)
            if node.is_dir:
                raise InvalidInput("{} is a directory".format("/" + rel), field="path")
            return {
                "serverId": root.server_id,
                "path": "/" + rel,
                "content": base64.b64encode(node.data).decode("ascii"),
                "encoding": "base64",
                "size": len(node.data),
                "modified": _iso(node.modified),
            }

        return _deferred(run)

    def upload_file(
        self,
        root: ServerRoot,
        path: str,
        content: str,
        encoding: str = "base64",
        chunk_index: int | None = None,
        total_chunks: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Store decoded content.  Chunks (``<path>.chunk<N>`` or ``chunk_index``)
        are stored as separate files, as the real manager keeps them until
        they are assembled.
        """

        def run() -> dict[str, Any]:
            nonlocal path
            if chunk_index is not None:
                if total_chunks is not None and chunk_index >= total_chunks:
                    raise InvalidInput("chunkIndex must be below totalChunks", field="chunkIndex")
                path = "{}.chunk{}".format(path, chunk_index)
            if encoding == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidInput("content is not valid base64", field="content") from None
            else:
                data = content.encode("utf-8")
            node = self._put(root, self._norm(path), data)
            return {"size": len(node.data), "modified": _iso(node.modified)}

        return _deferred(run)

    def get_file_info(self, root: ServerRoot, path: str) -> Deferred[dict[str, Any]]:
        """One entry plus its octal ``mode``."""

        def run() -> dict[str, Any]:
            rel = self._norm(path)
            node = self._node(root, rel)
            entry = self._entry(rel, node)
            entry["mode"] = "{:04o}".format(node.mode)
            return entry

        return _deferred(run)

    def set_file_permissions(
        self, root: ServerRoot, path: str, mode: str
    ) -> Deferred[dict[str, Any]]:
        """chmod, refusing setuid/setgid bits."""

        def run() -> dict[str, Any]:
            value = int(mode, 8)
            if value & 0o6000:
                raise PermissionDenied("setuid/setgid bits are not allowed")
            node = self._node(root, self._norm(path))
            node.mode = value
            return {}

        return _deferred(run)

    def create_archive(
        self, root: ServerRoot, files: list, archive_path: str, fmt: str
    ) -> Deferred[dict[str, Any]]:
        """Pack files (directories recursively) into the fake archive format."""

        def run() -> dict[str, Any]:
            tree = self._tree(root)
            members: dict[str, str] = {}
            for item in files:
                rel = self._norm(str(item))
                node = self._node(root, rel)
                for k in [rel, *self._descendants(root, rel)] if node.is_dir else [rel]:
                    if not tree[k].is_dir:
                        members[k] = base64.b64encode(tree[k].data).decode("ascii")
            blob = _ARCHIVE_MAGIC + json.dumps({"format": fmt, "members": members}).encode()
            node = self._put(root, self._norm(archive_path), blob)
            return {"archivePath": "/" + self._norm(archive_path), "size": len(node.data)}

        return _deferred(run)

    def extract_archive(
        self, root: ServerRoot, archive_path: str, extract_path: str
    ) -> Deferred[dict[str, Any]]:
        """Unpack a fake archive below ``extract_path``."""

        def run() -> dict[str, Any]:
            node = self._node(root, self._norm(archive_path))
            if not node.data.startswith(_ARCHIVE_MAGIC):
                raise InvalidInput("not an archive", field="archivePath")
            members = json.loads(node.data[len(_ARCHIVE_MAGIC) :])["members"]
            base = self._norm(extract_path)
            count = 0
            for name, b64 in members.items():
                rel = self._norm(posixpath.join(base, name))
                parent = posixpath.dirname(rel)
                if parent:
                    self.create_directory(root, parent)
                self._put(root, rel, base64.b64decode(b64))
                count += 1
            return {"extracted": count}

        return _deferred(run)

    def install_mod(self, root: ServerRoot, params: dict) -> Deferred[dict[str, Any]]:
        """Record a mod; a second install of the same id is a conflict."""

        def run() -> dict[str, Any]:
            mod_id = str(
                params.get("workshopId") or params.get("modId") or params.get("downloadUrl") or ""
            )
            if not mod_id:
                raise InvalidInput("modId is required", field="modId")
            mods = self.mods.setdefault(root.path, {})
            if mod_id in mods:
                raise Conflict("mod {} is already installed".format(mod_id))
            mod = {
                "id": mod_id,
                "name": params.get("name") or mod_id,
                "version": params.get("version") or "latest",
                "description": params.get("description") or "",
                "enabled": True,
            }
            mods[mod_id] = mod
            return {"mod": dict(mod)}

        return _deferred(run)

    def uninstall_mod(self, root: ServerRoot, mod_id: str) -> Deferred[dict[str, Any]]:
        """Forget a mod; unknown ids are NOT_FOUND."""

        def run() -> dict[str, Any]:
            mods = self.mods.setdefault(root.path, {})
            if mod_id not in mods:
                raise NotFound("mod {} is not installed".format(mod_id))
            del mods[mod_id]
            return {}

        return _deferred(run)

    def list_mods(self, root: ServerRoot) -> Deferred[dict[str, Any]]:
        """Installed mods."""

        def run() -> dict[str, Any]:
            mods = [dict(m) for m in self.mods.get(root.path, {}).values()]
            return {"mods": mods, "count": len(mods)}

        return _deferred(run)
