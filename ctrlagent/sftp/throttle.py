"""
Failed-login throttling, per remote address and per username (pure).

The n-th failure in a row for an address (or a username) makes the next
attempt from it wait ``base * 2**(n-1)`` seconds, at most ``cap``; the answer
to the failed attempt itself is delayed as long.  A success clears both keys;
failures older than ``forget`` seconds are forgotten.  Both keys count, so
one address guessing many usernames and many addresses guessing one username
are both slowed.  At most ``max_keys`` keys are kept (the stalest go first),
so that a flood of addresses costs bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime


@dataclass
class _Failures:
    count: int
    last: float
    allowed_at: float


class LoginThrottle:
    """Growing delays after failed logins (see the module)."""

    def __init__(self, clock: IReactorTime, base: float = 1.0, cap: float = 30.0,
                 forget: float = 900.0, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.forget = forget
        self.max_keys = max_keys
        self._keys: OrderedDict[tuple[str, str], _Failures] = OrderedDict()

    def _keys_of(self, address: str, username: str) -> list[tuple[str, str]]:
        return [("address", address), ("user", username)]

    def _get(self, key: tuple[str, str], now: float) -> _Failures | None:
        entry = self._keys.get(key)
        if entry is not None and now - entry.last > self.forget:
            del self._keys[key]
            return None
        return entry

    def delay(self, count: int) -> float:
        """The delay after ``count`` failures in a row."""
        if count <= 0 or self.base <= 0:
            return 0.0
        return float(min(self.cap, self.base * 2 ** min(count - 1, 62)))

    def wait_before(self, address: str, username: str) -> float:
        """Seconds an attempt from ``address`` for ``username`` must wait first."""
        now = self.clock.seconds()
        wait = 0.0
        for key in self._keys_of(address, username):
            entry = self._get(key, now)
            if entry is not None:
                wait = max(wait, entry.allowed_at - now)
        return wait

    def failed(self, address: str, username: str) -> float:
        """Record a failure; the seconds to wait before answering it."""
        now = self.clock.seconds()
        longest = 0.0
        for key in self._keys_of(address, username):
            entry = self._get(key, now)
            if entry is None:
                entry = _Failures(0, now, now)
            entry.count += 1
            entry.last = now
            wait = self.delay(entry.count)
            entry.allowed_at = now + wait
            self._keys[key] = entry
            self._keys.move_to_end(key)
            longest = max(longest, wait)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return longest

    def failures(self, address: str, username: str) -> int:
        """The larger failure count of the two keys (for tests and logs)."""
        now = self.clock.seconds()
        counts = [e.count for k in self._keys_of(address, username)
                  if (e := self._get(k, now)) is not None]
        return max(counts, default=0)

    def succeeded(self, address: str, username: str) -> None:
        """Clear the address's and the username's failures."""
        for key in self._keys_of(address, username):
            self._keys.pop(key, None)
