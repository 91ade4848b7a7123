"""
The mod actions: install, list and uninstall.
"""

from __future__ import annotations

from tests.actions.rig import PANEL_ID, Rig


def test_mods(rig: Rig) -> None:
    rig.created()
    assert rig.ok("list_mods", PANEL_ID) == {"mods": [], "count": 0}
    rig.ok("install_mod", PANEL_ID, type="steam_workshop", workshopId="123", name="Maps")
    rig.ok("install_mod", PANEL_ID, modId=77)
    assert rig.error("install_mod", PANEL_ID, workshopId="123").code == "CONFLICT"
    assert rig.error("install_mod", PANEL_ID, name="nothing to fetch").details["field"] == "modId"
    assert rig.ok("list_mods", PANEL_ID)["count"] == 2
    left = rig.ok("uninstall_mod", PANEL_ID, modId="123")
    assert [m["id"] for m in left["mods"]] == ["77"]
    assert rig.error("uninstall_mod", PANEL_ID, modId="123").code == "NOT_FOUND"
    assert rig.error("uninstall_mod", PANEL_ID).details["field"] == "modId"
