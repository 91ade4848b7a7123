"""
A game server's containers, in the engine seam's neutral terms.

``server_container`` and ``install_container`` turn a ``ServerSpec`` into the
``ContainerSpec`` of the server's long-running container and of its one-shot
install container; ``limits`` gives the resource limits of both (also what a
live update applies).  The identity labels every container of the agent
carries are defined here.  A runtime turns a ``ContainerSpec`` into its own
request (``engine/docker/bodies.py`` for Docker).

Pure: no reactor, no I/O, no engine field names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ctrlagent.config import ServersConfig, parse_ulimits
from ctrlagent.engine.interface import (
    Confinement,
    ContainerSpec,
    Mount,
    PortBinding,
    ResourceLimits,
)
from ctrlagent.errors import InvalidInput
from ctrlagent.servers import spec as specs
from ctrlagent.servers.spec import CONTAINER_PREFIX

__all__ = [
    "MANAGED_LABEL",
    "SERVER_ID_LABEL",
    "ROLE_LABEL",
    "SPEC_HASH_LABEL",
    "CONTAINER_PREFIX",
    "DATA_MOUNT",
    "INSTALL_MOUNT",
    "SCRIPT_MOUNT",
    "labels",
    "limits",
    "DEFAULT_ULIMITS",
    "parse_ulimits",
    "ulimits",
    "server_container",
    "install_container",
    "install_user",
]

MANAGED_LABEL = "ctrl-alt-play.managed"
SERVER_ID_LABEL = "ctrl-alt-play.server-id"
ROLE_LABEL = "ctrl-alt-play.role"
SPEC_HASH_LABEL = "ctrl-alt-play.spec-hash"
# Where the data directory is seen: by the server, and by its install script
# (Pterodactyl's convention, with the script beside it).
DATA_MOUNT = "/home/container"
INSTALL_MOUNT = "/mnt/server"
SCRIPT_MOUNT = "/mnt/install"

MB = 1024 * 1024

# Capabilities a game server never needs (Docker's default set minus these
# is what it keeps).
SERVER_CAP_DROP = (
    "setpcap", "mknod", "audit_write", "net_raw", "dac_override", "fowner",
    "fsetid", "net_bind_service", "sys_chroot", "setfcap",
)
# The engine keeps this much of a server's output for the console's replay
# after an agent restart; an install's output is copied to its own log.
SERVER_OUTPUT = (20 * MB, 2)
INSTALL_OUTPUT = (10 * MB, 1)

# Process limits of every container (``servers.ulimits``, parsed by
# ``config.parse_ulimits``), name to (soft, hard).  Explicit, not the
# engine's: Podman asks for a million open files by default, which a host
# whose own hard limit is lower refuses at start ("error setting rlimits ...
# operation not permitted"), and no game server needs that many.  ``nproc``
# is left out on purpose: it counts every process of the container's uid on
# the whole host (all servers running as uid 1000 share it), so a
# per-container cap is the PID limit (``servers.pids_limit``).
DEFAULT_ULIMITS: Mapping[str, tuple[int, int]] = parse_ulimits(ServersConfig().ulimits)


def labels(spec: specs.ServerSpec, role: str = "server") -> dict[str, str]:
    """The labels every container of this server carries."""
    return {
        MANAGED_LABEL: "true",
        SERVER_ID_LABEL: spec.server_id,
        ROLE_LABEL: role,
        SPEC_HASH_LABEL: spec.digest(),
    }


def _within(name: str, value: float, low: float, high: float) -> None:
    """
    Refuse a limit out of bounds where it is turned into engine units.

    Parsed specs never are; this keeps a spec built any other way from
    overflowing (``int(inf)``) in the background, where nobody is answered.
    """
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise InvalidInput("{} = {!r} is out of bounds".format(name, value), field=name)


def limits(spec: specs.ServerSpec, servers: ServersConfig) -> ResourceLimits:
    """
    The server's limits in bytes and percent (its install container's too).

    A PID limit of 0 or less (a stored definition from before it meant "the
    default") gets ``servers.pids_limit``; only the operator lifts it (0).
    """
    ask = spec.limits
    _within("limits.memory", ask.memory_mb, 0, specs.MAX_MEMORY_MB)
    _within("limits.swap", ask.swap_mb, -1, specs.MAX_MEMORY_MB)
    _within("limits.cpu", ask.cpu_percent, 0, specs.MAX_CPU_PERCENT)
    memory = swap = 0
    if ask.memory_mb > 0:
        memory = ask.memory_mb * MB
        swap = -1 if ask.swap_mb < 0 else memory + ask.swap_mb * MB
    pids = ask.pids if ask.pids > 0 else servers.pids_limit
    return ResourceLimits(
        memory_bytes=memory,
        memory_swap_bytes=swap,
        cpu_percent=ask.cpu_percent,
        io_weight=ask.io_weight,
        pids=min(pids, specs.MAX_PIDS) if pids > 0 else 0,
    )


def ulimits(servers: ServersConfig) -> dict[str, tuple[int, int]]:
    """
    The process limits of every container (``servers.ulimits``);
    ``ConfigInvalid`` naming the entry when the setting is not valid.
    """
    return parse_ulimits(servers.ulimits)


def _tmpfs(servers: ServersConfig) -> dict[str, str]:
    return {"/tmp": "rw,exec,nosuid,nodev,size={}m".format(servers.tmpfs_size_mb)}


def _env(env: dict[str, str]) -> dict[str, str]:
    return dict(sorted(env.items()))


def server_container(
    spec: specs.ServerSpec, data_path: str, servers: ServersConfig, network: str
) -> ContainerSpec:
    """
    The server's own container: the data directory at ``/home/container``,
    the filled startup line (run directly, or under ``/bin/sh -c`` when it
    needs a shell), stdin open for the console, its allocations published.
    """
    env = specs.server_environment(spec)
    line = specs.fill_startup(spec)
    env["STARTUP"] = line
    command = specs.startup_command(line)
    return ContainerSpec(
        name=spec.container_name,
        image=spec.image,
        labels=labels(spec),
        env=_env(env),
        command=tuple(command) if command is not None else None,
        user=spec.user or None,
        working_dir=DATA_MOUNT,
        mounts=(Mount(data_path, DATA_MOUNT),),
        ports=tuple(PortBinding(p.internal, p.external, p.ip) for p in spec.ports),
        network=network,
        limits=limits(spec, servers),
        confinement=Confinement(cap_drop=SERVER_CAP_DROP),
        tmpfs=_tmpfs(servers),
        interactive=True,
        output_max_bytes=SERVER_OUTPUT[0],
        output_max_files=SERVER_OUTPUT[1],
        ulimits=ulimits(servers),
    )


def install_user(spec: specs.ServerSpec, servers: ServersConfig) -> str:
    """
    Who runs the install script (``servers.install_user``).

    ``"server"`` runs the script as the server's own user (the image's user
    becomes the agent's container uid); anything else is a ``uid:gid``.
    """
    if servers.install_user == "server":
        pair = specs.uid_gid(spec) or (servers.container_uid, servers.container_gid)
        return "{}:{}".format(*pair)
    return servers.install_user


def install_container(
    spec: specs.ServerSpec,
    data_path: str,
    script_dir: str,
    servers: ServersConfig,
    network: str,
) -> ContainerSpec:
    """
    The one-shot install container.

    Pterodactyl's convention: the data directory at ``/mnt/server``, the script
    at ``/mnt/install/install.sh`` (read-only), the server's environment.  It
    joins the servers' network, so an operator's rules for it cover installs too.

    It runs as ``servers.install_user`` (root inside the container by
    default: egg scripts run ``apt-get``, ``curl``, ``unzip`` and ``chown``
    as root) but confined: every capability is dropped except
    ``servers.install_capabilities`` (see ``ServersConfig``; never ``MKNOD``,
    so no device node can be made), ``no-new-privileges`` (no setuid binary
    gains anything), no devices, ``/tmp`` without setuid or devices, the
    game's own memory/CPU/IO/PID limits and a bounded engine log.  Whatever
    the script leaves behind is cleaned by the agent afterwards (setuid and
    setgid bits, special files), whatever its exit code.
    """
    script = spec.install
    if script is None:
        raise InvalidInput("server {} has no install script".format(spec.server_id),
                           field="install")
    return ContainerSpec(
        name=spec.container_name + "-install",
        image=script.image or spec.image,
        labels=labels(spec, role="install"),
        env=_env(specs.server_environment(spec)),
        command=(SCRIPT_MOUNT + "/install.sh",),
        entrypoint=(script.entrypoint,),
        user=install_user(spec, servers),
        working_dir=INSTALL_MOUNT,
        mounts=(Mount(data_path, INSTALL_MOUNT), Mount(script_dir, SCRIPT_MOUNT, read_only=True)),
        network=network,
        limits=limits(spec, servers),
        confinement=Confinement(
            cap_drop=("ALL",),
            cap_add=tuple(servers.install_capabilities),
            no_devices=True,
        ),
        tmpfs=_tmpfs(servers),
        interactive=False,
        output_max_bytes=INSTALL_OUTPUT[0],
        output_max_files=INSTALL_OUTPUT[1],
        ulimits=ulimits(servers),
    )
