"""
Every body that does not decode to JSON answers 400 ``PARSE_ERROR``, on the
Panel's command endpoint and on the REST surface alike, and never logs a
traceback (the decoder itself is tested in ``tests/wire/test_json.py``).
Numbers no action can use (``1e999``, ``NaN``, ``Infinity``, 5,000 digits)
are JSON the dispatcher refuses as ``INVALID_PAYLOAD`` naming the field.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from ctrlagent.wire.json import MAX_BODY_DEPTH, nesting_depth
from tests.api.conftest import UUID, ApiRig, panel_headers
from tests.wire.samples import BAD_BODIES, NUMBER_BODIES


@pytest.mark.parametrize("raw,field", list(NUMBER_BODIES.values()), ids=list(NUMBER_BODIES))
@pytest_twisted.ensureDeferred
async def test_unusable_numbers_are_invalid_payload_naming_the_field(
    rig: ApiRig, raw: bytes, field: str
) -> None:
    code, body = await rig.command(raw)
    assert (code, body["success"], body["code"]) == (200, False, "INVALID_PAYLOAD")
    assert body.get("field") == field or field in body["error"]


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
@pytest_twisted.ensureDeferred
async def test_undecodable_command_bodies_are_400_parse_error(rig: ApiRig, raw: bytes) -> None:
    code, body = await rig.command(raw)
    assert (code, body["success"], body["code"]) == (400, False, "PARSE_ERROR")
    assert body["error"]


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
@pytest_twisted.ensureDeferred
async def test_undecodable_rest_bodies_are_400_parse_error(rig: ApiRig, raw: bytes) -> None:
    response = await rig.http.post(
        "http://node.test:8081/api/servers/{}/power".format(UUID),
        data=raw,
        headers=panel_headers(),
    )
    body = json.loads(await response.content())
    assert (response.code, body["code"]) == (400, "PARSE_ERROR")


@pytest_twisted.ensureDeferred
async def test_nesting_within_the_limit_is_still_served(rig: ApiRig) -> None:
    inner = "[" * (MAX_BODY_DEPTH - 2) + "]" * (MAX_BODY_DEPTH - 2)
    raw = '{"action":"system.ping","payload":{"x":' + inner + "}}"
    assert nesting_depth(raw.encode()) == MAX_BODY_DEPTH
    code, body = await rig.command(raw.encode())
    # Decoded (no PARSE_ERROR); the dispatcher's own, tighter payload bound
    # then names the field.
    assert (code, body["success"], body["code"]) == (200, False, "INVALID_PAYLOAD")
    shallow = '{"action":"system.ping","payload":{"x":' + "[" * 8 + "]" * 8 + "}}"
    code, body = await rig.command(shallow.encode())
    assert (code, body["success"]) == (200, True)
