"""
The lifecycle of a game server: its states, the inputs that move it, and the
one table of the moves allowed.

``ServerState`` is the state vocabulary (lowercase, as reported to the Panel)
and ``panel_status`` its mapping onto the Panel's enum.  ``unknown`` is the
agent's own state for "the container engine cannot be reached, so nobody knows";
the Panel has no such value, so it is reported with the Panel status the
server had before.

``TRANSITIONS`` maps each ``Input`` to the states it may fire in and the state
it leads to.  It was built from a census of every state change the test
suites make (``tests/servers/transitions.json``) and widened where the code
can reach a state the tests do not (a state changed by another task during
an ``await``).  Firing an input in the state it leads to changes nothing (no
event); firing it in a state outside its row raises ``IllegalTransition``.

``Lifecycle`` holds one server's state and is the only place that emits and
persists ``StatusChanged``.  ``ExitWatch`` tells an expected exit from a stop
outside the agent and from a crash; ``PowerSlot`` is the one power action a
server runs at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, StrEnum
from typing import Any

from twisted.logger import Logger

from ctrlagent.errors import Conflict
from ctrlagent.events import StatusChanged


class ServerState(StrEnum):
    """Lowercase states as reported to the Panel (``status``)."""

    INSTALLING = "installing"
    INSTALL_FAILED = "install_failed"
    OFFLINE = "offline"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    CRASHED = "crashed"
    SUSPENDED = "suspended"
    UNKNOWN = "unknown"


S = ServerState

_PANEL: dict[ServerState, str] = {
    S.INSTALLING: "INSTALLING",
    S.INSTALL_FAILED: "INSTALL_FAILED",
    S.OFFLINE: "OFFLINE",
    S.STARTING: "STARTING",
    S.RUNNING: "RUNNING",
    S.STOPPING: "STOPPING",
    S.CRASHED: "CRASHED",
    S.SUSPENDED: "SUSPENDED",
}

# States in which a container process exists (or is about to): stats are
# sampled, the console is attached, and a death is news.
ACTIVE_STATES = frozenset({S.STARTING, S.RUNNING, S.STOPPING})


def panel_status(state: ServerState, last_known: ServerState | None = None) -> str:
    """
    The Panel's ``panelStatus`` for ``state``.

    ``unknown`` maps to the Panel status of ``last_known`` (the state before the
    engine went away), else ``OFFLINE``: the Panel's enum has no "unknown" and a
    wrong ``RUNNING``/``OFFLINE`` flip would only make it issue power actions.
    """
    if state is S.UNKNOWN:
        if last_known is not None and last_known is not S.UNKNOWN:
            return _PANEL[last_known]
        return "OFFLINE"
    return _PANEL[state]


def parse_state(value: str) -> ServerState:
    """The ``ServerState`` named ``value``; unknown names become ``OFFLINE``."""
    try:
        return ServerState(value)
    except ValueError:
        return S.OFFLINE


class Input(StrEnum):
    """What happened to a server (the lifecycle's inputs)."""

    INSTALL = "install"                  # the install flow begins
    INSTALLED = "installed"              # ... and ended well
    INSTALL_FAILED = "install_failed"    # ... and failed
    START = "start"                      # a container start is asked for
    START_FAILED = "start_failed"        # ... and the engine refused it
    STARTUP_DONE = "startup_done"        # the console printed the "done" line (or none is awaited)
    STOP = "stop"                        # a graceful stop is asked for
    FOUND_DOWN = "found_down"            # the container is not running (no death to judge)
    EXITED = "exited"                    # the container died as expected (or was stopped outside)
    CRASHED = "crashed"                  # the container died unasked
    SUSPEND = "suspend"
    UNSUSPEND = "unsuspend"
    ENGINE_LOST = "engine_lost"          # the engine cannot be reached
    FOUND_RUNNING = "found_running"      # reconcile: the container runs
    FOUND_GONE = "found_gone"            # reconcile: no container at all
    FOUND_GONE_AFTER_CRASH = "found_gone_after_crash"  # ... and the last known state was crashed


_EVERY = frozenset(ServerState)
_SETTLED = frozenset({S.OFFLINE, S.CRASHED, S.INSTALL_FAILED, S.UNKNOWN})
_LIVE = ACTIVE_STATES | {S.UNKNOWN}

# input -> (the states it may fire in, the state it leads to)
TRANSITIONS: dict[Input, tuple[frozenset[ServerState], ServerState]] = {
    Input.INSTALL: (_SETTLED | {S.INSTALLING}, S.INSTALLING),
    Input.INSTALLED: (frozenset({S.INSTALLING}), S.OFFLINE),
    Input.INSTALL_FAILED: (frozenset({S.INSTALLING}), S.INSTALL_FAILED),
    # do_start refuses suspended, install_failed and installing servers
    Input.START: (_EVERY - {S.SUSPENDED, S.INSTALL_FAILED, S.INSTALLING}, S.STARTING),
    # the engine may have been lost (unknown) while the start was on its way
    Input.START_FAILED: (_LIVE | {S.OFFLINE, S.CRASHED}, S.OFFLINE),
    Input.STARTUP_DONE: (frozenset({S.STARTING, S.RUNNING}), S.RUNNING),
    Input.STOP: (ACTIVE_STATES, S.STOPPING),
    Input.FOUND_DOWN: (_LIVE | {S.OFFLINE}, S.OFFLINE),
    Input.EXITED: (_LIVE | {S.OFFLINE}, S.OFFLINE),
    # the death is judged after an inspect: the state may have moved meanwhile
    Input.CRASHED: (_LIVE | {S.OFFLINE, S.CRASHED}, S.CRASHED),
    Input.SUSPEND: (_EVERY, S.SUSPENDED),
    Input.UNSUSPEND: (frozenset({S.SUSPENDED, S.OFFLINE}), S.OFFLINE),
    Input.ENGINE_LOST: (_EVERY - {S.INSTALL_FAILED, S.SUSPENDED, S.INSTALLING}, S.UNKNOWN),
    Input.FOUND_RUNNING: (_EVERY - {S.INSTALLING}, S.RUNNING),
    Input.FOUND_GONE: (_LIVE | {S.OFFLINE}, S.OFFLINE),
    Input.FOUND_GONE_AFTER_CRASH: (_LIVE | {S.CRASHED}, S.CRASHED),
}


class IllegalTransition(Exception):
    """An input fired in a state its row of ``TRANSITIONS`` does not allow (a bug)."""

    def __init__(self, server_id: str, state: ServerState, event: Input) -> None:
        super().__init__(
            "server {}: {} is not allowed in state {}".format(server_id, event.value, state.value)
        )
        self.state = state
        self.event = event


def target(state: ServerState, event: Input) -> ServerState:
    """
    The state ``event`` leads to from ``state`` (pure).

    ``state`` itself when the event leads there (a no-op); raises
    ``IllegalTransition`` for a pair outside the table.
    """
    allowed, to = TRANSITIONS[event]
    if to is state:
        return state
    if state not in allowed:
        raise IllegalTransition("", state, event)
    return to


class Lifecycle:
    """
    One server's state: the only place that changes it, emits
    ``StatusChanged`` and persists it.
    """

    log = Logger()

    def __init__(
        self,
        server_id: str,
        state: ServerState,
        *,
        clock: Any,
        emit: Callable[[StatusChanged], None],
        persist: Callable[..., None],
        container_id: Callable[[], str | None],
    ) -> None:
        self.server_id = server_id
        self.state = state
        self.last_known: ServerState | None = None
        self.error: str | None = None
        self._clock = clock
        self._emit = emit
        self._persist = persist
        self._container_id = container_id

    def fire(
        self,
        event: Input,
        *,
        error: str | None = None,
        exit_code: int | None = None,
        oom: bool = False,
    ) -> None:
        """Apply ``event``: one ``StatusChanged`` with the real previous state, or nothing."""
        old = self.state
        allowed, new = TRANSITIONS[event]
        if old is new:
            return
        if old not in allowed:
            raise IllegalTransition(self.server_id, old, event)
        if new is S.UNKNOWN:
            self.last_known = old
        self.state = new
        self.error = error
        self.log.info(
            "server {server_id} {old} -> {new}", server_id=self.server_id, old=old, new=new
        )
        self._emit(
            StatusChanged(
                server_id=self.server_id,
                previous=old.value,
                current=new.value,
                timestamp=self._clock.seconds(),
                error=error,
                container_id=self._container_id(),
                exit_code=exit_code,
                oom_killed=oom,
            )
        )
        if new is not S.UNKNOWN:
            self._persist(state=new.value)

    def panel_status(self) -> str:
        """The Panel's status for the current state."""
        return panel_status(self.state, self.last_known)


class Exit(Enum):
    """How a container's death reads."""

    EXPECTED = "expected"   # the agent stopped or killed it
    EXTERNAL = "external"   # stopped outside the agent (a person, the engine shutting down)
    CRASH = "crash"


class ExitWatch:
    """
    What the agent knows before a container dies: whether it asked for the
    death, whether someone else killed it, whether the kernel's OOM killer
    struck.  ``classify`` reads a death and forgets the first two.
    """

    def __init__(self) -> None:
        self.expected = False
        self.external_kill = False
        self.oom = False

    def reset(self) -> None:
        """A new run begins: nothing is known."""
        self.expected = False
        self.external_kill = False
        self.oom = False

    def expect(self) -> None:
        """The agent is about to stop or kill the container."""
        self.expected = True

    def saw(self, action: str) -> None:
        """An engine event before the death (``oom``, ``kill``)."""
        if action == "oom":
            self.oom = True
        elif action == "kill" and not self.expected:
            # A stop we did not ask for (a person, or the engine shutting down).
            self.external_kill = True

    def classify(self, oom: bool) -> Exit:
        """How the death reads (``oom``: the kernel's verdict for this death)."""
        expected, external = self.expected, self.external_kill
        self.expected = self.external_kill = False
        if expected:
            return Exit.EXPECTED
        if external and not oom:
            return Exit.EXTERNAL
        return Exit.CRASH


class PowerSlot:
    """
    The one power action a server runs at a time.

    A second action while one runs answers ``CONFLICT`` at once; ``kill``
    never needs the slot, it bumps ``kill_epoch`` instead, so background work
    that began before a kill (a restart waiting out its stop) knows not to
    start the server again.
    """

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.action: str | None = None
        self.kill_epoch = 0

    def claim(self, action: str) -> None:
        """Take the slot or answer CONFLICT at once."""
        if self.action is not None:
            raise Conflict(
                "server {} is busy: {} in progress".format(self.server_id, self.action),
                details={"serverId": self.server_id, "inProgress": self.action},
            )
        self.action = action

    def try_claim(self, action: str) -> bool:
        """Take the slot if it is free."""
        if self.action is not None:
            return False
        self.action = action
        return True

    def release(self) -> None:
        """Free the slot."""
        self.action = None

    def killed(self) -> None:
        """A kill came: background work begun before it must not start the server."""
        self.kill_epoch += 1
