"""
Events of backups and restores, for the Panel link (``ctrlagent.events``
style: plain frozen dataclasses, no I/O).  A ``BackupManager`` listener
receives them on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union


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
