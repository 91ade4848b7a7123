"""
Install containers on the real engine: what a hostile or careless install
script can and cannot do to the host through the data directory.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.wire.json import to_json
from tests.servers.conftest import Rig, scripted, until

pytestmark = pytest.mark.docker

# Podman 4.3's default capabilities (containers.conf ``default_capabilities``).
PODMAN_DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
                       "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT")
S = ServerState

# CHOWN(0) DAC_OVERRIDE(1) FOWNER(3) SETGID(6) SETUID(7): the default set.
DEFAULT_CAPS_MASK = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 6) | (1 << 7)

HOSTILE_SCRIPT = r"""
cd /mnt/server
grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status
echo data > plain.txt
busybox mknod null c 1 3 && echo "MKNOD char: made" || echo "MKNOD char: refused"
busybox mknod disk b 8 0 && echo "MKNOD block: made" || echo "MKNOD block: refused"
cp /bin/busybox suid-shell && chmod 4755 suid-shell && echo "SUID: set"
mkdir sgid-dir && chmod 2775 sgid-dir && echo "SGID dir: set"
busybox chown 0:0 plain.txt && echo "CHOWN: done"
echo "DROP: $(busybox su -s /bin/sh -c 'id -u' container 2>&1)"
sleep 2
echo "script done"
"""


def _inspect(host: str, name: str) -> dict[str, Any] | None:
    proc = subprocess.run(
        ["docker", "inspect", name], capture_output=True, text=True, check=False,
        env=dict(os.environ, DOCKER_HOST=host),
    )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_install_scripts_run_confined_and_leave_no_device_or_setuid_file(
    rig: Rig, scripted_image: str
) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image)
    params["limits"]["pids"] = 0  # still gets the default PID limit
    params["install"] = {"script": HOSTILE_SCRIPT, "timeout": 30}
    created = manager.create_server(sid, params)

    # the install container, while it runs, as the engine holds it
    seen: list[dict[str, Any]] = []

    async def look() -> bool:
        doc = await deferToThread(_inspect, rig.host, "ctrl-alt-play-{}-install".format(sid))
        if doc is not None:
            seen.append(doc)
        return bool(seen)

    for _ in range(100):
        if await look() or created.called:
            break
    assert seen, "the install container was never seen running"
    host_config = seen[0]["HostConfig"]
    if rig.config.runtime.kind == "podman":
        # Podman shows what it dropped from its own defaults, not the request:
        # every default capability not added back is dropped (CapEff below
        # proves the whole set from the inside).
        assert set(PODMAN_DEFAULT_CAPS) - set(rig.config.servers.install_capabilities) <= {
            cap.removeprefix("CAP_") for cap in host_config["CapDrop"]}, host_config["CapDrop"]
        # ... and it shows as added only what its defaults lack.
        assert {cap.removeprefix("CAP_") for cap in host_config["CapAdd"] or ()} == set(
            rig.config.servers.install_capabilities) - set(PODMAN_DEFAULT_CAPS)
    else:
        assert host_config["CapDrop"] == ["ALL"]
        assert sorted(host_config["CapAdd"]) == sorted(rig.config.servers.install_capabilities)
    assert "no-new-privileges" in host_config["SecurityOpt"]
    assert host_config["Privileged"] is False
    assert host_config["PidsLimit"] == rig.config.servers.pids_limit
    assert host_config["Memory"] == 64 * 1024 * 1024 and host_config["NanoCpus"] == 500_000_000
    assert seen[0]["Config"]["User"] == "0:0"

    result = to_json(await created)
    assert result["status"] == "offline", manager.status(sid)
    log = open(manager.get(sid).install_log_path).read()
    # from the inside: exactly the configured capabilities, no new privileges
    cap_eff = next(line for line in log.splitlines() if line.startswith("CapEff:"))
    assert int(cap_eff.split()[1], 16) == DEFAULT_CAPS_MASK
    assert "NoNewPrivs:\t1" in log
    assert "MKNOD char: refused" in log and "MKNOD block: refused" in log
    # what real install scripts need still works: chown, and apt's drop to a user
    assert "CHOWN: done" in log and "DROP: 1000" in log and "script done" in log

    data = os.path.join(rig.config.data_dir, sid)
    modes = {name: os.lstat(os.path.join(data, name)).st_mode for name in os.listdir(data)}
    assert not any(stat.S_ISCHR(m) or stat.S_ISBLK(m) for m in modes.values()), modes
    assert "null" not in modes and "disk" not in modes
    # the sweep after the install: nothing setuid or setgid is left, all is the server's
    assert "SUID: set" in log and "SGID dir: set" in log
    assert not modes["suid-shell"] & (stat.S_ISUID | stat.S_ISGID)
    for name in os.listdir(data):
        assert os.lstat(os.path.join(data, name)).st_uid == 1000, name


@pytest_twisted.ensureDeferred
async def test_a_failing_install_is_swept_too(rig: Rig, scripted_image: str) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image)
    params["install"] = {
        "script": "cp /bin/busybox /mnt/server/suid && chmod 4755 /mnt/server/suid\nexit 9\n"
    }
    result = to_json(await manager.create_server(sid, params))
    assert result["status"] == "install_failed"
    path = os.path.join(rig.config.data_dir, sid, "suid")
    st = os.lstat(path)
    assert st.st_uid == 1000 and not st.st_mode & stat.S_ISUID
    await until(lambda: manager.get(sid).power is None, 5, "the install slot released")
