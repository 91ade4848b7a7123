"""
The SFTP actions: set or revoke a server's SFTP login and list the live
sessions (docs/SFTP.md).

The node's SFTP server is optional (``sftp.enabled``): without one, the same
names answer ``CONFLICT`` "SFTP is disabled on this node" before anything
else is checked, so that the Panel learns why instead of reading
``UNKNOWN_ACTION`` (or a payload or server error that does not matter).

The password is a secret: it is passed on to the SFTP server (which keeps
only a bcrypt hash) and never appears in a log line or an answer.
"""

from __future__ import annotations

from ctrlagent.errors import Conflict
from ctrlagent.interfaces import ISftpService

from .payload import Array, Boolean, Payload, Text
from .registry import ActionSpec, Call

DISABLED = "SFTP is disabled on this node"

# The keys of set_sftp_credentials; one that is absent keeps its value.
_LOGIN_KEYS = ("password", "publicKeys", "readOnly")


def sftp_actions(sftp: ISftpService | None) -> list[ActionSpec]:
    """The SFTP family, over ``sftp`` (None: SFTP is disabled on this node)."""
    if sftp is None:
        return _disabled()
    service = sftp

    async def set_credentials(call: Call) -> object:
        given = call.command.params
        # Parsed values, but only for the keys the Panel sent: "password": null
        # removes the password, a missing "password" keeps it.
        params = {key: call.params[key] for key in _LOGIN_KEYS if key in given}
        return await service.set_credentials(call.server, params)

    async def revoke_credentials(call: Call) -> object:
        return await service.revoke_credentials(call.server)

    async def list_sessions(call: Call) -> object:
        return service.list_sessions(call.server_id)

    login = Payload({
        "password": Text(description="8-1024 characters, stored as a bcrypt hash only; "
                                     "null removes the password, absent keeps it"),
        "publicKeys": Array(Text(required=True), description="OpenSSH public key lines "
                                                             "(replace the stored ones)"),
        "readOnly": Boolean(description="read and list only (absent keeps the stored value)"),
    })
    return [
        ActionSpec(
            "set_sftp_credentials", "sftp",
            "Set the server's SFTP login: {username, port}; its live sessions end",
            login, set_credentials, message="sftp credentials set",
        ),
        ActionSpec(
            "revoke_sftp_credentials", "sftp",
            "Remove the server's SFTP login and end its sessions",
            Payload(), revoke_credentials, message="sftp credentials revoked",
        ),
        ActionSpec(
            "list_sftp_sessions", "sftp",
            "The live SFTP sessions (of the server, when one is named)",
            Payload(server="optional"), list_sessions,
        ),
    ]


def _disabled() -> list[ActionSpec]:
    """The SFTP names on a node without SFTP: each answers ``CONFLICT`` at once."""

    async def disabled(call: Call) -> object:
        raise Conflict(DISABLED)

    anything = Payload(server="none")
    return [
        ActionSpec(name, "sftp", "{} ({})".format(summary, DISABLED), anything, disabled)
        for name, summary in (
            ("set_sftp_credentials", "Set the server's SFTP login"),
            ("revoke_sftp_credentials", "Remove the server's SFTP login"),
            ("list_sftp_sessions", "The live SFTP sessions"),
        )
    ]
