"""
``async_to_deferred``: our code is ``async def``; Twisted's callers get a Deferred.

Inside the agent every step awaits (Deferreds are awaitable), so methods are
written as coroutines.  Their callers on the Twisted side need a ``Deferred``:
``LoopingCall`` and ``DeferredSemaphore.run`` wait on what the function
returns, ``stopService`` must return one, and callers (the action dispatcher,
tests) chain ``addCallback``/``addErrback`` or cancel it.  A bare coroutine
would do none of that, and would not even start until awaited.

The decorator is the one place where the conversion happens (as tahoe-lafs's
``async_to_deferred``): the coroutine starts at once, runs to its first
``await`` before the call returns, and its result or exception fires the
Deferred.  Cancelling the Deferred cancels the Deferred the coroutine is
awaiting at that moment (``Deferred.fromCoroutine``'s behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

P = ParamSpec("P")
T = TypeVar("T")


def async_to_deferred(f: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """
    Wrap the coroutine function ``f`` so that calling it returns a ``Deferred``.

    Same name, docstring and signature (``inspect.signature`` follows
    ``__wrapped__``; mypy keeps the parameters through ``ParamSpec``).
    """

    @wraps(f)
    def to_deferred(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return to_deferred
