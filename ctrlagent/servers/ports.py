"""
Node ports for servers created without any (``servers.port_range``).

The Panel's ``create_server`` sends no ``ports``: without an allocation the
server publishes nothing and ``{{SERVER_PORT}}`` is empty.  ``PortPool``
picks one port of the node's range for such a server: one no other server
of this agent holds (stopped ones too: their ports are in their stored
definitions) and that nothing on the host is bound to on tcp or udp.  The
allocation becomes the server's first ``PortAllocation`` (the same port
inside the container and on the host, as Pterodactyl's eggs expect), so it
is stored with the definition, kept across agent restarts and released
with it when the server is deleted.

A pick is synchronous (two ``bind`` calls per port tried, microseconds):
the manager allocates and adds the server in one reactor turn, so two
creates at once never get the same port.  Among the free ports one is taken
at random, not the lowest: two agents sharing a host (test rigs) rarely
pick the same port before either publishes it.  Each port is tried at most
once per pick, and keeping the untried ones costs O(log n) a try
(``Untried``), so a range of n mostly bound ports costs n probes and
O(n log n) steps, never O(n²).

``allocations(spec)`` gives a server's ports in the Panel's shape
(``wire.servers.Allocation``).
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import overload

from ctrlagent.config import ServersConfig, parse_port_range
from ctrlagent.errors import InsufficientResources, PortConflict
from ctrlagent.servers.spec import PortAllocation, ServerSpec
from ctrlagent.wire.servers import Allocation

__all__ = ["PortPool", "Untried", "allocations", "port_is_free"]

# What the host says when a port is taken (EACCES: a privileged port, or
# one a security module keeps) rather than when the address is not its own.
_TAKEN = (errno.EADDRINUSE, errno.EACCES)


def port_is_free(ip: str, port: int) -> bool:
    """
    True when ``port`` can be bound at ``ip`` on tcp and on udp now.

    TCP is tried with ``SO_REUSEADDR``, as a game server binds: a
    connection still in TIME_WAIT does not hold the port, a listener does.
    ``PortConflict`` when ``ip`` is no address of this host at all.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as e:
                if e.errno in _TAKEN:
                    return False
                raise PortConflict(
                    "no port can be published at {} ({}): servers.default_bind_ip must be"
                    " an address of this host".format(ip, e.strerror or e)
                ) from None
    return True


class PortPool:
    """The node's range of ports for servers created without any."""

    def __init__(
        self,
        servers: ServersConfig,
        is_free: Callable[[str, int], bool] = port_is_free,
        choose: Callable[[Sequence[int]], int] | None = None,
    ) -> None:
        self.range = parse_port_range(servers.port_range)
        self.ip = servers.default_bind_ip
        self._is_free = is_free
        self._choose = choose if choose is not None else random.SystemRandom().choice

    @property
    def enabled(self) -> bool:
        """False when ``servers.port_range`` is empty (no allocation)."""
        return self.range is not None

    def allocate(self, taken: Iterable[int]) -> PortAllocation:
        """
        One free port of the range, none of ``taken`` (every host port a
        server of this agent holds); ``INSUFFICIENT_RESOURCES`` when the
        range has none left.
        """
        if self.range is None:
            raise InsufficientResources("no port range is configured (servers.port_range)")
        first, last = self.range
        held = set(taken)
        candidates = Untried([p for p in range(first, last + 1) if p not in held])
        while candidates:
            port = self._choose(candidates)
            candidates.remove(port)
            if self._is_free(self.ip, port):
                return PortAllocation(internal=port, external=port, ip=self.ip)
        raise InsufficientResources(
            "no free port left in servers.port_range {}-{} ({} held by servers of this node,"
            " the others bound on the host): delete a server or widen the range".format(
                first, last, sum(1 for p in held if first <= p <= last)
            )
        )


class Untried(Sequence[int]):
    """
    The ports of a range not tried yet, in their order, as a sequence that
    ``choose`` indexes: ``remove`` and indexing take O(log n) steps (a
    Fenwick tree of which positions are left), where a list's ``remove``
    takes O(n) and trying a whole range of n ports took O(n²), blocking the
    reactor for a range of tens of thousands of bound ports.  The order is
    the list's after the same removals, so a ``choose`` picks what it picked
    from the list.  ``steps`` counts the tree's steps (for the tests).
    """

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self._where = {port: i for i, port in enumerate(ports)}
        n = len(ports)
        self._len = n
        # tree[i] (1-based) counts the positions left in (i - lowbit(i), i].
        tree = [0] + [1] * n
        for i in range(1, n + 1):
            parent = i + (i & -i)
            if parent <= n:
                tree[parent] += tree[i]
        self._tree = tree
        self._top = 1 << n.bit_length() if n else 0
        self.steps = n

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...

    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("port index out of range")
        # Descend the tree to the (index + 1)-th position left.
        pos = 0
        rest = index + 1
        bit = self._top
        tree = self._tree
        n = len(tree) - 1
        while bit:
            self.steps += 1
            nxt = pos + bit
            if nxt <= n and tree[nxt] < rest:
                pos = nxt
                rest -= tree[nxt]
            bit >>= 1
        return self._ports[pos]

    def remove(self, port: int) -> None:
        """Take ``port`` out (``ValueError`` when it is not left)."""
        try:
            i = self._where.pop(port) + 1
        except KeyError:
            raise ValueError("port {} is not left".format(port)) from None
        self._len -= 1
        tree = self._tree
        n = len(tree) - 1
        while i <= n:
            self.steps += 1
            tree[i] -= 1
            i += i & -i


def allocations(spec: ServerSpec) -> tuple[Allocation, ...]:
    """The server's published ports in the Panel's shape (the first is primary)."""
    return tuple(
        Allocation(ip=p.ip, port=p.external, internal=p.internal, primary=index == 0)
        for index, p in enumerate(spec.ports)
    )
