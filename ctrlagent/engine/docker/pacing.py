"""
Many quiet engine streams read in one wake of the agent.

At hundreds of servers each console stream brings a line every few seconds,
and each line woke the reactor on its own: its poll, the logging context it
calls every reader in, the transport's read.  A ``ReadPacer`` takes such
connections out of the reactor's poll set into an epoll set of its own and
reads every connection with data in one round, on a timer: ``interval``
apart while data comes, slowing down to ``QUIET_ROUNDS`` intervals while
none does.  So a busy node wakes about ``1 / interval`` times a second for
all its streams together, whatever their number, and a line waits at most
``QUIET_ROUNDS * interval`` (0.1 s by default).

(Watching the set from the reactor as one descriptor instead of a timer
costs more than it saves: an epoll set inside another is re-checked by the
kernel each time it is added back, and the reactor still woke per line.)

A connection's end is the transport's business: on an end of file the
pacer hands the connection back to the reactor, which reads the end again
and reports it as for any connection; on a socket error (a reset) it ends
the connection with that error, as the reactor would.  A consumer that
pauses takes the connection out of the set until it resumes.  Only plain
sockets are paced (Unix and TCP; a TLS connection's bytes must go through
its TLS layer, so it stays with the reactor).
"""

from __future__ import annotations

import select
import socket
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ReadPacer", "PacedConnection"]

# One read's size (Twisted's own), and at most this many reads of one
# connection in a round: a backlog is still read at tens of MB/s.
READ_SIZE = 65536
READS_PER_ROUND = 16
# While no connection has data, rounds slow down to this many intervals apart.
QUIET_ROUNDS = 4
# A quiet round looks for connections closed behind the pacer's back at
# most this often (looking at every connection in every quiet round cost
# more, at 500 servers, than reading their lines).
SWEEP_SECONDS = 1.0


class PacedConnection:
    """One connection read by a ``ReadPacer`` (see ``ReadPacer.adopt``)."""

    __slots__ = ("_pacer", "_transport", "_protocol", "_socket", "fd", "paused", "active")

    def __init__(
        self, pacer: ReadPacer, transport: Any, protocol: Any, sock: socket.socket
    ) -> None:
        self._pacer = pacer
        self._transport = transport
        self._protocol = protocol
        self._socket = sock
        self.fd = sock.fileno()
        self.paused = False
        self.active = True

    def pause(self) -> None:
        """Read nothing more until ``resume`` (the consumer's back-pressure)."""
        if not self.active:
            self._transport.pauseProducing()  # handed back: the reactor reads it
        elif not self.paused:
            self.paused = True
            self._pacer._interest(self, False)

    def resume(self) -> None:
        """Read again after ``pause``."""
        if not self.active:
            self._transport.resumeProducing()
        elif self.paused:
            self.paused = False
            self._pacer._interest(self, True)

    def release(self, read: bool = False) -> None:
        """
        Leave the pacer: before the connection is closed (``read`` False),
        or (``read`` True) to be read by the reactor again (once resumed,
        when paused: ``pause`` and ``resume`` then go to the transport).
        """
        if not self.active:
            return
        self.active = False
        self._pacer._forget(self)
        transport = self._transport
        if read and not self.paused and transport.connected and not transport.disconnecting:
            transport.startReading()

    @property
    def closed_elsewhere(self) -> bool:
        """Its socket was closed without the pacer being told (nothing of ours to read)."""
        return self._socket.fileno() != self.fd

    def _read(self) -> None:
        """What is ready, at most ``READS_PER_ROUND`` reads."""
        sock = self._socket
        for _ in range(READS_PER_ROUND):
            if not self.active or self.paused:
                return
            if self.closed_elsewhere:
                self.release()
                return
            try:
                data = sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Ended with the error itself, as the reactor would (read
                # again, the socket would only report an end of file).
                self.release()
                self._transport.connectionLost(Failure(ConnectionLost(e.strerror or str(e))))
                return
            if not data:
                self.release(read=True)  # likewise the end of file
                return
            self._pacer.reads += 1
            try:
                self._protocol.dataReceived(data)
            except Exception:
                # As the reactor would: the connection ends, the others go on.
                self._pacer.log.failure("reading an engine stream failed; it is closed")
                self.release()
                self._transport.abortConnection()
                return
            if len(data) < READ_SIZE:
                return


class ReadPacer:
    """
    Reads the connections it adopted in rounds on a timer, each round taking
    every connection that has data: ``interval`` apart while data comes, up
    to ``QUIET_ROUNDS`` times that while none does.

    ``reactor`` needs ``callLater``, ``seconds`` and ``addSystemEventTrigger``.
    ``rounds`` and ``reads`` count what it did.
    """

    log = Logger()

    def __init__(self, reactor: Any, interval: float) -> None:
        self._reactor = reactor
        self.interval = interval
        self._epoll = select.epoll()
        self._paced: dict[int, PacedConnection] = {}
        self._round: IDelayedCall | None = None
        self._wait = interval
        self._swept_at = reactor.seconds()
        self.rounds = 0
        self.reads = 0
        # At shutdown every connection goes back to the reactor first, which
        # then closes it like any other.
        self._trigger = reactor.addSystemEventTrigger("before", "shutdown", self._at_shutdown)

    def __len__(self) -> int:
        return len(self._paced)

    def adopt(self, transport: Any, protocol: Any) -> PacedConnection | None:
        """
        Read ``transport``'s connection here from now on, handing what is read
        to ``protocol.dataReceived``; None when it cannot be (not a plain
        socket, closing, or the pacer closed): the reactor reads it as before.
        """
        if self._epoll.closed or not getattr(transport, "connected", False) \
                or getattr(transport, "disconnecting", True):
            return None
        get_handle = getattr(transport, "getHandle", None)
        sock = get_handle() if get_handle is not None else None
        if not isinstance(sock, socket.socket) or sock.fileno() < 0:
            return None
        paced = PacedConnection(self, transport, protocol, sock)
        try:
            self._epoll.register(paced.fd, select.EPOLLIN)
        except OSError:
            return None  # (the watch limit reached, say): the reactor reads it
        transport.stopReading()
        self._paced[paced.fd] = paced
        self._wait = self.interval
        if self._round is None:
            self._round = self._reactor.callLater(self._wait, self._read_round)
        return paced

    def _at_shutdown(self) -> None:
        self._trigger = None  # firing: not to be removed
        self.close()

    def close(self) -> None:
        """Hand every connection back to the reactor; adopt no more."""
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        for paced in list(self._paced.values()):
            paced.release(read=True)
        if self._round is not None and self._round.active():
            self._round.cancel()
        self._round = None
        self._epoll.close()

    # -- rounds ------------------------------------------------------------------

    def _read_round(self) -> None:
        self._round = None
        if self._epoll.closed:
            return
        self.rounds += 1
        ready: list[tuple[int, int]] = []
        try:
            ready = self._epoll.poll(0)
            for fd, _ in ready:
                paced = self._paced.get(fd)
                if paced is not None:
                    paced._read()
            now = self._reactor.seconds()
            if not ready and now - self._swept_at >= SWEEP_SECONDS:
                # Quiet: a connection closed without leaving (by someone
                # else than its reader) is dropped.
                self._swept_at = now
                for paced in list(self._paced.values()):
                    if paced.closed_elsewhere:
                        paced.release()
        except Exception:
            self.log.failure("a round of engine stream reads failed")
        finally:
            if self._paced and self._round is None and not self._epoll.closed:
                self._wait = self.interval if ready else min(self._wait * 2,
                                                            self.interval * QUIET_ROUNDS)
                self._round = self._reactor.callLater(self._wait, self._read_round)

    def _interest(self, paced: PacedConnection, reading: bool) -> None:
        """
        A paused connection leaves the set (an interest of none would still
        report a hung-up peer at every round), and comes back on resuming.
        """
        try:
            if reading:
                self._epoll.register(paced.fd, select.EPOLLIN)
            else:
                self._epoll.unregister(paced.fd)
        except (OSError, ValueError):
            pass  # closed already: its end comes through the reactor

    def _forget(self, paced: PacedConnection) -> None:
        if self._paced.get(paced.fd) is paced:
            del self._paced[paced.fd]
            try:
                if not paced.paused:  # (a paused one is out of the set already)
                    self._epoll.unregister(paced.fd)
            except (OSError, ValueError):
                pass  # the descriptor is closed (and so left the set) already
        if not self._paced and self._round is not None and self._round.active():
            self._round.cancel()
            self._round = None
