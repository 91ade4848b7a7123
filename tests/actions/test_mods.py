"""
The mod actions: install, list and uninstall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import succeed

from ctrlagent.wire.json import to_json
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


@dataclass(frozen=True)
class ModsLeft:
    """A mod list as a typed record of the file manager would carry it."""

    ids: tuple[str, ...]


@to_json.register
def _mods_left_json(value: ModsLeft) -> dict[str, Any]:
    return {"mods": [{"id": i} for i in value.ids], "count": len(value.ids)}


def test_uninstall_merges_a_mod_list_record_through_to_json(rig: Rig) -> None:
    rig.created()
    rig.ok("install_mod", PANEL_ID, modId=77)
    rig.files.list_mods = lambda root: succeed(ModsLeft(("5", "6")))  # type: ignore[method-assign]
    assert rig.ok("uninstall_mod", PANEL_ID, modId="77") == {
        "mods": [{"id": "5"}, {"id": "6"}], "count": 2
    }
    assert rig.ok("list_mods", PANEL_ID)["count"] == 2
