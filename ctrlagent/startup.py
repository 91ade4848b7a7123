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

import errno
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
        text = os_error_text(error)
    else:
        text = "unexpected {}: {} (at {})".format(
            type(error).__name__, error, _where(error)
        )
    return " ".join(text.split())


def os_error_text(error: OSError) -> str:
    """``No such file or directory: /path`` (the path acted on, when known)."""
    path = error.filename2 if error.filename2 is not None else error.filename
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    text = error.strerror or str(error) or type(error).__name__
    return "{}: {}".format(text, path) if path is not None else text


def listen_failure(
    description: str, error: BaseException, what: str = "the HTTP API"
) -> StartupError:
    """``what`` (the API, SFTP) cannot listen where ``description`` (a twisted endpoint) says."""
    reason = error.socketError if isinstance(error, CannotListenError) else error
    if isinstance(reason, OSError):
        why = os_error_text(reason)
    else:
        why = str(reason) or type(reason).__name__
    hint = ""
    if isinstance(reason, OSError) and reason.errno == errno.EADDRINUSE:
        hint = "; is another agent or program using it?"
    return StartupError(
        "cannot listen for {} on {} ({}){}".format(what, description, _lower_first(why), hint)
    )


def _cannot_listen(error: CannotListenError) -> str:
    where = "{}:{}".format(error.interface or "*", error.port)
    return str(listen_failure(where, error))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown place"
    last = frames[-1]
    return "{}:{}".format(os.path.basename(last.filename), last.lineno)
