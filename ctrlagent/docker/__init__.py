"""
The agent's own Docker Engine API client (no docker SDK).

``DockerClient`` is the entry point; the pure parts (frame demultiplexer and
line splitter, stats arithmetic, event and pull-progress parsing) live in
``mux``, ``stats`` and ``models`` and import no reactor.
"""

from ctrlagent.docker.client import (
    MANAGED_LABEL,
    MANAGED_LABEL_FILTER,
    DockerClient,
    error_for_status,
)
from ctrlagent.docker.errors import (
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
from ctrlagent.docker.eventstream import ResumableEvents
from ctrlagent.docker.models import DockerEvent, ImageRef, PullProgress, parse_image_ref
from ctrlagent.docker.stats import ContainerStats
from ctrlagent.docker.stdin import StdinPipe
from ctrlagent.docker.streams import ItemStream, LineStream
from ctrlagent.docker.transport import DockerHost, parse_docker_host

__all__ = [
    "DockerClient",
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
