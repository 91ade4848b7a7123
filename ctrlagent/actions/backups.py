"""
The backup actions (PROTOCOL.md section 5, docs/BACKUPS.md):
``create_backup``, ``list_backups``, ``restore_backup``, ``delete_backup``,
``set_backup_schedule``, over an ``IBackupManager``.

A restore may outlast the Panel's answer deadline: its ``pending`` answer
says it goes on.  While a server's files are locked (a restore holds them,
``IServerManager.lock_files``), the actions that would run it or write its
files (``GUARDED_DURING_RESTORE``) answer ``CONFLICT``: ``guard_restores``
wraps them where the registry is built, reading the servers' one lock state
(the same one SFTP and the server's own starts read), so that the file
manager need not know about backups.

On a node without a backup manager (a registry built without one), the same
names answer ``CONFLICT`` "backups are not available on this node" at once,
so that the Panel learns why instead of reading ``UNKNOWN_ACTION``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ctrlagent.errors import Conflict
from ctrlagent.interfaces import IBackupManager, IServerManager

from .payload import MISSING, Array, Boolean, Field, Payload, Text
from .registry import ActionSpec, Call

UNAVAILABLE = "backups are not available on this node"

# Actions that start the server or write into its directory: refused while a
# restore swaps that directory (the restore's own stop is the manager's).
GUARDED_DURING_RESTORE = frozenset({
    "start_server", "restart_server", "reinstall_server",
    "write_file", "create_directory", "delete_file", "rename_file", "upload_file",
    "set_file_permissions", "create_archive", "extract_archive",
    "install_mod", "uninstall_mod",
})


class _Retention(Field):
    """``retain``: a count, or ``{last?, days?}``; checked by the manager."""

    description = "keep the newest N scheduled backups, or {last, days}"

    def parse(self, value: Any, where: str) -> Any:
        return None if value is MISSING else value

    def schema(self) -> dict[str, Any]:
        return self._described({"oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "object", "properties": {"last": {"type": "integer", "minimum": 1},
                                              "days": {"type": "number", "minimum": 0}},
             "additionalProperties": False},
        ]})


_CREATE = Payload({
    "name": Text(description="a label for the backup (default: backup)"),
    "driver": Text(description="local, s3 or restic (default: backups.driver)"),
    "ignore": Array(Text(required=True), description="gitignore patterns left out"),
})
_RESTORE = Payload({
    "backupId": Text(required=True),
    "truncate": Boolean(description="remove files the backup lacks"),
    "stop": Boolean(description="stop a running server first"),
})
_DELETE = Payload({"backupId": Text(required=True)})
_SCHEDULE = Payload({
    "cron": Text(allow_empty=True, description="five fields, UTC; empty: no schedule"),
    "retain": _Retention(),
    "driver": Text(description="local, s3 or restic"),
})

_SUMMARIES = (
    ("create_backup", "Start a backup of the server's files", _CREATE),
    ("list_backups", "The server's backups, newest first", Payload()),
    ("restore_backup", "Put a backup back (server stopped, or stop:true)", _RESTORE),
    ("delete_backup", "Remove a backup", _DELETE),
    ("set_backup_schedule", "Back up on a cron schedule (empty cron: off)", _SCHEDULE),
)


def backup_actions(backups: IBackupManager | None) -> list[ActionSpec]:
    """The backup family over ``backups`` (None: no backups on this node)."""
    if backups is None:
        return _unavailable()
    manager = backups

    async def create(call: Call) -> object:
        p = call.params
        return await manager.create_backup(call.server, p["name"], p["driver"], p["ignore"])

    async def listing(call: Call) -> object:
        return await manager.list_backups(call.server)

    async def restore(call: Call) -> object:
        p = call.params
        return await manager.restore_backup(call.server, p["backupId"], p["truncate"], p["stop"])

    async def delete(call: Call) -> object:
        return await manager.delete_backup(call.server, call.params["backupId"])

    async def schedule(call: Call) -> object:
        p = call.params
        return await manager.set_backup_schedule(call.server, p["cron"], p["retain"], p["driver"])

    def restoring(call: Call) -> object:
        return {"backupId": call.params["backupId"], "status": "restoring"}

    handlers = {
        "create_backup": (create, "backup started", None),
        "list_backups": (listing, None, None),
        "restore_backup": (restore, "backup restored", restoring),
        "delete_backup": (delete, "backup deleted", None),
        "set_backup_schedule": (schedule, "backup schedule set", None),
    }
    specs = []
    for name, summary, payload in _SUMMARIES:
        handler, message, pending = handlers[name]
        specs.append(ActionSpec(name, "backups", summary, payload, handler, message=message,
                                pending=pending))
    return specs


def _unavailable() -> list[ActionSpec]:
    """The backup names on a node without backups: each answers ``CONFLICT`` at once."""

    async def unavailable(call: Call) -> object:
        raise Conflict(UNAVAILABLE)

    anything = Payload(server="none")
    return [
        ActionSpec(name, "backups", "{} ({})".format(summary, UNAVAILABLE), anything, unavailable)
        for name, summary, _ in _SUMMARIES
    ]


def guard_restores(specs: Iterable[ActionSpec], servers: IServerManager) -> list[ActionSpec]:
    """
    ``specs`` with those of ``GUARDED_DURING_RESTORE`` refusing, with
    ``CONFLICT``, a server whose files are locked (a restore is putting them
    back): the servers' one state (``IServerManager.files_locked``) that
    SFTP, the starts and the crash auto-restart read too.  The check comes
    after the registry resolved the server and parsed the payload, so an
    unknown server or a bad payload still answers as it always did.
    """
    out = []
    for spec in specs:
        if spec.name not in GUARDED_DURING_RESTORE:
            out.append(spec)
            continue
        out.append(replace(spec, handler=_guarded(spec, servers)))
    return out


def _guarded(spec: ActionSpec, servers: IServerManager) -> Any:
    handler = spec.handler
    name = spec.name

    async def guarded(call: Call) -> object:
        if call.server_id is not None:
            reason = servers.files_locked(call.server_id)
            if reason is not None:
                raise Conflict("{}: the server's files are being {}; try again once that "
                               "has finished".format(name, reason))
        return await handler(call)

    return guarded
