"""
The declarations of action payloads: each field is parsed and described once.

A ``Field`` turns one decoded JSON value into what the action uses, or raises
``InvalidInput`` naming the field by its dotted path (``files[2]``), so the
Panel (and a human reading its logs) sees which field was wrong; its
``schema()`` is the OpenAPI 3.0 description of the same rule, so the document
served at ``/api/openapi.json`` cannot drift from what the agent accepts.

A ``Payload`` is an action's fields in declaration order (the first bad field
wins), whether the action names a server, and at most one ``Definition``: the
``create_server``/``update_server`` body, which ``ctrlagent.servers.spec``
parses as a whole.

Every value has already passed ``ctrlagent.wire.command.check_payload`` (no
non-finite or absurd number, no runaway nesting, no lone surrogate).

Pure: no reactor, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ctrlagent.errors import InvalidInput
from ctrlagent.wire.command import MAX_SAFE_NUMBER


class _Missing:
    """The value of a field that is absent or null."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def _present(params: Mapping[str, Any], name: str) -> Any:
    value = params.get(name, MISSING)
    return MISSING if value is None else value


def whole(regex: str) -> str:
    """
    An OpenAPI ``pattern`` matching a whole string: ``^...$`` and, since
    Python's ``$`` also matches before a final newline (where ECMA's does
    not), nothing after the end either.
    """
    return "^(?:" + regex + ")$(?!\n)"


class Field:
    """One payload field: ``parse`` checks and converts it, ``schema`` describes it."""

    description: str | None = None

    def parse(self, value: Any, where: str) -> Any:
        """
        The value to use for the field at ``where`` (``MISSING`` when it is
        absent or null), or ``InvalidInput(field=where)``.
        """
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """The OpenAPI 3.0 schema object of the field."""
        raise NotImplementedError

    @property
    def required(self) -> bool:
        """Whether a payload without the field is refused."""
        return False

    def _described(self, schema: dict[str, Any]) -> dict[str, Any]:
        if self.description:
            schema["description"] = self.description
        return schema


class Text(Field):
    """
    A string.  Required: absent, null or (unless ``allow_empty``) empty is
    refused.  Optional: absent or null gives ``default``, and so does an empty
    string when there is a default (a path of ``""`` is the root).
    """

    def __init__(
        self,
        *,
        required: bool = False,
        default: str | None = None,
        allow_empty: bool = False,
        description: str | None = None,
    ) -> None:
        self._required = required
        self.default = default
        self.allow_empty = allow_empty
        self.description = description

    @property
    def required(self) -> bool:
        return self._required

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            if self._required:
                raise InvalidInput("{} is required".format(where), field=where)
            return self.default
        if not isinstance(value, str):
            raise InvalidInput("{} must be a string".format(where), field=where)
        if not value:
            if self._required and not self.allow_empty:
                raise InvalidInput("{} must not be empty".format(where), field=where)
            if not self._required and self.default is not None:
                return self.default
        return value

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        if self._required and not self.allow_empty:
            schema["minLength"] = 1
        if self.default is not None:
            schema["default"] = self.default
        return self._described(schema)


_INTEGER_TEXT = re.compile(r"\s*-?\d{1,12}\s*")


class Integer(Field):
    """
    An integer: a JSON integer, an integral float or a string of digits (some
    Panels send query-string values); ``default`` when absent; bounds enforced.
    """

    def __init__(
        self,
        *,
        default: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
        description: str | None = None,
    ) -> None:
        self.default = default
        self.minimum = minimum
        self.maximum = maximum
        self.description = description

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            return self.default
        result: int
        if isinstance(value, bool):
            raise InvalidInput("{} must be an integer".format(where), field=where)
        if isinstance(value, int):
            result = value
        elif isinstance(value, float) and value.is_integer():
            result = int(value)
        elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
            result = int(value)
        else:
            raise InvalidInput("{} must be an integer".format(where), field=where)
        if self.minimum is not None and result < self.minimum:
            raise InvalidInput(
                "{} must be at least {}".format(where, self.minimum), field=where
            )
        if self.maximum is not None and result > self.maximum:
            raise InvalidInput("{} must be at most {}".format(where, self.maximum), field=where)
        return result

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.default is not None:
            schema["default"] = self.default
        return self._described(schema)


class Number(Field):
    """A finite number (also a numeric string), never a boolean; ``default`` when absent."""

    def __init__(
        self,
        *,
        default: float | None = None,
        minimum: float | None = None,
        description: str | None = None,
    ) -> None:
        self.default = default
        self.minimum = minimum
        self.description = description

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            return self.default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if not isinstance(value, str):
                raise InvalidInput("{} must be a number".format(where), field=where)
            try:
                value = float(value)
            except ValueError:
                raise InvalidInput("{} must be a number".format(where), field=where) from None
        if not math.isfinite(value):
            raise InvalidInput("{} must be a finite number".format(where), field=where)
        if abs(value) > MAX_SAFE_NUMBER:
            raise InvalidInput("{} is out of range".format(where), field=where)
        if self.minimum is not None and value < self.minimum:
            raise InvalidInput(
                "{} must be at least {:g}".format(where, self.minimum), field=where
            )
        return float(value)

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.default is not None:
            schema["default"] = self.default
        return self._described(schema)


class Boolean(Field):
    """A boolean (also the strings ``"true"``/``"false"``, any case); ``default`` when absent."""

    def __init__(self, *, default: bool = False, description: str | None = None) -> None:
        self.default = default
        self.description = description

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            return self.default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InvalidInput("{} must be a boolean".format(where), field=where)

    def schema(self) -> dict[str, Any]:
        return self._described({"type": "boolean", "default": self.default})


class Choice(Field):
    """
    One of ``choices`` (``aliases`` map other accepted spellings onto them);
    ``default`` when absent, required when there is no default.
    """

    def __init__(
        self,
        *choices: str,
        default: str | None = None,
        aliases: Mapping[str, str] | None = None,
        description: str | None = None,
    ) -> None:
        self.choices = choices
        self.default = default
        self.aliases = dict(aliases or {})
        self.description = description

    @property
    def required(self) -> bool:
        return self.default is None

    def _accepted(self) -> list[str]:
        return [*self.choices, *self.aliases]

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            if self.default is None:
                raise InvalidInput("{} is required".format(where), field=where)
            return self.default
        if not isinstance(value, str):
            raise InvalidInput("{} must be a string".format(where), field=where)
        if value in self.aliases:
            return self.aliases[value]
        if value not in self.choices:
            raise InvalidInput(
                "{} must be one of {}".format(where, ", ".join(self._accepted())), field=where
            )
        return value

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "enum": self._accepted()}
        if self.default is not None:
            schema["default"] = self.default
        return self._described(schema)


_SIGNAL = re.compile(r"SIG[A-Z0-9]{2,10}")


class Signal(Field):
    """An optional signal name: ``"term"`` and ``"sigterm"`` are ``"SIGTERM"``."""

    def __init__(self, *, description: str | None = None) -> None:
        self.description = description

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            return None
        if not isinstance(value, str):
            raise InvalidInput("{} must be a string".format(where), field=where)
        signal = value.upper()
        if not signal.startswith("SIG"):
            signal = "SIG" + signal
        if not _SIGNAL.fullmatch(signal):
            raise InvalidInput("{} must be a signal name".format(where), field=where)
        return signal

    def schema(self) -> dict[str, Any]:
        return self._described(
            {
                "type": "string",
                "pattern": whole(
                    "[Ss][Ii][Gg][A-Za-z0-9]{2,10}|(?![Ss][Ii][Gg])[A-Za-z0-9]{2,10}"
                ),
                "example": "SIGTERM",
            }
        )


_MODE = re.compile(r"[0-7]{3,4}")


class OctalMode(Field):
    """A required file mode in octal digits: ``"0755"``, or ``644`` as a JSON number."""

    def __init__(self, *, description: str | None = None) -> None:
        self.description = description

    @property
    def required(self) -> bool:
        return True

    def parse(self, value: Any, where: str) -> Any:
        # Some clients send 644 as a JSON number; its decimal digits are the octal mode.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _MODE.fullmatch(value):
            raise InvalidInput(
                "{} must be an octal mode like 644 or 0755".format(where), field=where
            )
        return value

    def schema(self) -> dict[str, Any]:
        # The JSON-number spelling (644) is accepted but not advertised.
        return self._described(
            {"type": "string", "pattern": whole("[0-7]{3,4}"), "example": "0644"}
        )


class Identifier(Field):
    """An id given as a string or an integer, used as a string (a mod's id)."""

    def __init__(self, *, required: bool = False, description: str | None = None) -> None:
        self._required = required
        self.description = description

    @property
    def required(self) -> bool:
        return self._required

    def parse(self, value: Any, where: str) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if self._required:
            if not isinstance(value, str) or not value:
                raise InvalidInput("{} is required".format(where), field=where)
            return value
        if value is MISSING:
            return None
        if not isinstance(value, str):
            raise InvalidInput("{} must be a string".format(where), field=where)
        return value

    def schema(self) -> dict[str, Any]:
        text: dict[str, Any] = {"type": "string"}
        if self._required:
            text["minLength"] = 1
        return self._described({"oneOf": [text, {"type": "integer"}]})


class Array(Field):
    """
    A JSON array whose items each parse with ``items`` (named ``where[i]``);
    absent is None unless ``non_empty``, which refuses absent and empty arrays.
    """

    def __init__(
        self, items: Field, *, non_empty: bool = False, description: str | None = None
    ) -> None:
        self.items = items
        self.non_empty = non_empty
        self.description = description

    @property
    def required(self) -> bool:
        return self.non_empty

    def parse(self, value: Any, where: str) -> Any:
        if value is MISSING:
            if self.non_empty:
                raise InvalidInput("{} must be a non-empty array".format(where), field=where)
            return None
        if not isinstance(value, list):
            raise InvalidInput("{} must be an array".format(where), field=where)
        if self.non_empty and not value:
            raise InvalidInput("{} must be a non-empty array".format(where), field=where)
        return [
            self.items.parse(MISSING if item is None else item, "{}[{}]".format(where, index))
            for index, item in enumerate(value)
        ]

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "array", "items": self.items.schema()}
        if self.non_empty:
            schema["minItems"] = 1
        return self._described(schema)


@dataclass(frozen=True)
class Definition:
    """
    A body parsed as a whole by the domain's own parser (a server's
    definition, by ``ctrlagent.servers.spec``): ``parse(server_id, params)``
    raises ``InvalidInput`` naming the field; ``schema`` is its OpenAPI
    object schema, built from the same module's bounds.
    """

    parse: Callable[[str, Mapping[str, Any]], Any]
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class Payload:
    """
    What one action reads from its params.

    ``server``: ``"required"`` (the command must name a known server; it is
    resolved to its canonical id), ``"new"`` (it must name an id, which is not
    resolved: the server is being created), ``"optional"`` (resolved when
    given) or ``"none"`` (not read).  ``before_server``: the fields are
    checked before the server is resolved (file and mod actions, as the
    Panel has always seen them).  ``needs_one_of``: at least one of these
    params must be truthy (the first is named when none is).
    """

    fields: Mapping[str, Field] = field(default_factory=dict)
    server: Literal["required", "new", "optional", "none"] = "required"
    definition: Definition | None = None
    before_server: bool = False
    needs_one_of: tuple[str, ...] = ()

    def validate(self, params: Mapping[str, Any], server_id: str | None = None) -> dict[str, Any]:
        """
        The parsed fields by name, in declaration order (the first bad field
        wins), then the definition (as ``"definition"``) parsed for ``server_id``.
        """
        parsed: dict[str, Any] = {}
        for name, declared in self.fields.items():
            parsed[name] = declared.parse(_present(params, name), name)
        if self.needs_one_of and not any(params.get(name) for name in self.needs_one_of):
            first, *others = self.needs_one_of
            raise InvalidInput(
                "{} or {} is required".format(", ".join([first, *others[:-1]]), others[-1])
                if others
                else "{} is required".format(first),
                field=first,
            )
        if self.definition is not None:
            parsed["definition"] = self.definition.parse(server_id or "", params)
        return parsed

    def schema(self) -> dict[str, Any]:
        """The OpenAPI 3.0 schema of the ``payload`` object."""
        schema: dict[str, Any] = {"type": "object"}
        properties: dict[str, Any] = {}
        required: list[str] = []
        if self.definition is not None:
            definition = dict(self.definition.schema)
            properties.update(definition.get("properties", {}))
            required.extend(definition.get("required", []))
        for name, declared in self.fields.items():
            properties[name] = declared.schema()
            if declared.required:
                required.append(name)
        if properties:
            schema["properties"] = properties
        if required:
            schema["required"] = required
        if self.needs_one_of:
            schema["anyOf"] = [{"required": [name]} for name in self.needs_one_of]
        schema["additionalProperties"] = True
        return schema
