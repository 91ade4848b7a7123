"""
Fixtures of the engine tests beside the Docker rig of ``tests/conftest.py``.

- ``podman_service`` (session): a private ``podman system service``
  (``tests/rig/podman.py``) for the run, stopped at its end.  Without
  ``podman`` installed the Podman tests skip, except in CI (``CI=true``),
  where that is an error: a skipped integration suite is a failed CI.
- ``podman_scripted_image`` (session): the scripted game image, copied from
  the Docker test engine (``docker save | podman load``, once per run).
- ``podman_minetest_image`` (session): the real game server, imported from
  the cached Minetest rootfs (``tests/rig/images.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.rig.podman import PrivatePodman, podman_available


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def podman_service() -> Iterator[PrivatePodman]:
    if not podman_available() and not _ci():
        pytest.skip("podman is not installed (apt-get install podman)")
    service = PrivatePodman().start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def podman_scripted_image(
    podman_service: PrivatePodman, docker_engine: object, scripted_image: str
) -> str:
    return podman_service.load_from_docker(docker_engine.host, scripted_image)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def podman_minetest_image(podman_service: PrivatePodman) -> str:
    return podman_service.import_minetest()
