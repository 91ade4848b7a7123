"""
The console actions: lines in, history and exports out.
"""

from __future__ import annotations

import json

from tests.actions.rig import PANEL_ID, UUID, Rig


def test_console_actions(rig: Rig) -> None:
    rig.created()
    err = rig.error("send_server_command", UUID, command="say hi")
    assert err.code == "CONFLICT"  # not running
    rig.ok("start_server", UUID)
    assert rig.error("send_server_command", UUID).details["field"] == "command"
    assert rig.error("send_server_command", UUID, command=5).details["field"] == "command"
    rig.ok("send_server_command", PANEL_ID, command="say hi")
    assert rig.servers.servers[UUID].stdin == ["say hi"]
    assert rig.ok("console:command", PANEL_ID, command="list")["response"] == "> list"
    history = rig.ok("console:history", PANEL_ID, lines=2)
    assert history == {"serverId": UUID, "history": ["> say hi", "> list"], "lines": 2}
    status = rig.ok("console:status", PANEL_ID)
    assert status["connected"] is True and status["bufferSize"] == 3
    assert status["lastActivity"].endswith("Z")
    assert rig.ok("console:connect", PANEL_ID)["connected"] is True
    rig.ok("console:disconnect", PANEL_ID)
    txt = rig.ok("console:download", PANEL_ID)["content"]
    assert txt == "[fake] server started\n> say hi\n> list\n"
    js = json.loads(rig.ok("console:download", PANEL_ID, format="json")["content"])
    assert js["lines"][-1] == "> list"
    assert rig.error("console:download", PANEL_ID, format="pdf").details["field"] == "format"
    rig.ok("console:clear", PANEL_ID)
    assert rig.ok("console:history", PANEL_ID)["history"] == []


def test_log_lines_accept_digit_strings_and_refuse_nonsense(rig: Rig) -> None:
    rig.created()
    rig.ok("start_server", UUID)
    for i in range(5):
        rig.servers.emit_console(UUID, "line {}".format(i))
    assert rig.ok("get_server_logs", UUID, lines="2")["logs"] == ["line 3", "line 4"]
    for bad in ("many", True, 0, 2.5, [1]):
        err = rig.error("get_server_logs", UUID, lines=bad)
        assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "lines")
