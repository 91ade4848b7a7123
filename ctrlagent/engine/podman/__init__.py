"""Podman as the container engine: ``PodmanEngine`` over its Docker-compatible API."""

from ctrlagent.engine.podman.engine import PodmanEngine

__all__ = ["PodmanEngine"]
