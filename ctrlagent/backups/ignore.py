"""
Which paths of a server root a backup leaves out: ``.pteroignore`` in the
root plus the request's ``ignore`` patterns, both in gitignore syntax
(``pathspec``).

The ``.pteroignore`` file is the game server's to write: it is read without
following a link, only if it is a regular file, and at most
``MAX_IGNORE_BYTES`` of it; the request's patterns are bounded in number
and length.  Thread-side (it reads a file).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

import pathspec

from ctrlagent.errors import InvalidInput

IGNORE_FILE = ".pteroignore"
MAX_IGNORE_BYTES = 64 * 1024
MAX_PATTERNS = 1000
MAX_PATTERN_CHARS = 4096


def parse_patterns(value: object, field: str = "ignore") -> list[str]:
    """The request's ``ignore``: a list of strings (or one newline-separated string)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise InvalidInput("{} must be a list of patterns".format(field), field=field)
    if len(value) > MAX_PATTERNS:
        raise InvalidInput("{} holds more than {} patterns".format(field, MAX_PATTERNS),
                           field=field)
    for p in value:
        if len(p) > MAX_PATTERN_CHARS or "\x00" in p:
            raise InvalidInput("{} holds a pattern that is too long or has a NUL".format(field),
                               field=field)
    return list(value)


class IgnoreRules:
    """Compiled gitignore rules; ``matches("a/b")`` for a file, ``"a/b/"`` for a directory."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        self._spec = pathspec.GitIgnoreSpec.from_lines(self.lines) if self.lines else None

    def matches(self, rel: str) -> bool:
        """True when the path (relative to the root) is left out."""
        if self._spec is None:
            return False
        return bool(self._spec.match_file(rel))


def read_ignore_file(root_fd: int) -> list[str]:
    """
    The lines of ``.pteroignore`` in the root (``root_fd``), or [] when it is
    missing, not a regular file, or a link (never followed).
    """
    try:
        fd = os.open(IGNORE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=root_fd)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        data = os.read(fd, MAX_IGNORE_BYTES)
    except OSError:
        return []
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace").splitlines()


def load_rules(root_fd: int, patterns: list[str]) -> IgnoreRules:
    """``.pteroignore`` of the root plus the request's patterns."""
    try:
        return IgnoreRules(read_ignore_file(root_fd) + patterns)
    except (ValueError, TypeError) as e:
        # pathspec refuses some malformed patterns; .pteroignore is the
        # server's, so say which source is wrong without a traceback.
        raise InvalidInput("bad ignore pattern: {}".format(e), field="ignore") from None
