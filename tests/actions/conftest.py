"""Fixtures of the action tests."""

from __future__ import annotations

import pytest

from tests.actions.rig import Rig


@pytest.fixture
def rig() -> Rig:
    """A fresh registry over fakes."""
    return Rig()
