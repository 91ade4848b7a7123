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
without a ``downloadUrl`` is refused: this agent does not run steamcmd.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from ctrlagent.errors import InvalidInput
from ctrlagent.files import fsops
from ctrlagent.files.confined import Confined
from ctrlagent.files.paths import Components, normalise, safe_file_name

MANIFEST = ".ctrlagent-mods.json"
_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


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


def _text(params: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = params.get(key)
        if value is not None and value != "":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise InvalidInput("{} must be a string".format(key), field=key)
            return str(value)
    return ""


def parse_install(params: dict[str, Any]) -> ModRequest:
    """Validate an ``install_mod`` payload (pure)."""
    url = _text(params, "downloadUrl", "modUrl", "url") or None
    source_path = _text(params, "path", "filePath", "uploadedFile")
    source = normalise(source_path, field="path") if source_path else None
    kind = _text(params, "type") or ("upload" if source else "url")
    if url is None and source is None:
        if kind == "steam_workshop":
            raise InvalidInput("a Steam Workshop mod needs a downloadUrl (steamcmd is not run)",
                               field="downloadUrl")
        raise InvalidInput("install_mod needs downloadUrl (or modUrl) or path", field="downloadUrl")
    if url is not None and source is not None:
        raise InvalidInput("give either downloadUrl or path, not both", field="path")
    if url is not None:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidInput("download URL must be http:// or https://", field="downloadUrl")
    file_name = _text(params, "fileName", "filename")
    if not file_name:
        if source is not None:
            file_name = source[-1] if source else ""
        elif url is not None:
            file_name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    mod_id = _text(params, "workshopId", "modId", "id") or file_name
    if not _ID_RE.fullmatch(mod_id):
        raise InvalidInput("modId must be 1-128 letters, digits, '.', '_', ':' or '-'",
                           field="modId")
    checked = safe_file_name(file_name)
    if checked is None:
        if _text(params, "fileName", "filename"):
            raise InvalidInput("fileName is not a plain file name", field="fileName")
        checked = "mod-" + mod_id.replace(":", "_")
    return ModRequest(
        mod_id=mod_id,
        name=_text(params, "name") or mod_id,
        version=_text(params, "version"),
        description=_text(params, "description"),
        file_name=checked,
        url=url,
        source=source,
        kind=kind,
    )


def read_manifest(c: Confined, mods_dir: Components) -> list[dict[str, Any]]:
    """The recorded mods; an absent manifest is an empty list."""
    try:
        data, _ = fsops.read_bytes(c, mods_dir + (MANIFEST,), MAX_MANIFEST_BYTES)
    except fsops.FileNotFound:
        return []
    try:
        mods = json.loads(data)
    except ValueError:
        # A hand-edited, broken manifest must not make the mods unmanageable.
        return []
    if not isinstance(mods, dict) or not isinstance(mods.get("mods"), list):
        return []
    return [m for m in mods["mods"] if isinstance(m, dict) and isinstance(m.get("id"), str)]


def write_manifest(c: Confined, mods_dir: Components, mods: list[dict[str, Any]]) -> None:
    """Replace the manifest atomically (quota-free: it is tiny and ours)."""
    data = json.dumps({"version": 1, "mods": mods}, indent=2, sort_keys=True).encode()
    fsops.write_atomic(c, mods_dir + (MANIFEST,), [data], fsops.Quota(None))


def record(req: ModRequest, size: int) -> dict[str, Any]:
    """The manifest entry for an installed mod."""
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
        "installedAt": fsops.iso(datetime.now(UTC).timestamp()),
    }


def public(mod: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry in the Panel's ``list_mods`` shape (extras kept)."""
    out = dict(mod)
    for key, default in (("name", mod.get("id", "")), ("version", ""), ("description", ""),
                         ("enabled", True)):
        out.setdefault(key, default)
    return out


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
