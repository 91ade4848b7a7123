"""
The test rig: real parts shared by every test module.

- ``docker_engine`` (session): a real Docker engine.  The one at ``DOCKER_HOST``
  when that is set and answers, else a private ``dockerd`` started for the run
  and stopped at its end.  In CI (``CI=true``) the engine tests never skip: a
  missing engine is an error.
- ``private_docker`` (function): a factory of extra private engines that a test
  may stop and restart (daemon-restart tests); each is removed afterwards.
- ``scripted_image`` / ``minetest_image`` (session): the test images, imported
  into ``docker_engine``.
- ``podman_service`` (session): a private ``podman system service``
  (``tests/rig/podman.py``) for the run, stopped at its end; without
  ``podman`` the Podman tests skip, except in CI where that is an error.
  ``podman_scripted_image`` / ``podman_minetest_image``: the test images in it.
- ``runtime`` (session, parametrized): the container runtime an engine-backed
  test runs on, ``docker`` (``docker_engine``) or ``podman``
  (``podman_service``, holding the scripted image under the same name as
  Docker).  Every test whose fixtures ask for it (the servers ``rig``, the
  e2e and fault ``make_agent``) runs once per runtime, its id ending in
  ``[docker]`` / ``[podman]``; see ``pytest_generate_tests`` for which tests
  run on Docker only, and why.
- the hypothesis profile ``ctrlagent``: property tests have no deadline.
- ``fail_on_logged_errors`` (autouse): a test fails on any logged error event,
  "Unhandled error in Deferred" included.

Engine tests are marked ``docker`` (integration) or ``e2e`` (twistd subprocess).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.rig.dockerd import PrivateDockerd, engine_answers
from tests.rig.podman import PrivatePodman, podman_available
from tests.rig.runtime import RUNTIMES, Runtime

# Property tests assert behaviour, not speed: on a loaded CI machine one
# example may take longer than hypothesis's default 200 ms deadline, which
# would fail a correct test.  Every property test runs without a deadline.
settings.register_profile(
    "ctrlagent", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ctrlagent")


@dataclass(frozen=True)
class Engine:
    """A Docker engine the tests may use."""

    host: str  # a DOCKER_HOST value, e.g. unix:///tmp/x/docker.sock
    socket_path: str
    private: PrivateDockerd | None


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://") and engine_answers(host[len("unix://"):]):
        yield Engine(host=host, socket_path=host[len("unix://"):], private=None)
        return
    try:
        daemon = PrivateDockerd().start()
    except (OSError, RuntimeError) as e:
        if _ci():
            raise
        pytest.skip("no Docker engine: {}".format(e))
    try:
        yield Engine(host=daemon.host, socket_path=daemon.socket_path, private=daemon)
    finally:
        daemon.stop()


@pytest.fixture
def private_docker() -> Iterator[Callable[[], PrivateDockerd]]:
    made: list[PrivateDockerd] = []

    def make() -> PrivateDockerd:
        daemon = PrivateDockerd()
        made.append(daemon)
        return daemon.start()

    yield make
    for daemon in made:
        daemon.stop()


@pytest.fixture(scope="session")
def scripted_image(docker_engine: Engine) -> str:
    from tests.rig.images import build_scripted_image

    return build_scripted_image(docker_engine.host)


@pytest.fixture(scope="session")
def minetest_image(docker_engine: Engine) -> str:
    from tests.rig.images import import_minetest

    return import_minetest(docker_engine.host)


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
    podman_service: PrivatePodman, docker_engine: Engine, scripted_image: str
) -> str:
    return podman_service.load_from_docker(docker_engine.host, scripted_image)


@pytest.fixture(scope="session")
def podman_minetest_image(podman_service: PrivatePodman) -> str:
    return podman_service.import_minetest()


# -- the runtime of the engine-backed suites ------------------------------------

@pytest.fixture(scope="session")
def runtime(request: pytest.FixtureRequest) -> Runtime:
    """The runtime of this test's parameter (``docker`` when not parametrized)."""
    kind = getattr(request, "param", "docker")
    if kind == "podman":
        service: PrivatePodman = request.getfixturevalue("podman_service")
        # The scripted image under the name the tests pass (scripted_image).
        request.getfixturevalue("podman_scripted_image")
        return Runtime("podman", service.host)
    engine: Engine = request.getfixturevalue("docker_engine")
    return Runtime("docker", engine.host)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """
    Run every test that uses ``runtime`` once per runtime, except:

    - a test that runs no game container (no ``scripted_image`` among its
      fixtures: start-up failures, slow clients) runs on Docker only: the
      runtime is not what it tests;
    - a test of a private Docker engine (``private_docker``: daemon restarts)
      or of the Minetest image on the default network runs on Docker only
      (Podman's service restart and its published UDP ports have their own
      tests in ``tests/engine/podman/``);
    - ``@pytest.mark.runtimes("docker", reason=...)`` narrows it by hand.
    """
    if "runtime" not in metafunc.fixturenames:
        return
    kinds: tuple[str, ...] = RUNTIMES
    names = set(metafunc.fixturenames)
    if "scripted_image" not in names or names & {"private_docker", "minetest_image"}:
        kinds = ("docker",)
    marker = metafunc.definition.get_closest_marker("runtimes")
    if marker is not None:
        kinds = tuple(k for k in kinds if k in marker.args)
    metafunc.parametrize("runtime", kinds, indirect=True, scope="session")


@pytest.fixture(autouse=True)
def fail_on_logged_errors() -> Iterator[list[dict]]:
    """
    Collect every logged event at level error or above and fail the test.

    A test that expects an error log can clear the returned list.
    """
    errors: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors:
        from twisted.logger import formatEvent

        texts = []
        for e in errors:
            text = formatEvent(e)
            failure = e.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            texts.append(text)
        pytest.fail("logged errors:\n" + "\n---\n".join(texts))


_ENGINE_MARKERS = ("docker", "e2e")
_engine_counts = {"passed": 0, "failed": 0, "skipped": 0}


_engine_tests: set[str] = set()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Remember which tests are engine-backed (by marker, not by directory name)."""
    for item in items:
        if any(item.get_closest_marker(m) is not None for m in _ENGINE_MARKERS):
            _engine_tests.add(item.nodeid)


# Tests run once per runtime carry it in their id: test_x[podman], test_y[spec-docker].
_RUNTIME_PARAM = re.compile(r"\[(?:[^\]]*-)?(docker|podman)(?:-[^\]]*)?\]$")
_runtime_counts = {kind: {"ran": 0, "skipped": 0} for kind in RUNTIMES}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the engine-backed tests (marked docker or e2e) by outcome, and by runtime."""
    if report.nodeid not in _engine_tests:
        return
    found = _RUNTIME_PARAM.search(report.nodeid)
    if found and (report.skipped or report.when == "call"):
        _runtime_counts[found.group(1)]["skipped" if report.skipped else "ran"] += 1
    if report.skipped:
        _engine_counts["skipped"] += 1
    elif report.when == "call":
        _engine_counts["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter: object) -> None:
    c = _engine_counts
    terminalreporter.write_line(  # type: ignore[attr-defined]
        "engine-backed tests: {passed} passed, {failed} failed, {skipped} skipped".format(**c)
    )
    for kind, counts in _runtime_counts.items():
        terminalreporter.write_line(  # type: ignore[attr-defined]
            "  on {}: {ran} ran, {skipped} skipped".format(kind, **counts)
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped (or absent) engine test suite fails the run."""
    if not _ci() or session.config.option.collectonly:
        return
    if os.environ.get("CTRLAGENT_NO_ENGINE_TESTS"):
        # tox's `unit` env: the engine-backed tests run in the `engine` env
        # beside it (.ci/run checks both reports together).
        return
    if _engine_counts["skipped"] or not (_engine_counts["passed"] + _engine_counts["failed"]):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log line of the test, formatted."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def warnings() -> Iterator[list[dict[str, Any]]]:
    """The warning events logged during the test."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.warn:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)
