"""
Which servers' files an operation holds (``FileLocks``): today a restore,
which swaps a server's whole directory.

One state, owned by the servers layer and read by every writer through
``IServerManager.files_locked``: the server's own starts (power start and
restart, reinstall, the crash auto-restart), the file and power actions on
both channels (``actions/backups.py``), SFTP (``sftp/filesystem.py``), the
scheduled backups.  A writer that finds the files locked refuses (starts and
actions with ``CONFLICT``, SFTP with a permission failure); nothing waits.

Read from the reactor and from SFTP's threads: one dict, one key per server,
whose reads and writes are atomic under the GIL.
"""

from __future__ import annotations

from collections.abc import Callable

from ctrlagent.errors import Conflict


class FileLocks:
    """The servers whose files are locked, and by what (``"restored"``)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[object, str]] = {}

    def lock(self, server_id: str, reason: str) -> Callable[[], None]:
        """
        Lock ``server_id``'s files ("being ``reason``"); ``Conflict`` when
        they already are.  Returns the release (idempotent: it releases this
        lock only, never a later one).
        """
        held = self._held.get(server_id)
        if held is not None:
            raise Conflict("the server's files are being {}".format(held[1]))
        token = object()
        self._held[server_id] = (token, reason)

        def release() -> None:
            current = self._held.get(server_id)
            if current is not None and current[0] is token:
                del self._held[server_id]

        return release

    def locked(self, server_id: str) -> str | None:
        """Why ``server_id``'s files are locked (``"restored"``), or None."""
        held = self._held.get(server_id)
        return held[1] if held is not None else None

    def refuse(self, server_id: str, what: str) -> None:
        """``Conflict`` naming ``what`` when the server's files are locked."""
        reason = self.locked(server_id)
        if reason is not None:
            raise Conflict(refusal(what, reason))


def refusal(what: str, reason: str) -> str:
    """The message of a refusal while the files are locked."""
    return "{}: the server's files are being {}; try again once that has finished".format(
        what, reason)
