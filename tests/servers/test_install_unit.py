"""
The install flow on the in-memory engine: every way an install ends sweeps the
data directory, and no ending leaves the server ``installing``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.errors import InvalidInput
from ctrlagent.servers.installer import InstallLog
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.servers.manager import ServerManager
from ctrlagent.wire.json import to_json
from tests.servers.conftest import Unit, until
from tests.servers.test_manager_unit import PARAMS

S = ServerState


class Sweeps:
    """Records the data directories' prepare passes (and can make the recursive one fail)."""

    def __init__(self, manager: ServerManager, unit: Unit, fail: BaseException | None = None):
        self.calls: list[tuple[str, bool, list[str]]] = []
        self.real = manager.data.prepare
        self.unit = unit
        self.fail = fail
        manager.data.prepare = self  # type: ignore[method-assign]

    async def __call__(
        self, server_id: str, owner: tuple[int, int], recursive: bool = False, **more: Any
    ) -> None:
        installs = [c.name for c in self.unit.engine.containers.values()
                    if c.name.endswith("-install")]
        self.calls.append((server_id, recursive, installs))
        if recursive and self.fail is not None:
            raise self.fail
        await self.real(server_id, owner, recursive, **more)

    @property
    def recursive(self) -> list[tuple[str, bool, list[str]]]:
        return [call for call in self.calls if call[1]]


def install_params(**env: Any) -> dict[str, Any]:
    return {**PARAMS, "environment": env,
            "install": {"script": "echo hi", "timeout": 5}}


@pytest.mark.parametrize(
    ("env", "status", "error"),
    [
        ({}, "offline", None),
        ({"INSTALL_EXIT": "3"}, "install_failed", "exited with code 3"),
        ({"INSTALL_VANISH": "1"}, "install_failed", "no such container"),
        ({"INSTALL_CREATE_FAILS": "1"}, "install_failed", "refused the install container"),
    ],
    ids=["success", "failure", "container-gone", "create-refused"],
)
@pytest_twisted.ensureDeferred
async def test_every_install_ending_sweeps_the_data_directory_once_the_container_is_gone(
    unit: Unit, env: dict[str, str], status: str, error: str | None
) -> None:
    m = unit.manager()
    sweeps = Sweeps(m, unit)
    result = to_json(await m.create_server("s1", install_params(**env)))
    assert result["status"] == status
    status = to_json(m.status("s1"))
    assert status.get("error") == error or error in status["error"]
    # one recursive pass, after the install container was removed
    assert sweeps.recursive == [("s1", True, [])]


@pytest_twisted.ensureDeferred
async def test_a_timed_out_install_is_killed_removed_then_swept(unit: Unit) -> None:
    m = unit.manager()
    sweeps = Sweeps(m, unit)
    created = m.create_server("s1", install_params(INSTALL_HANG="1"))
    await until(lambda: any(c.name.endswith("-install") and c.running
                            for c in unit.engine.containers.values()), 2, "the install runs")
    assert sweeps.recursive == []
    unit.clock.advance(5.5)
    result = to_json(await created)
    assert result["status"] == "install_failed"
    assert "timed out after 5 s" in to_json(m.status("s1"))["error"]
    assert [kill[1] for kill in unit.engine.kills] == ["SIGKILL"]
    assert sweeps.recursive == [("s1", True, [])]
    with open(m.get("s1").install_log_path) as f:
        assert "[ctrlagent] install timed out" in f.read()


@pytest.mark.parametrize("env", [{}, {"INSTALL_EXIT": "2"}], ids=["success", "failure"])
@pytest_twisted.ensureDeferred
async def test_a_sweep_that_fails_fails_the_install(unit: Unit, env: dict[str, str]) -> None:
    m = unit.manager()
    Sweeps(m, unit, fail=PermissionError(13, "Permission denied"))
    result = to_json(await m.create_server("s1", install_params(**env)))
    assert result["status"] == "install_failed"
    error = to_json(m.status("s1"))["error"]
    if env:
        assert error == ("install script exited with code 2; cleaning the data directory"
                         " after the install failed: Permission denied")
    else:
        assert error == "cleaning the data directory after the install failed: Permission denied"
    assert m.get("s1").container_id is None  # no container for a dirty directory


@pytest_twisted.ensureDeferred
async def test_agent_shutdown_mid_install_sweeps_and_leaves_it_to_resume(unit: Unit) -> None:
    m = unit.manager()
    sweeps = Sweeps(m, unit)
    created = m.create_server("s1", install_params(INSTALL_HANG="1"))
    await until(lambda: any(c.name.endswith("-install") for c in unit.engine.containers.values()),
                2, "the install runs")
    await m.stopService()
    assert created.called
    assert sweeps.recursive == [("s1", True, [])]
    assert m.get("s1").state is S.INSTALLING  # not "failed": the next start resumes it
    again = unit.manager()
    assert again.get("s1").state is S.INSTALLING


@pytest_twisted.ensureDeferred
async def test_a_limit_refused_where_it_becomes_engine_units_is_install_failed(
    unit: Unit,
) -> None:
    from dataclasses import replace

    m = unit.manager()
    await m.create_server("s1", PARAMS)
    server = m.get("s1")
    # a definition that bypassed the parser (an old store row): it must not
    # leave the server "installing" for ever
    server.spec = replace(server.spec, limits=replace(server.spec.limits,
                                                      cpu_percent=float("inf")))
    server.container_id = None
    await m.reinstall("s1")
    assert server.state is S.INSTALL_FAILED
    assert "limits.cpu" in (server.error or "")
    with pytest.raises(InvalidInput):
        await m.update("s1", {"limits": {"cpu": float("inf")}})


@pytest_twisted.ensureDeferred
async def test_an_unwritable_data_directory_is_install_failed_not_installing(
    unit: Unit,
) -> None:
    m = unit.manager()
    os.makedirs(unit.config.data_dir, exist_ok=True)
    with open(os.path.join(unit.config.data_dir, "s1"), "w") as f:
        f.write("a file where the directory should be")
    result = to_json(await m.create_server("s1", PARAMS))
    assert result["status"] == "install_failed"
    error = to_json(m.status("s1"))["error"]
    assert "data directory" in error and "/s1" in error and "not a directory" in error


# -- the install log -------------------------------------------------------------


def test_install_log_never_follows_a_link_planted_in_its_place(tmp_path: Any) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "logs" / "s1.log"
    path.parent.mkdir()
    os.symlink(victim, path)
    log = InstallLog(str(path), 1000)
    log.create()
    log.append(["line 1"])
    assert not os.path.islink(path) and path.read_text() == "line 1\n"
    assert victim.read_text() == "precious\n"
    # a link swapped in after creation is refused, not written through
    path.unlink()
    os.symlink(victim, path)
    with pytest.raises(OSError):
        log.append(["line 2"])
    assert victim.read_text() == "precious\n"


def test_install_log_is_bounded_and_says_so_once(tmp_path: Any) -> None:
    log = InstallLog(str(tmp_path / "s1.log"), 64)
    log.create()
    log.append(["x" * 30, "y" * 30, "z" * 30])
    log.append(["more"] * 1000)
    text = (tmp_path / "s1.log").read_text()
    assert text.startswith("x" * 30 + "\n" + "y" * 30 + "\n")
    assert text.count("install log truncated") == 1
    assert "z" not in text and "more" not in text
    assert log.dropped_lines == 1001
    assert len(text.encode()) <= 64 + 60
