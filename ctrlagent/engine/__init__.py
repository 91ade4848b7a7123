"""
Container engines: the runtimes game servers run on.

``interface.py`` is the seam the server domain speaks (``IContainerEngine``
and its neutral records); ``docker/`` implements it over the Docker Engine
API (treq over the Unix socket, a raw hijacked attach for stdin).  A second
runtime is one more module beside it, chosen here by ``make_engine``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ctrlagent.errors import ConfigInvalid

if TYPE_CHECKING:
    from ctrlagent.config import AgentConfig
    from ctrlagent.engine.docker.client import DockerClient
    from ctrlagent.engine.interface import IContainerEngine

__all__ = ["make_engine", "ENGINES"]

ENGINES = ("docker",)


def make_engine(
    reactor: Any, config: AgentConfig, docker: DockerClient | None = None
) -> IContainerEngine:
    """
    The container engine of ``config`` (``engine``, "docker" by default) on ``reactor``.

    ``docker`` reuses an existing client (tests, and the composition root
    while other parts still speak to the client itself).
    """
    kind = str(getattr(config, "engine", "docker") or "docker")
    if kind != "docker":
        raise ConfigInvalid(
            "unknown container engine {!r} (known: {})".format(kind, ", ".join(ENGINES))
        )
    from ctrlagent.engine.docker.client import DockerClient
    from ctrlagent.engine.docker.engine import DockerEngine

    client = docker if docker is not None else DockerClient.from_config(reactor, config.docker)
    return DockerEngine(
        client,
        reactor,
        events_retry=config.timeouts.events_retry,
        events_retry_max=config.timeouts.events_retry_max,
    )
