"""
The actions of the protocol, behind both transports (PROTOCOL.md section 2).

``registry`` holds the one pipeline every command goes through; each family
declares its actions once, in its own module (``servers``, ``console``,
``files``, ``mods``, ``node``) with the payload declarations of ``payload``.
``build_registry`` is the one way to get them all.
"""

from __future__ import annotations

from ctrlagent.interfaces import IFileManager, IServerManager
from ctrlagent.work import Deadlines

from .console import console_actions
from .files import file_actions
from .mods import mod_actions
from .node import HostInfo, node_actions
from .registry import ActionRegistry
from .servers import server_actions


def register_all(
    registry: ActionRegistry, *, servers: IServerManager, files: IFileManager, host: HostInfo
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
    *, servers: IServerManager, files: IFileManager, host: HostInfo, deadlines: Deadlines
) -> ActionRegistry:
    """The registry of every action over the given domain."""
    registry = ActionRegistry(servers=servers, deadlines=deadlines)
    register_all(registry, servers=servers, files=files, host=host)
    return registry


__all__ = ["ActionRegistry", "build_registry", "register_all"]
