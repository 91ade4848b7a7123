"""
The backup action family (PROTOCOL.md section 5), declared for the action
registry: ``create_backup``, ``list_backups``, ``restore_backup``,
``delete_backup``, ``set_backup_schedule``.

Written here, beside the ``BackupManager`` it calls, for the lead to move to
``ctrlagent/actions/backups.py`` and register in ``register_all``; it
imports only the registry's declarations.  A restore may outlast the
Panel's answer deadline: its ``pending`` answer says it goes on.
"""

from __future__ import annotations

from typing import Any

from ctrlagent.actions.payload import Array, Boolean, Field, Payload, Text
from ctrlagent.actions.registry import ActionSpec, Call
from ctrlagent.backups.manager import BackupManager


class _Retention(Field):
    """``retain``: a count, or ``{last?, days?}``; checked by the manager."""

    description = "keep the newest N scheduled backups, or {last, days}"

    def parse(self, value: Any, where: str) -> Any:
        from ctrlagent.actions.payload import MISSING

        return None if value is MISSING else value

    def schema(self) -> dict[str, Any]:
        return self._described({"oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "object", "properties": {"last": {"type": "integer", "minimum": 1},
                                              "days": {"type": "number", "minimum": 0}},
             "additionalProperties": False},
        ]})


def backup_actions(backups: BackupManager) -> list[ActionSpec]:
    """The backup family."""

    async def create(call: Call) -> object:
        p = call.params
        return await backups.create_backup(call.server, name=p["name"], driver=p["driver"],
                                           ignore=p["ignore"])

    async def listing(call: Call) -> object:
        return await backups.list_backups(call.server)

    async def restore(call: Call) -> object:
        p = call.params
        return await backups.restore_backup(call.server, p["backupId"], truncate=p["truncate"],
                                            stop=p["stop"])

    async def delete(call: Call) -> object:
        return await backups.delete_backup(call.server, call.params["backupId"])

    async def schedule(call: Call) -> object:
        p = call.params
        return await backups.set_backup_schedule(call.server, p["cron"], p["retain"],
                                                 p["driver"])

    def restoring(call: Call) -> object:
        return {"backupId": call.params["backupId"], "status": "restoring"}

    return [
        ActionSpec(
            "create_backup", "backups", "Start a backup of the server's files",
            Payload({"name": Text(), "driver": Text(description="local, s3 or restic"),
                     "ignore": Array(Text(required=True),
                                     description="gitignore patterns left out")}),
            create, message="backup started",
        ),
        ActionSpec("list_backups", "backups", "The server's backups, newest first", Payload(),
                   listing),
        ActionSpec(
            "restore_backup", "backups", "Put a backup back (server stopped, or stop:true)",
            Payload({"backupId": Text(required=True),
                     "truncate": Boolean(description="remove files the backup lacks"),
                     "stop": Boolean(description="stop a running server first")}),
            restore, message="backup restored", pending=restoring,
        ),
        ActionSpec(
            "delete_backup", "backups", "Remove a backup",
            Payload({"backupId": Text(required=True)}), delete, message="backup deleted",
        ),
        ActionSpec(
            "set_backup_schedule", "backups", "Back up on a cron schedule (empty cron: off)",
            Payload({"cron": Text(allow_empty=True, description="five fields, UTC"),
                     "retain": _Retention(), "driver": Text()}),
            schedule, message="backup schedule set",
        ),
    ]
