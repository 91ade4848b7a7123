"""
One answer, one encoding: the same result data is the same bytes in the
``data`` of an HTTP answer (``POST /api/command``) and of a WebSocket
response, whatever it holds (NaN, infinities, lone surrogates, non-ASCII
text, records), because both transports frame it with ``wire`` and encode it
with ``wire.json.encode``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from ctrlagent.wire.command import ActionResult, Command
from ctrlagent.wire.json import to_json
from tests.api.conftest import ApiRig
from tests.panel.harness import Harness


@dataclass(frozen=True)
class _Sample:
    """A result record, serialised through its registered shape."""

    cpu: float
    label: str


@to_json.register
def _sample_json(sample: _Sample) -> dict[str, Any]:
    return {"cpuPercent": sample.cpu, "label": sample.label}


class _Answering:
    """A dispatcher answering every command with the same data."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def dispatch(self, command: Command) -> Deferred[ActionResult]:
        return succeed(ActionResult(self.data))

    def actions(self) -> list[str]:
        return ["echo"]


NAN, INF = float("nan"), float("inf")

CASES: dict[str, tuple[Any, bytes]] = {
    "NaN, infinities and a lone surrogate": (
        {"cpu": NAN, "limits": [INF, -INF], "name": "bad\ud800name", "ok": 1.5},
        b'{"cpu":null,"limits":[null,null],"name":"bad\\ud800name","ok":1.5}',
    ),
    "non-ASCII text beside NaN": (
        {"motd": "Überserver 🎮", "cpu": NAN},
        '{"motd":"Überserver 🎮","cpu":null}'.encode(),
    ),
    "a record holding infinity and a file-name surrogate": (
        {"sample": _Sample(INF, "caf\udce9")},
        b'{"sample":{"cpuPercent":null,"label":"caf\\udce9"}}',
    ),
}


def _data_of(raw: bytes) -> bytes:
    """The bytes of the ``data`` member, the last one of every success answer."""
    start = raw.index(b'"data":') + len(b'"data":')
    assert raw.endswith(b"}")
    return raw[start:-1]


async def _over_http(data: Any) -> bytes:
    rig = ApiRig()
    rig.api._dispatcher = _Answering(data)
    response = await rig.http.post(
        "http://node.test:8081/api/command",
        data=b'{"action":"echo"}',
        headers={"Authorization": "Bearer " + rig.config.secret},
    )
    assert response.code == 200
    raw: bytes = await response.content()
    assert raw.startswith(b'{"success":true,"data":')
    return raw


def _over_websocket(data: Any) -> bytes:
    rig = Harness()
    rig.link._dispatcher = _Answering(data)
    rig.start()
    rig.panel.send({"id": "same", "type": "command", "action": "echo"})
    rig.flush()
    [raw] = [r.raw for r in rig.panel.received if r.frame.get("type") == "response"]
    assert raw.startswith(b'{"id":"same","type":"response",')
    return raw


@pytest.mark.parametrize("data,expected", list(CASES.values()), ids=list(CASES))
@pytest_twisted.ensureDeferred
async def test_the_same_data_is_the_same_bytes_on_http_and_websocket(
    data: Any, expected: bytes
) -> None:
    http = await _over_http(data)
    websocket = _over_websocket(data)
    assert _data_of(http) == _data_of(websocket) == expected
    # Strict JSON both ways, for the Panel's JSON.parse.
    for raw in (http, websocket):
        json.loads(raw.decode("utf-8"), parse_constant=pytest.fail)
