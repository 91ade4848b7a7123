"""
The plain-command path asks the manager for a kept read first
(``IServerManager.read_answer``, ``servers/reads.py``): a bare status or
metrics read it has at hand is written as is and recorded like any other
answer; everything else (a wrong secret, a body with more in it, a read the
manager does not keep) goes on to the registry as before.
"""

from __future__ import annotations

import json
from typing import Any

from ctrlagent.api import AgentApi
from tests.api.conftest import SECRET, ApiRig

KEPT = b'{"success":true,"data":{"kept":true}}'


def _api(observed: list[tuple[Any, ...]]) -> tuple[ApiRig, list[tuple[str, str]]]:
    rig = ApiRig()
    asked: list[tuple[str, str]] = []

    def read_answer(action: str, server_id: str) -> bytes | None:
        asked.append((action, server_id))
        return KEPT if server_id == "s1" else None

    rig.servers.read_answer = read_answer  # type: ignore[method-assign]
    rig.api = AgentApi(
        config=rig.config, dispatcher=rig.dispatcher, servers=rig.servers,
        docker_ping=rig.docker.ping, clock=rig.clock, version="t",
        observe_command=lambda *args: observed.append(args),
    )
    return rig, asked


def _body(**command: Any) -> bytes:
    return json.dumps(command).encode()


def test_a_kept_read_is_written_as_is_and_recorded() -> None:
    observed: list[tuple[Any, ...]] = []
    rig, asked = _api(observed)
    answer = rig.api.answer_plain_command(
        b"Bearer " + SECRET.encode(), None,
        _body(action="get_server_status", serverId="s1"),
    )
    assert isinstance(answer, bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body == KEPT
    assert head.endswith(b"Content-Length: %d" % len(KEPT))
    assert asked == [("get_server_status", "s1")]
    assert [o[0] for o in observed] == ["get_server_status"]


def test_what_the_manager_does_not_keep_goes_to_the_registry() -> None:
    observed: list[tuple[Any, ...]] = []
    rig, asked = _api(observed)
    # Not kept (None): the registry answers (the fake has no such server: a failure).
    handed = rig.api.answer_plain_command(
        b"Bearer " + SECRET.encode(), None, _body(action="get_server_status", serverId="s2"),
    )
    assert asked == [("get_server_status", "s2")]
    assert handed is not None and not isinstance(handed, bytes)
    failures: list[Any] = []
    handed.work.addErrback(failures.append)  # type: ignore[attr-defined]
    assert failures and "s2" in str(failures[0].value)
    # A wrong secret, a body with a payload, no server: the manager is not asked.
    rig.api.answer_plain_command(
        b"Bearer wrong", None, _body(action="get_server_status", serverId="s1"),
    )
    handed = rig.api.answer_plain_command(
        b"Bearer " + SECRET.encode(), None,
        _body(action="get_server_status", serverId="s1", payload={"x": 1}),
    )
    # The fake has no s1: the registry's failure, for the route to answer.
    handed.work.addErrback(failures.append)  # type: ignore[union-attr]
    rig.api.answer_plain_command(
        b"Bearer " + SECRET.encode(), None, _body(action="list_servers"),
    )
    assert asked == [("get_server_status", "s2")]
