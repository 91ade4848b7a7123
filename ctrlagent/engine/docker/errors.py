"""
Typed errors of the Docker client.

Each error is both a ``DockerError`` (it carries the HTTP status the engine
answered, 0 when it did not answer) and the agent's generic category
(``NotFound``, ``Conflict``), so that transports map them to protocol codes
without knowing about Docker.
"""

from __future__ import annotations

from typing import Any

from ctrlagent.errors import Conflict, DockerError, DockerUnavailable, InvalidInput
from ctrlagent.errors import NotFound as _NotFound

__all__ = [
    "DockerError",
    "DockerUnavailable",
    "DockerTimeout",
    "DockerNotFound",
    "ContainerGone",
    "ImageNotFound",
    "NetworkNotFound",
    "DockerConflict",
    "DockerInvalidInput",
    "PullFailed",
    "RegistryAuthFailed",
    "NotFound",
    "Conflict",
    "error_for_status",
]


class DockerTimeout(DockerUnavailable):
    """A call or a stream got no answer within its time limit."""


class DockerNotFound(DockerError, _NotFound):
    """The engine answered 404: the named object does not exist."""

    code = "DOCKER_ERROR"

    def __init__(self, message: str, status: int = 404, **kw: Any) -> None:
        super().__init__(status, message, **kw)


class ContainerGone(DockerNotFound):
    """The container named by the call does not exist (any more)."""

    code = "CONTAINER_NOT_FOUND"


class ImageNotFound(DockerNotFound):
    """The image is neither local nor in its registry."""

    code = "DOCKER_ERROR"


class NetworkNotFound(DockerNotFound):
    """The named network does not exist."""


class DockerConflict(DockerError, Conflict):
    """The engine answered 409 (name in use, container running, ...)."""

    code = "CONFLICT"

    def __init__(self, message: str, status: int = 409, **kw: Any) -> None:
        super().__init__(status, message, **kw)


class DockerInvalidInput(DockerError, InvalidInput):
    """An argument the client refuses before talking to the engine."""

    code = "INVALID_PAYLOAD"

    def __init__(self, message: str, **kw: Any) -> None:
        DockerError.__init__(self, 400, message, **kw)
        self.field = None


class PullFailed(DockerError):
    """A pull failed: the registry is unreachable or refused it."""


class RegistryAuthFailed(PullFailed):
    """The registry wants credentials we do not have, or refused ours."""


# The names the issue uses: ``from ctrlagent.engine.docker import NotFound, Conflict``
# catches every Docker 404/409 (and the agent's generic ones).
NotFound = _NotFound


def error_for_status(status: int, message: str, kind: str = "") -> DockerError:
    """
    The typed error for an engine answer ``status`` about a ``kind`` of thing.

    ``kind`` is "container", "image", "network" or "" and chooses the
    ``NotFound`` subclass.
    """
    message = message or "engine answered {}".format(status)
    if status == 404:
        cls: type[DockerNotFound] = {
            "container": ContainerGone,
            "image": ImageNotFound,
            "network": NetworkNotFound,
        }.get(kind, DockerNotFound)
        return cls(message, status)
    if status == 409:
        return DockerConflict(message, status)
    return DockerError(status, message)
