"""
The payload declarations, property-tested: every field of every action names
the dotted path of a bad value, a parsed value parses to itself again, a value
its OpenAPI schema allows is accepted, and a payload reports its first bad
field in declaration order.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator

from ctrlagent.actions.payload import (
    MISSING,
    Array,
    Boolean,
    Choice,
    Field,
    Identifier,
    Integer,
    Number,
    OctalMode,
    Payload,
    Signal,
    Text,
)
from ctrlagent.errors import CtrlAgentError, InvalidInput
from ctrlagent.wire.command import check_payload
from tests.actions.rig import Rig

_SPECS = Rig().dispatcher.specs()

# Every field any action declares, by "action.field", plus a few shapes no
# action uses yet (so each Field class is covered with and without options).
FIELDS: dict[str, Field] = {
    "{}.{}".format(spec.name, name): declared
    for spec in _SPECS
    for name, declared in spec.payload.fields.items()
}
FIELDS.update(
    {
        "extra.text": Text(),
        "extra.integer": Integer(default=3, minimum=-5, maximum=5),
        "extra.number": Number(default=1.5),
        "extra.boolean": Boolean(default=True),
        "extra.choice": Choice("a", "b", aliases={"A": "a"}),
        "extra.identifier": Identifier(),
        "extra.array": Array(Integer(maximum=10)),
    }
)
_FIELD_NAMES = sorted(FIELDS)

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=14),
    st.sampled_from(
        ["", "/", "a.txt", "term", "SIGKILL", "sig", "644", "0755", "12", " 7 ", "-3", "1.5",
         "true", "False", "utf-8", "utf8", "zip", "tar.gz", "txt", "json", "all", "start",
         "755\n", "term\n", "SIGX", "ab", "a\n"]
    ),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=4),
    st.dictionaries(st.text(max_size=5), _SCALARS, max_size=3),
)
_WHERE = st.one_of(
    st.sampled_from(["path", "limits.cpu", "ports[0]", "a.b.c"]),
    st.from_regex(r"[a-z][a-zA-Z]{0,8}(\.[a-z][a-zA-Z]{0,8}){0,2}", fullmatch=True),
)


def _usable(value: Any) -> bool:
    """What ``check_payload`` lets through to the actions (all they ever see)."""
    try:
        check_payload({"v": value})
    except CtrlAgentError:
        return False
    return True


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(_FIELD_NAMES), value=_VALUES, where=_WHERE)
def test_every_field_names_the_path_of_a_bad_value(name: str, value: Any, where: str) -> None:
    assume(_usable(value))
    declared = FIELDS[name]
    try:
        declared.parse(MISSING if value is None else value, where)
    except InvalidInput as e:
        assert e.code == "INVALID_PAYLOAD"
        field = e.details["field"]
        # the field itself, or an item inside it (files[2])
        assert field == where or field.startswith(where + "["), (name, value, field)
        assert where in e.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(_FIELD_NAMES), value=_VALUES)
def test_a_parsed_value_parses_to_itself_again(name: str, value: Any) -> None:
    assume(_usable(value))
    declared = FIELDS[name]
    try:
        parsed = declared.parse(MISSING if value is None else value, "f")
    except InvalidInput:
        return
    again = declared.parse(MISSING if parsed is None else parsed, "f")
    assert again == parsed and type(again) is type(parsed), (name, value, parsed, again)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(_FIELD_NAMES), value=_VALUES)
def test_a_value_the_schema_allows_is_accepted(name: str, value: Any) -> None:
    declared = FIELDS[name]
    if value is None or not _usable(value):
        return
    if OAS30Validator(declared.schema()).is_valid(value):
        declared.parse(value, "f")


@pytest.mark.parametrize(
    ("declared", "value", "parsed"),
    [
        (Text(default="/"), "", "/"),
        (Text(default="/"), MISSING, "/"),
        (Text(required=True, allow_empty=True), "", ""),
        (Integer(default=100), " 12 ", 12),
        (Integer(), 4.0, 4),
        (Number(), "2.5", 2.5),
        (Boolean(), "TRUE", True),
        (Choice("base64", "utf8", default="base64", aliases={"utf-8": "utf8"}), "utf-8", "utf8"),
        (Signal(), "term", "SIGTERM"),
        (Signal(), "sigkill", "SIGKILL"),
        (OctalMode(), 644, "644"),
        (OctalMode(), "0755", "0755"),
        (Identifier(required=True), 77, "77"),
        (Array(Text(required=True), non_empty=True), ["a", "b"], ["a", "b"]),
    ],
)
def test_fields_convert_the_spellings_the_panel_uses(
    declared: Field, value: Any, parsed: Any
) -> None:
    assert declared.parse(value, "f") == parsed


@pytest.mark.parametrize(
    ("declared", "value", "field"),
    [
        (Text(required=True), MISSING, "f"),
        (Text(required=True), "", "f"),
        (Text(), 5, "f"),
        (Integer(minimum=1), 0, "f"),
        (Integer(maximum=3), "4", "f"),
        (Integer(), True, "f"),
        (Integer(), 2.5, "f"),
        (Number(), float("inf"), "f"),
        (Number(), "soon", "f"),
        (Number(minimum=0), -1, "f"),
        (Boolean(), "yes", "f"),
        (Choice("a"), MISSING, "f"),
        (Choice("a"), "b", "f"),
        (Signal(), "SIG KILL; rm", "f"),
        (OctalMode(), "755\n", "f"),
        (OctalMode(), MISSING, "f"),
        (Identifier(required=True), "", "f"),
        (Identifier(), [1], "f"),
        (Array(Text(required=True), non_empty=True), [], "f"),
        (Array(Text(required=True), non_empty=True), ["a", ""], "f[1]"),
        (Array(Text(required=True)), ["a", 5], "f[1]"),
    ],
)
def test_fields_refuse_naming_the_path(declared: Field, value: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        declared.parse(value, "f")
    assert caught.value.details["field"] == field


_PAYLOADS = [spec.payload for spec in _SPECS if spec.payload.fields]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(_PAYLOADS) - 1),
    data=st.data(),
)
def test_a_payload_reports_its_first_bad_field_in_declaration_order(
    index: int, data: st.DataObject
) -> None:
    payload = _PAYLOADS[index]
    names = list(payload.fields)
    params = {
        name: data.draw(_VALUES, label=name)
        for name in data.draw(st.lists(st.sampled_from(names), max_size=len(names)))
    }
    assume(_usable(params))
    try:
        parsed = payload.validate(params)
    except InvalidInput as e:
        bad = e.details["field"]
        owner = next(name for name in names if bad == name or bad.startswith(name + "["))
        for earlier in names[: names.index(owner)]:
            payload.fields[earlier].parse(
                MISSING if params.get(earlier) is None else params[earlier], earlier
            )
        return
    # and the parsed payload validates to itself
    assert payload.validate(parsed) == parsed


def test_one_of_names_the_first_when_none_is_given() -> None:
    payload = Payload({"name": Text()}, needs_one_of=("modId", "workshopId", "downloadUrl"))
    with pytest.raises(InvalidInput) as caught:
        payload.validate({"name": "x", "modId": 0})
    assert caught.value.details["field"] == "modId"
    assert payload.validate({"workshopId": "1"}) == {"name": None}
    assert payload.schema()["anyOf"] == [
        {"required": ["modId"]}, {"required": ["workshopId"]}, {"required": ["downloadUrl"]}
    ]


def test_a_payload_schema_lists_its_fields_and_what_is_required() -> None:
    payload = Payload({"path": Text(required=True), "lines": Integer(default=100, minimum=1)})
    schema = payload.schema()
    assert schema["required"] == ["path"]
    assert schema["properties"]["lines"] == {"type": "integer", "minimum": 1, "default": 100}
    assert schema["additionalProperties"] is True
