"""
Log observers for ``twistd --logger=``.

- ``twistd -n --logger=ctrlagent.logs.json_observer ctrlagent``: one JSON object
  per line on stdout, for journald / log shippers.
- ``twistd -n --logger=ctrlagent.logs.text_observer ctrlagent``: human text on
  stdout (the default twistd format, but at the configured level).

Both filter below ``CTRLAGENT_LOG_LEVEL`` (default ``info``).  The agent never
logs its secret; as a second line of defence both observers blank any
``Authorization``/``X-API-Key``-looking field that reaches them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

_SECRET_FIELDS = ("secret", "authorization", "x-api-key", "password", "token")


def _level() -> LogLevel:
    name = os.environ.get("CTRLAGENT_LOG_LEVEL", "info").lower()
    try:
        return LogLevel.levelWithName(name)
    except Exception:
        return LogLevel.info


@implementer(ILogObserver)
class _Redacting:
    """Blank fields whose names say they hold credentials, then forward."""

    def __init__(self, inner: ILogObserver) -> None:
        self._inner = inner

    def __call__(self, event: dict[str, Any]) -> None:
        if any(k.lower() in _SECRET_FIELDS for k in event):
            event = {
                k: ("<redacted>" if k.lower() in _SECRET_FIELDS else v) for k, v in event.items()
            }
        self._inner(event)


def _filtered(observer: ILogObserver) -> ILogObserver:
    predicate = LogLevelFilterPredicate(defaultLogLevel=_level())
    return FilteringLogObserver(_Redacting(observer), [predicate])


def json_observer() -> ILogObserver:
    """JSON lines on stdout (one event per line)."""
    return _filtered(jsonFileLogObserver(sys.stdout, recordSeparator=""))


class _EscapingText:
    """
    A text stream that writes what its encoding refuses (a lone surrogate from
    untrusted input) as backslash escapes: one odd character must not make the
    logger disable the observer (which it reports as a critical error).
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        try:
            self._stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self._stream, "encoding", None) or "utf-8"
            self._stream.write(text.encode(encoding, "backslashreplace").decode(encoding))

    def flush(self) -> None:
        self._stream.flush()


def text_observer() -> ILogObserver:
    """Human-readable text on stdout."""
    return _filtered(textFileLogObserver(_EscapingText(sys.stdout)))  # type: ignore[arg-type]
