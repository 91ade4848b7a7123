"""
The file actions: list, search, read, write, copy, move, upload, download
and archive the files of one server, confined to its directory by the file
manager (PROTOCOL.md section 2).

Their fields are checked before the server is resolved (the order the Panel
has always seen); the server's root comes from the server manager.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from ctrlagent.interfaces import IFileManager, IServerManager, ServerRoot

from .payload import Array, Boolean, Choice, Field, Integer, OctalMode, Payload, Text
from .registry import ActionSpec, Call, json_object


def _path(description: str = "path inside the server's directory") -> Text:
    return Text(required=True, description=description)


def _content() -> Text:
    return Text(required=True, allow_empty=True)


def _files(fields: dict[str, Field]) -> Payload:
    return Payload(fields, before_server=True)


def file_actions(files: IFileManager, servers: IServerManager) -> list[ActionSpec]:
    """The file family."""

    def root(call: Call) -> ServerRoot:
        return servers.server_root(call.server)

    async def awaited(result: object) -> object:
        return await cast(Awaitable[object], result)

    def simple(method: str, *names: str) -> Callable[[Call], Coroutine[Any, Any, object]]:
        """A handler passing the parsed ``names`` to ``files.<method>(root, ...)``."""

        async def handler(call: Call) -> object:
            args = [call.params[name] for name in names]
            return await awaited(getattr(files, method)(root(call), *args))

        return handler

    async def list_files(call: Call) -> object:
        p = call.params
        data = json_object(
            await awaited(files.list_files(root(call), p["path"], limit=p["limit"],
                                           offset=p["offset"]))
        )
        data.setdefault("files", [])
        return data

    async def search_files(call: Call) -> object:
        p = call.params
        data = json_object(
            await awaited(files.search_files(root(call), p["path"], p["query"], p["fileType"]))
        )
        data.setdefault("files", [])
        return data

    async def upload(call: Call) -> object:
        p = call.params
        # Chunked uploads may name their piece explicitly instead of by
        # ``<path>.chunk<N>``; only pass what was sent, so the plain call
        # matches IFileManager exactly.
        chunks: dict[str, Any] = {}
        if p["chunkIndex"] is not None:
            chunks["chunk_index"] = p["chunkIndex"]
        if p["totalChunks"] is not None:
            chunks["total_chunks"] = p["totalChunks"]
        return await awaited(
            files.upload_file(root(call), p["path"], p["content"], p["encoding"], **chunks)
        )

    async def read_file(call: Call) -> object:
        p = call.params
        if p["lossy"] or p["encoding"] == "lossy":
            return await awaited(files.read_file(root(call), p["path"], lossy=True))
        return await awaited(files.read_file(root(call), p["path"]))

    path = _files({"path": _path()})
    moved = _files({
        "sourcePath": _path("the file or directory, inside the server's directory"),
        "destinationPath": _path("where it goes; must not exist (missing parents are made)"),
    })
    return [
        ActionSpec(
            "list_files", "files", "A directory's entries",
            _files({
                "path": Text(default="/"),
                "limit": Integer(minimum=1, description="at most this many entries"),
                "offset": Integer(default=0, minimum=0),
            }),
            list_files,
        ),
        ActionSpec(
            "search_files", "files", "Files whose name holds the query",
            _files({
                "path": Text(default="/"),
                "query": Text(required=True),
                "fileType": Choice("file", "directory", "all", default="all"),
            }),
            search_files,
        ),
        ActionSpec(
            "read_file", "files",
            "A text file's content (a file that is not UTF-8 is NOT_TEXT unless lossy)",
            _files({
                "path": _path(),
                "lossy": Boolean(description="replace bytes that are not UTF-8 with U+FFFD"
                                             " instead of refusing the file (NOT_TEXT)"),
                "encoding": Choice("utf8", "lossy", default="utf8",
                                   aliases={"utf-8": "utf8"},
                                   description="lossy: the same as lossy: true"),
            }),
            read_file,
        ),
        ActionSpec(
            "write_file", "files", "Write a text file (atomically)",
            _files({"path": _path(), "content": _content()}),
            simple("write_file", "path", "content"), message="file written",
            ),
        ActionSpec(
            "create_directory", "files", "Create a directory (and its parents)", path,
            simple("create_directory", "path"), message="directory created",
        ),
        ActionSpec(
            "delete_file", "files", "Delete a file or a directory", path,
            simple("delete_file", "path"), message="deleted",
        ),
        ActionSpec(
            "rename_file", "files", "Move or rename a file or directory",
            _files({"oldPath": _path(), "newPath": _path()}),
            simple("rename_file", "oldPath", "newPath"), message="renamed",
        ),
        ActionSpec(
            "copy_file", "files",
            "Copy a file or directory tree (symlinks as links), all or nothing, within the"
            " disk limit",
            moved, simple("copy_file", "sourcePath", "destinationPath"), message="copied",
        ),
        ActionSpec(
            "move_file", "files", "Move or rename a file or directory",
            moved, simple("move_file", "sourcePath", "destinationPath"), message="moved",
        ),
        ActionSpec(
            "get_file_permissions", "files", "A path's permission bits, owner and group", path,
            simple("get_file_permissions", "path"),
        ),
        ActionSpec(
            "download_file", "files", "A file's bytes, base64", path,
            simple("download_file", "path"),
        ),
        ActionSpec(
            "upload_file", "files", "Write a file (base64 or UTF-8), whole or in chunks",
            _files({
                "path": _path(),
                "content": _content(),
                "encoding": Choice("base64", "utf8", default="base64",
                                   aliases={"utf-8": "utf8"}),
                "chunkIndex": Integer(minimum=0),
                "totalChunks": Integer(minimum=1),
            }),
            upload, message="uploaded",
        ),
        ActionSpec(
            "get_file_info", "files", "A file's type, size, times, mode and owner", path,
            simple("get_file_info", "path"),
        ),
        ActionSpec(
            "set_file_permissions", "files", "Change a file's mode (never setuid/setgid)",
            _files({"path": _path(), "mode": OctalMode()}),
            simple("set_file_permissions", "path", "mode"), message="permissions set",
        ),
        ActionSpec(
            "create_archive", "files", "Pack files into a zip or tar archive",
            _files({
                "files": Array(_path(), non_empty=True),
                "archivePath": _path(),
                "format": Choice("zip", "tar", "tar.gz", default="tar.gz"),
            }),
            simple("create_archive", "files", "archivePath", "format"),
            message="archive created",
        ),
        ActionSpec(
            "extract_archive", "files", "Unpack an archive into a directory",
            _files({"archivePath": _path(), "extractPath": Text(default="/")}),
            simple("extract_archive", "archivePath", "extractPath"),
            message="archive extracted",
        ),
    ]
