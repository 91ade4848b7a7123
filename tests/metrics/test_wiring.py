"""
The metrics in the service tree (tap.py): on by default with the engine
metered at the seam and the page on the API; off without either; on a
listener of its own with ``metrics.endpoint``; and the Panel link's figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from prometheus_client import generate_latest
from twisted.internet import reactor

from ctrlagent.config import AgentConfig, MetricsConfig, SftpConfig
from ctrlagent.metrics import AgentMetrics
from ctrlagent.tap import AgentService, build_service


def config_for(tmp_path: Path, metrics: MetricsConfig) -> AgentConfig:
    (tmp_path / "state").mkdir(parents=True, exist_ok=True)
    return AgentConfig(
        development=True,
        state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"),
        sftp=SftpConfig(enabled=False),
        metrics=metrics,
    )


async def _close(top: AgentService) -> None:
    await top.getServiceNamed("servers").store.close()  # type: ignore[attr-defined]
    await top.getServiceNamed("backups").store.close()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_metrics_are_on_by_default_and_off_when_disabled(tmp_path: Path) -> None:
    on = build_service(reactor, config_for(tmp_path / "on", MetricsConfig()))
    off = build_service(reactor, config_for(tmp_path / "off", MetricsConfig(enabled=False)))
    try:
        assert type(on.getServiceNamed("servers").engine).__name__ == "MeteredEngine"  # type: ignore[attr-defined]  # noqa: E501
        assert on.getServiceNamed("http")._api._metrics is not None  # type: ignore[attr-defined]
        assert type(off.getServiceNamed("servers").engine).__name__ == "DockerEngine"  # type: ignore[attr-defined]  # noqa: E501
        assert off.getServiceNamed("http")._api._metrics is None  # type: ignore[attr-defined]
        assert "metrics" not in [s.name for s in on] + [s.name for s in off]
    finally:
        await _close(on)
        await _close(off)


@pytest_twisted.ensureDeferred
async def test_a_metrics_endpoint_is_a_listener_of_its_own(tmp_path: Path) -> None:
    top = build_service(
        reactor, config_for(tmp_path, MetricsConfig(endpoint="tcp:0:interface=127.0.0.1"))
    )
    try:
        names = [s.name for s in top]
        assert names.index("metrics") > names.index("http")
        assert top.getServiceNamed("http")._api._metrics is None  # type: ignore[attr-defined]
    finally:
        await _close(top)


def test_the_panel_links_figures_are_read_when_scraped() -> None:
    metrics = AgentMetrics()
    stats = {"connected": True, "connections": 3, "outbox": 7, "dropped": 2,
             "failedHandshakes": 0, "commandsInFlight": 1}
    metrics.watch_link(lambda: stats)
    text = generate_latest(metrics.registry).decode()
    assert "ctrlagent_panel_link_up 1.0" in text
    assert "ctrlagent_panel_link_reconnects_total 2.0" in text
    assert "ctrlagent_panel_outbox_depth 7.0" in text
    stats.update(connected=False, outbox=0)
    text = generate_latest(metrics.registry).decode()
    assert "ctrlagent_panel_link_up 0.0" in text and "ctrlagent_panel_outbox_depth 0.0" in text
    assert "ctrlagent_panel_outbox_dropped_total 2.0" in text
