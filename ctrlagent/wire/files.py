"""
The results of the file and mod actions, and their shapes on the wire.

``FileManager`` (and ``testing.files.FakeFileManager``) return these frozen
records; beside each one its shape is registered with
:func:`ctrlagent.wire.json.to_json`, giving exactly the ``data`` keys of
PROTOCOL.md section 2: ``modified`` and ``lastModified`` as JavaScript
``toISOString`` text, ``permissions`` as three octal digits, ``mode`` as four,
``extension`` for files whose name has one, ``count`` beside a list of mods.

Records hold plain facts (seconds since the epoch, permission bits, flags);
the wire's spelling of them lives only here.  A listing of 10,000 entries is
shaped with one dict per entry and no recursive walk, so that records cost
the Panel's answer nothing over the dicts they replace (``bench/files.py``).
Pure: no reactor, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctrlagent.wire.json import to_json
from ctrlagent.wire.time import iso_ms

# -- timestamps: ``wire.time.iso_ms`` (re-exported for the file modules) ------

_PERMISSIONS = ["{:03o}".format(m) for m in range(0o1000)]


def permissions(mode: int) -> str:
    """The ``rwx`` bits of ``mode`` as three octal digits (``"644"``)."""
    return _PERMISSIONS[mode & 0o777]


def octal_mode(mode: int) -> str:
    """Permission bits, setuid/setgid/sticky included, as four octal digits (``"0644"``)."""
    return "{:04o}".format(mode & 0o7777)


# -- entries --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileEntry:
    """
    One file or directory as listings, searches and ``get_file_info`` show it.

    ``kind`` is ``"file"`` or ``"directory"``; ``size`` is 0 for a directory;
    ``modified`` is seconds since the epoch; ``mode`` the permission bits
    (``S_IMODE``); ``owner``/``group`` names (numbers when the host has no
    such user); ``path`` the entry's display path.  A symlink carries
    ``symlink``; one whose target is not inside the server directory is
    ``broken`` (and described by the link's own metadata, as a file).
    """

    name: str
    kind: str
    size: int
    modified: float
    mode: int
    owner: str
    group: str
    path: str
    symlink: bool = False
    broken: bool = False


def _entry(e: FileEntry) -> dict[str, Any]:
    """The keys every entry shape starts with, in the Panel's order."""
    modified = iso_ms(e.modified)
    out: dict[str, Any] = {
        "name": e.name,
        "type": e.kind,
        "size": e.size,
        "modified": modified,
        "lastModified": modified,
        "permissions": _PERMISSIONS[e.mode & 0o777],
        "owner": e.owner,
        "group": e.group,
        "path": e.path,
    }
    if e.kind != "directory":
        dot = e.name.rfind(".")
        if dot > 0:
            out["extension"] = e.name[dot + 1:].lower()
    return out


def _listed(e: FileEntry) -> dict[str, Any]:
    out = _entry(e)
    if e.broken:
        out["broken"] = True
    if e.symlink:
        out["symlink"] = True
    return out


@to_json.register
def _file_entry(e: FileEntry) -> dict[str, Any]:
    """
    ``{name, type, size, modified, lastModified, permissions, owner, group,
    path, extension?, broken?, symlink?}``.
    """
    return _listed(e)


@dataclass(frozen=True, slots=True)
class FileListing:
    """A page of a directory (``list_files``): ``total`` names, ``truncated`` if more follow."""

    server_id: str
    path: str
    files: tuple[FileEntry, ...]
    total: int
    offset: int
    limit: int
    truncated: bool


@to_json.register
def _file_listing(r: FileListing) -> dict[str, Any]:
    return {"serverId": r.server_id, "path": r.path, "files": [_listed(e) for e in r.files],
            "total": r.total, "offset": r.offset, "limit": r.limit, "truncated": r.truncated}


@dataclass(frozen=True, slots=True)
class FileSearch:
    """Entries under ``path`` whose name contains ``query`` (``search_files``)."""

    server_id: str
    path: str
    query: str
    files: tuple[FileEntry, ...]
    truncated: bool


@to_json.register
def _file_search(r: FileSearch) -> dict[str, Any]:
    return {"serverId": r.server_id, "path": r.path, "query": r.query,
            "files": [_listed(e) for e in r.files], "truncated": r.truncated}


@dataclass(frozen=True, slots=True)
class FileInfo:
    """``get_file_info``: one entry, with its mode in four octal digits."""

    entry: FileEntry


@to_json.register
def _file_info(r: FileInfo) -> dict[str, Any]:
    e = r.entry
    out = _entry(e)
    if e.symlink:
        out["symlink"] = True
    if e.broken:
        out["broken"] = True
    out["mode"] = octal_mode(e.mode)
    return out


# -- contents -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileText:
    """
    A file read as UTF-8 text (``read_file``); ``lossy`` when invalid bytes
    were replaced (only ever when the caller asked for lossy text: a file that
    is not UTF-8 is otherwise refused with ``NOT_TEXT``).  ``size`` counts
    bytes on disk.
    """

    server_id: str
    path: str
    content: str
    size: int
    modified: float
    lossy: bool = False


@to_json.register
def _file_text(r: FileText) -> dict[str, Any]:
    out: dict[str, Any] = {"serverId": r.server_id, "path": r.path, "content": r.content,
                           "size": r.size, "modified": iso_ms(r.modified), "encoding": "utf8"}
    if r.lossy:
        out["lossy"] = True
    return out


@dataclass(frozen=True, slots=True)
class FileBytes:
    """
    A file's bytes (``download_file``).  ``content`` is already base64 text:
    encoding a big file is work for the thread that read it, not for the
    reactor that sends the answer.
    """

    server_id: str
    path: str
    content: str
    size: int
    modified: float


@to_json.register
def _file_bytes(r: FileBytes) -> dict[str, Any]:
    return {"serverId": r.server_id, "path": r.path, "content": r.content,
            "encoding": "base64", "size": r.size, "modified": iso_ms(r.modified)}


@dataclass(frozen=True, slots=True)
class FileWritten:
    """
    A file stored by ``write_file`` or ``upload_file``.

    A plain write has ``modified``.  A chunk of a chunked upload has
    ``chunk`` (its index) and ``assembled``; when it completed the upload,
    ``target`` and ``target_size`` name the assembled file.  An assembly
    triggered by an empty upload of the target has ``modified``,
    ``assembled`` and ``chunks`` (how many were joined).
    """

    path: str
    size: int
    modified: float | None = None
    chunk: int | None = None
    assembled: bool | None = None
    chunks: int | None = None
    target: str | None = None
    target_size: int | None = None


@to_json.register
def _file_written(r: FileWritten) -> dict[str, Any]:
    out: dict[str, Any] = {"path": r.path, "size": r.size}
    if r.modified is not None:
        out["modified"] = iso_ms(r.modified)
    if r.chunk is not None:
        out["chunk"] = r.chunk
    if r.assembled is not None:
        out["assembled"] = r.assembled
    if r.chunks is not None:
        out["chunks"] = r.chunks
    if r.target is not None:
        out["target"] = r.target
    if r.target_size is not None:
        out["targetSize"] = r.target_size
    return out


# -- changes without a body -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    """
    ``create_directory`` (``{path}``) and ``delete_file`` (``{message, path}``):
    the path acted on, and what was done when there is something to say.
    """

    path: str
    message: str | None = None


@to_json.register
def _done(r: Done) -> dict[str, Any]:
    if r.message is None:
        return {"path": r.path}
    return {"message": r.message, "path": r.path}


@dataclass(frozen=True, slots=True)
class Renamed:
    """``rename_file``: where the file was and where it is now."""

    old_path: str
    new_path: str


@to_json.register
def _renamed(r: Renamed) -> dict[str, Any]:
    return {"oldPath": r.old_path, "newPath": r.new_path}


@dataclass(frozen=True, slots=True)
class PermissionsSet:
    """``set_file_permissions``: the path and the mode bits now set."""

    path: str
    mode: int


@to_json.register
def _permissions_set(r: PermissionsSet) -> dict[str, Any]:
    return {"path": r.path, "mode": octal_mode(r.mode)}


@dataclass(frozen=True, slots=True)
class FilePermissions:
    """
    ``get_file_permissions``: the permission bits of one path, and who owns
    it (names, or numeric ids when the host has no such user or group).
    """

    path: str
    mode: int
    owner: str
    group: str


@to_json.register
def _file_permissions(r: FilePermissions) -> dict[str, Any]:
    return {"path": r.path, "permissions": permissions(r.mode), "mode": octal_mode(r.mode),
            "owner": r.owner, "group": r.group}


@dataclass(frozen=True, slots=True)
class Copied:
    """
    ``copy_file`` and ``move_file``: where from, where to; a copy also says
    what it made (files, directories and symlinks, and the bytes written).
    """

    source_path: str
    destination_path: str
    files: int | None = None
    directories: int | None = None
    symlinks: int | None = None
    size: int | None = None


@to_json.register
def _copied(r: Copied) -> dict[str, Any]:
    out: dict[str, Any] = {"sourcePath": r.source_path, "destinationPath": r.destination_path}
    if r.files is not None:
        out.update(files=r.files, directories=r.directories, symlinks=r.symlinks, size=r.size)
    return out


# -- archives -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchiveCreated:
    """``create_archive``: the archive, its size in bytes and how many files it holds."""

    archive_path: str
    size: int
    files: int


@to_json.register
def _archive_created(r: ArchiveCreated) -> dict[str, Any]:
    return {"archivePath": r.archive_path, "size": r.size, "files": r.files}


@dataclass(frozen=True, slots=True)
class ArchiveExtracted:
    """
    ``extract_archive``: members ``extracted``, and ``skipped`` (links and
    special files, never created).
    """

    archive_path: str
    extract_path: str
    extracted: int
    skipped: int


@to_json.register
def _archive_extracted(r: ArchiveExtracted) -> dict[str, Any]:
    return {"archivePath": r.archive_path, "extractPath": r.extract_path,
            "extracted": r.extracted, "skipped": r.skipped}


# -- mods -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mod:
    """
    An installed mod as the Panel lists it.  The optional facts (file name,
    size, source URL or ``"upload"``, type, install time as recorded) are
    left out of the shape when unknown.
    """

    mod_id: str
    name: str
    version: str = ""
    description: str = ""
    enabled: bool = True
    file_name: str | None = None
    size: int | None = None
    source: str | None = None
    kind: str | None = None
    installed_at: str | None = None


@to_json.register
def _mod(m: Mod) -> dict[str, Any]:
    """
    ``{id, fileName?, name, version, description, source?, type?,
    installedAt?, enabled, size?}``.
    """
    out: dict[str, Any] = {"id": m.mod_id}
    if m.file_name is not None:
        out["fileName"] = m.file_name
    out["name"] = m.name
    out["version"] = m.version
    out["description"] = m.description
    if m.source is not None:
        out["source"] = m.source
    if m.kind is not None:
        out["type"] = m.kind
    if m.installed_at is not None:
        out["installedAt"] = m.installed_at
    out["enabled"] = m.enabled
    if m.size is not None:
        out["size"] = m.size
    return out


@dataclass(frozen=True, slots=True)
class ModInstalled:
    """``install_mod``: the mod as now recorded."""

    mod: Mod


@to_json.register
def _mod_installed(r: ModInstalled) -> dict[str, Any]:
    """
    ``{"mod": {id, name, version, description, enabled, fileName?, size?,
    source?, type?, installedAt?}}``: the keys in the order the install
    records them (a listing reads them back in the manifest's order).
    """
    m = r.mod
    out: dict[str, Any] = {"id": m.mod_id, "name": m.name, "version": m.version,
                           "description": m.description, "enabled": m.enabled}
    for key, value in (("fileName", m.file_name), ("size", m.size), ("source", m.source),
                       ("type", m.kind), ("installedAt", m.installed_at)):
        if value is not None:
            out[key] = value
    return {"mod": out}


@dataclass(frozen=True, slots=True)
class ModList:
    """
    The mods of a server (``list_mods``, and ``uninstall_mod``: those left),
    so the Panel refreshes its list from either answer.
    """

    mods: tuple[Mod, ...]

    @property
    def count(self) -> int:
        """How many mods there are."""
        return len(self.mods)


@to_json.register
def _mod_list(r: ModList) -> dict[str, Any]:
    return {"mods": [_mod(m) for m in r.mods], "count": len(r.mods)}
