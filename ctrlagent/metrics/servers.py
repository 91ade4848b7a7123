"""
Per-server series: a collector reading the server manager's live records at
scrape time, and the crash and restart counters counted from its events.

Only ``server_id`` identifies a server (never its name, image or any other
string a user chose); ``ctrlagent_server_state`` adds ``state``, one of the
lifecycle's fixed states: one series per server, its current state, valued 1
(not one per state: at 500 servers that would be 4,000 more samples a
scrape, and a state left behind goes stale at once anyway).  A server that
is no longer managed has no series from the next scrape on, and its counters
are forgotten with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ctrlagent.events import ServerRemoved, StatusChanged

MIB = 1024 * 1024

# The lifecycle's states (ctrlagent.servers.lifecycle.ServerState), in its order.
STATES = (
    "installing", "install_failed", "offline", "starting", "running", "stopping", "crashed",
    "suspended", "unknown",
)
# A start made by these power actions is a restart.
_RESTARTS = ("restart", "crash-restart")


class ServerCounters:
    """
    Crashes and restarts per server, counted from the manager's events (an
    event listener): a move to ``crashed`` is a crash; a move to ``starting``
    while the server's power action is a restart (asked for, or after a
    crash) is a restart.  Counters start at zero with the agent, as
    Prometheus counters may.
    """

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self.crashes: dict[str, int] = {}
        self.restarts: dict[str, int] = {}

    def __call__(self, event: object) -> None:
        if isinstance(event, StatusChanged):
            sid = event.server_id
            if event.current == "crashed" and event.previous != "crashed":
                self.crashes[sid] = self.crashes.get(sid, 0) + 1
            elif event.current == "starting" and self._power(sid) in _RESTARTS:
                self.restarts[sid] = self.restarts.get(sid, 0) + 1
        elif isinstance(event, ServerRemoved):
            self.crashes.pop(event.server_id, None)
            self.restarts.pop(event.server_id, None)

    def _power(self, server_id: str) -> str | None:
        server = self._manager.servers.get(server_id)
        return None if server is None else getattr(server, "power", None)


class ServerCollector(Collector):
    """Every managed server's figures, as they are when scraped."""

    def __init__(self, manager: Any, counters: ServerCounters) -> None:
        self._manager = manager
        self._counters = counters

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["server_id"]

        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=labels)

        def counter(name: str, text: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, text, labels=labels)

        state = GaugeMetricFamily(
            "ctrlagent_server_state",
            "The server's current state (one series per server, valued 1).",
            labels=["server_id", "state"],
        )
        cpu = gauge("ctrlagent_server_cpu_percent", "CPU use, percent of one core.")
        memory = gauge("ctrlagent_server_memory_bytes", "Memory in use.")
        memory_limit = gauge(
            "ctrlagent_server_memory_limit_bytes", "Memory limit (0: unlimited)."
        )
        rx = counter("ctrlagent_server_network_receive_bytes", "Bytes received (this run).")
        tx = counter("ctrlagent_server_network_transmit_bytes", "Bytes sent (this run).")
        disk = gauge("ctrlagent_server_disk_bytes", "Disk used by the data directory.")
        disk_limit = gauge("ctrlagent_server_disk_limit_bytes", "Disk limit (0: unlimited).")
        uptime = gauge("ctrlagent_server_uptime_seconds", "Seconds since this run started.")
        restarts = counter("ctrlagent_server_restarts", "Restarts (asked for or after a crash).")
        crashes = counter("ctrlagent_server_crashes", "Crashes seen by this agent.")
        lines = counter(
            "ctrlagent_server_console_lines", "Console lines read from the server (all kept)."
        )
        dropped = counter(
            "ctrlagent_server_console_lines_dropped",
            "Of those, lines the console throttle did not forward to the Panel.",
        )
        for sid, server in sorted(self._manager.servers.items()):
            ids = [sid]
            current = server.state.value
            state.add_metric([sid, current if current in STATES else "unknown"], 1)
            figures = server.metrics()
            limits = server.spec.limits
            cpu.add_metric(ids, figures.cpu)
            memory.add_metric(ids, figures.memory_mb * MIB)
            memory_limit.add_metric(ids, limits.memory_mb * MIB)
            rx.add_metric(ids, figures.rx)
            tx.add_metric(ids, figures.tx)
            disk.add_metric(ids, server.disk_bytes)
            disk_limit.add_metric(ids, limits.disk_mb * MIB)
            uptime.add_metric(ids, figures.uptime)
            restarts.add_metric(ids, self._counters.restarts.get(sid, 0))
            crashes.add_metric(ids, self._counters.crashes.get(sid, 0))
            lines.add_metric(ids, server.console.lines_total)
            dropped.add_metric(ids, server.console.throttle.total_dropped)
        yield from (
            state, cpu, memory, memory_limit, rx, tx, disk, disk_limit, uptime, restarts,
            crashes, lines, dropped,
        )
        drift = getattr(self._manager, "drift", None)
        if drift is not None:
            yield CounterMetricFamily(
                "ctrlagent_engine_unheard_ends",
                "Servers' ends the engine sent no event of, found by the drift check and"
                " settled.",
                value=drift.settled,
            )
