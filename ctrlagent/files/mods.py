"""
Mods: files in a server's mods folder, recorded in a manifest.

A mod is fetched from a download URL (through ``fetch.SafeFetcher``) or
copied from a file already uploaded into the server directory, into
``<root>/<mods_dir>/<file name>``, and recorded in
``<root>/<mods_dir>/.ctrlagent-mods.json`` (written atomically).  This module
holds the pure payload parsing and the blocking manifest operations; the
orchestration (locking, download, thread pool) is ``FileManager``'s.

Accepted ``install_mod`` payloads: the Panel's
``{type:"steam_workshop", workshopId, name, downloadUrl}``, the Go agent's
``{modId, modUrl?, version?}``, and ``{modId?, path}`` for an uploaded file.
Optional ``fileName``, ``version``, ``description``.  A Steam Workshop mod
whose ``downloadUrl`` is ``steam://workshop/download/<id>`` (the only form the
Panel produces) or empty is downloaded with steamcmd (``files.workshop``,
``servers.workshop``), for the app ``appId`` of the payload or
``workshop.app_id``; one with an http(s) ``downloadUrl`` is fetched like any
URL.  A workshop item is a folder: ``<mods_dir>/<workshopId>`` (or
``fileName``), recorded with ``folder: true``.

The manifest lives in the server's directory, so the game server can write
it: it is input from the internet like any payload.  Every entry read back is
validated (``read_manifest``): types, an id of ``_ID_RE``, a ``fileName``
that is one plain name (``paths.safe_file_name``), bounded texts, no
duplicate ids or file names; the manifest itself must be a regular file of at
most ``MAX_MANIFEST_BYTES`` and ``MAX_MODS`` entries.  What fails is ignored
and reported (``Manifest.problems``), never acted on.  The manifest and every
mod file are read, written and removed relative to a directory fd of the mods
folder, never through a link, and a removal only ever unlinks one plain
name in that folder (``remove_file``): never a directory, never a path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from ctrlagent.errors import InvalidInput
from ctrlagent.files import fsops, trees
from ctrlagent.files.confined import Confined, os_error
from ctrlagent.files.paths import Components, normalise, safe_file_name
from ctrlagent.files.urls import MAX_URL_CHARS, check_url
from ctrlagent.wire.files import Mod, iso_ms

MANIFEST = ".ctrlagent-mods.json"
_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Entries beyond this are ignored: no real server has that many mods, and it
# bounds the work a forged manifest causes on every mod action.
MAX_MODS = 5000
# Longest text of each field, in characters (from a payload or a manifest).
TEXT_LIMITS = {
    "name": 256,
    "version": 128,
    "description": 4096,
    "source": MAX_URL_CHARS,
    "type": 64,
    "installedAt": 64,
}
MAX_MOD_BYTES = 2**53
_URL_KEYS = ("downloadUrl", "modUrl", "url")
# A Steam published file id and an app id: unsigned decimal numbers.
_STEAM_ID_RE = re.compile(r"[0-9]{1,20}")
STEAM_ITEM_MAX = 2**64 - 1
STEAM_APP_MAX = 2**32 - 1
STEAM_URL_PREFIX = "steam://workshop/download/"


@dataclass(frozen=True)
class ModRequest:
    """A parsed ``install_mod`` payload."""

    mod_id: str
    name: str
    version: str
    description: str
    file_name: str
    url: str | None
    source: Components | None
    kind: str
    # A Steam Workshop item for steamcmd: (app id or None for the node's default, item id).
    workshop: tuple[int | None, str] | None = None


def _valid_text(value: str) -> bool:
    """True if ``value`` is real Unicode (no lone surrogate), so it can be encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(params: dict[str, Any], *keys: str, limit: int = 4096) -> str:
    for key in keys:
        value = params.get(key)
        if value is not None and value != "":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise InvalidInput("{} must be a string".format(key), field=key)
            if isinstance(value, int):
                if abs(value) >= 10**128:
                    raise InvalidInput("{} is too large".format(key), field=key)
                return str(value)
            if not _valid_text(value):
                raise InvalidInput("{} is not valid text".format(key), field=key)
            if len(value) > limit:
                raise InvalidInput("{} is longer than {} characters".format(key, limit),
                                   field=key)
            return value
    return ""


def _steam_number(value: str, field: str, what: str, high: int) -> int:
    if not _STEAM_ID_RE.fullmatch(value) or not 0 < int(value) <= high:
        raise InvalidInput("{} must be {}".format(field, what), field=field)
    return int(value)


def _parse_workshop(params: dict[str, Any], url: str | None) -> ModRequest | None:
    """
    The steamcmd request of a Steam Workshop payload, or None when the mod
    comes from an http(s) URL or an upload like any other.
    """
    if _text(params, "type", limit=TEXT_LIMITS["type"]) != "steam_workshop":
        return None
    if _text(params, "path", "filePath", "uploadedFile"):
        return None
    if url is not None and not url.lower().startswith("steam:"):
        return None
    sent = next((k for k in ("workshopId", "modId", "id") if params.get(k) not in (None, "")),
                None)
    in_url = url[len(STEAM_URL_PREFIX):].rstrip("/") if url is not None else None
    if url is not None and (not url.startswith(STEAM_URL_PREFIX)
                            or not _STEAM_ID_RE.fullmatch(in_url or "")):
        raise InvalidInput("downloadUrl must be {}<workshopId>".format(STEAM_URL_PREFIX),
                           field="downloadUrl")
    if sent is None:
        if in_url is None:
            raise InvalidInput("a Steam Workshop mod needs workshopId", field="workshopId")
        item, sent = in_url, "downloadUrl"
    else:
        item = _text(params, sent)
    number = _steam_number(item, sent, "a Steam Workshop item id (digits)", STEAM_ITEM_MAX)
    item = str(number)
    if in_url is not None and int(in_url) != number:
        raise InvalidInput("downloadUrl must be {}{} for this item".format(
            STEAM_URL_PREFIX, item), field="downloadUrl")
    app = _text(params, "appId", "appid", limit=32)
    app_id = _steam_number(app, "appId", "a Steam app id (digits)", STEAM_APP_MAX) if app else None
    file_name = _text(params, "fileName", "filename") or item
    if not _valid_text(file_name) or safe_file_name(file_name) != file_name:
        raise InvalidInput("fileName is not a plain file name", field="fileName")
    return ModRequest(
        mod_id=item,
        name=_text(params, "name", limit=TEXT_LIMITS["name"]) or item,
        version=_text(params, "version", limit=TEXT_LIMITS["version"]),
        description=_text(params, "description", limit=TEXT_LIMITS["description"]),
        file_name=file_name,
        url=None,
        source=None,
        kind="steam_workshop",
        workshop=(app_id, item),
    )


def parse_install(params: dict[str, Any]) -> ModRequest:
    """Validate an ``install_mod`` payload (pure)."""
    url = _text(params, *_URL_KEYS, limit=MAX_URL_CHARS) or None
    steam = _parse_workshop(params, url)
    if steam is not None:
        return steam
    source_path = _text(params, "path", "filePath", "uploadedFile")
    source = normalise(source_path, field="path") if source_path else None
    kind = _text(params, "type", limit=TEXT_LIMITS["type"]) or ("upload" if source else "url")
    if url is None and source is None:
        raise InvalidInput("install_mod needs downloadUrl (or modUrl) or path", field="downloadUrl")
    if url is not None and source is not None:
        raise InvalidInput("give either downloadUrl or path, not both", field="path")
    if url is not None:
        # Named as the Panel sent it (downloadUrl, or the Go agent's modUrl).
        sent = next((k for k in _URL_KEYS if params.get(k) not in (None, "")), _URL_KEYS[0])
        check_url(url, field=sent)
    file_name = _text(params, "fileName", "filename")
    if not file_name:
        if source is not None:
            file_name = source[-1] if source else ""
        elif url is not None:
            file_name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    mod_id = _text(params, "workshopId", "modId", "id")
    if not mod_id:
        mod_id = file_name
    if not _ID_RE.fullmatch(mod_id):
        raise InvalidInput("modId must be 1-128 letters, digits, '.', '_', ':' or '-'",
                           field="modId")
    checked = safe_file_name(file_name) if _valid_text(file_name) else None
    if checked is None:
        if _text(params, "fileName", "filename"):
            raise InvalidInput("fileName is not a plain file name", field="fileName")
        checked = "mod-" + mod_id.replace(":", "_")
    return ModRequest(
        mod_id=mod_id,
        name=_text(params, "name", limit=TEXT_LIMITS["name"]) or mod_id,
        version=_text(params, "version", limit=TEXT_LIMITS["version"]),
        description=_text(params, "description", limit=TEXT_LIMITS["description"]),
        file_name=checked,
        url=url,
        source=source,
        kind=kind,
    )


# -- the manifest ---------------------------------------------------------------

@dataclass
class Manifest:
    """The valid entries of a manifest, and why anything else was ignored."""

    mods: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_entry(raw: object) -> dict[str, Any]:
    """
    A manifest entry in our own shape, or ``ValueError`` saying why it
    cannot be trusted.  Only known fields are kept.
    """
    if not isinstance(raw, dict):
        raise ValueError("an entry is not an object")
    mod_id = raw.get("id")
    if not isinstance(mod_id, str) or not _ID_RE.fullmatch(mod_id):
        raise ValueError("id {} is not a mod id".format(_short(mod_id)))
    out: dict[str, Any] = {"id": mod_id}
    if "fileName" in raw and raw["fileName"] is not None:
        name = raw["fileName"]
        if (not isinstance(name, str) or not _valid_text(name)
                or safe_file_name(name) != name):
            raise ValueError("mod {}: fileName {} is not a plain file name".format(
                mod_id, _short(name)))
        out["fileName"] = name
    for key, limit in TEXT_LIMITS.items():
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        if not isinstance(value, str) or not _valid_text(value) or len(value) > limit:
            raise ValueError("mod {}: {} is not a text of at most {} characters".format(
                mod_id, key, limit))
        out[key] = value
    for flag in ("enabled", "folder"):
        if flag in raw:
            if not isinstance(raw[flag], bool):
                raise ValueError("mod {}: {} is not true or false".format(mod_id, flag))
            out[flag] = raw[flag]
    if "size" in raw:
        size = raw["size"]
        if (not isinstance(size, int) or isinstance(size, bool)
                or not 0 <= size <= MAX_MOD_BYTES):
            raise ValueError("mod {}: size is not a byte count".format(mod_id))
        out["size"] = size
    return out


def parse_manifest(data: bytes) -> Manifest:
    """Validate a manifest's bytes (pure); see the module docstring."""
    out = Manifest()
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        # Broken (or nested beyond the parser): the mods must stay manageable.
        out.problems.append("the manifest is not valid JSON: ignored")
        return out
    if not isinstance(doc, dict) or not isinstance(doc.get("mods"), list):
        out.problems.append("the manifest has no list of mods: ignored")
        return out
    entries = doc["mods"]
    if len(entries) > MAX_MODS:
        out.problems.append("{} entries beyond the first {} ignored".format(
            len(entries) - MAX_MODS, MAX_MODS))
        entries = entries[:MAX_MODS]
    ids: set[str] = set()
    names: set[str] = set()
    for raw in entries:
        try:
            mod = validate_entry(raw)
        except ValueError as e:
            out.problems.append(str(e))
            continue
        if mod["id"] in ids:
            out.problems.append("mod {}: a second entry for it ignored".format(mod["id"]))
            continue
        name = mod.get("fileName")
        if name is not None and name in names:
            out.problems.append("mod {}: fileName {} already belongs to another mod".format(
                mod["id"], _short(name)))
            continue
        ids.add(mod["id"])
        if name is not None:
            names.add(name)
        out.mods.append(mod)
    return out


def open_folder(c: Confined, mods_dir: Components) -> int | None:
    """
    A directory fd of the mods folder (the caller closes it), or None when
    there is none yet; resolved confined like any Panel path: a link inside
    the server directory is followed, one out of it refused.
    """
    try:
        return c.open(mods_dir, os.O_RDONLY | os.O_DIRECTORY)
    except fsops.FileNotFound:
        return None


def read_manifest_at(dir_fd: int) -> Manifest:
    """The validated manifest of the mods folder ``dir_fd``; absent means empty."""
    try:
        fd = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return Manifest()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Manifest(problems=["the manifest is a symlink: ignored"])
        return Manifest(problems=["the manifest cannot be opened ({}): ignored".format(
            e.strerror)])
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Manifest(problems=["the manifest is not a regular file: ignored"])
        if st.st_size > MAX_MANIFEST_BYTES:
            return Manifest(problems=["the manifest is larger than {} bytes: ignored".format(
                MAX_MANIFEST_BYTES)])
        parts: list[bytes] = []
        got = 0
        while got <= MAX_MANIFEST_BYTES:
            chunk = os.read(fd, MAX_MANIFEST_BYTES + 1 - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        if got > MAX_MANIFEST_BYTES:
            return Manifest(problems=["the manifest is larger than {} bytes: ignored".format(
                MAX_MANIFEST_BYTES)])
    finally:
        os.close(fd)
    return parse_manifest(data)


def read_manifest(c: Confined, mods_dir: Components) -> Manifest:
    """The validated manifest of the server's mods folder; a missing folder means empty."""
    dir_fd = open_folder(c, mods_dir)
    if dir_fd is None:
        return Manifest()
    try:
        return read_manifest_at(dir_fd)
    finally:
        os.close(dir_fd)


def write_manifest(c: Confined, dir_fd: int, mods: list[dict[str, Any]]) -> None:
    """
    Replace the manifest of the mods folder ``dir_fd`` atomically (quota-free:
    it is tiny and ours).  A link planted in its place is replaced, never
    written through.
    """
    data = json.dumps({"version": 1, "mods": mods}, indent=2, sort_keys=True).encode()
    tmp = fsops.TMP_PREFIX + secrets.token_hex(8)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            c.own(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, MANIFEST, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise os_error(e, "the mods manifest") from None


def remove_mod(dir_fd: int, mod: dict[str, Any]) -> int:
    """
    Remove what a (validated) manifest entry names: its file, or for a
    folder mod (a Steam Workshop item) its one plain-named folder of the mods
    folder and everything beneath it (``trees.remove_tree``: by directory fd,
    never following a link).  Returns the bytes freed.
    """
    name = mod.get("fileName")
    if not isinstance(name, str) or safe_file_name(name) != name:
        return 0
    if not mod.get("folder"):
        return remove_file(dir_fd, name)
    try:
        return trees.remove_tree(dir_fd, name)
    except OSError as e:
        raise os_error(e, name) from None


def remove_file(dir_fd: int, name: str) -> int:
    """
    Remove a mod's file: the one plain name ``name`` of the mods folder
    ``dir_fd`` (a link itself, never its target; never a directory).  Returns
    the bytes freed; 0 when there was nothing to remove.
    """
    if not isinstance(name, str) or safe_file_name(name) != name:
        return 0  # read_manifest lets no such name through; never act on one
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            return 0  # a mod is a file: a directory there is not the mod
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise os_error(e, name) from None
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def record(req: ModRequest, size: int) -> dict[str, Any]:
    """The manifest entry for an installed mod."""
    if req.workshop is not None:
        entry = record(replace(req, workshop=None, url=STEAM_URL_PREFIX + req.workshop[1]), size)
        entry["folder"] = True
        return entry
    return {
        "id": req.mod_id,
        "name": req.name,
        "version": req.version,
        "description": req.description,
        "enabled": True,
        "fileName": req.file_name,
        "size": size,
        "source": req.url if req.url is not None else "upload",
        "type": req.kind,
        "installedAt": iso_ms(datetime.now(UTC).timestamp()),
    }


def public(mod: dict[str, Any]) -> Mod:
    """
    A (validated) manifest entry as the Panel lists it: a missing name is the
    mod's id, a missing version or description empty, a mod enabled unless
    recorded otherwise.
    """
    return Mod(mod["id"], mod.get("name", mod["id"]), mod.get("version", ""),
               mod.get("description", ""), mod.get("enabled", True), mod.get("fileName"),
               mod.get("size"), mod.get("source"), mod.get("type"), mod.get("installedAt"))


def copy_into(c: Confined, source: Components, target: Components,
              quota: fsops.Quota) -> int:
    """Copy an uploaded file into the mods folder; returns its size."""
    fd = c.open(source, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInput("path is not a regular file", field="path")

        def chunks() -> Any:
            while True:
                data = os.read(fd, fsops.COPY_CHUNK * 4)
                if not data:
                    return
                yield data

        return fsops.write_atomic(c, target, chunks(), quota).st_size
    finally:
        os.close(fd)

