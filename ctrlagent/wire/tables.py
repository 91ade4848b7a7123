"""
The Panel's names and codes, each table once: power words, legacy frame
types, alternative action names, error codes and their REST statuses
(PROTOCOL.md sections 2 and 3).  Transports and the action registry read
them from here; nothing else spells them.

Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# The power words (``server_power``'s ``data.action``, the REST
# ``/api/servers/<id>/power`` body) and the action each one means.
POWER_WORDS: Mapping[str, str] = MappingProxyType(
    {
        "start": "start_server",
        "stop": "stop_server",
        "restart": "restart_server",
        "kill": "kill_server",
    }
)

# Legacy typed WebSocket frames (``{type, data}``) and the section 2 action each
# one means.  ``server_power`` is not here: its action comes from its
# ``data.action`` power word (``POWER_WORDS``).
LEGACY_FRAME_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "server_create": "create_server",
        "server_start": "start_server",
        "server_stop": "stop_server",
        "server_restart": "restart_server",
        "server_delete": "delete_server",
        "server_command": "send_server_command",
        "file_read": "read_file",
        "file_write": "write_file",
        "server_update": "update_server",
        "server_suspend": "suspend_server",
        "server_unsuspend": "unsuspend_server",
        "server_reinstall": "reinstall_server",
    }
)

# Alternative action names the registry accepts on both transports, and the
# action each one runs: the legacy typed-frame names (PROTOCOL.md section 3)
# and the Go agent's spellings, so that whichever transport hands them over
# is understood, plus the older names of a few actions.
ACTION_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "server_create": "create_server",
        "server_start": "start_server",
        "server_stop": "stop_server",
        "server_restart": "restart_server",
        "server_kill": "kill_server",
        "server_delete": "delete_server",
        "server_status": "get_server_status",
        "server_command": "send_server_command",
        "server_power": "power_server",
        "server_update": "update_server",
        "server_suspend": "suspend_server",
        "server_unsuspend": "unsuspend_server",
        "server_reinstall": "reinstall_server",
        "file_read": "read_file",
        "file_write": "write_file",
        "ping": "system.ping",
        "get_status": "get_server_status",
        "console:connect": "console:status",
        "get_system_info": "system.info",
    }
)

# Every error code the agent reports (``CtrlAgentError.code``), in the order
# PROTOCOL.md lists them, then the ones the agent adds.
ERROR_CODES: tuple[str, ...] = (
    "UNKNOWN_ACTION",
    "PARSE_ERROR",
    "INVALID_PAYLOAD",
    "SERVER_NOT_FOUND",
    "CONTAINER_NOT_FOUND",
    "FILE_NOT_FOUND",
    "NOT_FOUND",
    "DOCKER_ERROR",
    "INSUFFICIENT_RESOURCES",
    "PERMISSION_DENIED",
    "CONFIG_INVALID",
    "PORT_CONFLICT",
    "AUTH_FAILED",
    "CONFLICT",
    "EXECUTION_ERROR",
    "WORKSHOP_DOWNLOAD_FAILED",
    "NOT_TEXT",
)

# The HTTP status of each error code on the REST surface for operators
# (``/api/servers...``).  The Panel's ``/api/command`` never uses these: a
# failed command is HTTP 200 there.
REST_STATUS: Mapping[str, int] = MappingProxyType(
    {
        "SERVER_NOT_FOUND": 404,
        "CONTAINER_NOT_FOUND": 404,
        "FILE_NOT_FOUND": 404,
        "NOT_FOUND": 404,
        "INVALID_PAYLOAD": 400,
        "PARSE_ERROR": 400,
        "UNKNOWN_ACTION": 400,
        "CONFLICT": 409,
        "PORT_CONFLICT": 409,
        "PERMISSION_DENIED": 403,
        "AUTH_FAILED": 401,
        "INSUFFICIENT_RESOURCES": 507,
        "DOCKER_ERROR": 502,
        "CONFIG_INVALID": 500,
        "EXECUTION_ERROR": 500,
        "WORKSHOP_DOWNLOAD_FAILED": 502,
        "NOT_TEXT": 415,
    }
)

__all__ = ["ACTION_ALIASES", "ERROR_CODES", "LEGACY_FRAME_TYPES", "POWER_WORDS", "REST_STATUS"]
