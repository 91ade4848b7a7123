"""
The OpenAPI document of the actions, generated from their declarations: the
whole document validates, its ``Action`` enum is the registry's names, each
action's payload is described, and the server definition's schema carries
``servers/spec.py``'s own bounds.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from ctrlagent.actions.registry import ActionSpec
from ctrlagent.actions.servers import CREATE, UPDATE
from ctrlagent.api.openapi import openapi_document
from ctrlagent.errors import InvalidInput
from ctrlagent.servers import spec as specs
from tests.actions.rig import Rig
from tests.api.conftest import ApiRig


def _document(rig: Rig) -> dict[str, Any]:
    registry = rig.dispatcher
    return openapi_document("test", registry.names(), registry.openapi_schemas())


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def test_the_whole_document_with_every_action_validates(rig: Rig) -> None:
    document = _document(rig)
    validate(document)
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_the_action_enum_is_the_registrys_names(rig: Rig) -> None:
    document = _document(rig)
    names = rig.dispatcher.names()
    assert document["components"]["schemas"]["Action"]["enum"] == names
    assert names == rig.dispatcher.actions() == sorted(
        name for spec in rig.dispatcher.specs() for name in (spec.name, *spec.aliases)
    )
    commands = document["components"]["schemas"]["ActionCommand"]["oneOf"]
    assert sorted(n for c in commands for n in c["properties"]["action"]["enum"]) == names


@pytest_twisted.ensureDeferred
async def test_the_served_document_lists_the_registrys_names() -> None:
    api = ApiRig()
    code, document, _ = await api.get("/api/openapi.json")
    assert code == 200
    assert document["components"]["schemas"]["Action"]["enum"] == api.dispatcher.names()
    # ... and describes each action's payload, from the same declarations.
    assert document["components"]["schemas"] == {
        **document["components"]["schemas"],
        **api.dispatcher.openapi_schemas(),
    }


def _spec(rig: Rig, name: str) -> ActionSpec:
    (found,) = [s for s in rig.dispatcher.specs() if s.name == name]
    return found


@pytest.mark.parametrize(
    ("action", "payload"),
    [
        ("create_server", {"image": "busybox", "limits": {"memory": 512, "cpu": 150.5},
                           "ports": [{"internal": 25565, "external": 25565}, 27015],
                           "environment": {"EULA": True, "SEED": 42}, "panelId": "p-1"}),
        ("update_server", {"limits": {"memory": 1024}}),
        ("stop_server", {"signal": "SIGTERM", "timeout": 30}),
        ("stop_server", {"signal": "term"}),
        ("power_server", {"action": "restart"}),
        ("delete_server", {"purgeFiles": True}),
        ("get_server_logs", {"lines": 50}),
        ("console:download", {"format": "json"}),
        ("list_files", {"path": "/", "limit": 10, "offset": 0}),
        ("write_file", {"path": "a.txt", "content": ""}),
        ("upload_file", {"path": "/w.bin", "content": "AA==", "encoding": "utf-8",
                         "chunkIndex": 0, "totalChunks": 2}),
        ("set_file_permissions", {"path": "a", "mode": "0644"}),
        ("create_archive", {"files": ["/world"], "archivePath": "/b.zip", "format": "zip"}),
        ("install_mod", {"workshopId": "123"}),
        ("uninstall_mod", {"modId": 77}),
        ("system.ping", {}),
    ],
)
def test_a_payload_the_agent_takes_fits_its_schema(
    rig: Rig, action: str, payload: dict[str, Any]
) -> None:
    spec = _spec(rig, action)
    spec.payload.validate(payload, "srv-1")
    schema = rig.dispatcher.openapi_schemas()[_spec_schema_name(rig, action)]
    errors = [e.message for e in OAS30Validator(schema).iter_errors(payload)]
    assert errors == []


@pytest.mark.parametrize(
    ("action", "payload"),
    [
        ("create_server", {"name": "no image"}),
        ("create_server", {"image": "busybox", "limits": {"memory": specs.MAX_MEMORY_MB + 1}}),
        ("create_server", {"image": "busybox", "ports": [{"internal": 65536}]}),
        ("stop_server", {"signal": "SIG KILL; rm"}),
        ("stop_server", {"timeout": -1}),
        ("power_server", {"action": "explode"}),
        ("get_server_logs", {"lines": 0}),
        ("read_file", {}),
        ("upload_file", {"path": "a", "content": "", "encoding": "rot13"}),
        ("set_file_permissions", {"path": "a", "mode": "rwx"}),
        ("set_file_permissions", {"path": "a", "mode": "755\n"}),
        ("stop_server", {"signal": "TERM\n"}),
        ("create_server", {"image": "busybox", "panelId": "p-1\n"}),
        ("create_archive", {"files": [], "archivePath": "/b.zip"}),
        ("install_mod", {"name": "nothing to fetch"}),
        ("uninstall_mod", {}),
    ],
)
def test_a_payload_the_agent_refuses_is_outside_its_schema(
    rig: Rig, action: str, payload: dict[str, Any]
) -> None:
    spec = _spec(rig, action)
    with pytest.raises(InvalidInput):
        spec.payload.validate(payload, "srv-1")
    schema = rig.dispatcher.openapi_schemas()[_spec_schema_name(rig, action)]
    assert not OAS30Validator(schema).is_valid(payload)


def _spec_schema_name(rig: Rig, action: str) -> str:
    schemas = rig.dispatcher.openapi_schemas()
    (command,) = [
        c for c in schemas["ActionCommand"]["oneOf"]
        if action in c["properties"]["action"]["enum"]
    ]
    ref: str = command["properties"]["payload"]["$ref"]
    return ref.rsplit("/", 1)[1]


@pytest.mark.parametrize(
    ("key", "low", "high"),
    [
        ("memory", 0, specs.MAX_MEMORY_MB),
        ("swap", -1, specs.MAX_MEMORY_MB),
        ("disk", 0, specs.MAX_DISK_MB),
        ("cpu", 0, specs.MAX_CPU_PERCENT),
        ("io", 0, specs.MAX_IO_WEIGHT),
        ("pids", -specs.MAX_PIDS, specs.MAX_PIDS),
    ],
)
def test_the_definition_schema_carries_the_parsers_bounds(key: str, low: int, high: int) -> None:
    schema = CREATE.schema["properties"]["limits"]["properties"][key]
    assert (schema["minimum"], schema["maximum"]) == (low, high)
    for definition in (CREATE, UPDATE):
        for good in (low, high):
            definition.parse("srv-1", {"image": "busybox", "limits": {key: good}})
        for bad in (low - 1, high + 1):
            with pytest.raises(InvalidInput) as caught:
                definition.parse("srv-1", {"image": "busybox", "limits": {key: bad}})
            assert caught.value.details["field"] == "limits." + key


def test_an_update_is_checked_by_the_rules_of_a_merge() -> None:
    # only what the update names is checked: no image needed, limits merge
    UPDATE.parse("srv-1", {"limits": {"memory": 1024}})
    UPDATE.parse("srv-1", {"aliases": ["other-id"]})
    for params, field in [
        ({"image": ""}, "image"),
        ({"limits": 5}, "limits"),
        ({"environment": {"1BAD": "x"}}, "environment"),
        ({"stop": 5}, "stop"),
        ({"ports": [{"internal": 0}]}, "ports[0].internal"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            UPDATE.parse("srv-1", params)
        assert caught.value.details["field"] == field
