"""
A connection for one protocol instance, opened without log lines: ``connect_protocol``.

Twisted's ``connectProtocol`` builds a new ``Factory`` subclass at every call
(a generic class, dear to create), and every factory logs "Starting factory"
and "Stopping factory" around its connection.  The engine clients open a
connection per console stream and per stdin attach: at a re-attach of 500
servers that was 2,000 log lines (half the agent's log) and a few per cent of
its CPU.  ``connect_protocol`` does the same with one quiet factory class.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol

__all__ = ["connect_protocol"]

P = TypeVar("P", bound=Protocol)


class _OneProtocol(Factory):
    """Hands out the one protocol instance it was made for; logs nothing."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802 (Twisted's name)
        return self._protocol


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: P) -> Deferred[P]:
    """Connect ``endpoint`` to ``protocol``; fires with it once connected."""
    connected: Deferred[Any] = endpoint.connect(_OneProtocol(protocol))
    return connected
