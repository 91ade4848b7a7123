"""
The state vocabulary of a game server and its mapping onto the Panel's enum.

Pure: no reactor, no I/O.  ``unknown`` is the agent's own state for "the Docker
engine cannot be reached, so nobody knows"; the Panel has no such value, so it
is reported with the Panel status the server had before (see ``panel_status``).
"""

from __future__ import annotations

from enum import StrEnum


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


_PANEL: dict[ServerState, str] = {
    ServerState.INSTALLING: "INSTALLING",
    ServerState.INSTALL_FAILED: "INSTALL_FAILED",
    ServerState.OFFLINE: "OFFLINE",
    ServerState.STARTING: "STARTING",
    ServerState.RUNNING: "RUNNING",
    ServerState.STOPPING: "STOPPING",
    ServerState.CRASHED: "CRASHED",
    ServerState.SUSPENDED: "SUSPENDED",
}

# States in which a container process exists (or is about to): stats are
# sampled, the console is attached, and a death is news.
ACTIVE_STATES = frozenset({ServerState.STARTING, ServerState.RUNNING, ServerState.STOPPING})


def panel_status(state: ServerState, last_known: ServerState | None = None) -> str:
    """
    The Panel's ``panelStatus`` for ``state``.

    ``unknown`` maps to the Panel status of ``last_known`` (the state before the
    engine went away), else ``OFFLINE``: the Panel's enum has no "unknown" and a
    wrong ``RUNNING``/``OFFLINE`` flip would only make it issue power actions.
    """
    if state is ServerState.UNKNOWN:
        if last_known is not None and last_known is not ServerState.UNKNOWN:
            return _PANEL[last_known]
        return "OFFLINE"
    return _PANEL[state]


def parse_state(value: str) -> ServerState:
    """The ``ServerState`` named ``value``; unknown names become ``OFFLINE``."""
    try:
        return ServerState(value)
    except ValueError:
        return ServerState.OFFLINE
