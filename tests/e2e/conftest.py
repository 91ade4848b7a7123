"""
End-to-end fixtures: the agent as a ``twistd -n ctrlagent`` subprocess.

``agent_process`` gives a started agent (HTTP only, no Panel WebSocket) on a
free loopback port, driving the test's runtime (``runtime``: the session's
real Docker engine, or the private Podman service with ``runtime.kind =
"podman"``); it is stopped by
its pid afterwards and the game-server containers it created are removed.
``make_agent`` builds more (with a Panel URL, or to restart on the same state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.rig.agentproc import AgentProcess, remove_containers_under
from tests.rig.holders import end_holders
from tests.rig.runtime import Runtime


@pytest.fixture
def make_agent(tmp_path: Path, runtime: Runtime) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def make(**kwargs: object) -> AgentProcess:
        workdir = kwargs.pop("workdir", None) or tmp_path / "agent{}".format(len(agents))
        kwargs.setdefault("runtime", runtime.kind)
        agent = AgentProcess(Path(str(workdir)), runtime.host, **kwargs)  # type: ignore[arg-type]
        agents.append(agent)
        return agent

    yield make
    left: list[int] = []
    for agent in agents:
        agent.stop()
    for agent in agents:
        remove_containers_under(agent.docker_host, agent.data_dir)
        # Podman's stdin holders end with the containers (and are killed if not).
        left += end_holders(str(agent.state_dir / "stdin"))
        if agent.process is None and agent.log_path.exists():
            # Keep the agent's log in the test report when something failed.
            print("--- agent log {} ---\n{}".format(agent.workdir, agent.log_text()[-4000:]))  # noqa: T201
    assert left == [], "stdin holders outlived their containers"


@pytest.fixture
def agent_process(make_agent: Callable[..., AgentProcess], scripted_image: str) -> AgentProcess:
    return make_agent().start()
