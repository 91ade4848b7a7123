"""
The bodies of the agent's HTTP answers (PROTOCOL.md section 1), as JSON values
for ``wire.json.encode``.

Every answer of ``/api/command`` and the REST routes is one of two envelopes:
``{"success": true, "message"?, "data"}`` or ``{"success": false, "error",
"code", "details"?}`` (``error`` is the message here, where the WebSocket link
carries an ``{code, message}`` object).  The refusals the listener writes
before any route runs (401, 408, 413) and the route errors (404, 405, 500)
are failures of the same shape.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

from typing import Any

from ctrlagent.errors import AuthFailed, CtrlAgentError, InvalidInput
from ctrlagent.wire.command import ActionResult
from ctrlagent.wire.json import to_json
from ctrlagent.wire.tables import REST_STATUS


def success(result: ActionResult) -> dict[str, Any]:
    """``{"success": true, "message"?, "data"}`` for a command that worked."""
    body: dict[str, Any] = {"success": True}
    if result.message:
        body["message"] = result.message
    body["data"] = to_json(result.data)
    return body


def failure(error: CtrlAgentError) -> dict[str, Any]:
    """``{"success": false, "error", "code", "details"?}``: the offending field when known."""
    body: dict[str, Any] = {"success": False, "error": error.message, "code": error.code}
    if error.details:
        body["details"] = to_json(error.details)
    return body


def auth_failed() -> dict[str, Any]:
    """The 401 answer: no credential, or a wrong one."""
    return failure(AuthFailed("missing or invalid credentials"))


def too_large(limit: int) -> dict[str, Any]:
    """The 413 answer: a body over ``limit`` bytes."""
    return failure(InvalidInput("request body exceeds the limit of {} bytes".format(limit)))


# The codes of route errors that are not error codes of an action.
_ROUTE_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


def route_error(status: int, name: str | None = None) -> dict[str, Any]:
    """
    A request no route answers: an unknown path (404 ``NOT_FOUND``), a wrong
    method (405 ``METHOD_NOT_ALLOWED``), or another HTTP error (``HTTP_<status>``
    with its ``name``).
    """
    message = "not found" if status == 404 else (name or "HTTP error")
    code = _ROUTE_CODES.get(status, "HTTP_{}".format(status))
    return failure(CtrlAgentError(message, code=code))


def internal_error() -> dict[str, Any]:
    """The 500 answer of a route that failed unexpectedly (never its traceback)."""
    return failure(CtrlAgentError("internal error"))


def rest_status(code: str, default: int = 500) -> int:
    """The HTTP status of error ``code`` on the REST surface (``default`` for others)."""
    return REST_STATUS.get(code, default)


__all__ = [
    "auth_failed",
    "failure",
    "internal_error",
    "rest_status",
    "route_error",
    "success",
    "too_large",
]
