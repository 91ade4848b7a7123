"""
The lifecycle against the real engine with the scripted busybox game server.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
import pytest_twisted

from ctrlagent.errors import Conflict
from ctrlagent.servers.lifecycle import ServerState
from ctrlagent.wire.json import to_json
from tests.servers.conftest import Rig, scripted, sleep, until, until_state

pytestmark = pytest.mark.docker
S = ServerState


def inspect(host: str, cid: str) -> dict[str, Any]:
    import json

    out = subprocess.run(
        ["docker", "inspect", cid], capture_output=True, text=True, check=True,
        env=dict(os.environ, DOCKER_HOST=host),
    ).stdout
    return json.loads(out)[0]


@pytest_twisted.ensureDeferred
async def test_create_start_console_round_trip_and_graceful_stop(
    rig: Rig, scripted_image: str
) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image, STARTUP_DELAY=1, DATA_FILE="/home/container/commands.txt")
    params["aliases"] = ["panel-" + sid]
    created = to_json(await manager.create_server(sid, params))
    assert created["status"] == "offline" and created["containerId"]
    assert manager.resolve("panel-" + sid) == sid
    assert manager.resolve("ctrl-alt-play-" + sid) == sid
    assert manager.resolve(created["containerId"][:12]) == sid

    started = to_json(await manager.start(sid))
    assert started["status"] == "starting"  # the startup line comes a second later
    await until_state(manager, sid, S.RUNNING)

    reply = await manager.console_command(sid, "say hello", wait=0.5)
    assert "> say hello" in reply and "[Server] hello" in reply
    assert "[Server] hello" in manager.console_history(sid, 10)
    # the command reached the game through stdin and the data dir is mounted
    data = os.path.join(rig.config.data_dir, sid, "commands.txt")
    assert open(data).read() == "say hello\n"

    stopped = to_json(await manager.stop(sid))
    assert stopped["status"] == "stopping"
    await until_state(manager, sid, S.OFFLINE)
    assert "Stopping server (console)" in manager.console_history(sid, 5)
    assert rig.recorder.statuses(sid) == [
        ("offline", "installing"),
        ("installing", "offline"),
        ("offline", "starting"),
        ("starting", "running"),
        ("running", "stopping"),
        ("stopping", "offline"),
    ]
    assert to_json(manager.status(sid))["panelStatus"] == "OFFLINE"
    # the container stays (stop never removes), and it exited 0
    state = inspect(rig.host, created["containerId"])["State"]
    assert state["Running"] is False and state["ExitCode"] == 0


@pytest_twisted.ensureDeferred
async def test_limits_visible_in_docker_inspect(rig: Rig, scripted_image: str) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image)
    params["limits"] = {"memory": 128, "swap": 64, "cpu": 150, "io": 5, "disk": 0}
    params["ports"] = [{"internal": 25565, "external": 42001, "ip": "127.0.0.1"}]
    created = to_json(await manager.create_server(sid, params))
    doc = inspect(rig.host, created["containerId"])
    host = doc["HostConfig"]
    assert host["Memory"] == 128 * 1024 * 1024
    assert host["MemorySwap"] == (128 + 64) * 1024 * 1024
    assert host["NanoCpus"] == 1_500_000_000
    assert host["PidsLimit"] == rig.config.servers.pids_limit
    # the engine discards the weight (with a warning) where the kernel lacks it
    supported = os.path.exists("/sys/fs/cgroup/blkio/blkio.weight") or os.path.exists(
        "/sys/fs/cgroup/io.weight"
    )
    assert host["BlkioWeight"] == (10 if supported else 0)
    assert "/tmp" in host["Tmpfs"]
    assert host["PortBindings"] == {
        "25565/tcp": [{"HostIp": "127.0.0.1", "HostPort": "42001"}],
        "25565/udp": [{"HostIp": "127.0.0.1", "HostPort": "42001"}],
    }
    assert doc["Name"] == "/ctrl-alt-play-" + sid
    labels = doc["Config"]["Labels"]
    assert labels["ctrl-alt-play.managed"] == "true"
    assert labels["ctrl-alt-play.server-id"] == sid
    assert doc["Config"]["User"] == "1000:1000"
    assert "SERVER_PORT=25565" in doc["Config"]["Env"]
    assert "SERVER_MEMORY=128" in doc["Config"]["Env"]
    assert any(m["Destination"] == "/home/container" for m in doc["Mounts"])


@pytest_twisted.ensureDeferred
async def test_stop_escalates_to_kill_when_sigterm_is_ignored(
    rig: Rig, scripted_image: str
) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image, IGNORE_SIGTERM=1)
    params["stop"] = {"type": "signal", "value": "SIGTERM", "timeout": 1}
    await manager.create_server(sid, params)
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    await manager.stop(sid)
    await sleep(0.5)
    assert manager.get(sid).state is S.STOPPING
    await until_state(manager, sid, S.OFFLINE, timeout=8)
    history = manager.console_history(sid, 20)
    assert "SIGTERM ignored" in history
    assert any("did not stop within 1 s: killing" in line for line in history)
    assert inspect(rig.host, manager.get(sid).container_id)["State"]["ExitCode"] == 137


@pytest_twisted.ensureDeferred
async def test_kill_cuts_a_slow_stop_short_and_conflicts_are_refused(
    rig: Rig, scripted_image: str
) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image, IGNORE_SIGTERM=1)
    params["stop"] = {"type": "signal", "value": "SIGTERM", "timeout": 30}
    await manager.create_server(sid, params)
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    await manager.stop(sid)
    # a second power action while the stop runs: CONFLICT at once
    with pytest.raises(Conflict) as info:
        await manager.start(sid)
    assert info.value.code == "CONFLICT"
    with pytest.raises(Conflict):
        await manager.restart(sid)
    # kill is always allowed, and ends the 30 s stop now
    result = to_json(await manager.kill(sid))
    assert result["status"] == "offline"
    assert manager.get(sid).power is None
    cid = manager.get(sid).container_id
    assert cid is not None
    assert inspect(rig.host, cid)["State"]["Status"] == "exited"  # killed, not removed
    assert os.path.isdir(os.path.join(rig.config.data_dir, sid))


@pytest_twisted.ensureDeferred
async def test_crash_is_detected_restarted_and_the_loop_guard_holds(
    rig: Rig, scripted_image: str
) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    # The game crashes with code 3 one second after every start.
    await manager.create_server(sid, scripted(scripted_image, CRASH_AFTER=1, CRASH_CODE=3))
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    await until(lambda: ("running", "crashed") in rig.recorder.statuses(sid), 5, "crash")
    crash = [e for e in rig.recorder.events if getattr(e, "current", None) == "crashed"][0]
    assert crash.exit_code == 3  # type: ignore[union-attr]
    server = manager.get(sid)
    assert server.crash_report is not None
    assert "Crashing with exit code 3" in server.crash_report.lines
    assert server.crash_report.restarted
    # restarted by policy ...
    await until(lambda: rig.recorder.statuses(sid).count(("starting", "running")) == 2, 5,
                "restart")
    # ... and crashing again within the window: not restarted (crash-loop guard)
    await until(
        lambda: rig.recorder.statuses(sid).count(("running", "crashed")) == 2, 5, "second crash"
    )
    await sleep(1.5)
    assert server.state is S.CRASHED
    assert server.desired == "offline"
    assert server.crash_report.exit_code == 3 and not server.crash_report.restarted
    assert any("crash-loop guard" in line for line in manager.console_history(sid, 10))
    assert to_json(manager.status(sid))["panelStatus"] == "CRASHED"
    assert rig.recorder.statuses(sid).count(("starting", "running")) == 2


@pytest_twisted.ensureDeferred
async def test_console_crash_command_is_a_crash(rig: Rig, scripted_image: str) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image)
    params["crashRestart"] = False
    await manager.create_server(sid, params)
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    await manager.send_command(sid, "crash 5")
    await until_state(manager, sid, S.CRASHED)
    server = manager.get(sid)
    assert server.crash_report is not None and not server.crash_report.restarted
    # the exit code reported is the engine's
    cid = server.container_id
    assert cid is not None
    assert server.crash_report.exit_code == inspect(rig.host, cid)["State"]["ExitCode"] != 0


@pytest.mark.parametrize("typed", ["a line", "key by key"])
@pytest_twisted.ensureDeferred
async def test_a_typed_stop_command_stops_the_real_game_and_is_no_crash(
    rig: Rig, scripted_image: str, typed: str
) -> None:
    # The Panel's console sends the stop command the egg names, as a line or
    # as raw keys (a terminal-like console): the game exits 0 by itself, and
    # that is the Stop a player asked for.
    manager = rig.manager()
    sid = rig.new_id()
    await manager.create_server(sid, scripted(scripted_image))
    await manager.start(sid)
    await until_state(manager, sid, S.RUNNING)
    if typed == "a line":
        await manager.send_command(sid, "stop")
    else:
        for key in ("s", "t", "o", "p", "\n"):
            await manager.console_input(sid, key)
    await until_state(manager, sid, S.OFFLINE)
    await sleep(0.5)
    assert rig.recorder.statuses(sid)[-2:] == [("running", "stopping"), ("stopping", "offline")]
    server = manager.get(sid)
    assert server.crash_report is None and server.desired == "offline"
    cid = server.container_id
    assert cid is not None
    state = inspect(rig.host, cid)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0  # the game's own exit


@pytest_twisted.ensureDeferred
async def test_failing_install_script_is_install_failed(rig: Rig, scripted_image: str) -> None:
    manager = rig.manager()
    good, bad = rig.new_id(), rig.new_id()
    params = scripted(scripted_image)
    params["install"] = {"script": "echo installing > /mnt/server/installed.txt\necho done\n"}
    result = to_json(await manager.create_server(good, params))
    assert result["status"] == "offline"
    installed = os.path.join(rig.config.data_dir, good, "installed.txt")
    assert open(installed).read() == "installing\n"
    assert os.stat(installed).st_uid == 1000  # chowned to the server's user after install
    log = open(manager.get(good).install_log_path).read()
    assert "done" in log

    params["install"] = {"script": "echo about to fail\nexit 7\n"}
    result = to_json(await manager.create_server(bad, params))
    assert result["status"] == "install_failed"
    status = to_json(manager.status(bad))
    assert status["panelStatus"] == "INSTALL_FAILED"
    assert "code 7" in status["error"]
    assert "about to fail" in open(manager.get(bad).install_log_path).read()
    failed = [e for e in rig.recorder.events if getattr(e, "current", "") == "install_failed"]
    assert failed[0].exit_code == 7  # type: ignore[union-attr]
    with pytest.raises(Conflict):
        await manager.start(bad)


@pytest_twisted.ensureDeferred
async def test_install_script_timeout_is_install_failed(rig: Rig, scripted_image: str) -> None:
    manager = rig.manager()
    sid = rig.new_id()
    params = scripted(scripted_image)
    params["install"] = {"script": "echo slow\nsleep 30\n", "timeout": 1}
    result = to_json(await manager.create_server(sid, params))
    assert result["status"] == "install_failed"
    assert "timed out" in to_json(manager.status(sid))["error"]
    log = open(manager.get(sid).install_log_path).read()
    assert "slow" in log and "install timed out" in log
    # the install container is gone, the server container was never made
    assert manager.get(sid).container_id is None
