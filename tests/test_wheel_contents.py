"""
``scripts/wheel-contents`` (run by ``tox -e packaging``) refuses a wheel that
ships the test rig or lacks the agent's public fakes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "wheel-contents"


def _load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("wheel_contents", str(SCRIPT))
    spec = importlib.util.spec_from_loader("wheel_contents", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


contents = _load_script()
GOOD = [
    *contents.REQUIRED,
    "ctrlagent/actions/registry.py",  # a module named like a rig one, in its own place
    "ctrlagent/engine/docker/client.py",
    "ctrlagent-0.1.0.dist-info/METADATA",
]


def _wheel(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "ctrlagent-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name in names:
            wheel.writestr(name, "")
    return path


def _run(wheel: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(wheel)], capture_output=True, text=True, check=False
    )


def test_a_wheel_of_the_agent_and_its_fakes_passes(tmp_path: Path) -> None:
    assert contents.problems(GOOD) == []
    assert _run(_wheel(tmp_path, GOOD)).returncode == 0


@pytest.mark.parametrize(
    "planted",
    [
        "tests/__init__.py",
        "tests/rig/dockerd.py",
        "ctrlagent/tests/test_x.py",
        "rig/images.py",
        "ctrlagent/testing/dockerd.py",
        "ctrlagent/testing/agentproc.py",
        "ctrlagent/testing/registry.py",
        "ctrlagent/testing/images.py",
        "ctrlagent/testing/processes.py",
        "ctrlagent/testing/gameserver.sh",
        "gameserver.sh",
    ],
)
def test_a_wheel_shipping_the_test_rig_fails_naming_it(tmp_path: Path, planted: str) -> None:
    result = _run(_wheel(tmp_path, [*GOOD, planted]))
    assert result.returncode == 1
    assert "ships the test rig: {}".format(planted) in result.stderr


def test_a_wheel_without_a_public_fake_fails(tmp_path: Path) -> None:
    names = [n for n in GOOD if n != "ctrlagent/testing/files.py"]
    result = _run(_wheel(tmp_path, names))
    assert result.returncode == 1
    assert "lacks ctrlagent/testing/files.py" in result.stderr
