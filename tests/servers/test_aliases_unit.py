"""
An alias recorded with ``add_server_alias`` is kept by the real server manager
in its store: a restarted agent still knows the server by it (issue 12, item 7).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from ctrlagent.actions import Dispatcher
from ctrlagent.errors import Conflict
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.wire.command import Command
from ctrlagent.wire.json import to_json
from tests.servers.conftest import Unit

PARAMS = {"image": "img", "startup": "/game", "stop": "stop", "startupDone": "Done ("}


class NoHost:
    async def snapshot(self) -> dict[str, Any]:
        return {}

    async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
        return {}


def dispatcher(manager: Any) -> Dispatcher:
    return Dispatcher(servers=manager, files=FakeFileManager(Clock()), system=NoHost(),
                      clock=Clock())


@pytest_twisted.ensureDeferred
async def test_a_recorded_alias_survives_a_restart_of_the_manager(unit: Unit) -> None:
    m = unit.manager()
    await m.create_server("uuid-1", PARAMS)
    await m.create_server("uuid-2", PARAMS)
    add = Command("add_server_alias", "uuid-1", {"alias": "cuid-1"})
    result = await dispatcher(m).dispatch(add)
    assert to_json(result.data)["aliases"] == ["cuid-1"]
    try:
        await dispatcher(m).dispatch(Command("add_server_alias", "uuid-2", {"alias": "cuid-1"}))
    except Conflict:
        pass
    else:
        raise AssertionError("an alias of another server was accepted")
    await m.stopService()

    again = unit.manager()
    assert again.resolve("cuid-1") == "uuid-1"
    assert to_json(again.status("cuid-1"))["aliases"] == ["cuid-1"]
    assert to_json(again.status("uuid-2"))["aliases"] == []
