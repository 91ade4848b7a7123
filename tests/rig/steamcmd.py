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
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.rig.images import BUSYBOX, _docker, image_exists

SCRIPT = Path(__file__).with_name("steamcmd.sh")
_APPLETS = "sh echo mkdir dd tr ln mkfifo sleep cat rm".split()


def _tag() -> str:
    return "ctrlagent-test/steamcmd:" + hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]


STEAMCMD_IMAGE = _tag()


def build_steamcmd_image(host: str, tag: str = STEAMCMD_IMAGE) -> str:
    """Import the stand-in steamcmd image into the engine at ``host``."""
    if image_exists(host, tag):
        return tag
    if not os.path.exists(BUSYBOX):
        raise RuntimeError("{} missing: apt-get install busybox-static".format(BUSYBOX))
    with tempfile.TemporaryDirectory(prefix="ctrlagent-steamcmd-") as tmp:
        root = Path(tmp)
        for d in ("bin", "usr/local/bin", "tmp", "etc", "proc", "sys", "dev"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        for applet in _APPLETS:
            os.symlink("busybox", root / "bin" / applet)
        (root / "tmp").chmod(0o1777)
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        target = root / "usr" / "local" / "bin" / "steamcmd"
        shutil.copy(SCRIPT, target)
        target.chmod(0o755)
        tar = subprocess.run(
            ["tar", "-C", str(root), "-c", "."], capture_output=True, check=True
        ).stdout
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
