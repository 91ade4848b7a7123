"""
``FakeFileManager`` is an ``IFileManager`` answering with the real manager's
records: the same calls on both give the same record types and the same keys
on the wire, so tests of the registry and transports against the fake hold
for the real thing.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from ctrlagent.errors import CtrlAgentError, NotFound
from ctrlagent.interfaces import IFileManager, ServerRoot
from ctrlagent.testing.files import FakeFileManager
from ctrlagent.wire.files import ModList
from ctrlagent.wire.json import to_json
from tests.files.conftest import SERVER_GID, SERVER_UID, make_manager


def test_the_fake_provides_the_interface() -> None:
    assert verifyObject(IFileManager, FakeFileManager(Clock()))


async def _session(fm: Any, root: ServerRoot) -> list[tuple[str, Any]]:
    """Every action once, in an order that makes each one succeed."""
    b64 = base64.b64encode(b"blocks\xff").decode()
    calls: list[tuple[str, Any]] = [
        ("create_directory", await fm.create_directory(root, "/world")),
        ("write_file", await fm.write_file(root, "/world/level.dat", "seed=1\n")),
        ("upload_file", await fm.upload_file(root, "/world/r.mca", b64)),
        ("list_files", await fm.list_files(root, "/world")),
        ("search_files", await fm.search_files(root, "/", "level")),
        ("read_file", await fm.read_file(root, "/world/level.dat")),
        ("download_file", await fm.download_file(root, "/world/r.mca")),
        ("get_file_info", await fm.get_file_info(root, "/world/level.dat")),
        ("set_file_permissions", await fm.set_file_permissions(root, "/world/level.dat", "600")),
        ("rename_file", await fm.rename_file(root, "/world/r.mca", "/world/r0.mca")),
        ("copy_file", await fm.copy_file(root, "/world", "/copies/world")),
        ("move_file", await fm.move_file(root, "/copies/world/r0.mca", "/copies/r0.mca")),
        ("get_file_permissions", await fm.get_file_permissions(root, "/world/level.dat")),
        ("read_file", await fm.read_file(root, "/copies/r0.mca", lossy=True)),
        ("create_archive", await fm.create_archive(root, ["/world"], "/b.tar", "tar")),
        ("extract_archive", await fm.extract_archive(root, "/b.tar", "/restore")),
        ("delete_file", await fm.delete_file(root, "/restore")),
        ("install_mod", await fm.install_mod(root, {"modId": "7", "name": "Seven",
                                                    "path": "/world/level.dat"})),
        ("list_mods", await fm.list_mods(root)),
        ("uninstall_mod", await fm.uninstall_mod(root, "7")),
    ]
    return calls


def _keys(value: Any) -> Any:
    """The key structure of a shape: nested dict keys (in order), values dropped."""
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys(v) for v in value[:1]]
    return None


@pytest_twisted.ensureDeferred
async def test_the_fake_answers_like_the_real_manager(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    real = await _session(make_manager(),
                          ServerRoot("srv", str(tmp_path / "real"), None, SERVER_UID, SERVER_GID))
    fake_root = ServerRoot("srv", "/srv/ctrlagent/servers/srv", None, SERVER_UID, SERVER_GID)
    fake = await _session(FakeFileManager(Clock()), fake_root)
    for (action, mine), (_, theirs) in zip(real, fake, strict=True):
        assert type(mine) is type(theirs), action
        # The fake's mods hold no file; everything else has the same keys, in order.
        if action not in ("install_mod", "list_mods"):
            assert _keys(to_json(theirs)) == _keys(to_json(mine)), action
    assert to_json(dict(fake)["uninstall_mod"]) == to_json(dict(real)["uninstall_mod"])


@pytest_twisted.ensureDeferred
async def test_uninstall_answers_with_the_mods_left(tmp_path: Path) -> None:
    fm: Any
    for fm, root in ((make_manager(), ServerRoot("s", str(tmp_path), None, SERVER_UID,
                                                 SERVER_GID)),
                     (FakeFileManager(Clock()), ServerRoot("s", "/s", None, 0, 0))):
        await fm.write_file(root, "/a.jar", "a")
        for mod_id in ("1", "2"):
            await fm.install_mod(root, {"modId": mod_id, "path": "/a.jar",
                                        "fileName": "m{}.jar".format(mod_id)})
        left = await fm.uninstall_mod(root, "1")
        assert isinstance(left, ModList) and [m.mod_id for m in left.mods] == ["2"]
        assert left == await fm.list_mods(root) and left.count == 1
        try:
            await fm.uninstall_mod(root, "1")
        except NotFound:
            pass
        else:
            raise AssertionError("a second uninstall of {} succeeded".format(type(fm).__name__))


@pytest_twisted.ensureDeferred
async def test_the_fake_refuses_what_the_real_manager_refuses(tmp_path: Path) -> None:
    """Binary text, copies into themselves, existing targets: the same codes on both."""
    real_root = ServerRoot("srv", str(tmp_path), None, SERVER_UID, SERVER_GID)
    fake_root = ServerRoot("srv", "/srv/x", None, SERVER_UID, SERVER_GID)
    fm: Any
    for fm, root in ((make_manager(), real_root), (FakeFileManager(Clock()), fake_root)):
        await fm.create_directory(root, "/d")
        await fm.upload_file(root, "/d/bin", base64.b64encode(b"\xff\xfe").decode())
        await fm.write_file(root, "/d/t.txt", "text")
        calls = [
            (fm.read_file(root, "/d/bin"), "NOT_TEXT", None),
            (fm.copy_file(root, "/d", "/d/inner"), "INVALID_PAYLOAD", "destinationPath"),
            (fm.copy_file(root, "/d/bin", "/d/t.txt"), "CONFLICT", None),
            (fm.move_file(root, "/d", "/d/inner"), "INVALID_PAYLOAD", "destinationPath"),
            (fm.copy_file(root, "/", "/x"), "PERMISSION_DENIED", None),
            (fm.get_file_permissions(root, "/nope"), "FILE_NOT_FOUND", None),
        ]
        for d, code, field in calls:
            try:
                await d
            except CtrlAgentError as e:
                assert (e.code, e.details.get("field")) == (code, field), type(fm).__name__
            else:
                raise AssertionError("{} answered for {}".format(type(fm).__name__, code))
