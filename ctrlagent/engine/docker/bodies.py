"""
The Docker Engine API bodies of a neutral ``ContainerSpec``.

``create_body`` is the ``POST /containers/create`` body (the name goes in the
query), ``resources_body`` the resource fields of its ``HostConfig``, which is
also what ``POST /containers/{id}/update`` takes.

Pure: no reactor, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctrlagent.engine.interface import ContainerSpec, PortBinding, ResourceLimits

__all__ = [
    "create_body",
    "resources_body",
    "blkio_weight",
    "nano_cpus",
    "port_bindings",
    "ulimits_body",
]

MB = 1024 * 1024


def blkio_weight(io_weight: int) -> int:
    """The block I/O weight clamped to Docker's 10..1000."""
    return max(10, min(1000, io_weight))


def nano_cpus(cpu_percent: float) -> int:
    """Docker ``NanoCpus`` for a percentage of one core (0 = unlimited)."""
    return int(round(cpu_percent / 100.0 * 1e9))


def resources_body(limits: ResourceLimits) -> dict[str, Any]:
    """The ``HostConfig`` resource fields (also the body of a live update)."""
    out: dict[str, Any] = {}
    if limits.memory_bytes > 0:
        out["Memory"] = limits.memory_bytes
        out["MemorySwap"] = limits.memory_swap_bytes
    out["NanoCpus"] = nano_cpus(limits.cpu_percent)
    out["BlkioWeight"] = blkio_weight(limits.io_weight)
    if limits.pids > 0:
        out["PidsLimit"] = limits.pids
    return out


def port_bindings(
    ports: tuple[PortBinding, ...],
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, str]]]]:
    """``ExposedPorts`` and ``PortBindings`` of ``ports``."""
    exposed: dict[str, dict[str, Any]] = {}
    bindings: dict[str, list[dict[str, str]]] = {}
    for port in ports:
        for protocol in port.protocols:
            key = "{}/{}".format(port.container_port, protocol)
            exposed[key] = {}
            bindings.setdefault(key, []).append(
                {"HostIp": port.host_ip, "HostPort": str(port.host_port)}
            )
    return exposed, bindings


def ulimits_body(ulimits: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """``HostConfig.Ulimits`` of ``ulimits`` (name to soft/hard), by name."""
    return [
        {"Name": name, "Soft": soft, "Hard": hard}
        for name, (soft, hard) in sorted(ulimits.items())
    ]


def _size(value: int) -> str:
    if value % MB == 0:
        return "{}m".format(value // MB)
    return str(value)


def create_body(spec: ContainerSpec) -> dict[str, Any]:
    """
    The ``POST /containers/create`` body of ``spec``.

    An interactive container (a server's console) keeps stdin open across
    attaches, runs without an init process (the game is PID 1 and gets stop
    signals itself) and always publishes its ports, even none.  A container
    with ``no_devices`` spells its whole confinement out: not privileged,
    only ``cap_add`` kept, no device.
    """
    confinement = spec.confinement
    host: dict[str, Any] = {
        **resources_body(spec.limits),
        "Binds": [
            "{}:{}{}".format(m.source, m.target, ":ro" if m.read_only else "")
            for m in spec.mounts
        ],
        "NetworkMode": spec.network,
        "Tmpfs": dict(spec.tmpfs),
        # The agent owns restarts (crash policy and loop guard), not Docker.
        "RestartPolicy": {"Name": "no"},
    }
    if spec.output_max_bytes > 0:
        # json-file keeps the output in Docker's logs, which is where lines
        # printed while the agent was down are recovered from.
        host["LogConfig"] = {
            "Type": "json-file",
            "Config": {
                "max-size": _size(spec.output_max_bytes),
                "max-file": str(spec.output_max_files),
            },
        }
    if spec.ulimits:
        host["Ulimits"] = ulimits_body(spec.ulimits)
    if confinement.no_new_privileges:
        host["SecurityOpt"] = ["no-new-privileges"]
    if confinement.cap_drop:
        host["CapDrop"] = list(confinement.cap_drop)
    if confinement.no_devices:
        host["Privileged"] = confinement.privileged
        host["CapAdd"] = list(confinement.cap_add)
        host["Devices"] = []
    else:
        if confinement.cap_add:
            host["CapAdd"] = list(confinement.cap_add)
        if confinement.privileged:
            host["Privileged"] = True
    body: dict[str, Any] = {
        "Image": spec.image,
        "Env": ["{}={}".format(k, v) for k, v in sorted(spec.env.items())],
        "Labels": dict(spec.labels),
        "WorkingDir": spec.working_dir,
        "Tty": False,
        "OpenStdin": spec.interactive,
        "HostConfig": host,
    }
    if spec.interactive:
        exposed, bindings = port_bindings(spec.ports)
        body["ExposedPorts"] = exposed
        host["PortBindings"] = bindings
        host["Init"] = False
        body.update(StdinOnce=False, AttachStdin=True, AttachStdout=True, AttachStderr=True)
    elif spec.ports:
        exposed, bindings = port_bindings(spec.ports)
        body["ExposedPorts"] = exposed
        host["PortBindings"] = bindings
    if spec.entrypoint is not None:
        body["Entrypoint"] = list(spec.entrypoint)
    if spec.command is not None:
        body["Cmd"] = list(spec.command)
    if spec.user:
        body["User"] = spec.user
    return body
