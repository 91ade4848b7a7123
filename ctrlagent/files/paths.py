"""
Pure rules for turning a Panel path into components beneath a server root.

This module does no I/O and imports no reactor; ``confined`` walks the
components it produces.  The rules:

- A path is relative to the server's data directory; a leading ``/`` means
  that directory's root, and ``""`` is the root too.
- Doubled separators collapse (``a//b`` is ``a/b``) and ``.`` components vanish.
- ``..`` is resolved lexically; a ``..`` that would climb above the root is
  refused with ``PermissionDenied``.  ``a/../b`` is ``b``.
- A NUL byte anywhere is refused with ``InvalidInput``: the kernel would
  truncate the name at it, so what we checked would not be what we opened.
- URL-encoded forms are **literal names**.  ``%2e%2e`` is a file called
  ``%2e%2e``, not ``..``, and ``%2f`` is not a separator.  The HTTP and
  WebSocket transports carry paths inside JSON bodies, which are already
  decoded exactly once; decoding again here would make one string mean two
  things, the root cause of several path-traversal advisories elsewhere.
- Backslashes are literal name characters (this is Linux, not Windows).
"""

from __future__ import annotations

import re

from ctrlagent.errors import InvalidInput, PermissionDenied

Components = tuple[str, ...]

# Longest name a Linux filesystem accepts for one component.
NAME_MAX = 255
# Longest whole path we accept; PATH_MAX on Linux.
PATH_MAX = 4096

_MODE_RE = re.compile(r"[0-7]{3,4}")
# The index is canonical (no leading zeros): ``a.chunk1`` and ``a.chunk01``
# would otherwise be two files claiming one place in the assembly.
_CHUNK_RE = re.compile(r"(?P<base>.+)\.chunk(?P<index>0|[1-9][0-9]{0,5})", re.DOTALL)

# Prefixes of the agent's own work files in a server's directory: temp files
# of atomic writes, and originals an extraction keeps until it has succeeded.
# Never listed, searched or archived.
TMP_PREFIX = ".ctrlagent-tmp-"
KEEP_PREFIX = ".ctrlagent-keep-"
WORK_PREFIXES = (TMP_PREFIX, KEEP_PREFIX)


def normalise(path: str, field: str = "path") -> Components:
    """
    Return the components of ``path`` beneath the root.

    Raises ``InvalidInput`` for a non-string, a NUL byte or an overlong path
    or name, and ``PermissionDenied`` for a path that climbs above the root.
    """
    if not isinstance(path, str):
        raise InvalidInput("{} must be a string".format(field), field=field)
    if "\x00" in path:
        raise InvalidInput("{} contains a NUL byte".format(field), field=field)
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise InvalidInput("{} is too long".format(field), field=field)
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise PermissionDenied("{} leaves the server directory".format(field))
            out.pop()
            continue
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise InvalidInput("{} has a name longer than {} bytes".format(field, NAME_MAX),
                               field=field)
        out.append(part)
    return tuple(out)


def member_components(name: str) -> Components:
    """
    The components of an archive member's name, relative to the extraction
    directory.

    A leading ``/`` is neutralised (stripped, as GNU tar does); any ``..``
    that climbs above the extraction directory is refused with
    ``PermissionDenied`` so that the whole archive is refused.
    """
    return normalise(name.lstrip("/"), field="archive entry {!r}".format(name))


def display(components: Components) -> str:
    """The Panel's form of a path: ``/`` for the root, else ``/a/b``."""
    return "/" + "/".join(components)


def parse_mode(mode: object) -> int:
    """
    Parse a ``set_file_permissions`` mode (``^[0-7]{3,4}$``, octal).

    Raises ``InvalidInput`` for a malformed mode and ``PermissionDenied`` for
    setuid or setgid bits, which a game server never needs and an attacker
    always wants.
    """
    if isinstance(mode, int) and not isinstance(mode, bool):
        mode = format(mode, "o")
    if not isinstance(mode, str) or not _MODE_RE.fullmatch(mode):
        raise InvalidInput("mode must be 3 or 4 octal digits", field="mode")
    value = int(mode, 8)
    if value & 0o6000:
        raise PermissionDenied("setuid and setgid bits are not allowed")
    return value


def split_chunk(components: Components) -> tuple[Components, int] | None:
    """
    If the last component is ``<name>.chunk<N>``, return ``(components of
    <name>, N)``; else ``None``.
    """
    if not components:
        return None
    m = _CHUNK_RE.fullmatch(components[-1])
    if m is None:
        return None
    return components[:-1] + (m.group("base"),), int(m.group("index"))


def chunk_components(target: Components, index: int) -> Components:
    """The components of chunk ``index`` of ``target``."""
    return target[:-1] + ("{}.chunk{}".format(target[-1], index),)


def safe_file_name(name: str) -> str | None:
    """
    ``name`` if it is usable as a single file name inside a directory we
    manage (no separator, NUL, ``.``/``..`` or hidden agent files), else None.
    """
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        return None
    if name.startswith(".ctrlagent"):
        return None
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        return None
    return name
