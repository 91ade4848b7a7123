"""
The wire's tables (``wire.tables``) name only what the agent can do: every
power word, legacy frame type and action alias leads to an action the
dispatcher runs, and every error code has one REST status.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from ctrlagent import errors
from ctrlagent.actions import Dispatcher
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.wire.command import Command
from ctrlagent.wire.incoming import CommandFrame, parse_frame
from ctrlagent.wire.tables import (
    ACTION_ALIASES,
    ERROR_CODES,
    LEGACY_FRAME_TYPES,
    POWER_WORDS,
    REST_STATUS,
)


class _Host:
    """Host figures for the ``system.*`` actions."""

    async def snapshot(self) -> dict[str, Any]:
        return {"cpu": 1.0, "memory": 2.0, "disk": 3.0}

    async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
        return {"nodeId": node_id}


def _dispatcher() -> Dispatcher:
    clock = Clock()
    return Dispatcher(
        servers=FakeServerManager(clock), files=FakeFileManager(clock), system=_Host(), clock=clock
    )


@pytest.fixture(scope="module")
def known() -> set[str]:
    """Every action name the dispatcher answers today."""
    return set(_dispatcher().actions())


@pytest.mark.parametrize("word", sorted(POWER_WORDS))
def test_every_power_word_names_an_action_the_dispatcher_knows(word: str, known: set[str]) -> None:
    assert POWER_WORDS[word] in known


@pytest.mark.parametrize("frame_type", sorted(LEGACY_FRAME_TYPES))
def test_every_legacy_frame_type_names_an_action_the_dispatcher_knows(
    frame_type: str, known: set[str]
) -> None:
    assert LEGACY_FRAME_TYPES[frame_type] in known
    # ... and is read as that action off the wire.
    message = parse_frame(json.dumps({"type": frame_type, "data": {"serverId": "s"}}))
    assert isinstance(message, CommandFrame)
    assert message.command.action == LEGACY_FRAME_TYPES[frame_type]


@pytest.mark.parametrize("word", sorted(POWER_WORDS))
def test_server_power_frames_run_the_action_of_their_word(word: str) -> None:
    frame = {"type": "server_power", "data": {"serverId": "s", "action": word}}
    message = parse_frame(json.dumps(frame))
    assert isinstance(message, CommandFrame)
    assert message.command.action == POWER_WORDS[word]


@pytest.mark.parametrize("alias", sorted(ACTION_ALIASES))
def test_every_alias_is_accepted_and_names_an_action_the_dispatcher_knows(
    alias: str, known: set[str]
) -> None:
    assert alias in known
    assert ACTION_ALIASES[alias] in known
    assert ACTION_ALIASES[alias] not in ACTION_ALIASES  # one hop, never a chain


@pytest_twisted.ensureDeferred
async def test_an_alias_runs_the_action_it_names() -> None:
    dispatcher = _dispatcher()
    by_alias = await dispatcher.dispatch(Command("ping", None, {}))
    by_name = await dispatcher.dispatch(Command(ACTION_ALIASES["ping"], None, {}))
    assert by_alias.message == by_name.message == "pong"


def test_a_legacy_frame_type_that_is_also_an_alias_means_the_same_action() -> None:
    for frame_type, action in LEGACY_FRAME_TYPES.items():
        assert ACTION_ALIASES.get(frame_type, action) == action, frame_type


def _error_classes() -> list[type[errors.CtrlAgentError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.CtrlAgentError)
    ]


def test_every_error_class_has_a_listed_code_and_every_code_a_rest_status() -> None:
    classes = _error_classes()
    assert len(classes) > 10
    for cls in classes:
        assert cls.code in ERROR_CODES, cls
    assert len(set(ERROR_CODES)) == len(ERROR_CODES)
    assert set(REST_STATUS) == set(ERROR_CODES)
    assert all(400 <= status < 600 for status in REST_STATUS.values())
