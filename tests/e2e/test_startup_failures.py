"""
``twistd -n ctrlagent`` started on bad state, as systemd would start it.

Every startup failure must end the process non-zero within seconds, with one
``ctrlagent: error:`` line naming the problem and no traceback (a process that
stays up holding its port, answering nothing, defeats ``Restart=always``):
random bytes, a truncated store, a wrong schema, a read-only store, a state
path that is a file, a data path that is a file, an API or SFTP port in use.  A bad
stored server is not a startup failure: it is reported, quarantined, and the
agent serves the others.  A full state disk makes ``create_server`` answer
``INSUFFICIENT_RESOURCES`` and loses nothing.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctrlagent.config import ServersConfig
from ctrlagent.servers import spec as specs
from tests.rig.agentproc import ROOT, AgentProcess, _twistd

# Docker only: store and start-up faults: the runtime only runs the game
pytestmark = [pytest.mark.e2e, pytest.mark.runtimes("docker")]

EXIT_WITHIN = 30.0  # seconds; the machine is shared, the agent takes ~2 s


def run_to_exit(
    agent: AgentProcess, timeout: float = EXIT_WITHIN, rewrite: bool = True, daemon: bool = False
) -> tuple[int, str]:
    """
    Start ``agent`` expecting it to fail: ``(exit code, everything it printed)``.

    ``daemon``: as ``twistd ctrlagent`` without ``-n``, which forks and
    waits for the daemon's start; the exit code and output are the waiting
    parent's.
    """
    if rewrite:
        agent._write_config()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("AGENT_SECRET", None)
    started = time.monotonic()
    twistd = (
        ["--pidfile={}".format(agent.workdir / "agent.pid"),
         "--logfile={}".format(agent.workdir / "agent.log")]
        if daemon else ["--nodaemon", "--pidfile="]
    )
    result = subprocess.run(
        [_twistd(), *twistd, "ctrlagent", "--config", str(agent.config_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(agent.workdir),
        timeout=timeout,
        check=False,
    )
    assert time.monotonic() - started < timeout
    return result.returncode, result.stdout + result.stderr


def assert_one_clear_line(code: int, output: str, *needles: str) -> str:
    assert code != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "ctrlagent: error:" in line]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]
    # Nothing after the line, and nothing logged as an error besides it.
    assert not [line for line in output.splitlines() if "#error]" in line], output
    return lines[0]


def store_path(agent: AgentProcess) -> Path:
    return agent.state_dir / "servers.sqlite3"


def spec_json(server_id: str, image: str = "img") -> str:
    return specs.parse_spec(
        server_id, {"image": image, "startup": "/game"}, ServersConfig()
    ).to_json()


def make_store(agent: AgentProcess, *server_ids: str, image: str = "img") -> Path:
    """A store as an agent leaves it, holding ``server_ids`` (offline)."""
    agent.state_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(store_path(agent)), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE servers (server_id TEXT PRIMARY KEY, spec TEXT NOT NULL,"
            " desired TEXT NOT NULL DEFAULT 'offline', state TEXT NOT NULL DEFAULT 'offline',"
            " container_id TEXT, console_mark INTEGER NOT NULL DEFAULT 0, last_crash REAL,"
            " extra TEXT NOT NULL DEFAULT '{}', updated REAL NOT NULL)"
        )
        for sid in server_ids:
            db.execute(
                "INSERT INTO servers (server_id, spec, updated) VALUES (?, ?, 0)",
                (sid, spec_json(sid, image)),
            )
    finally:
        db.close()
    return store_path(agent)


def get_servers(agent: AgentProcess) -> list[str]:
    request = urllib.request.Request(agent.base_url + "/api/servers", headers=agent.headers())
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    return sorted(s["serverId"] for s in body["data"]["servers"])


@pytest.fixture
def agent(make_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return make_agent()


# -- the store cannot be used: exit with one line --------------------------------------


def test_random_bytes_as_the_store(agent: AgentProcess) -> None:
    agent.state_dir.mkdir(parents=True)
    store_path(agent).write_bytes(os.urandom(32768))
    assert_one_clear_line(
        *run_to_exit(agent), str(store_path(agent)), "is not a SQLite database", "backup"
    )


def test_a_truncated_store(agent: AgentProcess) -> None:
    path = make_store(agent, *("srv-{}".format(i) for i in range(300)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert_one_clear_line(*run_to_exit(agent), str(path), "is damaged")


def test_a_store_with_a_foreign_servers_table(agent: AgentProcess) -> None:
    agent.state_dir.mkdir(parents=True)
    db = sqlite3.connect(str(store_path(agent)))
    db.execute("CREATE TABLE servers (id INTEGER PRIMARY KEY, name TEXT)")
    db.commit()
    db.close()
    assert_one_clear_line(*run_to_exit(agent), "without the column(s) server_id, spec")


def test_a_state_path_that_is_a_file(agent: AgentProcess) -> None:
    agent.workdir.mkdir(parents=True, exist_ok=True)
    agent.state_dir.write_text("I am a file\n")
    assert_one_clear_line(
        *run_to_exit(agent), "state directory {} is not a directory".format(agent.state_dir)
    )


def test_a_data_path_that_is_a_file(agent: AgentProcess) -> None:
    agent.workdir.mkdir(parents=True, exist_ok=True)
    agent.data_dir.write_text("I am a file\n")
    assert_one_clear_line(
        *run_to_exit(agent), "data directory {} is not a directory".format(agent.data_dir)
    )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Small tmpfs mounts of our own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / "tmpfs{}".format(len(mounts))
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", str(where)],
                       check=True)
        mounts.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounts):
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_store_on_a_read_only_filesystem(
    make_agent: Callable[..., AgentProcess], tmpfs: Callable[[str], Path]
) -> None:
    state = tmpfs("4m")
    agent = make_agent()
    agent.state_dir = state
    make_store(agent, "a")
    subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
    assert_one_clear_line(*run_to_exit(agent), str(state), "read-only filesystem")


def test_the_api_port_in_use(agent: AgentProcess) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", agent.port))
        taken.listen()
        assert_one_clear_line(
            *run_to_exit(agent),
            "cannot listen for the HTTP API on tcp:{}:interface=127.0.0.1".format(agent.port),
            "address already in use",
        )


def test_the_api_port_in_use_as_a_daemon(agent: AgentProcess) -> None:
    """
    Without ``-n`` twistd forks and waits for the daemon's start: the waiting
    parent prints the daemon's one line and exits 1 (it used to wait forever).
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", agent.port))
        taken.listen()
        code, output = run_to_exit(agent, daemon=True)
    line = assert_one_clear_line(code, output, "address already in use")
    assert output.strip() == line, output  # twistd's own two lines are not added
    log = (agent.workdir / "agent.log").read_text()
    assert "cannot listen for the HTTP API" in log
    assert "Traceback" not in log, log
    assert not (agent.workdir / "agent.pid").exists()


def test_a_daemon_that_starts_leaves_the_parent_with_0_and_serves(agent: AgentProcess) -> None:
    agent._write_config()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("AGENT_SECRET", None)
    pidfile = agent.workdir / "agent.pid"
    try:
        result = subprocess.run(
            [_twistd(), "--pidfile={}".format(pidfile),
             "--logfile={}".format(agent.workdir / "agent.log"),
             "ctrlagent", "--config", str(agent.config_path)],
            capture_output=True, text=True, env=env, cwd=str(agent.workdir),
            timeout=3 * EXIT_WITHIN, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert agent.health()["status"] in ("healthy", "degraded")
    finally:
        # The daemon is ours: stop it by the pid it recorded, whatever happened.
        pid = int(pidfile.read_text()) if pidfile.exists() else None
        if pid is not None:
            os.kill(pid, 15)
            deadline = time.monotonic() + EXIT_WITHIN
            while time.monotonic() < deadline and os.path.exists("/proc/{}".format(pid)):
                time.sleep(0.1)
    assert pid is not None and not os.path.exists("/proc/{}".format(pid))


def test_the_sftp_port_in_use(make_agent: Callable[..., AgentProcess]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = make_agent(sftp_endpoint="tcp:{}:interface=127.0.0.1".format(port))
        assert_one_clear_line(
            *run_to_exit(agent),
            "cannot listen for SFTP on tcp:{}:interface=127.0.0.1".format(port),
            "address already in use",
        )


def test_a_tls_certificate_that_is_missing(make_agent: Callable[..., AgentProcess]) -> None:
    agent = make_agent()
    agent._write_config()
    text = agent.config_path.read_text().replace(
        'bind = "127.0.0.1"\n', 'bind = "127.0.0.1"\ntls_cert = "/nonexistent/cert.pem"\n'
    )
    agent.config_path.write_text(text)
    code, output = run_to_exit(agent, rewrite=False)
    assert_one_clear_line(code, output, "cannot be set up", "/nonexistent/cert.pem")


def test_a_unix_socket_in_a_missing_directory(make_agent: Callable[..., AgentProcess]) -> None:
    agent = make_agent()
    agent._write_config()
    text = agent.config_path.read_text().replace(
        'bind = "127.0.0.1"\n', 'bind = "127.0.0.1"\nendpoint = "unix:/nonexistent/api.sock"\n'
    )
    agent.config_path.write_text(text)
    code, output = run_to_exit(agent, rewrite=False)
    assert_one_clear_line(
        code, output, "cannot listen for the HTTP API on unix:/nonexistent/api.sock"
    )


# -- bad rows: reported, quarantined, the others served --------------------------------


def test_a_corrupt_row_is_quarantined_and_the_others_are_served(
    agent: AgentProcess, scripted_image: str
) -> None:
    path = make_store(agent, "alpha", "broken", "gamma", "mangled", image=scripted_image)
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("UPDATE servers SET extra = '{\"markCount\": ' WHERE server_id = 'broken'")
    db.execute(
        "UPDATE servers SET spec = '{\"server_id\": \"mangled\"' WHERE server_id = 'mangled'"
    )
    db.close()
    agent.start()
    assert get_servers(agent) == ["alpha", "gamma"]
    assert agent.health()["status"] == "healthy"
    log = agent.log_text()
    assert "Traceback" not in log
    for sid in ("broken", "mangled"):
        assert "stored server '{}' cannot be used".format(sid) in log
    # Kept verbatim for the operator, out of the agent's way: its id is free again.
    db = sqlite3.connect(str(path))
    quarantined = dict(db.execute("SELECT server_id, extra FROM quarantine").fetchall())
    db.close()
    assert quarantined["broken"] == '{"markCount": '
    created = agent.command_sync(
        {
            "action": "create_server",
            "serverId": "broken",
            "payload": {"image": scripted_image, "startup": "/usr/local/bin/gameserver",
                        "skipScripts": True},
        }
    )
    assert created["success"] is True, created
    # ...and a restart does not report the quarantined rows again.
    agent.stop()
    agent.start()
    assert get_servers(agent) == ["alpha", "broken", "gamma"]
    assert agent.log_text().count("stored server 'mangled' cannot be used") == 1


def test_a_store_from_an_older_agent_is_migrated(
    agent: AgentProcess, scripted_image: str
) -> None:
    agent.state_dir.mkdir(parents=True)
    db = sqlite3.connect(str(store_path(agent)))
    db.execute("CREATE TABLE servers (server_id TEXT PRIMARY KEY, spec TEXT NOT NULL)")
    db.execute("INSERT INTO servers VALUES ('old', ?)", (spec_json("old", scripted_image),))
    db.commit()
    db.close()
    agent.start()
    assert get_servers(agent) == ["old"]
    assert "added the column(s) desired, state" in agent.log_text()


# -- a full state disk ---------------------------------------------------------------


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue
    return filler


def create(agent: AgentProcess, server_id: str, image: str) -> dict[str, Any]:
    return agent.command_sync(
        {
            "action": "create_server",
            "serverId": server_id,
            "payload": {"image": image, "startup": "/usr/local/bin/gameserver",
                        "skipScripts": True},
        }
    )


def test_create_server_on_a_full_state_disk_is_a_clear_error_and_loses_nothing(
    make_agent: Callable[..., AgentProcess], tmpfs: Callable[[str], Path], scripted_image: str
) -> None:
    state = tmpfs("2m")
    agent = make_agent()
    agent.state_dir = state
    agent.start()
    assert create(agent, "before", scripted_image)["success"] is True
    filler = fill(state)
    answers = []
    for i in range(20):  # the WAL may still hold a few free frames
        answer = create(agent, "full-{}".format(i), scripted_image)
        answers.append(answer)
        if not answer["success"]:
            break
    refused = answers[-1]
    assert refused["success"] is False, answers
    assert refused["code"] == "INSUFFICIENT_RESOURCES"
    assert "state disk is full" in refused["error"]
    assert "sqlite" not in refused["error"].lower()
    stored_while_full = ["full-{}".format(n) for n in range(len(answers) - 1)]
    assert get_servers(agent) == sorted(["before", *stored_while_full])
    filler.unlink()
    assert create(agent, "after", scripted_image)["success"] is True
    agent.stop()
    assert "Traceback" not in agent.log_text()
    agent.start()
    assert get_servers(agent) == sorted(["after", "before", *stored_while_full])
