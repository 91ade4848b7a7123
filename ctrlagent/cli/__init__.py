"""
``ctrlagent``: the operator's command on a node (README "Operator CLI").

It talks to the local agent's HTTP API with the node's secret, read from
the same configuration the agent runs with (``--config``, the environment:
``config.load_config``).  Plain stdlib (``urllib``/``http.client``), no
Twisted: the command starts in a few tens of milliseconds.  Every failure
is one ``ctrlagent: error: ...`` line on stderr and a non-zero exit.
"""
