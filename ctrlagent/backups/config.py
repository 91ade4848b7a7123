"""
The ``[backups]`` settings, as the backups package reads them.

The tree itself (``BackupsConfig`` and its sections) and its parser live in
``ctrlagent.config``, the leaf every layer may import, where it is
``AgentConfig.backups``; this module re-exports them under the names the
package has always used.
"""

from __future__ import annotations

from ctrlagent.config import (
    BACKUP_DRIVERS as DRIVERS,
)
from ctrlagent.config import (
    S3_MAX_PART,
    S3_MAX_PARTS,
    S3_MIN_PART,
    BackupsConfig,
    HooksConfig,
    ResticConfig,
    Retention,
    S3Config,
    ScheduleDefaults,
    check_driver_configured,
    parse_backups_config,
    parse_cron,
    parse_retention,
    validate_backups,
)
from ctrlagent.config import (
    parse_backup_driver as parse_driver,
)

__all__ = [
    "DRIVERS",
    "S3_MAX_PART",
    "S3_MAX_PARTS",
    "S3_MIN_PART",
    "BackupsConfig",
    "HooksConfig",
    "ResticConfig",
    "Retention",
    "S3Config",
    "ScheduleDefaults",
    "check_driver_configured",
    "parse_backups_config",
    "parse_cron",
    "parse_driver",
    "parse_retention",
    "validate_backups",
]
