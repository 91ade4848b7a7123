"""
A private Docker engine for tests, benchmarks and the development run script.

``PrivateDockerd`` starts a ``dockerd`` with its own data root, exec root, Unix
socket and Linux bridge, so that it never disturbs another daemon on the
machine (see DOCKER-IN-TESTS.md: never ``--bridge=none``).  It is stopped by
its own pid after its containers and networks are removed, and everything it
created (the bridge, the bridges of its networks, the netns mount, the
directory) is cleaned up.

A run that ends without ``stop()`` must not leave its bridges behind for good:
each one holds a subnet, and Docker's address pools run out after a few dozen.
So every engine writes a record (bridge, address octet, directory, pids) into
the rig's run directory (``$CTRLAGENT_RIG_RUN_DIR``, else ``/run/ctrlagent-rig``
for root, else ``$XDG_RUNTIME_DIR/ctrlagent-rig``), and every ``start()`` first
removes the leftovers of the records whose processes are gone: a daemon that
crashed or was killed, or the daemon of a killed run once it has ended too.
Only what a record names is touched, and never anything a running ``dockerd``
on this machine uses (its bridge, its address pools, its directories), record
or not.  The rig never signals a process it did not start: a record is stale by
its dead pids only, so a daemon that outlives its killed run (it has its own
session) keeps running, and its leftovers wait until it is gone.

This module is synchronous on purpose: it is used from pytest session fixtures
and plain scripts, before any reactor runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from tests.rig.processes import (
    ProcessIdentity,
    spawn_logged,
    stop_process,
    wait_until_ready,
)

RUN_DIR_ENV = "CTRLAGENT_RIG_RUN_DIR"

# The second octet of the 10.x.0.0/16 ranges the rig picks from.
OCTETS = range(130, 251)

# Names the rig's bridges and Docker's network bridges have; nothing else
# (docker0, eth0, another tool's bridge) is ever deleted.
_RIG_BRIDGE = re.compile(r"cab[A-Za-z0-9_.-]{1,12}")
_NETWORK_BRIDGE = re.compile(r"br-[0-9a-f]{12}")

_RECORD_VERSION = 1
_CLI_TIMEOUT = 60.0


def engine_answers(socket_path: str, timeout: float = 2.0) -> bool:
    """True when a Docker engine answers ``GET /_ping`` on ``socket_path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = s.recv(256)
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]


# -- the host's links ---------------------------------------------------------


@dataclass(frozen=True)
class HostLink:
    """One network link of this host, as ``ip -d addr`` shows it."""

    name: str
    kind: str  # "bridge", "veth", ... ; "" for a plain device
    master: str  # the bridge it is enslaved to, "" when none
    ipv4: tuple[IPv4Interface, ...]


def host_links() -> list[HostLink]:
    """Every link of this network namespace with its kind, master and IPv4 addresses."""
    out = subprocess.run(
        ["ip", "-j", "-d", "addr", "show"],
        capture_output=True,
        text=True,
        timeout=_CLI_TIMEOUT,
        check=True,
    ).stdout
    links = []
    for entry in json.loads(out or "[]"):
        addrs = tuple(
            IPv4Interface("{}/{}".format(a["local"], a["prefixlen"]))
            for a in entry.get("addr_info", ())
            if a.get("family") == "inet"
        )
        links.append(
            HostLink(
                name=str(entry["ifname"]),
                kind=str((entry.get("linkinfo") or {}).get("info_kind", "")),
                master=str(entry.get("master", "")),
                ipv4=addrs,
            )
        )
    return links


def _host_ipv4_networks() -> list[IPv4Network]:
    """The networks of the host's IPv4 addresses and routes."""
    nets = [iface.network for link in host_links() for iface in link.ipv4]
    out = subprocess.run(
        ["ip", "-j", "-4", "route", "show"],
        capture_output=True,
        text=True,
        timeout=_CLI_TIMEOUT,
        check=False,
    ).stdout
    try:
        routes = json.loads(out or "[]")
    except ValueError:
        routes = []
    for route in routes:
        try:
            nets.append(IPv4Network(route.get("dst", ""), strict=False))
        except ValueError:
            continue  # "default" and the like
    return nets


def _octet_range(octet: int) -> IPv4Network:
    return IPv4Network("10.{}.0.0/16".format(octet))


def _pool_of(octet: int) -> IPv4Network:
    return IPv4Network("10.{}.0.0/17".format(octet))


def _free_octets(taken: Sequence[IPv4Network]) -> list[int]:
    return [o for o in OCTETS if not any(_octet_range(o).overlaps(net) for net in taken)]


def _pick_subnet_octet(claims: EngineClaims | None = None) -> int:
    taken = _host_ipv4_networks() + (claims.pools if claims is not None else [])
    free = _free_octets(taken)
    if not free:
        raise RuntimeError("no free 10.x.0.0/16 range for a private Docker bridge")
    return random.choice(free)


# -- what running engines use -------------------------------------------------


@dataclass
class EngineClaims:
    """
    What the running engines of this machine use, so that no cleanup touches
    it: their bridges, address pools and directories.  ``everything`` is set
    when an engine's configuration cannot be read (then nothing is touched).
    """

    bridges: set[str] = field(default_factory=set)
    pools: list[IPv4Network] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)
    everything: bool = False

    def add(self, other: EngineClaims) -> None:
        self.bridges |= other.bridges
        self.pools += other.pools
        self.roots += other.roots
        self.everything = self.everything or other.everything

    def holds_link(self, link: HostLink) -> bool:
        """True when a running engine may use ``link``."""
        if self.everything or link.name in self.bridges or link.master in self.bridges:
            return True
        return any(iface.ip in pool for iface in link.ipv4 for pool in self.pools)

    def holds_path(self, path: Path) -> bool:
        """True when ``path`` is, holds or lies inside a running engine's directory."""
        if self.everything:
            return True
        mine = _real(path)
        for root in self.roots:
            theirs = _real(root)
            if mine == theirs or mine in theirs.parents or theirs in mine.parents:
                return True
        return False


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


# Docker's built-in defaults, for a daemon whose configuration sets none.
_DOCKER_DEFAULT_POOLS = (IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"))


def _flag_values(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """Values of the command-line flags ``names`` (``--f v``, ``--f=v``, ``-f v``)."""
    values = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg[len(name) + 1 :])
    return values


def _networks(texts: Iterable[str]) -> list[IPv4Network]:
    nets = []
    for text in texts:
        try:
            nets.append(IPv4Network(text, strict=False))
        except ValueError:
            continue  # IPv6 or not an address: no IPv4 link can lie in it
    return nets


def dockerd_claims(argv: Sequence[str]) -> EngineClaims:
    """
    What the ``dockerd`` started with ``argv`` uses: its bridge, address pools
    and directories, from its flags and its configuration file.
    """
    claims = EngineClaims()
    config_files = _flag_values(argv, ("--config-file",))
    path = config_files[-1] if config_files else "/etc/docker/daemon.json"
    config: dict[str, Any] = {}
    try:
        loaded = json.loads(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ValueError("not an object")
        config = loaded
    except FileNotFoundError:
        if config_files:
            claims.everything = True
    except (OSError, ValueError):
        claims.everything = True

    bridges = _flag_values(argv, ("--bridge", "-b"))
    if isinstance(config.get("bridge"), str):
        bridges.append(config["bridge"])
    claims.bridges = set(bridges or ["docker0"])

    pool_texts = [
        part[len("base=") :]
        for value in _flag_values(argv, ("--default-address-pool",))
        for part in value.split(",")
        if part.startswith("base=")
    ]
    for pool in config.get("default-address-pools") or ():
        if isinstance(pool, dict) and isinstance(pool.get("base"), str):
            pool_texts.append(pool["base"])
    pool_texts += _flag_values(argv, ("--bip", "--fixed-cidr"))
    for key in ("bip", "fixed-cidr"):
        if isinstance(config.get(key), str):
            pool_texts.append(config[key])
    claims.pools = _networks(pool_texts)
    if not config.get("default-address-pools") and not _flag_values(
        argv, ("--default-address-pool",)
    ):
        claims.pools += _DOCKER_DEFAULT_POOLS

    roots = _flag_values(argv, ("--data-root", "--exec-root", "--pidfile", "-p"))
    roots += [
        h[len("unix://") :] for h in _flag_values(argv, ("--host", "-H")) if h.startswith("unix://")
    ]
    for key in ("data-root", "exec-root", "pidfile"):
        if isinstance(config.get(key), str):
            roots.append(config[key])
    if not _flag_values(argv, ("--data-root",)) and "data-root" not in config:
        roots.append("/var/lib/docker")
    if not _flag_values(argv, ("--exec-root",)) and "exec-root" not in config:
        roots.append("/var/run/docker")
    claims.roots = [Path(r) for r in roots if os.path.isabs(r)]
    if config_files:
        claims.roots.append(Path(path))
    return claims


def running_dockerd_claims(proc: Path = Path("/proc")) -> EngineClaims:
    """What every ``dockerd`` running on this machine uses, whoever started it."""
    claims = EngineClaims()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "dockerd":
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if ProcessIdentity.of(int(entry.name), proc) is None:
            continue  # a zombie holds nothing
        claims.add(dockerd_claims([a.decode(errors="replace") for a in argv if a]))
    return claims


# -- the rig's records --------------------------------------------------------


def rig_run_dir() -> Path:
    """Where the rig's engines keep their records (see the module docstring)."""
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/ctrlagent-rig")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "ctrlagent-rig"
    return Path(tempfile.gettempdir()) / "ctrlagent-rig-{}".format(os.geteuid())


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class EngineRecord:
    """
    What one private engine made, written before it makes anything: its
    bridge, the octet of its address range, its directory, the process that
    owns it and its ``dockerd`` once started.

    The record is live while its ``dockerd`` runs, or, before the daemon is
    started (and between a stop and a restart), while its owner runs.
    """

    bridge: str
    octet: int
    base: str
    made_dir: bool
    boot_id: str
    owner: ProcessIdentity
    dockerd: ProcessIdentity | None = None

    @property
    def pool(self) -> IPv4Network:
        return _pool_of(self.octet)

    def alive(self) -> bool:
        holder = self.dockerd if self.dockerd is not None else self.owner
        return self.boot_id == _boot_id() and holder.running()

    def claims(self) -> EngineClaims:
        return EngineClaims(
            bridges={self.bridge},
            pools=[_octet_range(self.octet)],
            roots=[Path(self.base)],
        )

    def to_json(self) -> str:
        def ident(p: ProcessIdentity | None) -> list[int] | None:
            return None if p is None else [p.pid, p.start]

        return json.dumps(
            {
                "version": _RECORD_VERSION,
                "bridge": self.bridge,
                "octet": self.octet,
                "base": self.base,
                "made_dir": self.made_dir,
                "boot_id": self.boot_id,
                "owner": ident(self.owner),
                "dockerd": ident(self.dockerd),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> EngineRecord:
        """Parse a record; ``ValueError`` for anything the rig did not write."""
        doc = json.loads(text)

        def ident(value: object) -> ProcessIdentity:
            if (
                isinstance(value, list)
                and len(value) == 2
                and all(type(v) is int and v > 0 for v in value)
            ):
                return ProcessIdentity(value[0], value[1])
            raise ValueError("bad process identity")

        if not isinstance(doc, dict) or doc.get("version") != _RECORD_VERSION:
            raise ValueError("not a record of this version")
        bridge, octet, base = doc.get("bridge"), doc.get("octet"), doc.get("base")
        if not isinstance(bridge, str) or not _RIG_BRIDGE.fullmatch(bridge):
            raise ValueError("not a rig bridge")
        if type(octet) is not int or octet not in OCTETS:
            raise ValueError("octet outside the rig's range")
        if not isinstance(base, str) or not os.path.isabs(base) or _real(Path(base)) == Path("/"):
            raise ValueError("bad directory")
        return cls(
            bridge=bridge,
            octet=octet,
            base=base,
            made_dir=doc.get("made_dir") is True,
            boot_id=str(doc.get("boot_id", "")),
            owner=ident(doc.get("owner")),
            dockerd=None if doc.get("dockerd") is None else ident(doc.get("dockerd")),
        )


class RigRegistry:
    """
    The directory of engine records, with a lock held while engines are
    claimed and leftovers removed, so that a cleanup never races an engine
    that is being set up.
    """

    def __init__(self, path: str | Path | None = None, lock_timeout: float = 120.0) -> None:
        self.path = Path(path) if path is not None else rig_run_dir()
        self.lock_timeout = lock_timeout

    def _ensure(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.path)
        # Records name directories to delete and links to remove: only a
        # directory nobody else can write to is trusted with that.
        if (
            not os.path.isdir(self.path)
            or os.path.islink(self.path)
            or st.st_uid != os.geteuid()
            or st.st_mode & 0o022
        ):
            raise RuntimeError(
                "{} is not a private directory of this user; set {} to one".format(
                    self.path, RUN_DIR_ENV
                )
            )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's lock (bounded wait)."""
        self._ensure()
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            "the rig's registry {} stayed locked".format(self.path)
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _file(self, bridge: str) -> Path:
        return self.path / (bridge + ".json")

    def records(self) -> list[tuple[Path, EngineRecord]]:
        """Every readable record; files the rig did not write are left alone."""
        found: list[tuple[Path, EngineRecord]] = []
        if not self.path.is_dir():
            return found
        for path in sorted(self.path.glob("*.json")):
            try:
                found.append((path, EngineRecord.from_json(path.read_text())))
            except (OSError, ValueError):
                continue
        return found

    def create(self, record: EngineRecord) -> None:
        """Write a new record; ``FileExistsError`` when one holds the bridge."""
        self._ensure()
        fd = os.open(self._file(record.bridge), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())

    def update(self, record: EngineRecord) -> None:
        """Replace a record atomically (a reader never sees half of it)."""
        self._ensure()
        tmp = self.path / ".{}.{}.tmp".format(record.bridge, os.getpid())
        tmp.write_text(record.to_json())
        os.replace(tmp, self._file(record.bridge))

    def remove(self, bridge: str) -> None:
        try:
            self._file(bridge).unlink()
        except FileNotFoundError:
            pass

    def claim(self, bridge: str, octet: int, base: Path, made_dir: bool) -> EngineRecord:
        """
        For a private engine starting, under the registry's lock (which the
        caller holds): clear dead engines' leftovers, keep ``octet`` unless its
        range is taken (then pick a free one), and write the engine's record.
        """
        self.clean_stale()
        claims = self.live_claims()
        if octet not in _free_octets(_host_ipv4_networks() + claims.pools):
            octet = _pick_subnet_octet(claims)
        base.mkdir(parents=True, exist_ok=True)
        owner = ProcessIdentity.of(os.getpid())
        assert owner is not None  # this very process runs
        record = EngineRecord(
            bridge=bridge,
            octet=octet,
            base=str(base),
            made_dir=made_dir,
            boot_id=_boot_id(),
            owner=owner,
        )
        try:
            self.create(record)
        except FileExistsError:
            raise RuntimeError(
                "bridge {} is recorded in {} by a running private engine, or by one "
                "whose leftovers could not be removed yet".format(bridge, self.path)
            ) from None
        return record

    def live_claims(self, exclude: str | None = None) -> EngineClaims:
        """What running engines use: live records and every running ``dockerd``."""
        claims = running_dockerd_claims()
        for _path, record in self.records():
            if record.bridge != exclude and record.alive():
                claims.add(record.claims())
        return claims

    def clean_stale(self) -> list[str]:
        """
        Remove the leftovers of every record whose processes are gone: call
        with the lock held.  Returns what was removed, for the caller's log.
        """
        removed: list[str] = []
        stale = [(path, r) for path, r in self.records() if not r.alive()]
        if not stale:
            return removed
        claims = self.live_claims()
        for path, record in stale:
            left = False
            if record.boot_id == _boot_id():
                removed += remove_engine_links(record.bridge, record.pool, claims)
                left = bool(engine_links(record.bridge, record.pool, claims))
            base = Path(record.base)
            if not claims.holds_path(base) and base.exists():
                unmount_under(base)
                _remove_engine_dir(base, record.made_dir)
                removed.append(str(base))
            if not left:
                path.unlink(missing_ok=True)
        return removed


def clean_stale_engines(run_dir: str | Path | None = None) -> list[str]:
    """
    Remove what earlier runs of the rig left behind when they died without
    ``stop()``; every ``PrivateDockerd.start()`` does this first.
    """
    registry = RigRegistry(run_dir)
    with registry.locked():
        return registry.clean_stale()


# -- removing what an engine made ---------------------------------------------


def _belongs_to_engine(
    link: HostLink, bridge: str | None, pool: IPv4Network, names: Iterable[str]
) -> bool:
    if link.kind != "bridge":
        return False
    if link.name == bridge or link.name in names:
        return True
    return bool(
        _NETWORK_BRIDGE.fullmatch(link.name)
        and link.ipv4
        and all(iface.ip in pool for iface in link.ipv4)
    )


def engine_links(
    bridge: str | None,
    pool: IPv4Network,
    claims: EngineClaims,
    names: Iterable[str] = (),
) -> list[str]:
    """
    An engine's links still on the host, in the order to delete them: the
    container ends enslaved to its bridges, the ``br-<id>`` bridges of its
    networks (by ``names``, or by an address in its ``pool``), its own
    ``bridge`` last.  Nothing a running engine holds (``claims``) is listed.
    """
    names = [n for n in names if _NETWORK_BRIDGE.fullmatch(n)]
    links = host_links()
    ours = {
        link.name
        for link in links
        if _belongs_to_engine(link, bridge, pool, names) and not claims.holds_link(link)
    }
    ends = sorted(
        link.name
        for link in links
        if link.kind == "veth" and link.master in ours and not claims.holds_link(link)
    )
    return ends + sorted(ours - {bridge or ""}) + ([bridge] if bridge in ours else [])


def remove_engine_links(
    bridge: str | None,
    pool: IPv4Network,
    claims: EngineClaims,
    names: Iterable[str] = (),
) -> list[str]:
    """Delete ``engine_links(...)`` once the engine's daemon is gone; returns the deleted names."""
    removed = []
    for name in engine_links(bridge, pool, claims, names):
        done = subprocess.run(
            ["ip", "link", "del", "dev", name],
            capture_output=True,
            timeout=_CLI_TIMEOUT,
            check=False,
        )
        if done.returncode == 0:
            removed.append(name)
    return removed


def _mount_points() -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) > 1:
            # Spaces and the like are octal escapes in /proc/mounts.
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1]))
    return points


def unmount_under(base: Path) -> None:
    """Lazily unmount everything mounted at or below ``base`` (deepest first)."""
    root = str(base).rstrip("/")
    inside = [p for p in _mount_points() if p == root or p.startswith(root + "/")]
    for point in sorted(set(inside), key=len, reverse=True):
        subprocess.run(
            ["umount", "-l", point], capture_output=True, timeout=_CLI_TIMEOUT, check=False
        )


# What an engine writes into a directory it was given (one it made is removed whole).
_ENGINE_ENTRIES = ("data", "exec", "daemon.json", "docker.sock", "dockerd.pid", "dockerd.log")


def _remove_engine_dir(base: Path, made_dir: bool) -> None:
    if made_dir:
        shutil.rmtree(base, ignore_errors=True)
        return
    for entry in _ENGINE_ENTRIES:
        path = base / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                pass
    try:
        base.rmdir()  # only when nothing else is left in it
    except OSError:
        pass


# -- the engine ---------------------------------------------------------------


class PrivateDockerd:
    """
    One private ``dockerd`` process and the resources it owns.

    ``start()`` removes the leftovers of dead engines, then returns once this
    one answers ``/_ping``; ``stop()`` removes its containers and networks,
    terminates it by pid and deletes what it created.  The object can be
    started again after ``kill_engine()`` or ``stop()`` with the same
    directory, which is how tests restart the daemon under a running agent.
    """

    def __init__(
        self,
        base_dir: str | None = None,
        name: str | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        self._made_dir = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="ctrlagent-dockerd-")).absolute()
        tag = name or "{:x}".format(random.getrandbits(28))
        self.bridge = ("cab" + tag)[:15]
        self.registry = RigRegistry(run_dir)
        self.octet = _pick_subnet_octet()
        self.process: subprocess.Popen[bytes] | None = None
        self._bridge_made = False
        self._record: EngineRecord | None = None
        self.log_path = self.base / "dockerd.log"

    @property
    def socket_path(self) -> str:
        return str(self.base / "docker.sock")

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` value for this engine."""
        return "unix://" + self.socket_path

    @property
    def bridge_subnet(self) -> str:
        return "10.{}.255.0/24".format(self.octet)

    @property
    def pool_base(self) -> str:
        """Address pool for networks created on this engine (no host overlap)."""
        return str(_pool_of(self.octet))

    def _make_bridge(self) -> None:
        if self._bridge_made:
            return
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        self._bridge_made = True
        subprocess.run(
            ["ip", "addr", "add", "10.{}.255.1/24".format(self.octet), "dev", self.bridge],
            check=True,
        )
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)

    def _claim(self) -> None:
        """
        Under the registry's lock: clear dead engines' leftovers, write this
        engine's record, make its bridge.  The record comes first, so a crash
        at any later point leaves nothing unrecorded.
        """
        with self.registry.locked():
            record = self.registry.claim(self.bridge, self.octet, self.base, self._made_dir)
            self.octet = record.octet
            self._record = record
            try:
                self._make_bridge()
            except BaseException:
                if self._bridge_made:
                    subprocess.run(["ip", "link", "del", "dev", self.bridge], check=False)
                    self._bridge_made = False
                self._drop_record()
                raise

    def _set_dockerd(self, pid: int | None) -> None:
        if self._record is None:
            return
        ident = ProcessIdentity.of(pid) if pid is not None else None
        self._record = replace(self._record, dockerd=ident)
        self.registry.update(self._record)

    def _drop_record(self) -> None:
        if self._record is not None:
            self.registry.remove(self._record.bridge)
            self._record = None

    def start(self, timeout: float = 30.0) -> PrivateDockerd:
        """
        Start the engine and wait until it answers.  A start that fails (or is
        interrupted) leaves nothing running: a first start removes all it made,
        a restart stops the daemon it spawned.
        """
        if self.process is not None and self.process.poll() is None:
            return self
        first = self._record is None
        if first:
            self._claim()
        try:
            self._spawn(timeout)
        except BaseException:
            if first:
                self.stop()
            else:
                self.kill_engine()
            raise
        return self

    def _spawn(self, timeout: float) -> None:
        for sub in ("data", "exec"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        config = {
            "default-address-pools": [{"base": self.pool_base, "size": 24}],
        }
        (self.base / "daemon.json").write_text(json.dumps(config))
        self.process = spawn_logged(
            [
                "dockerd",
                "--config-file",
                str(self.base / "daemon.json"),
                "--data-root",
                str(self.base / "data"),
                "--exec-root",
                str(self.base / "exec"),
                "--pidfile",
                str(self.base / "dockerd.pid"),
                "--host",
                self.host,
                "--bridge",
                self.bridge,
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=true",
            ],
            self.log_path,
            start_new_session=True,
        )
        self._set_dockerd(self.process.pid)
        wait_until_ready(
            self.process,
            lambda: engine_answers(self.socket_path, timeout=0.5),
            timeout,
            "dockerd",
            self.log_path,
        )

    def _docker(self, *args: str) -> subprocess.CompletedProcess[str] | None:
        env = dict(os.environ, DOCKER_HOST=self.host)
        try:
            return subprocess.run(
                ["docker", *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=_CLI_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None

    def remove_all_containers(self) -> None:
        """Force-remove every container of this engine (cheaper than stop timeouts)."""
        if not engine_answers(self.socket_path):
            return
        listed = self._docker("ps", "-aq")
        ids = listed.stdout.split() if listed is not None else []
        if ids:
            self._docker("rm", "-f", "-v", *ids)

    def remove_all_networks(self) -> list[str]:
        """
        Remove every user-defined network of this engine (the agent's own
        among them), whose bridges would otherwise outlive the daemon.  Call
        after the containers are gone.  Returns the ids of the networks found.
        """
        if not engine_answers(self.socket_path):
            return []
        listed = self._docker("network", "ls", "-q", "--no-trunc", "--filter", "type=custom")
        ids = listed.stdout.split() if listed is not None else []
        if ids:
            self._docker("network", "rm", *ids)
        return ids

    def kill_engine(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the daemon process only (containers stay, for restart tests)."""
        # Until it is started again the owner holds the record, so that no
        # other run's cleanup takes a daemon being restarted for a dead one.
        self._set_dockerd(None)
        stop_process(self.process, sig, timeout)
        self.process = None

    def stop(self) -> None:
        """Remove containers and networks, stop the daemon by pid, delete what it made."""
        network_ids: list[str] = []
        try:
            self.remove_all_containers()
            network_ids = self.remove_all_networks()
        finally:
            self.kill_engine()
            left: list[str] = []
            if self._record is not None:
                # A network the daemon could not remove keeps its bridge: the
                # sweep takes it by id, or by an address in this engine's pool.
                bridge = self.bridge if self._bridge_made else None
                pool = _pool_of(self.octet)
                names = ["br-" + i[:12] for i in network_ids]
                with self.registry.locked():
                    claims = self.registry.live_claims(exclude=self.bridge)
                    remove_engine_links(bridge, pool, claims, names)
                    left = engine_links(bridge, pool, claims, names)
                self._bridge_made = False
            unmount_under(self.base)
            shutil.rmtree(self.base, ignore_errors=True)
            if left:
                # The record stays, held by this process: the first start
                # after this process ends tries again.
                self._record = None
            else:
                self._drop_record()

    def __enter__(self) -> PrivateDockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
