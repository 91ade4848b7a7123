"""
The actions of the protocol, behind both transports (PROTOCOL.md section 2).

``registry`` holds the one pipeline every command goes through; each family
declares its actions once, in its own module (``servers``, ``aliases``, ``console``,
``files``, ``mods``, ``node``, ``sftp``, ``backups``) with the payload declarations of ``payload``.
``build_registry`` is the one way to get them all.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.interfaces import IReactorTime

from ctrlagent.config import TimeoutsConfig
from ctrlagent.interfaces import IBackupManager, IFileManager, IHost, IServerManager, ISftpService
from ctrlagent.work import Deadlines, Tracker

from .aliases import alias_actions
from .backups import backup_actions, guard_restores
from .console import console_actions
from .files import file_actions
from .mods import mod_actions
from .node import node_actions
from .registry import ActionRegistry
from .servers import server_actions
from .sftp import sftp_actions


def register_all(
    registry: ActionRegistry,
    *,
    servers: IServerManager,
    files: IFileManager,
    host: IHost,
    sftp: ISftpService | None = None,
    backups: IBackupManager | None = None,
) -> None:
    """
    Register every family's actions in ``registry``.  Without ``sftp`` (SFTP
    disabled on this node) the SFTP actions answer ``CONFLICT``; without
    ``backups`` the backup actions do.  The actions that start a server or
    write its files refuse while its files are locked (a restore runs).
    """
    specs = [
        *server_actions(servers),
        *alias_actions(servers),
        *console_actions(servers),
        *file_actions(files, servers),
        *mod_actions(files, servers),
        *node_actions(host, servers),
        *sftp_actions(sftp),
        *backup_actions(backups),
    ]
    for spec in guard_restores(specs, servers):
        registry.register(spec)


def build_registry(
    *,
    servers: IServerManager,
    files: IFileManager,
    host: IHost,
    deadlines: Deadlines,
    sftp: ISftpService | None = None,
    backups: IBackupManager | None = None,
) -> ActionRegistry:
    """
    The registry of every action over the given domain (``sftp``: the SFTP
    server, ``backups``: the backup manager, if any).
    """
    registry = ActionRegistry(servers=servers, deadlines=deadlines)
    register_all(registry, servers=servers, files=files, host=host, sftp=sftp, backups=backups)
    return registry


class Dispatcher(ActionRegistry):
    """
    The registry of every action, built the way the agent always built it.

    ``servers`` and ``files`` provide ``IServerManager`` and ``IFileManager``;
    ``system`` is the host view (``SystemInfo``); ``sftp`` the SFTP server
    (``ISftpService``; None when disabled); ``backups`` the backup manager
    (``IBackupManager``; None: the backup actions answer ``CONFLICT``); ``deadlines`` bounds long
    actions and keeps the work that outlives its answer.  A dispatcher built
    without ``deadlines`` (tests) makes its own from ``clock``, ``tracker``
    and ``long_action_deadline`` (default: ``TimeoutsConfig.command_answer``).
    """

    def __init__(
        self,
        *,
        servers: IServerManager,
        files: IFileManager,
        system: IHost,
        deadlines: Deadlines | None = None,
        clock: IReactorTime | None = None,
        tracker: Tracker | None = None,
        long_action_deadline: float | None = None,
        sftp: ISftpService | None = None,
        backups: IBackupManager | None = None,
    ) -> None:
        if deadlines is None:
            if clock is None:
                raise TypeError("Dispatcher needs deadlines or a clock")
            timeouts = TimeoutsConfig()
            if long_action_deadline is not None:
                timeouts = replace(timeouts, command_answer=long_action_deadline)
            deadlines = Deadlines(clock, tracker if tracker is not None else Tracker(), timeouts)
        super().__init__(servers=servers, deadlines=deadlines)
        register_all(
            self, servers=servers, files=files, host=system, sftp=sftp, backups=backups
        )


__all__ = ["ActionRegistry", "Dispatcher", "build_registry", "register_all"]
