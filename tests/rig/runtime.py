"""
The container runtime an engine-backed test runs on (``tests/conftest.py``'s
``runtime`` fixture): Docker or a private Podman service.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctrlagent.config import RuntimeConfig

RUNTIMES = ("docker", "podman")


@dataclass(frozen=True)
class Runtime:
    """The runtime's kind and its API socket."""

    kind: str  # "docker" or "podman"
    host: str  # unix://... ; the docker CLI speaks to either with DOCKER_HOST=host

    def config(self) -> RuntimeConfig:
        """The agent's ``[runtime]`` settings for this runtime."""
        if self.kind == "podman":
            return RuntimeConfig(kind="podman", podman_host=self.host)
        return RuntimeConfig(kind="docker")
