"""``async_to_deferred`` gives Twisted callers a Deferred that behaves as the coroutine does."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from zope.interface.interface import InterfaceClass

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.files.manager import FileManager
from ctrlagent.interfaces import IFileManager, IServerManager
from ctrlagent.servers.manager import ServerManager
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.servers import FakeServerManager


def outcome(d: Deferred[Any]) -> list[Any]:
    """What ``d`` fired with so far (a result or a ``Failure``); empty while pending."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_calling_returns_a_deferred_that_fires_with_the_result() -> None:
    @async_to_deferred
    async def double(x: int) -> int:
        return x * 2

    d = double(21)
    assert isinstance(d, Deferred)
    assert outcome(d) == [42]


def test_the_coroutine_runs_at_once_and_resumes_when_what_it_awaits_fires() -> None:
    gate: Deferred[str] = Deferred()
    steps: list[str] = []

    @async_to_deferred
    async def work() -> str:
        steps.append("started")
        value = await gate
        steps.append("resumed")
        return value.upper()

    seen = outcome(work())
    assert steps == ["started"]
    assert seen == []
    gate.callback("done")
    assert steps == ["started", "resumed"]
    assert seen == ["DONE"]


def test_an_exception_fails_the_deferred_with_that_exception() -> None:
    @async_to_deferred
    async def refuse() -> None:
        raise ValueError("no")

    (result,) = outcome(refuse())
    assert isinstance(result, Failure)
    assert result.check(ValueError)
    assert str(result.value) == "no"


def test_cancelling_the_deferred_cancels_what_the_coroutine_awaits() -> None:
    cancelled: list[Deferred[None]] = []
    inner: Deferred[None] = Deferred(cancelled.append)
    after: list[str] = []

    @async_to_deferred
    async def wait() -> None:
        await inner
        after.append("ran on")

    d = wait()
    seen = outcome(d)
    d.cancel()
    assert cancelled == [inner]
    (result,) = seen
    assert isinstance(result, Failure)
    assert result.check(CancelledError)
    assert after == []


def test_name_docstring_and_signature_are_kept() -> None:
    async def resize(server_id: str, *, disk_mb: int = 0) -> dict[str, Any]:
        """Change a server's disk limit."""
        return {"serverId": server_id, "disk": disk_mb}

    wrapped = async_to_deferred(resize)
    assert wrapped.__name__ == "resize"
    assert wrapped.__doc__ == "Change a server's disk limit."
    assert inspect.signature(wrapped) == inspect.signature(resize)
    assert outcome(wrapped("a", disk_mb=5)) == [{"serverId": "a", "disk": 5}]


def test_a_decorated_method_is_bound_to_its_instance() -> None:
    class Counter:
        def __init__(self) -> None:
            self.count = 0

        @async_to_deferred
        async def add(self, n: int) -> int:
            """Add ``n``."""
            self.count += n
            return self.count

    counter = Counter()
    assert outcome(counter.add(2)) == [2]
    assert outcome(counter.add(3)) == [5]
    assert list(inspect.signature(Counter.add).parameters) == ["self", "n"]


@pytest.mark.parametrize(
    ("iface", "impl"),
    [
        (IServerManager, ServerManager),
        (IServerManager, FakeServerManager),
        (IFileManager, FileManager),
        (IFileManager, FakeFileManager),
    ],
)
def test_decorated_implementations_keep_their_interface_signatures(
    iface: InterfaceClass, impl: type
) -> None:
    # verifyObject reads a function's code object, and the wrapper's is
    # (*args, **kwargs): it would accept any signature.  This checks what it
    # no longer can, through inspect.signature (which follows __wrapped__).
    for name in iface.names(all=True):
        described = iface[name]
        if not hasattr(described, "getSignatureInfo"):
            continue
        info = described.getSignatureInfo()
        params = list(inspect.signature(getattr(impl, name)).parameters.values())[1:]
        names = [p.name for p in params]
        positional = list(info["positional"])
        assert names[: len(positional)] == positional, (impl.__name__, name)
        extra = params[len(positional):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), (impl.__name__, name)


def test_the_decorator_lives_in_work_and_asyncs_names_the_same_one() -> None:
    from ctrlagent import work

    assert async_to_deferred is work.async_to_deferred
