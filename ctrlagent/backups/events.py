"""
Events of backups and restores, for the Panel link.  They live in
``ctrlagent.events`` (beside the servers' events, where the Panel link may
read them); this module re-exports them for the backups package.  A
``BackupManager`` listener receives them on the reactor thread.
"""

from __future__ import annotations

from ctrlagent.events import BackupEvent, BackupListener, BackupProgress, BackupStatusChanged

__all__ = ["BackupEvent", "BackupListener", "BackupProgress", "BackupStatusChanged"]
