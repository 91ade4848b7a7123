"""
The agent's own Docker Engine API client (no docker SDK).

``DockerClient`` is the entry point and ``DockerEngine`` the engine seam
over it; the pure parts (frame demultiplexer and line splitter, stats
arithmetic, event and pull-progress parsing, request bodies, time formats)
live in ``mux``, ``stats``, ``models``, ``bodies`` and ``timefmt`` and import
no reactor.
"""

from ctrlagent.engine.docker.client import (
    MANAGED_LABEL,
    MANAGED_LABEL_FILTER,
    DockerClient,
    error_for_status,
)
from ctrlagent.engine.docker.engine import DockerEngine
from ctrlagent.engine.docker.errors import (
    Conflict,
    ContainerGone,
    DockerConflict,
    DockerError,
    DockerInvalidInput,
    DockerNotFound,
    DockerTimeout,
    DockerUnavailable,
    ImageNotFound,
    NetworkNotFound,
    NotFound,
    PullFailed,
    RegistryAuthFailed,
)
from ctrlagent.engine.docker.eventstream import ResumableEvents
from ctrlagent.engine.docker.models import DockerEvent, ImageRef, PullProgress, parse_image_ref
from ctrlagent.engine.docker.stats import ContainerStats
from ctrlagent.engine.docker.stdin import StdinPipe
from ctrlagent.engine.docker.streams import ItemStream, LineStream
from ctrlagent.engine.docker.transport import DockerHost, parse_docker_host

__all__ = [
    "DockerClient",
    "DockerEngine",
    "MANAGED_LABEL",
    "MANAGED_LABEL_FILTER",
    "error_for_status",
    "Conflict",
    "ContainerGone",
    "DockerConflict",
    "DockerError",
    "DockerInvalidInput",
    "DockerNotFound",
    "DockerTimeout",
    "DockerUnavailable",
    "ImageNotFound",
    "NetworkNotFound",
    "NotFound",
    "PullFailed",
    "RegistryAuthFailed",
    "ResumableEvents",
    "DockerEvent",
    "ImageRef",
    "PullProgress",
    "parse_image_ref",
    "ContainerStats",
    "StdinPipe",
    "ItemStream",
    "LineStream",
    "DockerHost",
    "parse_docker_host",
]
