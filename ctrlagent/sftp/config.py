"""
The SFTP server's settings: ``SftpConfig`` and ``parse_sftp_config``.

Pure: no I/O, no reactor.  ``parse_sftp_config`` takes the ``[sftp]`` table of
the agent's TOML (or any mapping) and refuses unknown keys and bad values
with ``ConfigInvalid`` naming the setting, as ``ctrlagent.config`` does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ctrlagent.errors import ConfigInvalid

HOST_KEY_NAME = "sftp_host_ed25519_key"
CREDENTIALS_NAME = "sftp_credentials.json"


@dataclass(frozen=True)
class SftpConfig:
    """Settings of the SFTP server (TOML table ``[sftp]``)."""

    enabled: bool = True
    # A Twisted server endpoint; ``port`` is used when ``endpoint`` is empty.
    port: int = 2022
    bind: str = "0.0.0.0"
    endpoint: str = ""
    # Empty: ``<state_dir>/sftp_host_ed25519_key``, generated on first start.
    host_key: str = ""
    # ``local``: credentials set through the agent's actions; ``panel``: the
    # Panel's own accounts (POST /api/auth/login, GET /api/servers/<id>).
    backend: str = "local"
    panel_url: str = ""
    # Seconds a Panel grant is trusted before it is asked again.
    grant_cache_seconds: float = 60.0
    # Failed logins: the n-th failure in a row from one address (or for one
    # username) delays the next answer by throttle_base * 2**(n-1), at most
    # throttle_max; a failure older than throttle_forget is forgotten.
    throttle_base: float = 1.0
    throttle_max: float = 30.0
    throttle_forget: float = 900.0
    # Live SSH connections at once, all servers together, and per address.
    max_sessions: int = 256
    max_sessions_per_address: int = 16
    # Seconds to finish authentication before the connection is dropped.
    login_timeout: float = 60.0
    # Seconds a walked disk-usage figure is trusted (our own writes keep it current).
    disk_usage_ttl: float = 30.0
    # Open file and directory handles per session.
    max_handles: int = 256
    # bcrypt cost for stored passwords.
    bcrypt_rounds: int = 12

    def endpoint_description(self) -> str:
        """The Twisted endpoint string the server listens on."""
        if self.endpoint:
            return self.endpoint
        return "tcp:{}:interface={}".format(self.port, self.bind.replace(":", "\\:"))

    def host_key_path(self, state_dir: str) -> str:
        """Where the host key lives."""
        return self.host_key or os.path.join(state_dir, HOST_KEY_NAME)


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                        "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigInvalid("sftp.{}: expected true or false".format(name))
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ConfigInvalid("sftp.{}: expected an integer".format(name))
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigInvalid("sftp.{}: expected an integer".format(name)) from None
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigInvalid("sftp.{}: expected a number".format(name))
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigInvalid("sftp.{}: expected a number".format(name)) from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigInvalid("sftp.{}: expected a finite number".format(name))
        return number
    if not isinstance(value, str):
        raise ConfigInvalid("sftp.{}: expected a string".format(name))
    return value


def validate_sftp_config(config: SftpConfig) -> None:
    """Refuse settings that cannot work, with ``ConfigInvalid`` naming the setting."""
    if not 0 < config.port < 65536:
        raise ConfigInvalid("sftp.port: must be 1-65535")
    if config.backend not in ("local", "panel"):
        raise ConfigInvalid("sftp.backend: must be local or panel")
    if config.backend == "panel" and not config.panel_url.startswith(("http://", "https://")):
        raise ConfigInvalid("sftp.panel_url: an http(s) URL is required with backend panel")
    for name in ("grant_cache_seconds", "throttle_base", "throttle_max", "throttle_forget",
                 "login_timeout", "disk_usage_ttl"):
        if getattr(config, name) < 0:
            raise ConfigInvalid("sftp.{}: must not be negative".format(name))
    if config.throttle_max < config.throttle_base:
        raise ConfigInvalid("sftp.throttle_max: must be at least sftp.throttle_base")
    if config.login_timeout <= 0:
        raise ConfigInvalid("sftp.login_timeout: must be positive")
    for name in ("max_sessions", "max_sessions_per_address", "max_handles"):
        if not 1 <= getattr(config, name) <= 1_000_000:
            raise ConfigInvalid("sftp.{}: must be 1-1000000".format(name))
    if not 4 <= config.bcrypt_rounds <= 31:
        raise ConfigInvalid("sftp.bcrypt_rounds: must be 4-31")
    if config.endpoint and ":" not in config.endpoint:
        raise ConfigInvalid("sftp.endpoint: not a Twisted endpoint description (e.g. tcp:2022)")


def parse_sftp_config(values: Mapping[str, Any] | None) -> SftpConfig:
    """Build and validate an ``SftpConfig`` from the ``[sftp]`` table."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigInvalid("sftp: expected a table")
    defaults = SftpConfig()
    known = {f.name for f in fields(SftpConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigInvalid("unknown configuration key 'sftp.{}'".format(key))
        kwargs[key] = _coerce(key, value, getattr(defaults, key))
    config = dataclasses.replace(defaults, **kwargs)
    validate_sftp_config(config)
    return config
