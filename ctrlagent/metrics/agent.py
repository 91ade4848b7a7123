"""
``AgentMetrics``: the agent's registry, its event-driven series and the
collectors that read the live objects at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ctrlagent.metrics.servers import ServerCollector, ServerCounters

# The label value of whatever is not in a fixed table.
UNKNOWN = "unknown"

# Seconds: from a cached status read to a create behind a slow pull.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class AgentMetrics:
    """
    The agent's metrics: ``registry`` is what ``GET /metrics`` renders.

    ``actions`` is the fixed table of action names (the registry's): an HTTP
    command naming anything else is counted under ``unknown``.
    """

    def __init__(self, actions: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._actions = frozenset(actions)
        # The agent process itself (process_resident_memory_bytes,
        # process_cpu_seconds_total, open descriptors; python_info), read from /proc.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.http_requests = Counter(
            "ctrlagent_http_requests",
            "HTTP API commands answered, by action and outcome (ok or error).",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "ctrlagent_http_request_duration_seconds",
            "Time to answer an HTTP API command, by action.",
            ["action"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.engine_calls = Counter(
            "ctrlagent_engine_calls",
            "Container engine API calls, by operation and outcome (ok or error).",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.engine_latency = Histogram(
            "ctrlagent_engine_call_duration_seconds",
            "Time of a container engine API call, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # The labelled children, looked up once per label set: ``labels()``
        # checks and joins its values and takes a lock on every call, which
        # an answer to every HTTP command and engine call should not pay.
        # The label values are bounded (the action table, the engine's
        # operations), and so are these caches.
        self._http_children: dict[tuple[str, bool], tuple[Counter, Histogram]] = {}
        self._engine_children: dict[tuple[str, bool], tuple[Counter, Histogram]] = {}

    @staticmethod
    def _pair(
        children: dict[tuple[str, bool], tuple[Counter, Histogram]],
        counter: Counter,
        histogram: Histogram,
        name: str,
        ok: bool,
    ) -> tuple[Counter, Histogram]:
        pair = children.get((name, ok))
        if pair is None:
            pair = (counter.labels(name, "ok" if ok else "error"), histogram.labels(name))
            children[(name, ok)] = pair
        return pair

    def set_actions(self, actions: Iterable[str]) -> None:
        """The fixed table of action names (known once the registry is built)."""
        self._actions = frozenset(actions)

    def action_label(self, action: object) -> str:
        """``action`` when it is in the fixed table, else ``unknown``."""
        return action if isinstance(action, str) and action in self._actions else UNKNOWN

    # -- observers called at the choke points -------------------------------------

    def observe_request(self, action: object, seconds: float, ok: bool) -> None:
        """One HTTP command answered (the API calls this once per command)."""
        count, latency = self._pair(
            self._http_children,
            self.http_requests,
            self.http_latency,
            self.action_label(action),
            ok,
        )
        count.inc()
        latency.observe(max(0.0, seconds))

    def observe_engine(self, operation: str, seconds: float, ok: bool) -> None:
        """One engine call finished (``MeteredEngine`` calls this)."""
        count, latency = self._pair(
            self._engine_children, self.engine_calls, self.engine_latency, operation, ok
        )
        count.inc()
        latency.observe(max(0.0, seconds))

    # -- collectors reading the live objects ------------------------------------

    def watch_servers(self, manager: Any) -> ServerCounters:
        """
        Every server's figures, read from ``manager`` at scrape time, and its
        crash and restart counters, counted from the manager's events.
        """
        counters = ServerCounters(manager)
        manager.add_listener(counters, console=False)
        self.registry.register(ServerCollector(manager, counters))
        return counters

    def watch_link(self, stats: Callable[[], dict[str, Any]]) -> None:
        """The Panel link's state, read from its ``stats()`` at scrape time."""
        self.registry.register(_LinkCollector(stats))

    def watch_work(self, tracker: Any) -> None:
        """Background work in flight (the root ``Tracker``), at scrape time."""
        self.registry.register(_WorkCollector(tracker))


class _LinkCollector(Collector):
    """``ctrlagent_panel_*``: the link's state, connections, outbox depth and drops."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        connections = int(stats.get("connections", 0))
        yield GaugeMetricFamily(
            "ctrlagent_panel_link_up",
            "1 while the WebSocket link to the Panel is open.",
            value=1 if stats.get("connected") else 0,
        )
        yield CounterMetricFamily(
            "ctrlagent_panel_link_connections",
            "WebSocket links to the Panel opened since the agent started.",
            value=connections,
        )
        yield CounterMetricFamily(
            "ctrlagent_panel_link_reconnects",
            "Links opened again after the first one (reconnects).",
            value=max(0, connections - 1),
        )
        yield GaugeMetricFamily(
            "ctrlagent_panel_link_failed_handshakes",
            "Attempts in a row whose WebSocket handshake failed (0 once a link is stable).",
            value=int(stats.get("failedHandshakes", 0)),
        )
        yield GaugeMetricFamily(
            "ctrlagent_panel_outbox_depth",
            "Events waiting in the outbox for the link.",
            value=int(stats.get("outbox", 0)),
        )
        yield CounterMetricFamily(
            "ctrlagent_panel_outbox_dropped",
            "Events the outbox dropped (full while the link was down or slow).",
            value=int(stats.get("dropped", 0)),
        )
        yield GaugeMetricFamily(
            "ctrlagent_panel_commands_in_flight",
            "Commands from the Panel being answered.",
            value=int(stats.get("commandsInFlight", 0)),
        )


class _WorkCollector(Collector):
    """``ctrlagent_background_tasks``: the root tracker's work in flight."""

    def __init__(self, tracker: Any) -> None:
        self._tracker = tracker

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ctrlagent_background_tasks",
            "Background work in flight (every service's share of the root tracker).",
            value=len(self._tracker),
        )
