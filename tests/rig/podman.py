"""
A private Podman service for tests: ``PrivatePodman``.

``podman system service`` serves Podman's Docker-compatible API (and its own
libpod API) on a Unix socket of its own.  Everything it uses is private to
one directory: its storage (``--root``/``--runroot``), its configuration
(``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``,
``CONTAINERS_REGISTRIES_CONF``), its CNI network configurations and its
event log.  Its default network is a bridge of the rig's own (``cab<tag>``,
in a ``10.x.0.0/16`` range no other engine of the machine uses), and the
networks created on it take their subnets from the same range.

What this machine needs (docs/RUNTIMES.md): the ``cgroupfs`` cgroup manager
(no systemd), the ``file`` events backend (no journald), the CNI network
backend (Debian's podman 4.3 ships CNI plugins, not netavark) without
masquerading or firewall rules, and containers that ask for explicit
rlimits (Podman's default of a million open files is above this host's hard
limit, and runc then refuses to start the container).

It is recorded and cleaned like ``PrivateDockerd``: a record in the rig's run
directory (``tests/rig/dockerd.py``) names its bridge, range and directory
before anything is made, so a run killed halfway leaves nothing for good;
``stop()`` removes its containers and networks, stops the service by its own
pid and deletes what it made.

Synchronous on purpose: used from pytest session fixtures.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from tests.rig.dockerd import (
    EngineRecord,
    RigRegistry,
    _pick_subnet_octet,
    _pool_of,
    engine_answers,
    engine_links,
    host_links,
    remove_engine_links,
    unmount_under,
)
from tests.rig.processes import ProcessIdentity, spawn_logged, stop_process, wait_until_ready

_CLI_TIMEOUT = 60.0
_CNI_BRIDGE = re.compile(r"cni-podman[0-9]{1,4}")


def _iptables(*args: str) -> subprocess.CompletedProcess[str] | None:
    if shutil.which("iptables") is None:
        return None
    try:
        return subprocess.run(["iptables", *args], capture_output=True, text=True,
                              timeout=_CLI_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return None


def _rules(table: str) -> list[list[str]]:
    """The rules of ``table`` as ``iptables -S`` prints them, split into arguments."""
    done = _iptables("-t", table, "-S")
    if done is None or done.returncode != 0:
        return []
    out = []
    for line in done.stdout.splitlines():
        try:
            out.append(shlex.split(line))
        except ValueError:
            continue
    return out


def cni_chains() -> set[str]:
    """The CNI plugins' chains (``CNI-...``) of the filter and nat tables now."""
    return {
        "{}:{}".format(table, rule[1])
        for table in ("filter", "nat")
        for rule in _rules(table)
        if len(rule) == 2 and rule[0] == "-N" and rule[1].startswith("CNI-")
    }


def remove_cni_rules(bridges: Iterable[str], chains_before: set[str]) -> None:
    """
    Remove what the CNI plugins left in iptables for ``bridges``: every rule
    naming one of them (or a ``cni-podman<n>`` bridge that is gone) as in- or
    out-interface, then the ``CNI-`` chains this
    run made (absent from ``chains_before``) once no rule in them names any
    interface or address, with the jumps to them.  The firewall plugin of
    Podman's networks leaves its isolation rules behind after the last
    container is gone.
    """
    names = set(bridges)
    # CNI names Podman's bridges cni-podman<n>: rules naming one that is no
    # longer a link are leftovers too (a network removed before stop()).
    present = {link.name for link in host_links()}
    for table in ("filter", "nat"):
        for rule in _rules(table):
            if rule[:1] != ["-A"] or len(rule) < 2:
                continue
            ifaces = {rule[i + 1] for i, a in enumerate(rule[:-1]) if a in ("-i", "-o")}
            dangling = {n for n in ifaces if _CNI_BRIDGE.fullmatch(n) and n not in present}
            if ifaces & names or dangling:
                _iptables("-t", table, "-D", *rule[1:])
        made = {c.split(":", 1)[1] for c in cni_chains() - chains_before
                if c.startswith(table + ":")}
        rules = _rules(table)
        busy = {
            rule[1] for rule in rules
            if rule[:1] == ["-A"] and len(rule) > 1 and rule[1] in made
            and any(a in ("-i", "-o", "-s", "-d") for a in rule)
        }
        drop = made - busy
        if not drop:
            continue
        for rule in rules:
            if rule[:1] == ["-A"] and len(rule) > 1 and rule[1] not in drop and any(
                rule[i] == "-j" and rule[i + 1] in drop for i in range(len(rule) - 1)
            ):
                _iptables("-t", table, "-D", *rule[1:])
        for chain in drop:
            _iptables("-t", table, "-F", chain)
        for chain in drop:
            _iptables("-t", table, "-X", chain)


def podman_available() -> bool:
    """True when the ``podman`` command is installed."""
    return shutil.which("podman") is not None


class PrivatePodman:
    """
    One private ``podman system service`` and what it owns.

    ``start()`` returns once the service answers ``/_ping``; ``stop()``
    removes its containers and networks, terminates it by pid and deletes
    its directory, bridges and mounts.  ``podman(...)`` runs the ``podman``
    command on the same storage (image loads, cleanup).
    """

    def __init__(self, base_dir: str | None = None, name: str | None = None,
                 run_dir: str | Path | None = None, storage_driver: str = "overlay") -> None:
        self._made_dir = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="ctrlagent-podman-")).absolute()
        tag = name or "{:x}".format(random.getrandbits(28))
        self.bridge = ("cab" + tag)[:15]
        self.registry = RigRegistry(run_dir)
        self.octet = _pick_subnet_octet()
        self.storage_driver = storage_driver
        self.process: subprocess.Popen[bytes] | None = None
        self._record: EngineRecord | None = None
        self.log_path = self.base / "podman.log"
        # The CNI chains that were there before this service: never removed.
        self._chains_before: set[str] | None = None

    @property
    def socket_path(self) -> str:
        return str(self.base / "podman.sock")

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` (or ``CONTAINER_HOST``) value of this service."""
        return "unix://" + self.socket_path

    @property
    def subnet(self) -> str:
        """The default network's subnet."""
        return "10.{}.255.0/24".format(self.octet)

    # -- configuration -------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment of every ``podman`` process on this storage."""
        return dict(
            os.environ,
            CONTAINERS_CONF=str(self.base / "containers.conf"),
            CONTAINERS_STORAGE_CONF=str(self.base / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self.base / "registries.conf"),
            TMPDIR=str(self.base / "tmp"),
        )

    def _global_flags(self) -> list[str]:
        return [
            "--root", str(self.base / "storage"),
            "--runroot", str(self.base / "run"),
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
        ]

    def _write_config(self) -> None:
        base = self.base
        for sub in ("storage", "run", "tmp", "cni"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        pool = _pool_of(self.octet)
        (base / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            "events_logfile_path = {events}\n"
            "tmp_dir = {tmp}\n"
            'runtime = "runc"\n'
            "[network]\n"
            'network_backend = "cni"\n'
            "network_config_dir = {cni}\n"
            'default_network = "{bridge}"\n'
            'default_subnet = "{subnet}"\n'
            'default_subnet_pools = [{{base = "{pool}", size = 24}}]\n'.format(
                events=json.dumps(str(base / "events.log")),
                tmp=json.dumps(str(base / "tmp")),
                cni=json.dumps(str(base / "cni")),
                bridge=self.bridge,
                subnet=self.subnet,
                pool=pool,
            )
        )
        (base / "storage.conf").write_text(
            "[storage]\n"
            'driver = "{}"\n'
            "graphroot = {}\n"
            "runroot = {}\n".format(
                self.storage_driver,
                json.dumps(str(base / "storage")),
                json.dumps(str(base / "run")),
            )
        )
        # No search registries: a short name is a local image or nothing
        # (the machine has no internet anyway).
        (base / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "permissive"\n'
        )
        # The default network: the rig's own bridge, no NAT, no firewall
        # rules, no port mapping (CNI's portmap and firewall plugins write
        # iptables rules; the tests talk to loopback and to their containers
        # only).  Networks created through the API get Podman's usual plugins;
        # stop() removes the rules those leave.
        gateway = "10.{}.255.1".format(self.octet)
        conflist = {
            "cniVersion": "0.4.0",
            "name": self.bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "ranges": [[{"subnet": self.subnet, "gateway": gateway}]],
                    },
                },
            ],
        }
        (base / "cni" / "{}.conflist".format(self.bridge)).write_text(json.dumps(conflist))

    # -- the record ----------------------------------------------------------

    def _claim(self) -> None:
        """Under the registry's lock: clean dead engines' leftovers, write this one's record."""
        with self.registry.locked():
            record = self.registry.claim(self.bridge, self.octet, self.base, self._made_dir)
            self.octet = record.octet
            self._record = record

    def _set_service(self, pid: int | None) -> None:
        if self._record is None:
            return
        ident = ProcessIdentity.of(pid) if pid is not None else None
        # The record's engine process is the service (the field is named
        # after dockerd; a record is alive while that process runs).
        self._record = replace(self._record, dockerd=ident)
        self.registry.update(self._record)

    # -- running -------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PrivatePodman:
        """Start the service and wait until it answers; a failed start leaves nothing."""
        if self.process is not None and self.process.poll() is None:
            return self
        if self._record is None:
            self._claim()
        if self._chains_before is None:
            self._chains_before = cni_chains()
        try:
            self._write_config()
            self.process = spawn_logged(
                ["podman", *self._global_flags(), "system", "service", "--time=0", self.host],
                self.log_path,
                start_new_session=True,
                env=self.env(),
                cwd=str(self.base),
            )
            self._set_service(self.process.pid)
            wait_until_ready(
                self.process,
                lambda: engine_answers(self.socket_path, timeout=0.5),
                timeout,
                "podman system service",
                self.log_path,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def podman(self, *args: str, input_bytes: bytes | None = None,
               check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman args`` on this service's storage and configuration."""
        proc = subprocess.run(
            ["podman", *self._global_flags(), *args],
            input=input_bytes,
            capture_output=True,
            env=self.env(),
            timeout=_CLI_TIMEOUT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError("podman {} failed: {}".format(
                " ".join(args[:2]), proc.stderr.decode(errors="replace")))
        return proc

    def load_from_docker(self, docker_host: str, image: str) -> str:
        """
        Copy ``image`` from the Docker engine at ``docker_host`` (``docker
        save | podman load``, under a second for the test images) unless this
        storage has it; the image's name as the tests use it.
        """
        if self.podman("image", "exists", image, check=False).returncode == 0:
            return image
        saved = subprocess.run(
            ["docker", "save", image],
            capture_output=True,
            env=dict(os.environ, DOCKER_HOST=docker_host),
            timeout=_CLI_TIMEOUT,
            check=False,
        )
        if saved.returncode != 0:
            raise RuntimeError("docker save {} failed: {}".format(
                image, saved.stderr.decode(errors="replace")))
        self.podman("load", input_bytes=saved.stdout)
        return image

    def import_minetest(self, tag: str = "ctrlagent-test/minetest:5") -> str:
        """
        The Minetest server image (``tests/rig/images.py``), imported from the
        cached rootfs tarball with the same settings as into Docker (about
        10 s) unless this storage has it.
        """
        from tests.rig.images import build_minetest_rootfs

        if self.podman("image", "exists", tag, check=False).returncode == 0:
            return tag
        self.podman(
            "import",
            "--change", "USER Debian-minetest",
            "--change", "WORKDIR /var/games/minetest-server",
            "--change", "ENV HOME=/var/games/minetest-server",
            "--change", 'CMD ["/usr/games/minetestserver", "--port", "30000"]',
            str(build_minetest_rootfs()),
            tag,
        )
        return tag

    def _network_bridges(self) -> list[str]:
        """The bridges of the networks created on this service (not the default one)."""
        names: list[str] = []
        for path in sorted((self.base / "cni").glob("*.conflist")):
            try:
                doc = json.loads(path.read_text())
                for plugin in doc.get("plugins") or ():
                    if plugin.get("type") == "bridge" and plugin.get("bridge"):
                        names.append(str(plugin["bridge"]))
            except (OSError, ValueError, AttributeError):
                continue
        return [n for n in names if n != self.bridge]

    def kill_service(self, sig: int = signal.SIGTERM) -> None:
        """
        Stop the service process only: its containers keep running under
        conmon, and ``start()`` serves them again (restart tests).
        """
        self._set_service(None)  # the owner holds the record meanwhile
        stop_process(self.process, sig, 30.0)
        self.process = None

    def remove_all(self) -> None:
        """Force-remove every container and every created network of this service."""
        if self.process is None or not engine_answers(self.socket_path):
            return
        try:
            self.podman("rm", "--all", "--force", "--time", "0", check=False)
            listed = self.podman("network", "ls", "--format", "{{.Name}}", check=False)
            for name in listed.stdout.decode(errors="replace").split():
                if name not in (self.bridge, "podman"):
                    self.podman("network", "rm", "--force", name, check=False)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        """Remove containers and networks, stop the service by pid, delete what it made."""
        bridges = self._network_bridges()
        try:
            self.remove_all()
        finally:
            stop_process(self.process, signal.SIGTERM, 30.0)
            self.process = None
            self._set_service(None)
            left: list[str] = []
            if self._record is not None:
                pool = _pool_of(self.octet)
                with self.registry.locked():
                    claims = self.registry.live_claims(exclude=self.bridge)
                    remove_engine_links(self.bridge, pool, claims)
                    # CNI names its bridges cni-podman<n>: only those of this
                    # service's networks, in its range, are deleted.
                    for link in host_links():
                        if (link.name in bridges and link.kind == "bridge"
                                and all(i.ip in pool for i in link.ipv4)
                                and not claims.holds_link(link)):
                            subprocess.run(["ip", "link", "del", "dev", link.name],
                                           capture_output=True, timeout=_CLI_TIMEOUT,
                                           check=False)
                    left = engine_links(self.bridge, pool, claims)
                    remove_cni_rules([self.bridge, *bridges], self._chains_before or set())
            unmount_under(self.base)
            if self._made_dir:
                shutil.rmtree(self.base, ignore_errors=True)
            if left:
                self._record = None  # kept, for the next start's sweep
            elif self._record is not None:
                self.registry.remove(self._record.bridge)
                self._record = None

    def __enter__(self) -> PrivatePodman:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
