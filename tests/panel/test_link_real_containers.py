"""
The Panel link with the real agent behind it: ``ServerManager`` on a real Docker
engine running the scripted game server, the real ``Dispatcher``, and a real
Autobahn server on 127.0.0.1 playing the Panel.  The Panel creates, starts and
talks to a server over the link, the server floods its console, and the Panel
dies mid-flood and comes back: every command is answered once with its id, and
no console line produced while the link was down is lost or reordered.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import succeed

from ctrlagent.actions import Dispatcher
from ctrlagent.events import ConsoleOutput, ServerEvent
from ctrlagent.panel.link import PanelLink
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.testing.panel import FakePanel
from tests.servers.conftest import Rig, rig, scripted  # noqa: F401 - rig is a fixture

from .harness import SECRET, FakeHost
from .test_link_loopback import fast_config, sleep, until

pytestmark = pytest.mark.docker
reactor: Any = _reactor

FLOOD = 100_000


@pytest_twisted.ensureDeferred
async def test_real_server_over_the_link_survives_a_panel_dying_mid_flood(
    rig: Rig, scripted_image: str  # noqa: F811
) -> None:
    # Throttling is the server manager's business; this test is about the link.
    rig.servers_config(console_throttle_lines=10_000_000)
    manager = rig.manager()
    sid = rig.new_id()
    panel = FakePanel(reactor, SECRET)
    listening = reactor.listenTCP(0, panel.factory, interface="127.0.0.1")
    port = listening.getHost().port
    config = fast_config(port, console_batch_lines=50, console_batch_window=0.05,
                         outbox_size=10_000)
    dispatcher = Dispatcher(
        servers=manager, files=FakeFileManager(reactor), system=FakeHost(), clock=reactor
    )
    link = PanelLink(
        reactor, config, dispatcher, manager,
        lambda: succeed({"os": "linux"}), lambda: succeed({"cpu": 0, "memory": 0, "disk": 0}),
    )
    seen: list[tuple[str, bool]] = []  # (line, link up when the manager published it)

    def record(event: ServerEvent) -> None:
        if isinstance(event, ConsoleOutput) and event.server_id == sid:
            seen.extend((line, link.connected) for line in event.lines)

    link.startService()
    manager.add_listener(record)  # after the link's own listener
    try:
        await until(lambda: link.connected, 10)
        params = scripted(scripted_image, STARTUP_DELAY=0, FLOOD_LINES=FLOOD)
        panel.send({"id": "c-create", "type": "command", "action": "create_server",
                    "serverId": sid, "payload": params})
        await until(lambda: "c-create" in panel.responses(), 30)
        assert panel.responses()["c-create"][0]["success"] is True, panel.responses()
        await until(lambda: manager.get(sid).state.value == "offline", 30)

        panel.send({"id": "c-start", "type": "command",
                    "data": {"action": "start_server", "serverId": sid}})
        # The answer of a connection that drops is not replayed: wait for it
        # (on Podman the flood can start before the start call returns).
        await until(lambda: "c-start" in panel.responses(), 30)
        # The Panel dies once the flood is under way, and comes back 0.4 s later.
        await until(lambda: len(panel.console_lines(sid)) > 2_000, 30)
        await listening.stopListening()
        panel.drop()
        await until(lambda: not link.connected, 5)
        await sleep(0.4)
        listening = reactor.listenTCP(port, panel.factory, interface="127.0.0.1")
        await until(lambda: link.connected, 10)
        await until(lambda: "flood done" in panel.console_lines(sid)[-3:], 60)

        panel.send({"type": "server_command", "data": {"serverId": sid, "command": "say back"}})
        await until(lambda: "[Server] back" in panel.console_lines(sid), 10)
        panel.send({"id": "c-stop", "type": "command", "action": "stop_server",
                    "serverId": sid, "payload": {"timeout": 5}})
        await until(lambda: "c-stop" in panel.responses(), 15)
        await until(lambda: any(
            f["data"]["serverId"] == sid and f["data"]["currentStatus"] == "offline"
            for f in panel.frames("server_status_changed", connection=1)), 30)

        responses = panel.responses()
        assert sorted(responses) == ["c-create", "c-start", "c-stop"]
        assert all(len(replies) == 1 and replies[0]["success"] for replies in responses.values())

        numbers = [int(line) for line in panel.console_lines(sid) if line.isdigit()]
        assert numbers == sorted(set(numbers)), "console lines reordered or duplicated"
        published = [int(line) for line, _ in seen if line.isdigit()]
        assert published == list(range(1, FLOOD + 1))  # the manager saw them all
        while_down = {int(line) for line, up in seen if line.isdigit() and not up}
        assert while_down, "the flood did not overlap the outage"
        missing = set(published) - set(numbers)
        assert not missing & while_down, "lines produced while the link was down were lost"
        assert len(missing) < 2_000
        assert not panel.frames("events_dropped")
        # After the reconnect the Panel heard the server's current state.
        second = panel.frames("server_status_changed", connection=1)
        assert any(f["data"]["previousStatus"] == f["data"]["currentStatus"] == "running"
                   for f in second)
    finally:
        manager.remove_listener(record)
        await link.stopService()
        await listening.stopListening()
