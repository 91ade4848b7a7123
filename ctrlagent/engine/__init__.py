"""
Container engines: the runtimes game servers run on.

``interface.py`` is the seam the server domain speaks (``IContainerEngine``
and its neutral records); ``docker/`` implements it over the Docker Engine
API (treq over the Unix socket, a raw hijacked attach for stdin) and
``podman/`` over Podman's Docker-compatible API with Podman's differences
corrected.  ``make_engine`` picks one by the configuration's runtime kind
(docs/RUNTIMES.md).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ctrlagent.errors import ConfigInvalid

if TYPE_CHECKING:
    from ctrlagent.config import AgentConfig, DockerConfig
    from ctrlagent.engine.docker.client import DockerClient
    from ctrlagent.engine.interface import IContainerEngine

__all__ = ["make_engine", "runtime_kind", "engine_client_config", "ENGINES", "PODMAN_SOCKET"]

ENGINES = ("docker", "podman")
# Where a rootful Podman service listens (``podman.socket`` of Debian's package).
PODMAN_SOCKET = "unix:///run/podman/podman.sock"


def runtime_kind(config: AgentConfig) -> str:
    """The configured runtime: ``runtime.kind`` (empty: docker); an unknown one is ConfigInvalid."""
    kind = config.runtime.kind or "docker"
    if kind not in ENGINES:
        raise ConfigInvalid(
            "unknown container runtime {!r} (known: {})".format(kind, ", ".join(ENGINES))
        )
    return kind


def engine_client_config(config: AgentConfig) -> DockerConfig:
    """
    The settings of the API client of the configured runtime: ``docker``'s,
    with Podman's socket (``runtime.podman_host``, else ``PODMAN_SOCKET``)
    when the runtime is Podman.  The composition root builds its one client
    from this, so that the parts still speaking to the client reach the same
    engine as the seam.
    """
    if runtime_kind(config) != "podman":
        return config.docker
    return replace(config.docker, host=config.runtime.podman_host or PODMAN_SOCKET)


def make_engine(
    reactor: Any, config: AgentConfig, docker: DockerClient | None = None
) -> IContainerEngine:
    """
    The container engine of ``config`` (``runtime.kind``, "docker" by default) on ``reactor``.

    ``docker`` reuses an existing client (tests, and the composition root
    while other parts still speak to the client itself); it must reach the
    configured runtime (see ``engine_client_config``).
    """
    kind = runtime_kind(config)
    from ctrlagent.engine.docker.client import DockerClient

    client = (
        docker
        if docker is not None
        else DockerClient.from_config(reactor, engine_client_config(config))
    )
    retry = {
        "events_retry": config.timeouts.events_retry,
        "events_retry_max": config.timeouts.events_retry_max,
    }
    if kind == "podman":
        from ctrlagent.engine.podman.engine import PodmanEngine

        # Console input is held outside the agent, so that it outlives it.
        stdin_dir = os.path.join(config.state_dir, "stdin")
        return PodmanEngine(client, reactor, stdin_dir=stdin_dir, **retry)
    from ctrlagent.engine.docker.engine import DockerEngine

    return DockerEngine(client, reactor, **retry)
