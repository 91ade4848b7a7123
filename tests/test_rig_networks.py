"""
The rig's private engines leave the host's network links as they found them:
after ``stop()``, after a crash (at the next start), and after
``scripts/run-agent`` is stopped with Ctrl-C.  And no cleanup ever touches an
engine that still runs.

The engine tests start their own private engines (never the shared one): they
test starting and stopping.  Links are counted with ``ip -o link``; links that
other runs on this machine add meanwhile (their containers' ends, their
engines' bridges) are told apart by their addresses: outside every range the
engines of the test use, or in one that another engine took after the test's
engine let it go.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from tests.conftest import Engine
from tests.rig.dockerd import (
    EngineRecord,
    PrivateDockerd,
    RigRegistry,
    clean_stale_engines,
    dockerd_claims,
    engine_answers,
    host_links,
    running_dockerd_claims,
)
from tests.rig.images import build_scripted_image
from tests.rig.processes import ProcessIdentity

ROOT = Path(__file__).resolve().parent.parent
AGENT_LABEL = "ctrl-alt-play.managed=true"


# -- counting links -----------------------------------------------------------


def link_names() -> set[str]:
    """The names of the host's links, as ``ip -o link`` lists them."""
    out = subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    # "7: name: <...>" or "8: veth1@if7: <...>" (the peer after '@').
    return {line.split(": ", 2)[1].split("@", 1)[0] for line in out.splitlines() if line}


def _link_addresses() -> dict[str, tuple[list[IPv4Interface], str]]:
    out = subprocess.run(
        ["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return {
        e["ifname"]: (
            [
                IPv4Interface("{}/{}".format(a["local"], a["prefixlen"]))
                for a in e.get("addr_info", ())
                if a.get("family") == "inet"
            ],
            e.get("master", ""),
        )
        for e in json.loads(out)
    }


def _ranges(octets: Iterable[int]) -> list[IPv4Network]:
    return [IPv4Network("10.{}.0.0/16".format(o)) for o in octets]


def links_in_ranges(octets: Iterable[int]) -> set[str]:
    """The links holding an address in the ``10.<octet>.0.0/16`` ranges: an engine's bridges."""
    ranges = _ranges(octets)
    return {
        name
        for name, (addrs, _master) in _link_addresses().items()
        if any(a.ip in r for a in addrs for r in ranges)
    }


def links_left(
    before: set[str], octets: Iterable[int], seen: set[str], settle: float = 5.0
) -> set[str]:
    """
    Links present now that were not ``before``, leaving out those of other
    runs: a link holding an address outside the ``10.<octet>.0.0/16`` ranges of
    the test's engines, or inside one but never ``seen`` while the test's
    engine held it (another engine took the range after it), or enslaved to
    such a link.  Asked again for a few seconds, since other runs' container
    links come and go.
    """
    ranges = _ranges(octets)

    def foreign(name: str, details: dict[str, tuple[list[IPv4Interface], str]]) -> bool:
        addrs, master = details.get(name, ([], ""))
        if addrs and (name not in seen or not any(a.ip in r for a in addrs for r in ranges)):
            return True
        return bool(master) and foreign(master, details)

    deadline = time.monotonic() + settle
    while True:
        new = link_names() - before
        details = _link_addresses()
        left = {name for name in new if not foreign(name, details)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def assert_links_as_before(before: set[str], octets: Iterable[int], seen: set[str]) -> None:
    left = links_left(before, octets, seen)
    after = link_names()
    assert left == set(), "links left behind: {} (before: {} links, now: {})".format(
        sorted(left), len(before), len(after)
    )


# -- driving an engine --------------------------------------------------------


def docker(host: str, *args: str) -> str:
    done = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, DOCKER_HOST=host),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, "docker {}: {}".format(" ".join(args), done.stderr)
    return done.stdout.strip()


def agent_network(host: str, name: str = "ctrl-alt-play") -> str:
    """Create a network as the agent does (a labelled bridge); return its bridge's name."""
    network_id = docker(host, "network", "create", "--label", AGENT_LABEL, name)
    return "br-" + network_id[:12]


def server_on(host: str, network: str) -> str:
    """Run a container attached to ``network``, as a game server would be."""
    image = build_scripted_image(host)
    return docker(host, "run", "-d", "--network", network, image, "sleep", "300")


def mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [line for line in lines if line.split(" ")[1].startswith(prefix)]


@pytest.fixture
def engines() -> Iterator[list[PrivateDockerd]]:
    """Private engines a test starts; whatever it did not stop is stopped after it."""
    made: list[PrivateDockerd] = []
    yield made
    for engine in made:
        if engine.process is not None:
            engine.stop()


def started(engines: list[PrivateDockerd]) -> PrivateDockerd:
    engine = PrivateDockerd()
    engines.append(engine)
    return engine.start()


# -- stop ---------------------------------------------------------------------


@pytest.mark.docker
def test_stopped_engine_leaves_the_hosts_links_as_they_were_before_it_started(
    engines: list[PrivateDockerd],
) -> None:
    clean_stale_engines()  # so that the start below has nothing older to remove
    before = link_names()
    engine = started(engines)
    network_bridge = agent_network(engine.host)
    server_on(engine.host, "ctrl-alt-play")
    during = _link_addresses()
    assert engine.bridge in during and network_bridge in during
    assert any(master == network_bridge for _, master in during.values())  # the server's end
    seen = links_in_ranges([engine.octet])

    engine.stop()

    assert_links_as_before(before, [engine.octet], seen)
    assert not engine.base.exists()


@pytest.mark.docker
def test_networks_are_removed_through_the_engine_before_it_stops(
    engines: list[PrivateDockerd],
) -> None:
    engine = started(engines)
    bridges = {agent_network(engine.host), agent_network(engine.host, "other")}
    docker(engine.host, "network", "create", "--internal", "inner")
    server_on(engine.host, "ctrl-alt-play")

    engine.remove_all_containers()
    found = engine.remove_all_networks()

    assert len(found) == 3
    assert docker(engine.host, "network", "ls", "-q", "--filter", "type=custom") == ""
    assert bridges & link_names() == set()  # gone while the daemon still runs
    engine.stop()


@pytest.mark.docker
def test_a_network_the_engine_did_not_remove_loses_its_bridge_once_the_engine_stops(
    engines: list[PrivateDockerd], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = link_names()
    engine = started(engines)
    network_bridge = agent_network(engine.host)
    seen = links_in_ranges([engine.octet])
    # As when the daemon no longer answers at stop: its networks stay in it.
    monkeypatch.setattr(engine, "remove_all_networks", lambda: [])

    engine.stop()

    assert network_bridge not in link_names()
    assert_links_as_before(before, [engine.octet], seen)


# -- a crashed run ------------------------------------------------------------


def _veth_on(bridge: str) -> str:
    """A veth pair with one end on ``bridge``, as a container's network leaves it."""
    name = "vethrig" + uuid.uuid4().hex[:6]
    subprocess.run(
        ["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True
    )
    subprocess.run(["ip", "link", "set", name, "master", bridge], check=True)
    return name


@pytest.mark.docker
def test_next_start_removes_what_a_crashed_engine_left_and_spares_running_engines(
    engines: list[PrivateDockerd],
) -> None:
    clean_stale_engines()
    before = link_names()
    running = started(engines)
    running_bridge = agent_network(running.host)

    crashed = started(engines)
    crashed_bridge = agent_network(crashed.host)
    end = _veth_on(crashed_bridge)
    seen = links_in_ranges([crashed.octet])
    assert crashed.process is not None
    os.kill(crashed.process.pid, signal.SIGKILL)  # by its own pid
    crashed.process.wait(10)
    crashed.process = None  # abandoned: never stopped
    leftovers = {crashed.bridge, crashed_bridge, end, end + "p"}
    assert leftovers <= link_names()
    assert mounts_under(crashed.base)
    record = crashed.registry.path / (crashed.bridge + ".json")
    assert record.exists()

    following = started(engines)
    seen |= links_in_ranges([running.octet, following.octet])

    assert leftovers & link_names() == set()
    assert not crashed.base.exists() and mounts_under(crashed.base) == []
    assert not record.exists()
    # The engine that runs keeps everything, and works.
    assert {running.bridge, running_bridge} <= link_names()
    assert engine_answers(running.socket_path)
    server_on(running.host, "ctrl-alt-play")
    assert (running.registry.path / (running.bridge + ".json")).exists()

    following.stop()
    running.stop()
    assert_links_as_before(before, [running.octet, crashed.octet, following.octet], seen)


@pytest.mark.docker
def test_a_stale_record_naming_a_running_engines_bridge_and_directory_never_touches_it(
    engines: list[PrivateDockerd], tmp_path: Path
) -> None:
    """
    The running engine is known to this registry by its ``dockerd`` process
    alone (no record of its own there), as an engine started by older code is.
    """
    engine = started(engines)
    network_bridge = agent_network(engine.host)
    me = ProcessIdentity.of(os.getpid())
    assert me is not None
    reused = ProcessIdentity(me.pid, me.start + 1)  # the pid lives, but as another process
    registry = RigRegistry(tmp_path / "run")
    registry.create(
        EngineRecord(
            bridge=engine.bridge,
            octet=engine.octet,
            base=str(engine.base),
            made_dir=True,
            boot_id=Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            owner=reused,
            dockerd=reused,
        )
    )

    with registry.locked():
        removed = registry.clean_stale()

    assert removed == []
    assert {engine.bridge, network_bridge} <= link_names()
    assert (engine.base / "data").is_dir() and engine_answers(engine.socket_path)
    assert registry.records() == []  # the stale record itself is dropped
    engine.stop()


@pytest.mark.docker
def test_the_suites_engine_is_known_as_running_to_the_cleanup(docker_engine: Engine) -> None:
    """The engine the other tests share (DOCKER_HOST's, or the session's): held as running."""
    name_of = '{{index .Options "com.docker.network.bridge.name"}}'
    bridge = docker(docker_engine.host, "network", "inspect", "bridge", "-f", name_of)
    claims = running_dockerd_claims()
    assert bridge in claims.bridges
    assert claims.holds_path(Path(docker_engine.socket_path))
    held = [link for link in host_links() if link.name == bridge]
    assert held and claims.holds_link(held[0])


# -- scripts/run-agent --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(1)
        assert proc.poll() is None, log.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError("no {!r} within {}s:\n{}".format(pattern, timeout, log.read_text()))


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen("http://127.0.0.1:{}/health".format(port), timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.docker
@pytest.mark.e2e
def test_run_agent_stopped_with_ctrl_c_leaves_the_hosts_links_as_they_were(
    tmp_path: Path,
) -> None:
    # A copy of the checkout, so that the run's .dev/ stays out of the tree,
    # run with this test's Python environment instead of a fresh ./.venv.
    tree = tmp_path / "tree"
    for sub in ("scripts", "ctrlagent", "twisted", "tests/rig"):
        shutil.copytree(
            ROOT / sub, tree / sub, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache")
        )
    (tree / "tests" / "__init__.py").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("PANEL_URL", "PYTHONPATH")}
    env.update(
        CTRLAGENT_VENV=sys.prefix,
        DOCKER_HOST="unix://{}".format(tmp_path / "no-engine.sock"),
    )
    port = _free_port()
    log = tmp_path / "run-agent.log"
    clean_stale_engines()
    before = link_names()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(tree / "scripts" / "run-agent"), "--port", str(port), "--bind", "127.0.0.1"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
    try:
        host = _wait_for(r"private engine at (unix://\S+)", log, proc, 60)
        deadline = time.monotonic() + 60
        while not _health(port):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        network_bridge = agent_network(host)
        server_on(host, "ctrl-alt-play")
        subnet = docker(
            host, "network", "inspect", "ctrl-alt-play", "-f", "{{(index .IPAM.Config 0).Subnet}}"
        )
        octet = int(subnet.split(".")[1])
        assert network_bridge in link_names()
        seen = links_in_ranges([octet])

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the runner stops the agent and its engine
            proc.wait(90)

    text = log.read_text()
    assert code == 0, text
    assert "stopping the private engine" in text
    assert "Traceback" not in text and "#critical]" not in text, text
    assert_links_as_before(before, [octet], seen)
    assert not Path(host[len("unix://") :]).parent.exists()


# -- records and claims, without an engine ------------------------------------


def test_a_process_identity_is_not_running_once_reaped_or_when_its_pid_was_reused() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    ident = ProcessIdentity.of(proc.pid)
    assert ident is not None and ident.running()
    assert not ProcessIdentity(proc.pid, ident.start + 1).running()
    proc.kill()
    proc.wait()
    assert not ident.running() and ProcessIdentity.of(proc.pid) is None


def test_dockerd_claims_come_from_its_flags_and_its_configuration(tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    pools = [{"base": "10.200.0.0/17", "size": 24}]
    config.write_text(json.dumps({"default-address-pools": pools}))
    claims = dockerd_claims(
        [
            "dockerd",
            "--config-file",
            str(config),
            "--data-root=/srv/d/data",
            "--bridge",
            "cabxyz",
            "--host",
            "unix:///srv/d/docker.sock",
        ]
    )
    assert claims.bridges == {"cabxyz"}
    assert claims.pools == [IPv4Network("10.200.0.0/17")]
    assert claims.holds_path(Path("/srv/d")) and claims.holds_path(Path("/srv/d/data/x"))
    assert not claims.holds_path(Path("/srv/other"))

    plain = dockerd_claims(["dockerd", "--config-file", str(tmp_path / "missing.json")])
    assert plain.everything  # an engine we cannot read holds everything

    config.write_text("{}")
    default = dockerd_claims(["dockerd", "--config-file", str(config)])
    assert default.bridges == {"docker0"}
    assert IPv4Network("172.17.0.0/16").subnet_of(default.pools[0])
    assert default.holds_path(Path("/var/lib/docker"))


@pytest.mark.parametrize(
    "change",
    [
        {"bridge": "docker0"},
        {"bridge": "eth0"},
        {"octet": 17},
        {"base": "/"},
        {"base": "relative/dir"},
        {"version": 99},
        {"owner": [0, 1]},
    ],
)
def test_a_record_the_rig_did_not_write_is_never_acted_upon(
    tmp_path: Path, change: dict[str, object]
) -> None:
    doc = {
        "version": 1,
        "bridge": "cab0123abc",
        "octet": 200,
        "base": str(tmp_path / "engine"),
        "made_dir": True,
        "boot_id": "",
        "owner": [1, 1],
        "dockerd": None,
    }
    EngineRecord.from_json(json.dumps(doc))  # the unchanged record is one
    doc.update(change)
    with pytest.raises(ValueError):
        EngineRecord.from_json(json.dumps(doc))
    registry = RigRegistry(tmp_path / "run")
    registry.path.mkdir(mode=0o700)
    (registry.path / "x.json").write_text(json.dumps(doc))
    with registry.locked():
        assert registry.clean_stale() == []
    assert (registry.path / "x.json").exists()


def test_a_registry_others_can_write_to_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    with pytest.raises(RuntimeError, match="not a private directory"):
        with RigRegistry(run).locked():
            pass
