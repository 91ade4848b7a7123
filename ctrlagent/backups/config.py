"""
The ``[backups]`` settings: where backups go, which driver, how many at once,
and the S3, restic and schedule defaults.

Pure: no I/O but reading nothing; ``parse_backups_config`` turns the TOML
mapping (already loaded by ``ctrlagent.config``) into a frozen tree, and
refuses a bad value with ``ConfigInvalid`` naming the setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ctrlagent.errors import ConfigInvalid

DRIVERS = ("local", "s3", "restic")
# S3's own bounds on multipart uploads.
S3_MIN_PART = 5 * 1024 * 1024
S3_MAX_PART = 5 * 1024 * 1024 * 1024
S3_MAX_PARTS = 10_000


@dataclass(frozen=True)
class S3Config:
    """An S3 (or S3-compatible) bucket backups are uploaded to."""

    endpoint: str | None = None
    bucket: str = ""
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    path_style: bool = False
    prefix: str = "ctrlagent"
    # Smallest part; grown for big archives so that at most 10,000 parts hold them.
    part_size: int = 64 * 1024 * 1024
    part_retries: int = 5


@dataclass(frozen=True)
class ResticConfig:
    """A restic repository, driven through the ``restic`` binary."""

    repository: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    binary: str = "restic"
    timeout: float = 6 * 3600.0


@dataclass(frozen=True)
class Retention:
    """What a schedule keeps: the newest ``last`` and/or those younger than ``days``."""

    last: int | None = None
    days: float | None = None


@dataclass(frozen=True)
class ScheduleDefaults:
    """A node-wide schedule applied to servers without their own (off by default)."""

    cron: str | None = None
    retain: Retention = Retention()
    driver: str = "local"


@dataclass(frozen=True)
class HooksConfig:
    """
    Console commands around a backup of a running server: ``before`` (for
    example ``save-off``, ``save-all``), then wait until a console line
    matches ``wait_for`` (a regular expression; at most ``wait_timeout``
    seconds, then the backup goes on with a note), and ``after`` once the
    archive is written, whatever its outcome (``save-on``).
    """

    before: tuple[str, ...] = ()
    wait_for: str | None = None
    wait_timeout: float = 60.0
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackupsConfig:
    """Every backup setting."""

    directory: str = "/var/lib/ctrlagent/backups"
    driver: str = "local"
    concurrency: int = 2
    compression_level: int = 3
    # Seconds between two progress events of one backup.
    progress_interval: float = 1.0
    # Seconds a restore waits for a server it stopped to be offline.
    stop_timeout: float = 120.0
    # Seconds between two looks at the schedules.
    schedule_interval: float = 30.0
    s3: S3Config = S3Config()
    restic: ResticConfig = ResticConfig()
    schedule: ScheduleDefaults = ScheduleDefaults()
    hooks: HooksConfig = HooksConfig()


def _section(mapping: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = mapping.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigInvalid("{}.{} must be a table".format(where, key))
    return value


def _unknown(mapping: Mapping[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(mapping) - known)
    if extra:
        raise ConfigInvalid("unknown setting {}.{}".format(where, extra[0]))


def _str(mapping: Mapping[str, Any], key: str, where: str, default: str | None) -> Any:
    value = mapping.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise ConfigInvalid("{}.{} must be a string".format(where, key))
    return value


def _num(mapping: Mapping[str, Any], key: str, where: str, default: float | None,
         low: float, high: float, integer: bool = False) -> Any:
    value = mapping.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigInvalid("{}.{} must be a number".format(where, key))
    if integer and not isinstance(value, int):
        raise ConfigInvalid("{}.{} must be a whole number".format(where, key))
    if not (low <= value <= high):  # also refuses NaN
        raise ConfigInvalid("{}.{} must be between {} and {}".format(where, key, low, high))
    return value


def _bool(mapping: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = mapping.get(key, default)
    if not isinstance(value, bool):
        raise ConfigInvalid("{}.{} must be true or false".format(where, key))
    return value


def _commands(mapping: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = mapping.get(key, [])
    if not isinstance(value, list) or not all(
            isinstance(c, str) and c and "\n" not in c and len(c) <= 1024 for c in value):
        raise ConfigInvalid("{}.{} must be a list of one-line console commands".format(
            where, key))
    return tuple(value)


def parse_driver(value: object, where: str = "driver") -> str:
    """A driver name, or ``ConfigInvalid``."""
    if value not in DRIVERS:
        raise ConfigInvalid("{} must be one of {}".format(where, ", ".join(DRIVERS)))
    return str(value)


def parse_retention(value: object, where: str = "retain") -> Retention:
    """
    ``retain``: a whole number (keep the newest N) or a table ``{last?, days?}``
    (keep the newest ``last`` and every backup younger than ``days``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"last": value}
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigInvalid("{} must be a number or a table {{last, days}}".format(where))
    _unknown(value, {"last", "days"}, where)
    last = _num(value, "last", where, None, 1, 100_000, integer=True)
    days = _num(value, "days", where, None, 0.001, 36_500)
    return Retention(last=last, days=days)


def parse_cron(value: object, where: str = "cron") -> str | None:
    """A five-field cron expression (UTC), or None/"" for off."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise ConfigInvalid("{} must be a cron expression".format(where))
    from croniter import croniter

    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ConfigInvalid("{} is not a valid five-field cron expression".format(where))
    return value


def parse_backups_config(mapping: Mapping[str, Any] | None,
                         state_dir: str = "/var/lib/ctrlagent") -> BackupsConfig:
    """The ``[backups]`` table as a ``BackupsConfig`` (``directory`` under ``state_dir``)."""
    where = "backups"
    mapping = mapping or {}
    if not isinstance(mapping, Mapping):
        raise ConfigInvalid("backups must be a table")
    _unknown(mapping, {"directory", "driver", "concurrency", "compression_level",
                       "progress_interval", "stop_timeout", "schedule_interval", "s3",
                       "restic", "schedule", "hooks"}, where)
    directory = _str(mapping, "directory", where, os.path.join(state_dir, "backups"))
    if not os.path.isabs(directory):
        raise ConfigInvalid("backups.directory must be an absolute path")

    s3m = _section(mapping, "s3", where)
    w = where + ".s3"
    _unknown(s3m, {"endpoint", "bucket", "region", "access_key", "secret_key",
                   "secret_key_file", "path_style", "prefix", "part_size", "part_retries"}, w)
    secret = _str(s3m, "secret_key", w, None)
    secret_file = _str(s3m, "secret_key_file", w, None)
    if secret_file is not None:
        secret = _read_secret(secret_file, w + ".secret_key_file")
    endpoint = _str(s3m, "endpoint", w, None)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigInvalid("backups.s3.endpoint must be an http:// or https:// URL")
    s3 = S3Config(
        endpoint=endpoint,
        bucket=_str(s3m, "bucket", w, ""),
        region=_str(s3m, "region", w, "us-east-1"),
        access_key=_str(s3m, "access_key", w, None),
        secret_key=secret,
        path_style=_bool(s3m, "path_style", w, False),
        prefix=_str(s3m, "prefix", w, "ctrlagent").strip("/"),
        part_size=_num(s3m, "part_size", w, 64 * 1024 * 1024, S3_MIN_PART, S3_MAX_PART,
                       integer=True),
        part_retries=_num(s3m, "part_retries", w, 5, 0, 100, integer=True),
    )

    rm = _section(mapping, "restic", where)
    w = where + ".restic"
    _unknown(rm, {"repository", "password", "password_file", "binary", "timeout"}, w)
    restic = ResticConfig(
        repository=_str(rm, "repository", w, None),
        password=_str(rm, "password", w, None),
        password_file=_str(rm, "password_file", w, None),
        binary=_str(rm, "binary", w, "restic"),
        timeout=_num(rm, "timeout", w, 6 * 3600.0, 1, 7 * 86400),
    )
    if restic.password is not None and restic.password_file is not None:
        raise ConfigInvalid("backups.restic: set password or password_file, not both")

    sm = _section(mapping, "schedule", where)
    w = where + ".schedule"
    _unknown(sm, {"cron", "retain", "driver"}, w)
    schedule = ScheduleDefaults(
        cron=parse_cron(sm.get("cron"), w + ".cron"),
        retain=parse_retention(sm.get("retain"), w + ".retain"),
        driver=parse_driver(sm.get("driver", "local"), w + ".driver"),
    )

    hm = _section(mapping, "hooks", where)
    w = where + ".hooks"
    _unknown(hm, {"before", "wait_for", "wait_timeout", "after"}, w)
    wait_for = _str(hm, "wait_for", w, None)
    if wait_for is not None:
        import re

        try:
            re.compile(wait_for)
        except re.error as e:
            raise ConfigInvalid("backups.hooks.wait_for is not a regular expression: {}"
                                .format(e)) from None
    hooks = HooksConfig(
        before=_commands(hm, "before", w),
        wait_for=wait_for,
        wait_timeout=_num(hm, "wait_timeout", w, 60.0, 0.1, 3600),
        after=_commands(hm, "after", w),
    )

    config = BackupsConfig(
        directory=directory,
        driver=parse_driver(mapping.get("driver", "local"), "backups.driver"),
        concurrency=_num(mapping, "concurrency", where, 2, 1, 64, integer=True),
        compression_level=_num(mapping, "compression_level", where, 3, 1, 19, integer=True),
        progress_interval=_num(mapping, "progress_interval", where, 1.0, 0.05, 3600),
        stop_timeout=_num(mapping, "stop_timeout", where, 120.0, 1, 86400),
        schedule_interval=_num(mapping, "schedule_interval", where, 30.0, 1, 3600),
        s3=s3,
        restic=restic,
        schedule=schedule,
        hooks=hooks,
    )
    for name in {config.driver, schedule.driver}:
        check_driver_configured(config, name)
    return config


def check_driver_configured(config: BackupsConfig, driver: str) -> None:
    """``ConfigInvalid`` unless ``driver`` has what it needs."""
    if driver == "s3" and not config.s3.bucket:
        raise ConfigInvalid("backups.s3.bucket is required for the s3 driver")
    if driver == "restic":
        if not config.restic.repository:
            raise ConfigInvalid("backups.restic.repository is required for the restic driver")
        if config.restic.password is None and config.restic.password_file is None:
            raise ConfigInvalid("backups.restic needs password or password_file")


def _read_secret(path: str, where: str) -> str:
    """A secret from a file that is not world-readable."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o004:
            raise ConfigInvalid("{} {} must not be world-readable".format(where, path))
        with open(path, encoding="utf-8") as f:
            return f.read(4096).strip()
    except OSError as e:
        raise ConfigInvalid("{} {} cannot be read ({})".format(where, path, e.strerror)) from None
