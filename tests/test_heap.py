"""The startup heap freeze, on a ``Clock`` with a fake collector."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from ctrlagent.heap import StartupHeapFreeze
from ctrlagent.tap import Options, makeService


class FakeCollector:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.count = 0

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.count = 1234

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")
        self.count = 0

    def get_freeze_count(self) -> int:
        return self.count


def test_the_startup_heap_is_collected_then_frozen_after_the_delay_and_thawed_on_stop() -> None:
    clock, fake = Clock(), FakeCollector()
    heap = StartupHeapFreeze(clock, delay=10.0, collector=fake)
    heap.startService()
    clock.advance(9.9)
    assert fake.calls == []
    clock.advance(0.1)
    assert fake.calls == ["collect", "freeze"] and heap.frozen == 1234
    heap.stopService()
    assert fake.calls[-1] == "unfreeze" and heap.frozen == 0


def test_the_freeze_is_renewed_and_every_so_often_thawed_for_one_full_pass() -> None:
    clock, fake = Clock(), FakeCollector()
    heap = StartupHeapFreeze(clock, delay=10.0, collector=fake, every=300.0, thaw_every=3)
    heap.startService()
    clock.advance(10)
    assert fake.calls == ["collect", "freeze"]
    clock.advance(299)
    assert fake.calls == ["collect", "freeze"]
    clock.advance(1)  # renewed: what is not frozen yet is collected, then frozen
    assert fake.calls == ["collect", "freeze"] * 2
    clock.advance(300)  # the third time: thawed first, so the pass walks everything
    assert fake.calls == ["collect", "freeze"] * 2 + ["unfreeze", "collect", "freeze"]
    assert heap.rounds == 3 and heap.frozen == 1234
    heap.stopService()
    assert fake.calls[-1] == "unfreeze" and not clock.getDelayedCalls()


def test_stopping_before_the_delay_freezes_nothing() -> None:
    clock, fake = Clock(), FakeCollector()
    heap = StartupHeapFreeze(clock, delay=10.0, collector=fake)
    heap.startService()
    heap.stopService()
    clock.advance(60)
    assert fake.calls == [] and not clock.getDelayedCalls()


def test_the_real_collector_is_the_default() -> None:
    clock = Clock()
    heap = StartupHeapFreeze(clock, delay=0.0)
    heap.startService()
    try:
        clock.advance(0)
        # (Frozen objects freed by reference counting leave the count at once.)
        assert heap.frozen > 0 and gc.get_freeze_count() > 0
    finally:
        heap.stopService()
    assert gc.get_freeze_count() == 0


def test_objects_made_after_the_start_are_frozen_at_the_next_renewal() -> None:
    clock = Clock()
    heap = StartupHeapFreeze(clock, delay=0.0, every=300.0)
    heap.startService()
    try:
        clock.advance(0)
        first = gc.get_freeze_count()
        servers = [{"id": n, "lines": [str(n)]} for n in range(20_000)]  # a fleet made later
        clock.advance(300)
        assert gc.get_freeze_count() >= first + 20_000
        assert servers[-1]["id"] == 19_999
    finally:
        heap.stopService()
    assert gc.get_freeze_count() == 0


@pytest_twisted.ensureDeferred
async def test_twistd_service_tree_starts_the_heap_freeze_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        os, "environ",
        # A Panel WebSocket URL: the link is built only when one is configured.
        {"AGENT_SECRET": "s", "CTRLAGENT_SFTP_ENDPOINT": "tcp:0:interface=127.0.0.1",
         "PANEL_URL": "ws://127.0.0.1:9/ws"},
    )
    options = Options()
    options.parseOptions(["--port", "18081", "--state-dir", str(tmp_path / "state"),
                          "--data-dir", str(tmp_path / "data")])
    top = makeService(options)  # built, not started
    try:
        assert [child.name for child in top] == [
            "banner", "servers", "sftp", "backups", "panel", "http", "heap"
        ]
        assert isinstance(top.getServiceNamed("heap"), StartupHeapFreeze)
    finally:
        # The store opens its database thread when built.
        await top.getServiceNamed("servers").store.close()  # type: ignore[attr-defined]
        await top.getServiceNamed("backups").store.close()  # type: ignore[attr-defined]
