"""
Fixtures of the standing fault suite (``-m faults``).

Every test here drives the real agent (``twistd -n ctrlagent`` as a
subprocess) through a fault a node meets: SIGKILLs, an engine restart, full
filesystems, a corrupt store, a flapping Panel link, hostile clients and a
hostile game server.

- ``make_agent``: builds ``FaultAgent``s (JSON logs) on the test's runtime
  (``runtime``: Docker or the private Podman service) or any other engine;
  stopped by pid afterwards, their containers removed.
- ``no_logged_tracebacks`` (autouse): after the agents are stopped, fails the
  test on any traceback, "Unhandled error" or ``log_failure`` event in any of
  their logs.  Nothing a user, a game server or a faulty machine does may
  produce one: what goes wrong is a coded answer or one clear log line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.rig import (
    FaultAgent,
    log_messages,
    logged_tracebacks,
)
from tests.rig.agentproc import remove_containers_under
from tests.rig.holders import end_holders
from tests.rig.runtime import Runtime


@pytest.fixture(autouse=True)
def no_logged_tracebacks() -> Iterator[list[Path]]:
    """The logs of every agent the test ran; any traceback in one fails the test."""
    logs: list[Path] = []
    yield logs
    found = []
    for path in logs:
        for entry in logged_tracebacks(path):
            found.append("{}:\n{}".format(path, entry))
    if found:
        pytest.fail(
            "the agent logged {} traceback(s):\n{}".format(len(found), "\n---\n".join(found[:10])),
            pytrace=False,
        )


@pytest.fixture
def make_agent(
    tmp_path: Path, runtime: Runtime, no_logged_tracebacks: list[Path]
) -> Iterator[Callable[..., FaultAgent]]:
    """``make_agent(workdir=..., docker_host=..., **AgentProcess kwargs)`` (not started)."""
    agents: list[FaultAgent] = []

    def make(**kwargs: Any) -> FaultAgent:
        workdir = Path(kwargs.pop("workdir", None) or tmp_path / "agent{}".format(len(agents)))
        host = kwargs.pop("docker_host", None)
        if host is None:
            host = runtime.host
            kwargs.setdefault("runtime", runtime.kind)
        agent = FaultAgent(workdir, host, **kwargs)
        agents.append(agent)
        no_logged_tracebacks.append(agent.log_path)
        return agent

    yield make
    left: list[int] = []
    for agent in agents:
        agent.stop(timeout=20)
    for agent in agents:
        remove_containers_under(agent.docker_host, agent.data_dir)
        # Podman's stdin holders end with the containers (and are killed if not).
        left += end_holders(str(agent.state_dir / "stdin"))
        if agent.log_path.exists():
            # In the report when the test failed.
            tail = "\n".join(log_messages(agent.log_path)[-40:])
            print("--- agent log {} ---\n{}".format(agent.workdir, tail))  # noqa: T201
    assert left == [], "stdin holders outlived their containers"
