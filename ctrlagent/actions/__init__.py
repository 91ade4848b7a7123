"""
The actions of the protocol, behind both transports (PROTOCOL.md section 2).

``registry`` holds the one pipeline every command goes through; each family
declares its actions once, in its own module (``servers``, ``console``,
``files``, ``mods``, ``node``) with the payload declarations of ``payload``.
``build_registry`` is the one way to get them all.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.interfaces import IReactorTime

from ctrlagent.config import TimeoutsConfig
from ctrlagent.interfaces import IFileManager, IHost, IServerManager
from ctrlagent.work import Deadlines, Tracker

from .console import console_actions
from .files import file_actions
from .mods import mod_actions
from .node import node_actions
from .registry import ActionRegistry
from .servers import server_actions


def register_all(
    registry: ActionRegistry, *, servers: IServerManager, files: IFileManager, host: IHost
) -> None:
    """Register every family's actions in ``registry``."""
    for spec in [
        *server_actions(servers),
        *console_actions(servers),
        *file_actions(files, servers),
        *mod_actions(files, servers),
        *node_actions(host, servers),
    ]:
        registry.register(spec)


def build_registry(
    *, servers: IServerManager, files: IFileManager, host: IHost, deadlines: Deadlines
) -> ActionRegistry:
    """The registry of every action over the given domain."""
    registry = ActionRegistry(servers=servers, deadlines=deadlines)
    register_all(registry, servers=servers, files=files, host=host)
    return registry


class Dispatcher(ActionRegistry):
    """
    The registry of every action, built the way the agent always built it.

    ``servers`` and ``files`` provide ``IServerManager`` and ``IFileManager``;
    ``system`` is the host view (``SystemInfo``); ``deadlines`` bounds long
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
    ) -> None:
        if deadlines is None:
            if clock is None:
                raise TypeError("Dispatcher needs deadlines or a clock")
            timeouts = TimeoutsConfig()
            if long_action_deadline is not None:
                timeouts = replace(timeouts, command_answer=long_action_deadline)
            deadlines = Deadlines(clock, tracker if tracker is not None else Tracker(), timeouts)
        super().__init__(servers=servers, deadlines=deadlines)
        register_all(self, servers=servers, files=files, host=system)


__all__ = ["ActionRegistry", "Dispatcher", "build_registry", "register_all"]
