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
- ``fail_on_logged_errors`` (autouse): a test fails on any logged error event,
  "Unhandled error in Deferred" included.

Engine tests are marked ``docker`` (integration) or ``e2e`` (twistd subprocess).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from tests.rig.dockerd import PrivateDockerd, engine_answers


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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the engine-backed tests (marked docker or e2e) by outcome."""
    if report.nodeid not in _engine_tests:
        return
    if report.skipped:
        _engine_counts["skipped"] += 1
    elif report.when == "call":
        _engine_counts["passed" if report.passed else "failed"] += 1


def pytest_terminal_summary(terminalreporter: object) -> None:
    c = _engine_counts
    terminalreporter.write_line(  # type: ignore[attr-defined]
        "engine-backed tests: {passed} passed, {failed} failed, {skipped} skipped".format(**c)
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped (or absent) engine test suite fails the run."""
    if not _ci() or session.config.option.collectonly:
        return
    if _engine_counts["skipped"] or not (_engine_counts["passed"] + _engine_counts["failed"]):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
