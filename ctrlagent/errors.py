"""
The agent's error hierarchy.

Every error the agent reports to the Panel is a ``CtrlAgentError`` carrying one
of the protocol's error codes (PROTOCOL.md section 3).  Transports map these to
responses in exactly one place each; domain code only raises them.
"""

from __future__ import annotations

from typing import Any


class CtrlAgentError(Exception):
    """
    Base of every error that has a meaning on the wire.

    ``code`` is the UPPER_SNAKE protocol code, ``message`` a human sentence and
    ``details`` optional structured extras (never secrets).
    """

    code: str = "EXECUTION_ERROR"

    def __init__(
        self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def __str__(self) -> str:
        return self.message


class ParseError(CtrlAgentError):
    """A request body or frame that is not valid JSON / not an object."""

    code = "PARSE_ERROR"


class UnknownAction(CtrlAgentError):
    """An action name the dispatcher does not know."""

    code = "UNKNOWN_ACTION"


class InvalidInput(CtrlAgentError):
    """A payload field that is missing, of the wrong type, or out of range."""

    code = "INVALID_PAYLOAD"

    def __init__(self, message: str, *, field: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.field = field
        if field is not None:
            self.details.setdefault("field", field)


class ConfigInvalid(CtrlAgentError):
    """A configuration value that cannot be used."""

    code = "CONFIG_INVALID"


class AuthFailed(CtrlAgentError):
    """A missing or wrong credential."""

    code = "AUTH_FAILED"


class PermissionDenied(CtrlAgentError):
    """An operation that would leave a server's directory or is otherwise forbidden."""

    code = "PERMISSION_DENIED"


class NotFound(CtrlAgentError):
    """Something named by the request does not exist."""

    code = "NOT_FOUND"


class ServerNotFound(NotFound):
    """No managed server answers to the given id or alias."""

    code = "SERVER_NOT_FOUND"


class ContainerNotFound(NotFound):
    """The server's container is gone (removed behind the agent's back)."""

    code = "CONTAINER_NOT_FOUND"


class FileNotFound(NotFound):
    """A path inside a server's directory that does not exist."""

    code = "FILE_NOT_FOUND"


class NotText(CtrlAgentError):
    """
    A file asked for as text that is not valid UTF-8 (a binary file): its
    bytes come through ``download_file``, or as lossy text on request.
    """

    code = "NOT_TEXT"


class Conflict(CtrlAgentError):
    """The request conflicts with work in progress (e.g. a second power action)."""

    code = "CONFLICT"


class PortConflict(Conflict):
    """A port allocation that is already in use on the host."""

    code = "PORT_CONFLICT"


class InsufficientResources(CtrlAgentError):
    """A disk, memory or size limit would be exceeded."""

    code = "INSUFFICIENT_RESOURCES"


class EngineError(CtrlAgentError):
    """
    The container engine (Docker, Podman, ...) answered with an error.

    The protocol calls every engine failure ``DOCKER_ERROR``, whatever the
    runtime.
    """

    code = "DOCKER_ERROR"


class EngineUnavailable(EngineError):
    """The container engine cannot be reached: socket missing, refused, or timing out."""


class DockerError(EngineError):
    """
    The Docker engine answered with an error.

    ``status`` is the HTTP status the engine returned (0 when there was no
    answer at all).
    """

    def __init__(self, status: int, message: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = status


class DockerUnavailable(DockerError, EngineUnavailable):
    """The Docker engine cannot be reached: socket missing, refused, or timing out."""

    def __init__(self, message: str, **kw: Any) -> None:
        super().__init__(0, message, **kw)
