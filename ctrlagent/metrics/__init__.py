"""
Prometheus metrics of the agent (``GET /metrics``, docs/METRICS.md).

``AgentMetrics`` owns one ``CollectorRegistry`` per agent (never the
process-global one, so that two agents in one process, as in tests, do not
share series).  What happens (HTTP commands, engine calls) is counted as it
happens through two observer calls at single choke points: the API's
command runner and ``MeteredEngine``, the one wrapper at the engine seam.
What *is* (every server's figures, the Panel link, the background work) is
read at scrape time by custom collectors from the live objects, so there is
no polling loop and a removed server's series are gone from the next scrape.

Label values are bounded: actions come from the registry's fixed table
(anything else is ``unknown``), engine operations from ``IContainerEngine``'s
methods, states from the lifecycle's fixed set; the only free label is
``server_id``, one per managed server.
"""

from ctrlagent.metrics.agent import AgentMetrics
from ctrlagent.metrics.engine import MeteredEngine

__all__ = ["AgentMetrics", "MeteredEngine"]
