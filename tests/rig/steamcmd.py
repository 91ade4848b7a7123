"""
A stand-in steamcmd image (Steam is unreachable from the test machines).

``build_steamcmd_image`` imports a busybox rootfs holding ``steamcmd.sh`` as
``/usr/local/bin/steamcmd`` (see that script for the command line it takes,
the lines it prints, as Valve's steamcmd does, and the catalogue of items),
built like the scripted game server of ``images.py`` and tagged by the
script's content, so an edited script never runs from a stale image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.rig.images import _docker, busybox_rootfs, image_exists

SCRIPT = Path(__file__).with_name("steamcmd.sh")
_APPLETS = "sh echo mkdir dd tr ln mkfifo sleep cat rm".split()


def _tag() -> str:
    return "ctrlagent-test/steamcmd:" + hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]


STEAMCMD_IMAGE = _tag()


def build_steamcmd_image(host: str, tag: str = STEAMCMD_IMAGE) -> str:
    """Import the stand-in steamcmd image into the engine at ``host``."""
    if image_exists(host, tag):
        return tag
    tar = busybox_rootfs(SCRIPT, "steamcmd", _APPLETS, container_user=False)
    _docker(
        host,
        "import",
        "-c", "ENTRYPOINT [\"/usr/local/bin/steamcmd\"]",
        "-c", "ENV PATH=/bin:/usr/local/bin",
        "-",
        tag,
        input_bytes=tar,
    )
    return tag
