"""
Who decides how often running servers are sampled: the agent as tap.py
builds it samples every server at the full rate only while the Panel link
is connected (it forwards every sample); otherwise at the idle rate, and
when a figure is read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from ctrlagent.config import PanelConfig
from ctrlagent.tap import AgentService, build_service
from tests.startup.test_backups_start import _close, config_for


def _hub_live(top: AgentService) -> bool:
    return bool(top.getServiceNamed("servers").stats_hub.live())  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_servers_are_sampled_at_full_rate_only_while_the_panel_link_is_connected(
    tmp_path: Path,
) -> None:
    top = build_service(reactor, config_for(tmp_path))  # a Panel URL: a link, not started
    try:
        link = top.getServiceNamed("panel")
        assert not link.connected and not _hub_live(top)
        link._protocol = object()  # type: ignore[attr-defined]  # what onOpen sets
        assert link.connected and _hub_live(top)
        link._protocol = None  # type: ignore[attr-defined]
        assert not _hub_live(top)
    finally:
        await _close(top)


@pytest_twisted.ensureDeferred
async def test_without_a_panel_link_servers_are_sampled_at_the_idle_rate(tmp_path: Path) -> None:
    config = replace(config_for(tmp_path), panel=PanelConfig(url=""))
    top = build_service(reactor, config)
    try:
        assert "panel" not in [child.name for child in top]
        assert not _hub_live(top)
        hub = top.getServiceNamed("servers").stats_hub  # type: ignore[attr-defined]
        assert (hub.interval, hub.idle_interval) == (2.0, 30.0)
    finally:
        await _close(top)
