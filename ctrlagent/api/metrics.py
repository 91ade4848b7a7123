"""
``GET /metrics``: the agent's ``CollectorRegistry`` in the Prometheus text
format, behind its own bearer token when one is set (``metrics.token``; not
the node's secret, so a scraper never holds the key to the servers).

The registry is rendered on the reactor thread, where the collectors read the
server manager's live records: ``prometheus_client.twisted.MetricsResource``
would render in a thread pool (it is a WSGI resource) and so read them while
the reactor changes them.  The same resource is served on the API's listener
or on a listener of its own (``metrics.endpoint``), built in tap.py.
"""

from __future__ import annotations

import hmac
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ctrlagent.wire import http as envelopes
from ctrlagent.wire.json import encode


class MetricsResource(Resource):
    """Renders ``registry``; with a ``token``, only for ``Authorization: Bearer <token>``."""

    isLeaf = True
    log = Logger()

    def __init__(self, registry: CollectorRegistry, token: str = "") -> None:
        super().__init__()
        self._registry = registry
        self._token = token.encode("utf-8")

    def authorized(self, request: Request) -> bool:
        """True without a token, else when the request carries it."""
        if not self._token:
            return True
        header = request.getHeader(b"authorization") or b""
        scheme, _, offered = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            offered.strip(), self._token
        )

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 (Twisted hook)
        request.setHeader(b"Cache-Control", b"no-store")
        if not self.authorized(request):
            body = encode(envelopes.auth_failed())
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="ctrlagent-metrics"')
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body
        try:
            body = generate_latest(self._registry)
        except Exception:
            # A collector's bug: say so once in the log, answer 500 as JSON.
            self.log.failure("rendering the metrics failed")
            body = encode(envelopes.internal_error())
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    render_HEAD = render_GET  # noqa: N815 (Twisted hook)


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
