"""
The OpenAPI 3 description of the agent's HTTP API, served at ``/api/openapi.json``.

Kept as plain data next to the routes so that a test can check that every route
is described and every ``$ref`` resolves.  The action list and each action's
payload schema come from the action registry's declarations when they are
given, so the document cannot drift from what the agent accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ctrlagent.wire.tables import ERROR_CODES, POWER_WORDS

_ERROR_CODES = list(ERROR_CODES)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": "#/components/schemas/" + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_FAILURE = _json(_ref("Failure"), "The request failed; `code` says why.")
_UNAUTHORIZED = _json(_ref("Failure"), "Missing or wrong secret (`AUTH_FAILED`).")
_TOO_LARGE = _json(_ref("Failure"), "The body is larger than the configured limit.")
_SERVER_ID = {
    "name": "serverId",
    "in": "path",
    "required": True,
    "description": "Any id of the server: creation id, Panel id alias, container name or id.",
    "schema": {"type": "string"},
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "ctrlagent HTTP API",
        "description": (
            "The node agent of Ctrl-Alt-Play. The Panel drives it through `POST /api/command`; "
            "a failed command answers HTTP 200 with `success: false` because the Panel marks a "
            "node offline on any non-2xx status. `/api/servers...` is a small REST surface for "
            "operators that uses ordinary HTTP status codes."
        ),
        "version": "0",
    },
    "security": [{"bearer": []}, {"apiKey": []}],
    "paths": {
        "/": {
            "get": {
                "summary": "Redirect to /health",
                "security": [],
                "responses": {"301": {"description": "`Location: /health`"}},
            }
        },
        "/health": {
            "get": {
                "summary": "Discovery and health probe",
                "security": [],
                "responses": {
                    "200": _json(_ref("Health"), "The agent can serve (Docker answers)."),
                    "503": _json(_ref("Health"), "The Docker engine is unreachable."),
                },
            }
        },
        "/api/discovery": {
            "get": {
                "summary": "What kind of agent this is",
                "security": [],
                "responses": {"200": _json(_ref("Discovery"), "Agent identity.")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format; metrics.token, not the secret)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The agent's series in the Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _UNAUTHORIZED,
                    "404": {"description": "Metrics are off here, or on their own endpoint."},
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document.")},
            }
        },
        "/api/status": {
            "get": {
                "summary": "Node status as the Panel shows it",
                "responses": {
                    "200": _json(_ref("NodeStatus"), "Node status."),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/api/command": {
            "post": {
                "summary": "Run one action (the Panel's command endpoint)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("CommandRequest")}},
                },
                "responses": {
                    "200": _json(
                        {"oneOf": [_ref("Success"), _ref("Failure")]},
                        "The command's outcome, success or failure.",
                    ),
                    "400": _json(_ref("Failure"), "The body is not JSON (`PARSE_ERROR`)."),
                    "401": _UNAUTHORIZED,
                    "413": _TOO_LARGE,
                },
            }
        },
        "/api/servers": {
            "get": {
                "summary": "Every managed server",
                "responses": {
                    "200": _json(_ref("ServerListResponse"), "Managed servers."),
                    "401": _UNAUTHORIZED,
                },
            }
        },
        "/api/servers/{serverId}": {
            "get": {
                "summary": "One server's status",
                "parameters": [_SERVER_ID],
                "responses": {
                    "200": _json(_ref("ServerStatusResponse"), "The server's status."),
                    "401": _UNAUTHORIZED,
                    "404": _FAILURE,
                },
            }
        },
        "/api/servers/{serverId}/power": {
            "post": {
                "summary": "Start, stop, restart or kill a server",
                "parameters": [_SERVER_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("PowerRequest")}},
                },
                "responses": {
                    "200": _json(_ref("ServerStatusResponse"), "The power action is under way."),
                    "400": _FAILURE,
                    "401": _UNAUTHORIZED,
                    "404": _FAILURE,
                    "409": _FAILURE,
                },
            }
        },
        "/api/servers/{serverId}/commands": {
            "post": {
                "summary": "Write one line to the server's console",
                "parameters": [_SERVER_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ConsoleCommandRequest")}},
                },
                "responses": {
                    "200": _json(_ref("Success"), "The line was written."),
                    "400": _FAILURE,
                    "401": _UNAUTHORIZED,
                    "404": _FAILURE,
                    "409": _FAILURE,
                },
            }
        },
        "/api/servers/{serverId}/aliases": {
            "post": {
                "summary": "Record another id the server is known by (the Panel's second id)",
                "parameters": [_SERVER_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("AliasRequest")}},
                },
                "responses": {
                    "200": _json(_ref("Success"), "The alias names the server from now on."),
                    "400": _FAILURE,
                    "401": _UNAUTHORIZED,
                    "404": _FAILURE,
                    "409": _FAILURE,
                },
            }
        },
        "/api/servers/{serverId}/logs": {
            "get": {
                "summary": "The last console lines",
                "parameters": [
                    _SERVER_ID,
                    {
                        "name": "lines",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "default": 100},
                    },
                ],
                "responses": {
                    "200": _json(_ref("LogsResponse"), "Console lines, oldest first."),
                    "400": _FAILURE,
                    "401": _UNAUTHORIZED,
                    "404": _FAILURE,
                },
            }
        },
        "/api/servers/{serverId}/backups/{backupId}/download": {
            "get": {
                "summary": "A backup's archive (tar.zst), whole or one byte range",
                "parameters": [
                    _SERVER_ID,
                    {
                        "name": "backupId",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "Range",
                        "in": "header",
                        "required": False,
                        "description": "One range: `bytes=a-b`, `bytes=a-` or `bytes=-n`.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The whole archive.",
                        "content": {"application/zstd": {
                            "schema": {"type": "string", "format": "binary"}}},
                    },
                    "206": {
                        "description": "The range asked, with `Content-Range`.",
                        "content": {"application/zstd": {
                            "schema": {"type": "string", "format": "binary"}}},
                    },
                    "401": _UNAUTHORIZED,
                    "404": _FAILURE,
                    "409": _FAILURE,
                    "416": {"description": "The range is past the archive's end."},
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "The node's secret."},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        },
        "schemas": {
            "Failure": {
                "type": "object",
                "required": ["success", "error", "code"],
                "properties": {
                    "success": {"type": "boolean", "enum": [False]},
                    "error": {"type": "string"},
                    "code": {"type": "string", "enum": _ERROR_CODES},
                    "details": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}},
                        "additionalProperties": True,
                    },
                },
            },
            "Success": {
                "type": "object",
                "required": ["success", "data"],
                "properties": {
                    "success": {"type": "boolean", "enum": [True]},
                    "message": {"type": "string"},
                    "data": {"type": "object", "additionalProperties": True},
                },
            },
            "Action": {"type": "string", "description": "An action of the dispatcher."},
            "PanelCommand": {
                "type": "object",
                "description": "The Panel's shape.",
                "required": ["action"],
                "properties": {
                    "action": _ref("Action"),
                    "serverId": {"type": "string"},
                    "payload": {"type": "object", "additionalProperties": True},
                },
            },
            "GoAgentCommand": {
                "type": "object",
                "description": "The Go agent's shape; `data` may carry `serverId`.",
                "required": ["action", "data"],
                "properties": {
                    "action": _ref("Action"),
                    "data": {
                        "type": "object",
                        "properties": {"serverId": {"type": "string"}},
                        "additionalProperties": True,
                    },
                },
            },
            "CommandRequest": {
                "description": (
                    "Either shape; the agent merges `params = {...data, ...payload}` and takes "
                    "`serverId` from the top level, else `data`, else `payload`."
                ),
                "anyOf": [_ref("PanelCommand"), _ref("GoAgentCommand")],
            },
            "Health": {
                "type": "object",
                "required": ["status", "nodeId", "version", "connected", "docker"],
                "properties": {
                    "status": {"type": "string", "enum": ["healthy", "degraded"]},
                    "nodeId": {"type": "string"},
                    "version": {"type": "string"},
                    "uptime": {"type": "string", "example": "1h 2m 3s"},
                    "uptimeSeconds": {"type": "integer"},
                    "timestamp": {"type": "string", "format": "date-time"},
                    "connected": {
                        "type": "boolean",
                        "description": "WebSocket link state; true when the link is disabled.",
                    },
                    "docker": {"type": "boolean"},
                },
            },
            "Discovery": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["ctrl-alt-play-agent"]},
                    "version": {"type": "string"},
                    "name": {"type": "string"},
                    "nodeUuid": {"type": "string"},
                },
            },
            "NodeStatus": {
                "type": "object",
                "required": ["online", "version"],
                "properties": {
                    "online": {"type": "boolean"},
                    "version": {"type": "string"},
                    "uptime": {"type": "number", "description": "seconds"},
                    "serverCount": {"type": "integer"},
                    "lastSeen": {"type": "string", "format": "date-time"},
                    "nodeId": {"type": "string"},
                },
            },
            "ServerStatus": {
                "type": "object",
                "properties": {
                    "serverId": {"type": "string"},
                    "status": {
                        "type": "string",
                        "example": "running",
                        "description": "installing, offline, starting, running, stopping, ...",
                    },
                    "panelStatus": {
                        "type": "string",
                        "enum": [
                            "INSTALLING",
                            "INSTALL_FAILED",
                            "SUSPENDED",
                            "OFFLINE",
                            "STARTING",
                            "RUNNING",
                            "STOPPING",
                            "CRASHED",
                        ],
                    },
                    "containerId": {"type": "string", "nullable": True},
                    "resources": _ref("Metrics"),
                    "allocations": {
                        "type": "array",
                        "description": "the ports it publishes (left out when none)",
                        "items": {
                            "type": "object",
                            "properties": {
                                "ip": {"type": "string"},
                                "port": {"type": "integer", "description": "on the host"},
                                "internal": {"type": "integer", "description": "in the container"},
                                "protocol": {"type": "string", "example": "tcp/udp"},
                                "protocols": {"type": "array", "items": {"type": "string"}},
                                "primary": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
            "Metrics": {
                "type": "object",
                "properties": {
                    "cpu": {"type": "number", "description": "percent (100 = one core)"},
                    "memory": {"type": "number", "description": "MB"},
                    "disk": {"type": "number", "description": "MB"},
                    "network": {
                        "type": "object",
                        "properties": {"in": {"type": "integer"}, "out": {"type": "integer"}},
                    },
                    "players": {"type": "integer"},
                    "timestamp": {"type": "string", "format": "date-time"},
                },
            },
            "ServerStatusResponse": {
                "allOf": [
                    _ref("Success"),
                    {"type": "object", "properties": {"data": _ref("ServerStatus")}},
                ]
            },
            "ServerListResponse": {
                "allOf": [
                    _ref("Success"),
                    {
                        "type": "object",
                        "properties": {
                            "data": {
                                "type": "object",
                                "properties": {
                                    "servers": {"type": "array", "items": _ref("ServerStatus")},
                                    "count": {"type": "integer"},
                                },
                            }
                        },
                    },
                ]
            },
            "PowerRequest": {
                "type": "object",
                "required": ["action"],
                "properties": {
                    "action": {"type": "string", "enum": list(POWER_WORDS)},
                    "signal": {"type": "string", "example": "SIGTERM"},
                    "timeout": {"type": "number", "description": "seconds before a kill"},
                },
            },
            "ConsoleCommandRequest": {
                "type": "object",
                "required": ["command"],
                "properties": {"command": {"type": "string"}},
            },
            "AliasRequest": {
                "type": "object",
                "required": ["alias"],
                "properties": {
                    "alias": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
                        "description": "The server's other id (the Panel's server.id or uuid).",
                    }
                },
            },
            "LogsResponse": {
                "allOf": [
                    _ref("Success"),
                    {
                        "type": "object",
                        "properties": {
                            "data": {
                                "type": "object",
                                "properties": {
                                    "logs": {"type": "array", "items": {"type": "string"}},
                                    "lines": {"type": "integer"},
                                },
                            }
                        },
                    },
                ]
            },
        },
    },
}


def openapi_document(
    version: str,
    actions: list[str] | None = None,
    schemas: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The document for agent ``version``, listing ``actions`` when given.

    ``schemas`` are the action registry's component schemas
    (``ActionRegistry.openapi_schemas()``: the ``Action`` enum, one payload
    schema per action and ``ActionCommand``), merged into the components so
    that the command endpoint is described action by action.
    """
    document = copy.deepcopy(_DOCUMENT)
    document["info"]["version"] = version
    components = document["components"]["schemas"]
    if schemas:
        components.update(copy.deepcopy(dict(schemas)))
        if "ActionCommand" in schemas:
            components["CommandRequest"]["anyOf"].append(_ref("ActionCommand"))
    if actions:
        components["Action"]["enum"] = sorted(actions)
    return document
