"""The ``[backups]`` settings: defaults, and one clear ``ConfigInvalid`` per bad value."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ctrlagent.backups.config import Retention, parse_backups_config, parse_retention
from ctrlagent.errors import ConfigInvalid


def test_defaults_put_backups_under_the_state_directory() -> None:
    c = parse_backups_config(None, state_dir="/srv/state")
    assert c.directory == "/srv/state/backups"
    assert (c.driver, c.concurrency, c.schedule.cron) == ("local", 2, None)
    assert c.s3.part_size == 64 * 1024 * 1024


@pytest.mark.parametrize(("mapping", "words"), [
    ({"drivr": "local"}, "unknown setting backups.drivr"),
    ({"driver": "tape"}, "backups.driver must be one of"),
    ({"concurrency": 0}, "backups.concurrency must be between"),
    ({"concurrency": 1.5}, "whole number"),
    ({"concurrency": True}, "must be a number"),
    ({"progress_interval": float("nan")}, "between"),
    ({"directory": "relative"}, "absolute"),
    ({"driver": "s3"}, "backups.s3.bucket is required"),
    ({"s3": {"bucket": "b", "part_size": 1024}}, "backups.s3.part_size"),
    ({"s3": {"bucket": "b", "endpoint": "ftp://x"}}, "http"),
    ({"driver": "restic", "restic": {"repository": "/r"}}, "password"),
    ({"restic": {"password": "a", "password_file": "/f"}}, "not both"),
    ({"schedule": {"cron": "bad"}}, "cron"),
    ({"schedule": {"cron": "0 * * * *", "retain": {"weeks": 1}}}, "retain.weeks"),
    ({"s3": []}, "must be a table"),
    ({"hooks": {"wait_for": "(unclosed"}}, "regular expression"),
    ({"hooks": {"before": ["save-all\nstop"]}}, "one-line console commands"),
    ({"hooks": {"after": "save-on"}}, "backups.hooks.after"),
])
def test_bad_values_name_the_setting(mapping: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigInvalid, match=words.replace(".", r"\.")):
        parse_backups_config(mapping)


def test_retention_forms() -> None:
    assert parse_retention(3) == Retention(last=3)
    assert parse_retention({"days": 7}) == Retention(days=7)
    assert parse_retention(None) == Retention()


def test_secret_key_file_must_not_be_world_readable(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("s3cr3t\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigInvalid, match="world-readable"):
        parse_backups_config({"s3": {"bucket": "b", "secret_key_file": str(f)}})
    os.chmod(f, 0o600)
    c = parse_backups_config({"s3": {"bucket": "b", "secret_key_file": str(f)}})
    assert c.s3.secret_key == "s3cr3t" and "s3cr3t" not in repr(c)


def test_drivers_are_built_from_what_is_configured(tmp_path: Path) -> None:
    from ctrlagent.backups.manager import build_drivers

    c = parse_backups_config({"directory": str(tmp_path / "a")})
    assert sorted(build_drivers(c, str(tmp_path))) == ["local"]
    c = parse_backups_config({"directory": str(tmp_path / "a"),
                              "s3": {"bucket": "b", "endpoint": "http://127.0.0.1:9"},
                              "restic": {"repository": str(tmp_path / "r"), "password": "p"}})
    assert sorted(build_drivers(c, str(tmp_path))) == ["local", "restic", "s3"]
