"""
The container runtime an engine-backed test runs on (``tests/conftest.py``'s
``runtime`` fixture): Docker or a private Podman service.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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


@contextmanager
def bench_runtime(kind: str) -> Iterator[tuple[Runtime, str]]:
    """
    For benchmarks: the runtime ``kind`` and the scripted image in it.

    Docker: the engine at ``DOCKER_HOST`` when it answers, else a private
    dockerd.  Podman: a private ``podman system service`` (``PrivatePodman``)
    holding the image copied from that Docker engine.  What was started is
    stopped on exit.
    """
    from tests.rig.dockerd import PrivateDockerd, engine_answers
    from tests.rig.images import build_scripted_image
    from tests.rig.podman import PrivatePodman

    if kind not in RUNTIMES:
        raise ValueError("unknown runtime {!r} (known: {})".format(kind, ", ".join(RUNTIMES)))
    with ExitStack() as stack:
        host = os.environ.get("DOCKER_HOST", "")
        if not (host.startswith("unix://") and engine_answers(host[len("unix://"):])):
            host = stack.enter_context(PrivateDockerd()).host
        image = build_scripted_image(host)
        if kind == "docker":
            yield Runtime("docker", host), image
            return
        service = stack.enter_context(PrivatePodman())
        yield Runtime("podman", service.host), service.load_from_docker(host, image)
