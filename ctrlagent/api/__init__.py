"""
The agent's HTTP API: the Klein app (``AgentApi``), the listener that checks
credentials and sizes before reading a body and bounds connections
(``GuardedSite``, also known as ``LimitedSite``) and ``make_http_service``.
"""

from ctrlagent.api.app import AgentApi
from ctrlagent.api.site import (
    GuardedChannel,
    GuardedRequest,
    GuardedSite,
    LimitedRequest,
    LimitedSite,
    make_http_service,
)

__all__ = [
    "AgentApi",
    "GuardedChannel",
    "GuardedRequest",
    "GuardedSite",
    "LimitedRequest",
    "LimitedSite",
    "make_http_service",
]
