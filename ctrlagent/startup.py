"""
Startup failures: one clear line for the operator, never a traceback.

Anything that stops the agent from starting (a state store it cannot use, an
API port it cannot bind, a data directory that is a file, ...) is raised as,
or translated into, a ``StartupError`` whose text names the problem and what
to do about it.  ``describe_startup_failure`` turns any exception into that one
line; the composition root (``ctrlagent.tap``) prints it and exits non-zero,
so that a service manager restarting the agent sees a failure instead of a
process that holds its port and answers nothing.

This module is pure: no reactor, no I/O.
"""

from __future__ import annotations

import os
import traceback

from twisted.internet.error import CannotListenError


class StartupError(Exception):
    """The agent cannot start; ``str()`` is one line for the operator."""


def describe_startup_failure(error: BaseException) -> str:
    """One line (no newline) naming what stopped the agent from starting."""
    if isinstance(error, StartupError):
        text = str(error)
    elif isinstance(error, CannotListenError):
        text = _cannot_listen(error)
    elif isinstance(error, OSError):
        text = "{}{}".format(
            error.strerror or type(error).__name__,
            ": {}".format(error.filename) if error.filename else "",
        )
    else:
        text = "unexpected {}: {} (at {})".format(
            type(error).__name__, error, _where(error)
        )
    return " ".join(text.split())


def _cannot_listen(error: CannotListenError) -> str:
    reason = error.socketError
    if isinstance(reason, OSError) and reason.strerror:
        why = reason.strerror.lower()
    else:
        why = str(reason)
    where = "{}:{}".format(error.interface or "*", error.port)
    hint = ""
    if isinstance(reason, OSError) and reason.errno == 98:  # EADDRINUSE
        hint = "; is another agent or program using port {}?".format(error.port)
    return "cannot listen for the HTTP API on {} ({}){}".format(where, why, hint)


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown place"
    last = frames[-1]
    return "{}:{}".format(os.path.basename(last.filename), last.lineno)
