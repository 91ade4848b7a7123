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


def test_raw_input_and_interrupt_with_the_panels_payloads(rig: Rig) -> None:
    rig.created()
    assert rig.error("console:input", PANEL_ID, input="x").code == "CONFLICT"  # not running
    assert rig.error("console:interrupt", PANEL_ID).code == "CONFLICT"
    rig.ok("start_server", UUID)
    # externalAgentService.sendConsoleInput: {input}, raw, no newline added.
    assert rig.ok("console:input", PANEL_ID, input="say he") == {"serverId": UUID, "bytes": 6}
    assert rig.servers.servers[UUID].stdin == []
    rig.ok("console:input", PANEL_ID, input="llo\n")
    assert rig.servers.servers[UUID].stdin == ["say hello"]
    assert rig.ok("console:input", PANEL_ID, input="")["bytes"] == 0
    assert rig.error("console:input", PANEL_ID).details["field"] == "input"
    assert rig.error("console:input", PANEL_ID, input=["a"]).details["field"] == "input"
    # externalAgentService.sendConsoleInterrupt: {}.
    assert rig.ok("console:interrupt", PANEL_ID) == {"serverId": UUID, "signal": "SIGINT"}
    assert rig.ok("get_server_status", UUID)["status"] == "offline"


def test_console_settings_with_the_panels_payloads(rig: Rig) -> None:
    rig.created()
    got = rig.ok("console:settings:get", PANEL_ID)
    assert got == {"serverId": UUID, "settings": {
        "historySize": 1000, "throttleLines": 2000, "throttleInterval": 1.0,
        "timestamps": False}}
    changed = rig.ok("console:settings:update", PANEL_ID,
                     settings={"historySize": "500", "timestamps": "true"})
    assert changed["settings"]["historySize"] == 500
    assert changed["settings"]["timestamps"] is True
    assert rig.ok("console:settings:get", UUID)["settings"] == changed["settings"]
    err = rig.error("console:settings:update", PANEL_ID,
                    settings={"historySize": 100, "fontSize": 12, "theme": "dark"})
    assert (err.code, err.details["field"]) == ("INVALID_PAYLOAD", "settings")
    assert err.details["unknown"] == ["fontSize", "theme"]
    assert "fontSize, theme" in err.message and "historySize" in err.message
    for settings, field in (
        (None, "settings"),
        ("big", "settings"),
        ({"historySize": 1}, "settings.historySize"),
        ({"historySize": 100_001}, "settings.historySize"),
        ({"throttleLines": -1}, "settings.throttleLines"),
        ({"throttleInterval": 61}, "settings.throttleInterval"),
        ({"throttleInterval": 0.01}, "settings.throttleInterval"),
        ({"timestamps": 1}, "settings.timestamps"),
        ({"timestamps": None}, "settings.timestamps"),
    ):
        params = {} if settings is None else {"settings": settings}
        err = rig.error("console:settings:update", PANEL_ID, **params)
        assert (settings, err.code, err.details.get("field")) == (
            settings, "INVALID_PAYLOAD", field)
    assert rig.ok("console:settings:get", UUID)["settings"] == changed["settings"]
    assert rig.error("console:settings:get", "nope").code == "SERVER_NOT_FOUND"
