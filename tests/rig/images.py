"""
Test images built without any registry.

- ``build_scripted_image``: a busybox rootfs holding ``gameserver.sh`` (see that
  script for the behaviours chosen by environment variables), imported with
  ``docker import`` in well under a second.
- ``build_minetest_rootfs`` / ``import_minetest``: a real game server, Debian's
  ``minetest-server``, bootstrapped once per machine with debootstrap and cached
  as a tarball keyed by the package version, then imported into any engine.

Synchronous on purpose: used by session fixtures and bench scripts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def _script_tag() -> str:
    # The tag follows the script's content, so an edited script never runs
    # from a stale cached image.
    digest = hashlib.sha256(Path(__file__).with_name("gameserver.sh").read_bytes()).hexdigest()
    return "ctrlagent-test/scripted:" + digest[:12]


SCRIPTED_IMAGE = _script_tag()
MINETEST_IMAGE = "ctrlagent-test/minetest:5"

BUSYBOX = "/bin/busybox"
_APPLETS = (
    "sh ash echo cat sleep seq yes head tr dd kill ls mkdir rm printf date id env "
    "true false test [ wc grep sed tail touch chmod"
).split()

CACHE_DIR = Path(os.environ.get("CTRLAGENT_CACHE", os.path.expanduser("~/.cache/ctrlagent")))


def _docker(host: str, *args: str, input_bytes: bytes | None = None) -> str:
    env = dict(os.environ, DOCKER_HOST=host)
    proc = subprocess.run(
        ["docker", *args], input=input_bytes, capture_output=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            "docker {} failed: {}".format(" ".join(args[:2]), proc.stderr.decode(errors="replace"))
        )
    return proc.stdout.decode()


def image_exists(host: str, image: str) -> bool:
    env = dict(os.environ, DOCKER_HOST=host)
    return (
        subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, env=env, check=False
        ).returncode
        == 0
    )


def busybox_rootfs(
    script: Path, program: str, applets: Sequence[str], *, container_user: bool
) -> bytes:
    """
    A tar of a minimal busybox root: ``applets`` linked to busybox, ``script``
    installed as ``/usr/local/bin/<program>``, and with ``container_user`` the
    uid 1000 user ``container`` with its home ``/home/container``.
    """
    if not os.path.exists(BUSYBOX):
        raise RuntimeError("{} missing: apt-get install busybox-static".format(BUSYBOX))
    with tempfile.TemporaryDirectory(prefix="ctrlagent-rootfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "usr/local/bin", "tmp", "etc", "proc", "sys", "dev"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        for applet in applets:
            os.symlink("busybox", root / "bin" / applet)
        (root / "tmp").chmod(0o1777)
        passwd = "root:x:0:0:root:/root:/bin/sh\n"
        if container_user:
            (root / "home" / "container").mkdir(parents=True)
            (root / "home" / "container").chmod(0o777)
            passwd += "container:x:1000:1000::/home/container:/bin/sh\n"
            (root / "etc" / "group").write_text("root:x:0:\ncontainer:x:1000:\n")
        (root / "etc" / "passwd").write_text(passwd)
        target = root / "usr" / "local" / "bin" / program
        shutil.copy(script, target)
        target.chmod(0o755)
        return subprocess.run(
            ["tar", "-C", str(root), "-c", "."], capture_output=True, check=True
        ).stdout


def build_scripted_image(host: str, tag: str = SCRIPTED_IMAGE) -> str:
    """Import the busybox scripted game server into the engine at ``host``."""
    if image_exists(host, tag):
        return tag
    tar = busybox_rootfs(
        Path(__file__).with_name("gameserver.sh"), "gameserver", _APPLETS, container_user=True
    )
    _docker(
        host,
        "import",
        "-c", "CMD [\"/usr/local/bin/gameserver\"]",
        "-c", "WORKDIR /home/container",
        "-c", "ENV PATH=/bin:/usr/local/bin",
        "-",
        tag,
        input_bytes=tar,
    )
    return tag


def _debian_mirror() -> str:
    """The Debian mirror apt uses here (DOCKER-IN-TESTS.md)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*")) + [Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)\s", text, re.M
        )
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def minetest_version() -> str:
    """The candidate version of Debian's minetest-server (the cache key)."""
    out = subprocess.run(
        ["apt-cache", "policy", "minetest-server"], capture_output=True, text=True, check=False
    ).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise RuntimeError("minetest-server is not available from apt (run apt-get update)")
    return m.group(1)


def build_minetest_rootfs() -> Path:
    """
    Return a cached tarball of a minimal Debian with minetest-server.

    Built once per machine (about 35 s) and keyed by the package version, so
    repeated test runs reuse it.
    """
    version = minetest_version()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / "minetest-rootfs-{}.tar".format(re.sub(r"[^A-Za-z0-9.+-]", "_", version))
    if tarball.exists():
        return tarball
    with tempfile.TemporaryDirectory(prefix="ctrlagent-minetest-", dir=str(CACHE_DIR)) as tmp:
        root = Path(tmp) / "root"
        subprocess.run(
            [
                "debootstrap", "--variant=minbase", "--include=minetest-server",
                "bookworm", str(root), _debian_mirror(),
            ],
            check=True,
            capture_output=True,
        )
        for trash in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt",
                      "var/lib/apt/lists"):
            shutil.rmtree(root / trash, ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    return tarball


def import_minetest(host: str, tag: str = MINETEST_IMAGE) -> str:
    """Import the cached Minetest rootfs into the engine at ``host``."""
    if image_exists(host, tag):
        return tag
    tarball = build_minetest_rootfs()
    _docker(
        host,
        "import",
        "-c", "USER Debian-minetest",
        "-c", "WORKDIR /var/games/minetest-server",
        "-c", "ENV HOME=/var/games/minetest-server",
        "-c", "CMD [\"/usr/games/minetestserver\", \"--port\", \"30000\"]",
        str(tarball),
        tag,
    )
    return tag
