"""
When and where the link dials the Panel: the reconnect schedule
(``ReconnectBackoff``, ``ClientService``'s ``retryPolicy``) and the URL
(``panel_url``, ``without_query`` for log lines).

Pure: no reactor, no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def panel_url(url: str, node_id: str) -> str:
    """
    ``url`` with ``nodeId=<node_id>`` in its query unless one is there already.

    Older Panels take the node id only from the query and close with 1008
    "Invalid node ID" without it.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "nodeId" and value for key, value in query):
        return url
    query = [(key, value) for key, value in query if key != "nodeId"]
    query.append(("nodeId", node_id))
    return urlunsplit(parts._replace(path=parts.path or "/", query=urlencode(query)))


def without_query(url: str) -> str:
    """The URL as it may appear in a log line (the query could carry tokens)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment=""))


def without_credentials(url: str) -> str:
    """The URL as ``/health`` may show it: no user, password, query or fragment."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


class ReconnectBackoff:
    """
    The reconnect schedule, usable as ``ClientService``'s ``retryPolicy``.

    ``ClientService`` passes the number of consecutive failed TCP attempts, which
    it resets to zero on every TCP connect.  A Panel that accepts TCP and then
    refuses the WebSocket handshake (or closes the link at once) would thus be
    redialled at the shortest delay forever, so this policy adds its own count
    of failed handshakes.  After a 401/403 the delay never drops below
    ``refused_floor`` until a handshake succeeds again.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        factor: float = 2.0,
        refused_floor: float = 30.0,
        jitter: float = 0.25,
        random: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.refused_floor = refused_floor
        self.jitter = jitter
        self._random = random
        self.failed_handshakes = 0
        self.refused = False

    def base_delay(self, failed_attempts: int) -> float:
        """The delay before jitter for the given ``ClientService`` attempt count."""
        failures = max(failed_attempts - 1, 0) + self.failed_handshakes
        try:
            delay = self.initial * self.factor ** min(failures, 100)
        except OverflowError:
            delay = self.maximum
        delay = min(delay, self.maximum)
        if self.refused:
            delay = max(delay, self.refused_floor)
        return delay

    def __call__(self, failed_attempts: int) -> float:
        # Jitter only ever lengthens the delay, so many agents restarted together
        # spread out without any of them retrying sooner than the schedule says.
        return self.base_delay(failed_attempts) * (1.0 + self.jitter * self._random())

    def handshake_failed(self, refused: bool) -> None:
        """A TCP connection that did not become a lasting WebSocket session."""
        self.failed_handshakes += 1
        # Sticky until a handshake succeeds: a refusing Panel that then times out
        # is still one we must not hammer.
        self.refused = self.refused or refused

    def opened(self) -> None:
        """The Panel accepted our handshake: credentials are fine."""
        self.refused = False

    def stable(self) -> None:
        """A session lasted long enough to count as healthy: start over at ``initial``."""
        self.failed_handshakes = 0
        self.refused = False
