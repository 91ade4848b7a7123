"""
Typed values of the Docker client, parsed from the engine's JSON.

Pure code: events, pull progress and image references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctrlagent.engine.docker.timefmt import format_since

__all__ = [
    "DockerEvent",
    "PullProgress",
    "ImageRef",
    "parse_event",
    "parse_pull_progress",
    "parse_image_ref",
    "format_since",
    "label_filters",
]

DEFAULT_REGISTRY = "docker.io"


@dataclass(frozen=True)
class DockerEvent:
    """
    One engine event about a container.

    ``labels`` holds the actor's attributes (the container's labels plus
    ``name``, ``image`` and, on ``die``, ``exitCode``).  ``time`` is in
    seconds (float), ``time_nano`` the exact nanosecond stamp used to resume.
    """

    action: str
    container_id: str
    labels: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    time: float = 0.0
    time_nano: int = 0
    type: str = "container"

    @property
    def attributes(self) -> dict[str, str]:
        """Alias of ``labels``: the engine calls them the actor's attributes."""
        return self.labels

    @property
    def name(self) -> str:
        """The container's name, when the engine says it."""
        return self.labels.get("name", "")


def parse_event(doc: dict[str, Any]) -> DockerEvent:
    """A ``DockerEvent`` from one document of ``GET /events``."""
    actor = doc.get("Actor") or {}
    attributes = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
    exit_code: int | None = None
    if "exitCode" in attributes:
        try:
            exit_code = int(attributes["exitCode"])
        except ValueError:
            exit_code = None
    time_nano = int(doc.get("timeNano") or 0)
    seconds = int(doc.get("time") or 0)
    if not time_nano:
        time_nano = seconds * 1_000_000_000
    action = str(doc.get("Action") or doc.get("status") or "")
    # "exec_start: sh -c ..." and "health_status: healthy" carry details after a colon.
    return DockerEvent(
        action=action,
        container_id=str(actor.get("ID") or doc.get("id") or ""),
        labels=attributes,
        exit_code=exit_code,
        time=time_nano / 1e9,
        time_nano=time_nano,
        type=str(doc.get("Type") or "container"),
    )


@dataclass(frozen=True)
class PullProgress:
    """
    One progress report of an image pull.

    ``layer`` is the layer id ("" for whole-image messages), ``status`` the
    engine's words ("Downloading", "Pull complete", ...), ``current`` and
    ``total`` bytes when known, ``percent`` from them (None when unknown).
    """

    layer: str
    status: str
    current: int = 0
    total: int = 0
    error: str = ""

    @property
    def percent(self) -> float | None:
        """Completion of this layer in percent, when the total is known."""
        if self.total > 0:
            return min(100.0, self.current * 100.0 / self.total)
        return None


def parse_pull_progress(doc: dict[str, Any]) -> PullProgress:
    """A ``PullProgress`` from one document of ``POST /images/create``."""
    detail = doc.get("progressDetail") or {}
    error = ""
    if doc.get("error") or doc.get("errorDetail"):
        error = str((doc.get("errorDetail") or {}).get("message") or doc.get("error") or "")
    return PullProgress(
        layer=str(doc.get("id") or ""),
        status=str(doc.get("status") or ""),
        current=int(detail.get("current") or 0),
        total=int(detail.get("total") or 0),
        error=error,
    )


@dataclass(frozen=True)
class ImageRef:
    """An image reference split the way the pull API wants it."""

    registry: str
    repository: str  # including the registry when one was written
    tag: str  # a tag or a digest ("sha256:...")

    @property
    def is_digest(self) -> bool:
        return ":" in self.tag and self.tag.split(":", 1)[0].startswith("sha")

    def __str__(self) -> str:
        sep = "@" if self.is_digest else ":"
        return "{}{}{}".format(self.repository, sep, self.tag)


def parse_image_ref(ref: str) -> ImageRef:
    """
    Split ``[registry/]name[:tag][@digest]``.

    The registry is the first component when it looks like a host (has a dot
    or a port, or is ``localhost``); otherwise it is Docker Hub.
    """
    name, digest = (ref.split("@", 1) + [""])[:2]
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry = first
    else:
        registry = DEFAULT_REGISTRY
    return ImageRef(registry=registry, repository=name, tag=digest or tag or "latest")


def label_filters(labels: dict[str, str] | list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Docker ``label`` filter values from a mapping, a list or one string."""
    if labels is None:
        return []
    if isinstance(labels, str):
        return [labels]
    if isinstance(labels, dict):
        return ["{}={}".format(k, v) if v is not None else str(k) for k, v in labels.items()]
    return [str(x) for x in labels]
