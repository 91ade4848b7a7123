"""
Domain events the server manager and the backup manager publish and the
Panel link forwards.

Plain dataclasses, treated as immutable: no reactor, no I/O.  The Panel link turns them into
the protocol's ``event`` frames (PROTOCOL.md section 3); tests subscribe to them
directly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from ctrlagent.records import record

# What the console puts before each line while a server's console timestamps
# are on (``console:settings`` ``timestamps``): ``[HH:MM:SS] `` in UTC.
_STAMP = re.compile(r"\A\[\d\d:\d\d:\d\d\] ")


def console_stamp(at: float) -> str:
    """The prefix of a console line printed at ``at`` when timestamps are on."""
    return time.strftime("[%H:%M:%S] ", time.gmtime(at))


def unstamp(line: str) -> str:
    """``line`` without the prefix ``console_stamp`` put before it (if any)."""
    return _STAMP.sub("", line, count=1)


@dataclass(frozen=True)
class StatusChanged:
    """A server moved from ``previous`` to ``current`` (lowercase states)."""

    server_id: str
    previous: str
    current: str
    timestamp: float
    error: str | None = None
    container_id: str | None = None
    exit_code: int | None = None
    oom_killed: bool = False


# Not frozen, unlike the other events: a flooding server produces thousands a
# second, and a frozen dataclass costs four times as much to build; and the
# manager sets ``receipt`` for its acknowledging consumer.  Treat the rest as
# immutable all the same.
@dataclass(slots=True)
class ConsoleOutput:
    """
    Consecutive console lines of one server and one stream, oldest first.

    ``stream`` is ``stdout``, ``stderr`` or ``agent`` (a notice the agent itself
    writes into the console, such as a throttling summary); ``timestamp`` is
    the first line's.  The manager publishes what one read of the server's
    output held as one event per run of a stream, so a flood costs the
    listeners one call per read, not one per line.

    ``receipt``: set by the manager for its acknowledging consumer (the Panel
    link), which calls it once these lines were delivered or dropped for good
    (``ctrlagent.servers.delivery``); None for every other listener.
    """

    server_id: str
    stream: str
    lines: list[str]
    timestamp: float
    receipt: Callable[[], None] | None = None


@record
class ResourceUpdate:
    """
    The latest resource sample of a running server, in the Panel's units:
    a ``ctrlagent.wire.servers.Metrics`` record (or a mapping of its JSON
    shape), read through ``ctrlagent.wire.json.to_json``.
    """

    server_id: str
    metrics: Any = field(default_factory=dict)


@dataclass(frozen=True)
class ServerRemoved:
    """
    A server was deleted and forgotten: what other parts keep for it (SFTP
    logins, say) goes too, so a new server given the same id inherits nothing.
    """

    server_id: str


ServerEvent = Union[StatusChanged, ConsoleOutput, ResourceUpdate, ServerRemoved]
EventListener = Callable[[ServerEvent], None]


# --- backups (published by ctrlagent.backups.manager.BackupManager) ---


@dataclass(frozen=True)
class BackupProgress:
    """How far a running backup (or restore) has come."""

    server_id: str
    backup_id: str
    operation: str  # "backup" | "restore"
    bytes: int
    files: int
    total_bytes: int
    percent: float


@dataclass(frozen=True)
class BackupStatusChanged:
    """A backup or restore finished (``completed`` / ``failed``) or started (``running``)."""

    server_id: str
    backup_id: str
    operation: str  # "backup" | "restore"
    status: str
    error: str | None = None
    size: int = 0
    checksum: str | None = None


BackupEvent = Union[BackupProgress, BackupStatusChanged]
BackupListener = Callable[[BackupEvent], None]
