"""
``GET /metrics``: the agent's ``CollectorRegistry`` in the Prometheus text
format, behind its own bearer token when one is set (``metrics.token``; not
the node's secret, so a scraper never holds the key to the servers).

The collectors run on the reactor thread, where they read the server
manager's live records (``prometheus_client.twisted.MetricsResource``, a WSGI
resource, would run them in a thread pool while the reactor changes those
records).  What they gathered is then formatted as text in the reactor's
thread pool (given ``reactor``): at 500 servers that is most of a scrape's
cost, and the API keeps answering meanwhile.  The same resource is served on the API's listener
or on a listener of its own (``metrics.endpoint``), built in tap.py.
"""

from __future__ import annotations

import hmac
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ctrlagent.wire import http as envelopes
from ctrlagent.wire.json import encode


class MetricsResource(Resource):
    """Renders ``registry``; with a ``token``, only for ``Authorization: Bearer <token>``."""

    isLeaf = True
    log = Logger()

    def __init__(
        self, registry: CollectorRegistry, token: str = "", reactor: Any = None
    ) -> None:
        super().__init__()
        self._registry = registry
        self._token = token.encode("utf-8")
        # With a reactor, the text is formatted in its thread pool.
        self._reactor = reactor

    def authorized(self, request: Request) -> bool:
        """True without a token, else when the request carries it."""
        if not self._token:
            return True
        header = request.getHeader(b"authorization") or b""
        scheme, _, offered = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            offered.strip(), self._token
        )

    def render_GET(self, request: Request) -> bytes | int:  # noqa: N802 (Twisted hook)
        request.setHeader(b"Cache-Control", b"no-store")
        if not self.authorized(request):
            body = encode(envelopes.auth_failed())
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="ctrlagent-metrics"')
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body
        try:
            families = list(self._registry.collect())
        except Exception:
            return self._failed(request)
        if self._reactor is None:
            return self._answer(request, generate_latest(_Gathered(families)))
        formatted = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), generate_latest, _Gathered(families)
        )
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)  # the scraper left: nothing to say

        def write(body: bytes) -> None:
            if not finished.called:
                request.write(self._answer(request, body))
                request.finish()

        def failed(failure: Failure) -> None:
            if not finished.called:
                request.write(self._failed(request, failure))
                request.finish()

        formatted.addCallbacks(write, failed)
        done: int = NOT_DONE_YET
        return done

    @staticmethod
    def _answer(request: Request, body: bytes) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _failed(self, request: Request, failure: Failure | None = None) -> bytes:
        """A collector's bug: say so once in the log, answer 500 as JSON."""
        self.log.failure("rendering the metrics failed", failure)
        body = encode(envelopes.internal_error())
        request.setResponseCode(500)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    render_HEAD = render_GET  # noqa: N815 (Twisted hook)


class _Gathered:
    """What the collectors gave, as a registry ``generate_latest`` can format anywhere."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class _QuietSite(Site):
    """A ``Site`` without access log: a scraper comes every few seconds."""

    noisy = False

    def log(self, request: Any) -> None:  # type: ignore[override]
        """No access log line per scrape."""


def metrics_site(page: MetricsResource) -> Site:
    """The site of ``metrics.endpoint``: ``/metrics`` and nothing else (404)."""
    root = Resource()
    root.putChild(b"metrics", page)
    return _QuietSite(root)
