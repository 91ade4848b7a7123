"""
The Panel link is a service only when a Panel WebSocket is configured: the
current Panel has none and drives the agent over HTTP (issue 12, item 3).
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from ctrlagent.config import AgentConfig, PanelConfig, SftpConfig
from ctrlagent.tap import build_service


def config_for(tmp_path: Path, **panel: object) -> AgentConfig:
    (tmp_path / "state").mkdir(exist_ok=True)
    return AgentConfig(
        development=True,
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        sftp=SftpConfig(enabled=False),
        panel=PanelConfig(**panel),  # type: ignore[arg-type]
    )


async def names_of(tmp_path: Path, **panel: object) -> list[str]:
    top = build_service(reactor, config_for(tmp_path, **panel))  # built, not started
    try:
        return [child.name for child in top]
    finally:
        await top.getServiceNamed("servers").store.close()  # type: ignore[attr-defined]
        await top.getServiceNamed("backups").store.close()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_by_default_the_agent_builds_no_panel_link(tmp_path: Path) -> None:
    assert "panel" not in await names_of(tmp_path)


@pytest_twisted.ensureDeferred
async def test_a_configured_panel_websocket_gets_its_link_before_the_api(tmp_path: Path) -> None:
    names = await names_of(tmp_path, url="wss://panel.example.com:8080")
    assert names[-2:] == ["panel", "http"]
    assert "panel" not in await names_of(tmp_path, url="wss://panel.example.com", enabled=False)
