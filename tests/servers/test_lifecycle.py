"""
The lifecycle table (``ctrlagent.servers.lifecycle``): pure, no engine.

``transitions.json`` is the census of every state change the test suites made
before the table existed; each must be a move the table allows for an input
its caller fires.  Every other pair raises, and no walk over the inputs
reaches a state outside ``ServerState``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctrlagent.errors import Conflict
from ctrlagent.events import StatusChanged
from ctrlagent.servers.lifecycle import (
    TRANSITIONS,
    Exit,
    ExitWatch,
    IllegalTransition,
    Input,
    Lifecycle,
    PowerSlot,
    ServerState,
    target,
)

S = ServerState
I = Input  # noqa: E741

with open(os.path.join(os.path.dirname(__file__), "transitions.json")) as f:
    CENSUS: list[dict[str, Any]] = json.load(f)["transitions"]

# The inputs each census caller (the functions that set the state before the
# table) fires now; read from ctrlagent/servers/server.py.
CALLERS: dict[str, set[Input]] = {
    "install": {I.INSTALL, I.INSTALLED, I.INSTALL_FAILED},
    "do_start": {I.START, I.START_FAILED, I.STARTUP_DONE},
    "take_lines": {I.STARTUP_DONE},
    "graceful_stop": {I.STOP, I.FOUND_DOWN},
    "on_exit": {I.EXITED},
    "_crashed": {I.CRASHED},
    "mark_unknown": {I.ENGINE_LOST},
    "reconcile": {I.FOUND_GONE, I.FOUND_GONE_AFTER_CRASH, I.FOUND_RUNNING, I.FOUND_DOWN},
    "unsuspend": {I.UNSUSPEND},
    "work": {I.SUSPEND},  # the suspend's background work
}


class Recorder:
    def __init__(self) -> None:
        self.events: list[StatusChanged] = []
        self.persisted: list[dict[str, Any]] = []

    def lifecycle(self, state: ServerState) -> Lifecycle:
        class Clock:
            def seconds(self) -> float:
                return 12.5

        return Lifecycle(
            "s1",
            state,
            clock=Clock(),
            emit=self.events.append,
            persist=lambda **fields: self.persisted.append(fields),
            container_id=lambda: "c1",
        )


def test_the_census_is_not_empty_and_names_only_known_states_and_callers() -> None:
    assert len(CENSUS) >= 20
    for row in CENSUS:
        assert row["caller"] in CALLERS, row
        S(row["from"]), S(row["to"])


@pytest.mark.parametrize("row", CENSUS, ids=lambda r: "{from}-{to}-{caller}".format(**r))
def test_every_census_transition_is_allowed_by_the_table(row: dict[str, Any]) -> None:
    old, new = S(row["from"]), S(row["to"])
    allowed = []
    for event in CALLERS[row["caller"]]:
        try:
            if target(old, event) is new:
                allowed.append(event)
        except IllegalTransition:
            pass
    assert allowed, "{} -> {} by {} is not in the table".format(old, new, row["caller"])


def test_every_input_has_one_row() -> None:
    assert set(TRANSITIONS) == set(Input)


@pytest.mark.parametrize("event", list(Input))
def test_every_pair_outside_the_table_raises_and_changes_nothing(event: Input) -> None:
    allowed, to = TRANSITIONS[event]
    for state in ServerState:
        recorder = Recorder()
        life = recorder.lifecycle(state)
        if state in allowed or state is to:
            life.fire(event)
            assert life.state is to
            continue
        with pytest.raises(IllegalTransition) as raised:
            target(state, event)
        assert raised.value.state is state and raised.value.event is event
        with pytest.raises(IllegalTransition):
            life.fire(event, error="boom")
        assert life.state is state and life.error is None
        assert recorder.events == [] and recorder.persisted == []


def test_a_change_emits_one_event_and_persists_it_except_unknown() -> None:
    recorder = Recorder()
    life = recorder.lifecycle(S.RUNNING)
    life.fire(I.CRASHED, error="crashed with exit code 3", exit_code=3, oom=True)
    assert recorder.events == [
        StatusChanged("s1", "running", "crashed", 12.5, "crashed with exit code 3", "c1", 3, True)
    ]
    assert recorder.persisted == [{"state": "crashed"}]
    assert life.error == "crashed with exit code 3"
    life.fire(I.CRASHED)  # the same state: nothing at all
    assert len(recorder.events) == 1 and life.error == "crashed with exit code 3"
    life.fire(I.ENGINE_LOST)
    assert life.state is S.UNKNOWN and life.last_known is S.CRASHED
    assert life.panel_status() == "CRASHED"
    assert recorder.persisted == [{"state": "crashed"}]  # unknown is never stored


@given(st.lists(st.sampled_from(list(Input)), max_size=60), st.sampled_from(list(ServerState)))
def test_a_walk_over_inputs_never_leaves_the_states(
    events: list[Input], start: ServerState
) -> None:
    recorder = Recorder()
    life = recorder.lifecycle(start)
    for event in events:
        before = life.state
        try:
            life.fire(event)
        except IllegalTransition:
            assert life.state is before
            continue
        assert life.state in ServerState
        assert life.state is TRANSITIONS[event][1]
    previous = start
    for change in recorder.events:
        assert change.previous == previous.value and change.current != change.previous
        previous = S(change.current)
    assert previous is life.state


def test_exit_watch_tells_expected_external_and_crash() -> None:
    watch = ExitWatch()
    assert watch.classify(oom=False) is Exit.CRASH
    watch.expect()
    watch.saw("kill")  # our own kill is not an external one
    assert watch.classify(oom=False) is Exit.EXPECTED
    watch.saw("kill")
    assert watch.classify(oom=False) is Exit.EXTERNAL
    watch.saw("kill")
    assert watch.classify(oom=True) is Exit.CRASH  # killed by the OOM killer
    watch.saw("oom")
    assert watch.oom and watch.classify(oom=watch.oom) is Exit.CRASH
    assert watch.oom  # the OOM verdict lasts until the next run
    watch.reset()
    assert not watch.oom


def test_power_slot_answers_conflict_and_counts_kills() -> None:
    slot = PowerSlot("s1")
    slot.claim("stop")
    with pytest.raises(Conflict) as raised:
        slot.claim("start")
    assert raised.value.details == {"serverId": "s1", "inProgress": "stop"}
    assert not slot.try_claim("install")
    slot.killed()
    assert slot.kill_epoch == 1 and slot.action == "stop"
    slot.release()
    assert slot.try_claim("install") and slot.action == "install"
