"""
The seams between the action dispatcher and the domain (servers, files, the host).

The dispatcher (``ctrlagent.actions.registry``) is tested against fakes of these; the
real providers are ``ctrlagent.servers.manager.ServerManager`` and
``ctrlagent.files.manager.FileManager``.  Every method that does I/O returns a
Deferred (implementations are ``async def`` wrapped at the edge, or return
Deferreds).  Errors are ``ctrlagent.errors`` exceptions carrying protocol codes.

Shapes of returned dicts are the Panel's (PROTOCOL.md section 2): camelCase keys,
lowercase status strings plus ``panelStatus``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zope.interface import Interface

if TYPE_CHECKING:
    from ctrlagent.wire.files import (
        ArchiveCreated,
        ArchiveExtracted,
        Copied,
        Done,
        FileBytes,
        FileInfo,
        FileListing,
        FilePermissions,
        FileSearch,
        FileText,
        FileWritten,
        ModInstalled,
        ModList,
        PermissionsSet,
        Renamed,
    )


@dataclass(frozen=True)
class ServerRoot:
    """Where a server's files live and how much it may hold."""

    server_id: str
    path: str  # absolute path of the server's data directory
    disk_limit_bytes: int | None  # None = unlimited
    uid: int
    gid: int


class IServerManager(Interface):
    """Owns every game server on this node."""

    def resolve(server_id: str) -> str:
        """
        Return the canonical id of the server known by ``server_id`` (its
        creation id, an alias, its container name or container id).  Raises
        ``ServerNotFound``.
        """

    def create_server(server_id: str, params: dict) -> object:
        """
        Define and create a server from a ``create_server`` payload.  Fires with
        ``{"serverId", "containerId"?, "status"}`` within the Panel's 30 s; a slow
        image pull or install continues in the background (``status: "installing"``).
        Raises ``InvalidInput`` naming the bad field, ``Conflict`` if it exists.
        """

    def start(server_id: str) -> object:
        """Start the server. Fires with ``{"serverId", "status"}``."""

    def stop(server_id: str, signal: str | None = None, timeout: float | None = None) -> object:
        """
        Stop gracefully (stop method, then kill after ``timeout``); ``signal ==
        "SIGKILL"`` kills at once.  Fires with ``{"serverId", "status"}`` once
        the stop is under way (a long stop finishes in the background).
        """

    def restart(server_id: str) -> object:
        """Stop then start. Fires with ``{"serverId", "status"}``."""

    def kill(server_id: str) -> object:
        """SIGKILL the server's process. Never removes the container or files."""

    def delete(server_id: str, purge_files: bool = False) -> object:
        """Remove the container (and the data directory when ``purge_files``)."""

    def suspend(server_id: str) -> object:
        """Stop the server and refuse starts until unsuspended."""

    def unsuspend(server_id: str) -> object:
        """Allow starts again."""

    def reinstall(server_id: str) -> object:
        """Run the install step again (server must be offline)."""

    def update(server_id: str, params: dict) -> object:
        """Apply changed limits/environment/startup; limits are applied live."""

    def status(server_id: str) -> object:
        """``{"serverId", "status", "panelStatus", "containerId", "resources"?}`` (sync)."""

    def list_servers() -> list:
        """Status dicts of every managed server (sync)."""

    def server_metrics(server_id: str) -> object:
        """
        The Panel's metrics shape (sync, from the latest sample):
        ``{"cpu": float, "memory": float MB, "disk": float MB,
        "network": {"in": int, "out": int}, "players": int, "timestamp": ISO}``.
        """

    def read_answer(action: str, server_id: str) -> bytes | None:
        """
        The encoded success answer (the whole JSON body) of a bare
        ``get_server_status`` or ``get_server_metrics`` of ``server_id``, when
        the manager has it at hand without the registry, exactly as the
        registry would write it now; None to have the registry answer (any
        other action, an unknown server, an answer not kept).  The API's
        plain-command path asks it first.
        """

    def send_command(server_id: str, command: str) -> object:
        """
        Write one line to the server's stdin.  The server's own stop command,
        typed while it runs and no power action is under way, runs as the
        ``stop`` power action (which writes the line): not a crash.
        """

    def console_command(server_id: str, command: str, wait: float | None = None) -> object:
        """Send ``command``; fire with what the console printed within ``wait`` s."""

    def console_history(server_id: str, lines: int = 100) -> list:
        """The last ``lines`` console lines (sync)."""

    def console_status(server_id: str) -> object:
        """``{"connected": bool, "lastActivity": ISO|None, "bufferSize": int}`` (sync)."""

    def console_clear(server_id: str) -> None:
        """Empty the server's console buffer."""

    def console_input(server_id: str, data: str) -> object:
        """Write ``data`` to stdin exactly as given, no newline added: ``{"serverId", "bytes"}``."""

    def console_interrupt(server_id: str) -> object:
        """Ctrl+C: SIGINT to the server's process: ``{"serverId", "signal": "SIGINT"}``."""

    def console_settings(server_id: str) -> object:
        """
        The console settings in force (sync): ``{"serverId", "settings":
        {"historySize", "throttleLines", "throttleInterval", "timestamps"}}``.
        """

    def update_console_settings(server_id: str, settings: object) -> object:
        """
        Change some console settings (unknown keys and bad values are
        ``InvalidInput``), stored and applied live; the answer of ``console_settings``.
        """

    def server_root(server_id: str) -> ServerRoot:
        """Where the server's files live (for the file manager)."""

    def lock_files(server_id: str, reason: str) -> Callable[[], None]:
        """
        Lock the server's files while ``reason`` (``"restored"``) happens to
        them: starts (power, reinstall, the crash auto-restart), deletion and
        every writer (file actions, SFTP) refuse until the returned release
        is called.  ``Conflict`` when they are locked already.
        """

    def files_locked(server_id: str) -> str | None:
        """Why the server's files are locked, or None (sync; safe from threads)."""

    def add_listener(listener: object, console: bool = True) -> None:
        """
        Subscribe ``listener(event)`` to every ``ctrlagent.events`` event
        (but ``ConsoleOutput`` when ``console`` is False).  A listener
        providing ``IConsoleConsumer`` settles console receipts.
        """

    def remove_listener(listener: object) -> None:
        """Unsubscribe."""


class IConsoleConsumer(Interface):
    """
    The event listener whose delivery of console lines is the agent's (the
    Panel link): a console line counts as delivered, and the server's mark
    passes it, only once the consumer says so (``ctrlagent.servers.delivery``).
    """

    def __call__(event: object) -> None:
        """
        Take one event.  For a ``ConsoleOutput`` with a ``receipt``, call the
        receipt exactly once: when the lines have been delivered, or when
        they were dropped and never will be.  Never raise.
        """


class IFileManager(Interface):
    """
    File operations confined to one server's directory.

    Every method takes the ``ServerRoot`` first, paths relative to it (a
    leading ``/`` means the root), and returns an awaitable (a Deferred)
    firing with a record of ``ctrlagent.wire.files``, whose ``to_json`` shape
    is the ``data`` of PROTOCOL.md section 2 for that action.
    """

    def list_files(
        root: ServerRoot, path: str, limit: int | None = None, offset: int = 0
    ) -> Awaitable[FileListing]:
        """A page of a directory: ``{"serverId", "path", "files": [...], "total", ...}``."""

    def search_files(
        root: ServerRoot, path: str, query: str, file_type: str = "all"
    ) -> Awaitable[FileSearch]:
        """Entries under ``path`` whose name contains ``query``: ``{"files": [...], ...}``."""

    def read_file(root: ServerRoot, path: str, lossy: bool = False) -> Awaitable[FileText]:
        """
        ``{"serverId", "path", "content", "size", "modified", "encoding": "utf8"}``.
        A file that is not valid UTF-8 raises ``NotText`` unless ``lossy``
        (then invalid bytes become U+FFFD and the answer has ``lossy: true``).
        """

    def write_file(root: ServerRoot, path: str, content: str) -> Awaitable[FileWritten]:
        """Atomic write. ``{"path", "size", "modified"}``."""

    def create_directory(root: ServerRoot, path: str) -> Awaitable[Done]:
        """``mkdir -p``. ``{"path"}``."""

    def delete_file(root: ServerRoot, path: str) -> Awaitable[Done]:
        """File or directory. ``{"message", "path"}``."""

    def rename_file(root: ServerRoot, old_path: str, new_path: str) -> Awaitable[Renamed]:
        """``{"oldPath", "newPath"}``."""

    def copy_file(root: ServerRoot, source_path: str, destination_path: str) -> Awaitable[Copied]:
        """
        Copy a file, symlink (as a link) or directory tree to a path that does
        not exist, all or nothing, within the disk limit:
        ``{"sourcePath", "destinationPath", "files", "directories", "symlinks", "size"}``.
        """

    def move_file(root: ServerRoot, source_path: str, destination_path: str) -> Awaitable[Copied]:
        """Move (rename) within the server directory: ``{"sourcePath", "destinationPath"}``."""

    def get_file_permissions(root: ServerRoot, path: str) -> Awaitable[FilePermissions]:
        """``{"path", "permissions": "644", "mode": "0644", "owner", "group"}``."""

    def download_file(root: ServerRoot, path: str) -> Awaitable[FileBytes]:
        """
        ``{"serverId", "path", "content" (base64), "encoding": "base64",
        "size", "modified"}``.
        """

    def upload_file(
        root: ServerRoot, path: str, content: str, encoding: str = "base64"
    ) -> Awaitable[FileWritten]:
        """Handles ``<path>.chunk<N>`` chunked uploads. ``{"path", "size", ...}``."""

    def get_file_info(root: ServerRoot, path: str) -> Awaitable[FileInfo]:
        """
        ``{"name", "path", "type", "size", "modified", "permissions", "mode",
        "owner", "group"}``.
        """

    def set_file_permissions(root: ServerRoot, path: str, mode: str) -> Awaitable[PermissionsSet]:
        """``{"path", "mode"}``; never follows symlinks, never sets setuid/setgid."""

    def create_archive(
        root: ServerRoot, files: list, archive_path: str, fmt: str
    ) -> Awaitable[ArchiveCreated]:
        """``{"archivePath", "size", "files"}``."""

    def extract_archive(
        root: ServerRoot, archive_path: str, extract_path: str
    ) -> Awaitable[ArchiveExtracted]:
        """``{"archivePath", "extractPath", "extracted", "skipped"}``."""

    def install_mod(root: ServerRoot, params: dict) -> Awaitable[ModInstalled]:
        """Fetch or copy a mod into the mods folder and record it. ``{"mod": {...}}``."""

    def uninstall_mod(root: ServerRoot, mod_id: str) -> Awaitable[ModList]:
        """
        Remove a mod; the mods LEFT, so the Panel refreshes its list from the
        answer: ``{"mods": [...], "count"}``.
        """

    def list_mods(root: ServerRoot) -> Awaitable[ModList]:
        """``{"mods": [{"id", "name", "version", "description", "enabled"}], "count"}``."""


class IHost(Interface):
    """
    The node's own figures, for the action registry and the Panel link.

    Each method returns (a Deferred or coroutine of) a ``ctrlagent.wire.node``
    record; ``ctrlagent.wire.json.to_json`` gives its shape for the Panel.  The
    provider is ``ctrlagent.system.SystemInfo`` (built by ``system.make_host``).
    """

    def snapshot() -> Awaitable[object]:
        """A ``HostSnapshot``: CPU percent, memory and disk use, uptime, load."""

    def system_load() -> Awaitable[object]:
        """A ``HostLoad``: CPU, memory and disk percents (a pong's ``systemLoad``)."""

    def system_info(node_id: str | None = None) -> Awaitable[object]:
        """A ``HostInfo``: identity, hardware, engine version, capabilities, networks."""


class ISftpService(Interface):
    """
    The node's SFTP server, as the SFTP actions see it (docs/SFTP.md).  The
    provider is ``ctrlagent.sftp.service.SftpService``; ``server_id`` is the
    canonical id the registry resolved.
    """

    def set_credentials(server_id: str, params: dict) -> Awaitable[object]:
        """
        Set the server's login from ``{password?, publicKeys?, readOnly?}``
        (a missing key keeps its value; ``password: None`` removes the
        password); the server's live sessions end.  ``{username, port}``.
        """

    def revoke_credentials(server_id: str) -> Awaitable[object]:
        """Remove the server's login and end its sessions: ``{revoked, closedSessions}``."""

    def list_sessions(server_id: str | None = None) -> object:
        """``{sessions: [...]}``: the live sessions of one server, or of all."""


class IBackupManager(Interface):
    """
    The node's backups, as the backup actions and the guards around restores
    see them (docs/BACKUPS.md).  The provider is
    ``ctrlagent.backups.manager.BackupManager``; ``server_id`` is the
    canonical id the registry resolved.  Answers are the ``data`` of
    PROTOCOL.md section 5.
    """

    def create_backup(
        server_id: str, name: object = None, driver: object = None, ignore: object = None
    ) -> Awaitable[object]:
        """Start a backup: ``{backupId, status: "running"}`` at once; events follow."""

    def list_backups(server_id: str) -> Awaitable[object]:
        """``{backups: [...], count}``, newest first."""

    def restore_backup(
        server_id: str, backup_id: object, truncate: object = False, stop: object = False
    ) -> Awaitable[object]:
        """Put a backup back (``CONFLICT`` while the server runs unless ``stop``)."""

    def delete_backup(server_id: str, backup_id: object) -> Awaitable[object]:
        """Remove a backup and its archive."""

    def set_backup_schedule(
        server_id: str, cron: object, retain: object = None, driver: object = None
    ) -> Awaitable[object]:
        """Back the server up on a cron schedule (an empty ``cron`` removes it)."""

    def busy(server_id: str) -> str | None:
        """What backup work holds the server now: ``backup``, ``restore``, ``delete`` or None."""

    def add_listener(listener: object) -> None:
        """Subscribe ``listener(event)`` to ``BackupProgress`` / ``BackupStatusChanged``."""

    def remove_listener(listener: object) -> None:
        """Unsubscribe."""
