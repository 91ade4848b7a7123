"""
The SFTP server's settings, as the SFTP package sees them.

The ``[sftp]`` section itself (``SftpConfig``, its validation and
``HOST_KEY_NAME``) lives in ``ctrlagent.config`` with every other setting, so
that ``load_config`` builds and validates it with the rest of the tree; this
module re-exports it and keeps what only the SFTP server uses.
"""

from __future__ import annotations

from ctrlagent.config import HOST_KEY_NAME, SftpConfig, parse_sftp_config, validate_sftp

# The local logins' store, in the state directory (ctrlagent.sftp.credentials).
CREDENTIALS_NAME = "sftp_credentials.json"

validate_sftp_config = validate_sftp

__all__ = [
    "CREDENTIALS_NAME",
    "HOST_KEY_NAME",
    "SftpConfig",
    "parse_sftp_config",
    "validate_sftp_config",
]
