"""
The agent's HTTP API: the Klein app (``AgentApi``), the listener that refuses
oversized bodies early (``LimitedSite``) and ``make_http_service``.
"""

from ctrlagent.api.app import AgentApi
from ctrlagent.api.site import LimitedRequest, LimitedSite, make_http_service

__all__ = ["AgentApi", "LimitedRequest", "LimitedSite", "make_http_service"]
