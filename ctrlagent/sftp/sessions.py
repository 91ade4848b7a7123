"""
Live SFTP sessions: who is connected to which server, and a way to end them.

A session is one authenticated SSH connection.  ``close_sessions(server_id)``
disconnects every session of a server at once (credentials revoked or
changed, server suspended or deleted); the registry answers
``list_sftp_sessions``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger


class Login:
    """
    What a successful login is: a server and whether it may write (made by
    the local checker in ``ssh`` and the Panel's in ``panel``).
    """

    def __init__(self, server_id: str, read_only: bool) -> None:
        self.server_id = server_id
        self.read_only = read_only


@dataclass
class Session:
    """One authenticated connection."""

    server_id: str
    username: str
    remote_address: str
    started_at: float
    disconnect: Callable[[str], None]
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    bytes_read: int = 0
    bytes_written: int = 0

    def public(self) -> dict[str, Any]:
        """The Panel's shape of the session."""
        started = datetime.fromtimestamp(self.started_at, UTC)
        return {
            "id": self.id,
            "serverId": self.server_id,
            "username": self.username,
            "remoteAddress": self.remote_address,
            "startedAt": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "bytesRead": self.bytes_read,
            "bytesWritten": self.bytes_written,
        }


class SessionRegistry:
    """Every live session, by id."""

    log = Logger()

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def add(self, session: Session) -> None:
        """Register a session that has just authenticated."""
        self._sessions[session.id] = session
        self.log.info("sftp: {username} ({server_id}) logged in from {address}",
                      username=session.username, server_id=session.server_id,
                      address=session.remote_address)

    def remove(self, session: Session) -> None:
        """Forget a session that ended."""
        if self._sessions.pop(session.id, None) is not None:
            self.log.info(
                "sftp: {username} ({server_id}) from {address} logged out "
                "({read} bytes read, {written} written)",
                username=session.username, server_id=session.server_id,
                address=session.remote_address, read=session.bytes_read,
                written=session.bytes_written)

    def list(self, server_id: str | None = None) -> list[Session]:
        """Sessions of ``server_id`` (all when ``None``), oldest first."""
        out = [s for s in self._sessions.values()
               if server_id is None or s.server_id == server_id]
        return sorted(out, key=lambda s: s.started_at)

    def close_sessions(self, server_id: str, reason: str = "access revoked") -> int:
        """Disconnect every session of ``server_id`` now; how many there were."""
        victims = self.list(server_id)
        for s in victims:
            self._sessions.pop(s.id, None)
            self.log.info("sftp: closing session {id} of {server_id} ({reason})",
                          id=s.id, server_id=server_id, reason=reason)
            s.disconnect(reason)
        return len(victims)

    def close_all(self, reason: str = "the agent is stopping") -> int:
        """Disconnect every session."""
        count = 0
        for server_id in {s.server_id for s in self._sessions.values()}:
            count += self.close_sessions(server_id, reason)
        return count

    def __len__(self) -> int:
        return len(self._sessions)
