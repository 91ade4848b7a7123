"""
An in-memory ``IFileManager``, for action-registry, API and link tests.

``FakeFileManager`` keeps a file tree per server root with real rules (path
confinement, disk limits, missing paths), so a test that passes against it
says something about its caller, not about canned answers.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from ctrlagent.errors import (
    Conflict,
    FileNotFound,
    InsufficientResources,
    InvalidInput,
    NotFound,
    NotText,
    PermissionDenied,
)
from ctrlagent.interfaces import IFileManager, ServerRoot
from ctrlagent.wire.files import (
    ArchiveCreated,
    ArchiveExtracted,
    Copied,
    Done,
    FileBytes,
    FileEntry,
    FileInfo,
    FileListing,
    FilePermissions,
    FileSearch,
    FileText,
    FileWritten,
    Mod,
    ModInstalled,
    ModList,
    PermissionsSet,
    Renamed,
)

T = TypeVar("T")

# The real manager's default cap on one page of a listing (FilesConfig.max_list_entries).
LIST_CAP = 100_000

@dataclass
class _Node:
    is_dir: bool
    data: bytes = b""
    mode: int = 0o644
    modified: float = 0.0


_ARCHIVE_MAGIC = b"FAKEARCHIVE\n"


def _deferred(f: Callable[[], T]) -> Deferred[T]:
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
    Results are the real manager's records (``ctrlagent.wire.files``).
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock if clock is not None else Clock()
        self.trees: dict[str, dict[str, _Node]] = {}
        self.mods: dict[str, dict[str, Mod]] = {}

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

    def _entry(self, rel: str, node: _Node) -> FileEntry:
        return FileEntry(
            posixpath.basename(rel) or "/",
            "directory" if node.is_dir else "file",
            0 if node.is_dir else len(node.data),
            node.modified,
            node.mode,
            "container",
            "container",
            "/" + rel,
        )

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
    ) -> Deferred[FileListing]:
        """Directory listing, directories first."""

        def run() -> FileListing:
            rel = self._norm(path)
            node = self._node(root, rel)
            if not node.is_dir:
                raise InvalidInput("{} is not a directory".format("/" + rel), field="path")
            tree = self._tree(root)
            entries = [self._entry(k, tree[k]) for k in self._children(root, rel)]
            entries.sort(key=lambda e: (e.kind != "directory", e.name))
            cap = LIST_CAP if limit is None else min(limit, LIST_CAP)
            page = tuple(entries[offset : offset + cap])
            return FileListing(
                root.server_id, "/" + rel, page, len(entries), offset, cap,
                offset + cap < len(entries),
            )

        return _deferred(run)

    def search_files(
        self, root: ServerRoot, path: str, query: str, file_type: str = "all"
    ) -> Deferred[FileSearch]:
        """Names containing ``query`` (case-insensitive) under ``path``."""

        def run() -> FileSearch:
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
            return FileSearch(root.server_id, "/" + rel, query, tuple(found), False)

        return _deferred(run)

    def read_file(
        self, root: ServerRoot, path: str, lossy: bool = False
    ) -> Deferred[FileText]:
        """UTF-8 text of a file; not UTF-8 is ``NotText`` unless ``lossy``."""

        def run() -> FileText:
            rel = self._norm(path)
            node = self._node(root, rel)
            if node.is_dir:
                raise InvalidInput("{} is a directory".format("/" + rel), field="path")
            try:
                text = node.data.decode("utf-8")
            except UnicodeDecodeError as e:
                if not lossy:
                    raise NotText(
                        "{} is not UTF-8 text (byte {} is not valid UTF-8): read its bytes"
                        " with download_file, or ask read_file for lossy text with lossy: true"
                        .format("/" + rel, e.start),
                        details={"path": "/" + rel, "offset": e.start},
                    ) from None
                return FileText(root.server_id, "/" + rel, node.data.decode("utf-8", "replace"),
                                len(node.data), node.modified, True)
            return FileText(root.server_id, "/" + rel, text, len(node.data), node.modified)

        return _deferred(run)

    def write_file(self, root: ServerRoot, path: str, content: str) -> Deferred[FileWritten]:
        """Replace a file's content."""

        def run() -> FileWritten:
            rel = self._norm(path)
            node = self._put(root, rel, content.encode("utf-8"))
            return FileWritten("/" + rel, len(node.data), node.modified)

        return _deferred(run)

    def create_directory(self, root: ServerRoot, path: str) -> Deferred[Done]:
        """``mkdir -p``; a file in the way is a conflict."""

        def run() -> Done:
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
            return Done("/" + rel)

        return _deferred(run)

    def delete_file(self, root: ServerRoot, path: str) -> Deferred[Done]:
        """Remove a file or a whole directory; never the root itself."""

        def run() -> Done:
            rel = self._norm(path)
            if rel == "":
                raise PermissionDenied("refusing to delete the server directory itself")
            node = self._node(root, rel)
            tree = self._tree(root)
            if node.is_dir:
                for k in self._descendants(root, rel):
                    del tree[k]
            del tree[rel]
            return Done("/" + rel, "deleted {}".format("/" + rel))

        return _deferred(run)

    def rename_file(
        self, root: ServerRoot, old_path: str, new_path: str
    ) -> Deferred[Renamed]:
        """Move a file or directory; the target must not exist."""

        def run() -> Renamed:
            return Renamed(*self._rename(root, old_path, new_path, "newPath"))

        return _deferred(run)

    def _rename(self, root: ServerRoot, old_path: str, new_path: str,
                field: str) -> tuple[str, str]:
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
            raise InvalidInput("cannot move a directory into itself", field=field)
        moves = [(k, new + k[len(old) :]) for k in [old, *self._descendants(root, old)]]
        for src, dst in moves:
            tree[dst] = tree.pop(src)
        return "/" + old, "/" + new

    def move_file(
        self, root: ServerRoot, source_path: str, destination_path: str
    ) -> Deferred[Copied]:
        """``rename_file`` under the Panel's names."""

        def run() -> Copied:
            old, new = self._rename(root, source_path, destination_path, "destinationPath")
            return Copied(old, new)

        return _deferred(run)

    def copy_file(
        self, root: ServerRoot, source_path: str, destination_path: str
    ) -> Deferred[Copied]:
        """Copy a file or a directory tree to a new path, all or nothing, within the limit."""

        def run() -> Copied:
            src, dst = self._norm(source_path), self._norm(destination_path)
            if src == "":
                raise PermissionDenied("cannot copy the server directory itself")
            if dst == "":
                raise InvalidInput("the destination cannot be the server directory",
                                   field="destinationPath")
            node = self._node(root, src)
            tree = self._tree(root)
            if (dst + "/").startswith(src + "/"):
                raise InvalidInput("cannot copy a directory into itself",
                                   field="destinationPath")
            if dst in tree:
                raise Conflict("{} already exists".format("/" + dst))
            names = [src, *self._descendants(root, src)] if node.is_dir else [src]
            size = sum(len(tree[k].data) for k in names)
            if (root.disk_limit_bytes is not None
                    and self._used(root) + size > root.disk_limit_bytes):
                raise InsufficientResources("copying {} ({} bytes) would exceed the server's"
                                            " disk limit".format("/" + src, size))
            now = self.clock.seconds()
            parts = dst.split("/")[:-1]
            for i in range(1, len(parts) + 1):  # missing parents are made, as the real copy does
                sub = "/".join(parts[:i])
                if sub not in tree:
                    tree[sub] = _Node(True, mode=0o755, modified=now)
                elif not tree[sub].is_dir:
                    raise FileNotFound("{} is not a directory".format("/" + sub))
            for k in names:
                old = tree[k]
                tree[dst + k[len(src):]] = _Node(old.is_dir, old.data, old.mode, now)
            dirs = sum(1 for k in names if tree[k].is_dir)
            return Copied("/" + src, "/" + dst, len(names) - dirs, dirs, 0, size)

        return _deferred(run)

    def get_file_permissions(self, root: ServerRoot, path: str) -> Deferred[FilePermissions]:
        """A path's mode bits and owner."""

        def run() -> FilePermissions:
            rel = self._norm(path)
            node = self._node(root, rel)
            return FilePermissions("/" + rel, node.mode, "container", "container")

        return _deferred(run)

    def download_file(self, root: ServerRoot, path: str) -> Deferred[FileBytes]:
        """A file's bytes as base64."""

        def run() -> FileBytes:
            rel = self._norm(path)
            node = self._node(root, rel)
            if node.is_dir:
                raise InvalidInput("{} is a directory".format("/" + rel), field="path")
            return FileBytes(
                root.server_id,
                "/" + rel,
                base64.b64encode(node.data).decode("ascii"),
                len(node.data),
                node.modified,
            )

        return _deferred(run)

    def upload_file(
        self,
        root: ServerRoot,
        path: str,
        content: str,
        encoding: str = "base64",
        chunk_index: int | None = None,
        total_chunks: int | None = None,
    ) -> Deferred[FileWritten]:
        """
        Store decoded content.  Chunks (``<path>.chunk<N>`` or ``chunk_index``)
        are stored as separate files, as the real manager keeps them until
        they are assembled.
        """

        def run() -> FileWritten:
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
            rel = self._norm(path)
            node = self._put(root, rel, data)
            return FileWritten("/" + rel, len(node.data), node.modified)

        return _deferred(run)

    def get_file_info(self, root: ServerRoot, path: str) -> Deferred[FileInfo]:
        """One entry plus its octal ``mode``."""

        def run() -> FileInfo:
            rel = self._norm(path)
            return FileInfo(self._entry(rel, self._node(root, rel)))

        return _deferred(run)

    def set_file_permissions(
        self, root: ServerRoot, path: str, mode: str
    ) -> Deferred[PermissionsSet]:
        """chmod, refusing setuid/setgid bits."""

        def run() -> PermissionsSet:
            value = int(mode, 8)
            if value & 0o6000:
                raise PermissionDenied("setuid/setgid bits are not allowed")
            rel = self._norm(path)
            node = self._node(root, rel)
            node.mode = value
            return PermissionsSet("/" + rel, value)

        return _deferred(run)

    def create_archive(
        self, root: ServerRoot, files: list, archive_path: str, fmt: str
    ) -> Deferred[ArchiveCreated]:
        """Pack files (directories recursively) into the fake archive format."""

        def run() -> ArchiveCreated:
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
            return ArchiveCreated("/" + self._norm(archive_path), len(node.data), len(members))

        return _deferred(run)

    def extract_archive(
        self, root: ServerRoot, archive_path: str, extract_path: str
    ) -> Deferred[ArchiveExtracted]:
        """Unpack a fake archive below ``extract_path``."""

        def run() -> ArchiveExtracted:
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
            return ArchiveExtracted("/" + self._norm(archive_path), "/" + base, count, 0)

        return _deferred(run)

    def install_mod(self, root: ServerRoot, params: dict) -> Deferred[ModInstalled]:
        """Record a mod; a second install of the same id is a conflict."""

        def run() -> ModInstalled:
            mod_id = str(
                params.get("workshopId") or params.get("modId") or params.get("downloadUrl") or ""
            )
            if not mod_id:
                raise InvalidInput("modId is required", field="modId")
            mods = self.mods.setdefault(root.path, {})
            if mod_id in mods:
                raise Conflict("mod {} is already installed".format(mod_id))
            mod = Mod(
                mod_id,
                params.get("name") or mod_id,
                params.get("version") or "latest",
                params.get("description") or "",
            )
            mods[mod_id] = mod
            return ModInstalled(mod)

        return _deferred(run)

    def uninstall_mod(self, root: ServerRoot, mod_id: str) -> Deferred[ModList]:
        """Forget a mod; unknown ids are NOT_FOUND.  The mods left."""

        def run() -> ModList:
            mods = self.mods.setdefault(root.path, {})
            if mod_id not in mods:
                raise NotFound("mod {} is not installed".format(mod_id))
            del mods[mod_id]
            return ModList(tuple(mods.values()))

        return _deferred(run)

    def list_mods(self, root: ServerRoot) -> Deferred[ModList]:
        """Installed mods."""

        def run() -> ModList:
            return ModList(tuple(self.mods.get(root.path, {}).values()))

        return _deferred(run)
