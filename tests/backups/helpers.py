"""Thread-side helpers of the backup tests: archive a root, restore into one."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ctrlagent.backups.archive import ArchiveStats, write_archive
from ctrlagent.backups.ignore import load_rules
from ctrlagent.backups.restore import RestoreResult, restore_root


def archive_bytes(root: Path, ignore: list[str] | None = None, **kw: Any
                  ) -> tuple[bytes, ArchiveStats]:
    """The archive of ``root`` in memory (tests only: small trees)."""
    out = io.BytesIO()
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        stats = write_archive(fd, out.write, load_rules(fd, ignore or []), **kw)
    finally:
        os.close(fd)
    return out.getvalue(), stats


def restore_bytes(root: Path, data: bytes, stats: ArchiveStats | None, *,
                  truncate: bool = True, **kw: Any) -> RestoreResult:
    """Restore ``data`` into ``root``, checked against ``stats`` when given."""
    return restore_root(
        str(root), io.BytesIO(data),
        size=stats.size if stats else None,
        checksum=stats.checksum if stats else None,
        content_bytes=stats.bytes if stats else None,
        uid=os.getuid(), gid=os.getgid(), truncate=truncate, **kw)
