"""
Fixtures of the engine tests.

The Podman rig (``podman_service``, ``podman_scripted_image``,
``podman_minetest_image``) is in ``tests/conftest.py``, shared with the
engine-backed suites that run on both runtimes; the Docker client fixtures
are in ``tests/engine/docker/conftest.py``.
"""
