"""
``add_server_alias`` (also ``add_alias``): recording the Panel's second id of a
server, with conflicts refused (issue 12, item 7).  The HTTP route and the
WebSocket link are tested in tests/api and tests/panel; the persistence over a
real manager in tests/servers/test_aliases_unit.py.
"""

from __future__ import annotations

import pytest

from tests.actions.rig import PANEL_ID, UUID, Rig

OTHER = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


def test_an_alias_names_the_server_for_every_action_from_then_on(rig: Rig) -> None:
    rig.created(panelId=None)
    assert rig.error("get_server_status", PANEL_ID).code == "SERVER_NOT_FOUND"
    data = rig.ok("add_server_alias", UUID, alias=PANEL_ID)
    assert data == {"serverId": UUID, "alias": PANEL_ID, "added": True, "aliases": [PANEL_ID]}
    # The Panel's console/files/metrics id now reaches the server its power id created.
    assert rig.ok("get_server_status", PANEL_ID)["serverId"] == UUID
    assert rig.ok("get_server_metrics", PANEL_ID)["players"] == 0


def test_add_alias_is_the_same_action_and_may_name_the_server_by_either_id(rig: Rig) -> None:
    rig.created()
    data = rig.ok("add_alias", PANEL_ID, alias="seeded-server-1")
    assert data["serverId"] == UUID and data["aliases"] == sorted([PANEL_ID, "seeded-server-1"])
    assert rig.ok("get_status", "seeded-server-1")["serverId"] == UUID


def test_recording_an_alias_twice_changes_nothing(rig: Rig) -> None:
    rig.created()
    again = rig.ok("add_server_alias", UUID, alias=PANEL_ID)
    assert (again["added"], again["aliases"]) == (False, [PANEL_ID])
    own = rig.ok("add_server_alias", UUID, alias=UUID)
    assert (own["added"], own["aliases"]) == (False, [PANEL_ID])


def test_an_alias_that_names_another_server_is_a_conflict(rig: Rig) -> None:
    rig.created()
    rig.created(OTHER, panelId="other-panel-id")
    for taken in (OTHER, "other-panel-id", "ctrl-alt-play-" + OTHER):
        err = rig.error("add_server_alias", UUID, alias=taken)
        assert err.code == "CONFLICT", taken
        assert OTHER in err.message
    assert rig.ok("get_status", UUID)["aliases"] == [PANEL_ID]
    assert rig.ok("get_status", "other-panel-id")["serverId"] == OTHER


@pytest.mark.parametrize(
    "alias, field",
    [(None, "alias"), ("", "alias"), (42, "alias"), ("has space", "alias"), ("-x", "alias"),
     ("x" * 129, "alias")],
)
def test_a_bad_alias_is_invalid_payload_naming_the_field(rig: Rig, alias: object,
                                                         field: str) -> None:
    rig.created()
    err = rig.error("add_server_alias", UUID, alias=alias)
    assert (err.code, err.details.get("field")) == ("INVALID_PAYLOAD", field)


def test_an_alias_for_an_unknown_server_is_server_not_found(rig: Rig) -> None:
    assert rig.error("add_server_alias", "ghost", alias=PANEL_ID).code == "SERVER_NOT_FOUND"
    assert rig.error("add_server_alias", None, alias=PANEL_ID).code == "INVALID_PAYLOAD"
