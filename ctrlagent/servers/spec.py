"""
A game server's definition: the ``create_server`` payload parsed and validated
into a frozen ``ServerSpec``, and the Docker create body built from it.

Pure: no reactor, no I/O.  Every problem raises ``InvalidInput`` naming the
payload field (``limits.memory``, ``ports[1].external``, ...), which the
dispatcher reports as ``INVALID_PAYLOAD``.

Payload (PROTOCOL.md section 2, plus optional agent extras)::

    {name, image, startup, environment: {..}, skipScripts,
     limits: {memory MB, swap MB, disk MB, cpu %, io weight, pids},
     ports: [{internal, external, protocol?, ip?}],
     aliases: [..] / panelId,
     stop: "SIGTERM" | "^C" | "stop" | {type: "signal"|"command", value, timeout},
     startupDone: "Done (" | {pattern, regex: bool},
     install: {script, image?, entrypoint?, timeout?},
     crashRestart: bool, user: "uid:gid" | "image"}
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ctrlagent.config import ServersConfig
from ctrlagent.errors import InvalidInput

MANAGED_LABEL = "ctrl-alt-play.managed"
SERVER_ID_LABEL = "ctrl-alt-play.server-id"
ROLE_LABEL = "ctrl-alt-play.role"
SPEC_HASH_LABEL = "ctrl-alt-play.spec-hash"
CONTAINER_PREFIX = "ctrl-alt-play-"
DATA_MOUNT = "/home/container"
MB = 1024 * 1024

# A server id ends up in a container name, a label and a directory name: keep
# it to what all three accept, with no path separators.
_SERVER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
_SIGNAL = re.compile(r"^SIG[A-Z0-9]+$")
_USER = re.compile(r"^\d+(:\d+)?$")
# Characters that need a shell: without any of them the startup line is split
# and executed directly, so the game process is PID 1 and gets our signals.
_SHELL_CHARS = set("|&;<>()$`\\\"'*?[]#~=%{}\n")


@dataclass(frozen=True)
class PortAllocation:
    """One allocation: ``internal`` container port published at ``ip:external``."""

    internal: int
    external: int
    ip: str


@dataclass(frozen=True)
class Limits:
    """Resource limits in the Panel's units (MB, percent of one core, weight)."""

    memory_mb: int = 0  # 0 = unlimited
    swap_mb: int = 0  # 0 = no swap, -1 = unlimited
    disk_mb: int = 0  # 0 = unlimited
    cpu_percent: float = 0.0  # 100 = one core, 0 = unlimited
    io_weight: int = 500
    pids: int = 512


@dataclass(frozen=True)
class StopMethod:
    """How a server is asked to stop: a signal, or a console command."""

    kind: str = "signal"  # "signal" | "command"
    value: str = "SIGTERM"
    timeout: float | None = None  # None = the agent's default


@dataclass(frozen=True)
class StartupDone:
    """The console output that turns ``starting`` into ``running``."""

    pattern: str
    regex: bool = False

    def matches(self, line: str) -> bool:
        """True when ``line`` shows that startup is complete."""
        if self.regex:
            return re.search(self.pattern, line) is not None
        return self.pattern in line


@dataclass(frozen=True)
class InstallScript:
    """A script run once in a separate install container."""

    script: str
    image: str | None = None  # None = the server's image
    entrypoint: str = "/bin/sh"
    timeout: float | None = None  # None = the agent's default


@dataclass(frozen=True)
class ServerSpec:
    """Everything that defines one game server."""

    server_id: str
    name: str
    image: str
    startup: str
    environment: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    ports: tuple[PortAllocation, ...] = ()
    aliases: tuple[str, ...] = ()
    stop: StopMethod = field(default_factory=StopMethod)
    startup_done: StartupDone | None = None
    install: InstallScript | None = None
    skip_scripts: bool = False
    crash_restart: bool = True
    user: str | None = None  # "uid:gid"; None = take the image's user

    @property
    def container_name(self) -> str:
        """The Docker name of the server's container."""
        return container_name(self.server_id)

    def to_json(self) -> str:
        """A JSON form for the store (``spec_from_json`` reverses it)."""
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self) -> str:
        """A short hash of everything that shapes the container."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def container_name(server_id: str) -> str:
    """The Docker name of a server's container."""
    return CONTAINER_PREFIX + server_id


def validate_server_id(server_id: Any) -> str:
    """Return ``server_id`` if it is usable as a name, label and directory."""
    if not isinstance(server_id, str) or not _SERVER_ID.match(server_id):
        raise InvalidInput(
            "serverId must be 1-128 characters of letters, digits, '_', '.', '-'",
            field="serverId",
        )
    return server_id


def _str(params: Mapping[str, Any], key: str, *, required: bool = False, default: str = "") -> str:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise InvalidInput("{} is required".format(key), field=key)
        return default
    if not isinstance(value, str):
        raise InvalidInput("{} must be a string".format(key), field=key)
    return value


def _number(value: Any, name: str, *, minimum: float, default: float) -> float:
    if value is None or value == "":
        return float(default)
    if isinstance(value, bool):
        raise InvalidInput("{} must be a number".format(name), field=name)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidInput("{} must be a number".format(name), field=name) from None
    if not isinstance(value, (int, float)) or value != value:
        raise InvalidInput("{} must be a number".format(name), field=name)
    if value < minimum:
        raise InvalidInput("{} must be at least {}".format(name, minimum), field=name)
    return float(value)


def _int(value: Any, name: str, *, minimum: int, default: int) -> int:
    number = _number(value, name, minimum=minimum, default=default)
    if not number.is_integer():
        raise InvalidInput("{} must be a whole number".format(name), field=name)
    return int(number)


def env_value(value: Any) -> str:
    """An environment value as a string (``true``/``false`` for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _environment(params: Mapping[str, Any]) -> dict[str, str]:
    raw = params.get("environment")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidInput("environment must be an object", field="environment")
    env: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise InvalidInput(
                "environment key {!r} is not a variable name".format(key), field="environment"
            )
        if isinstance(value, (Mapping, list)):
            raise InvalidInput(
                "environment.{} must be a string, number or boolean".format(key),
                field="environment." + key,
            )
        env[key] = env_value(value)
    return env


def _limits(params: Mapping[str, Any], defaults: ServersConfig) -> Limits:
    raw = params.get("limits")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidInput("limits must be an object", field="limits")
    swap = _int(raw.get("swap"), "limits.swap", minimum=-1, default=0)
    return Limits(
        memory_mb=_int(raw.get("memory"), "limits.memory", minimum=0, default=0),
        swap_mb=swap,
        disk_mb=_int(raw.get("disk"), "limits.disk", minimum=0, default=0),
        cpu_percent=_number(raw.get("cpu"), "limits.cpu", minimum=0, default=0.0),
        io_weight=_int(raw.get("io"), "limits.io", minimum=0, default=500),
        pids=_int(raw.get("pids"), "limits.pids", minimum=0, default=defaults.pids_limit),
    )


def _port(value: Any, name: str) -> int:
    port = _int(value, name, minimum=1, default=0)
    if not 1 <= port <= 65535:
        raise InvalidInput("{} must be a port (1-65535)".format(name), field=name)
    return port


def _ports(params: Mapping[str, Any], defaults: ServersConfig) -> tuple[PortAllocation, ...]:
    raw = params.get("ports")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidInput("ports must be a list", field="ports")
    seen: dict[tuple[str, int], PortAllocation] = {}
    for index, item in enumerate(raw):
        name = "ports[{}]".format(index)
        if isinstance(item, (int, str)) and not isinstance(item, bool):
            item = {"internal": item, "external": item}
        if not isinstance(item, Mapping):
            raise InvalidInput("{} must be an object".format(name), field=name)
        if item.get("internal") is None and item.get("external") is None:
            raise InvalidInput("{}.internal is required".format(name), field=name + ".internal")
        internal = _port(item.get("internal", item.get("external")), name + ".internal")
        external = _port(item.get("external", internal), name + ".external")
        protocol = item.get("protocol", "tcp")
        if protocol not in (None, "tcp", "udp", "tcp/udp", "both"):
            raise InvalidInput(
                "{}.protocol must be tcp or udp".format(name), field=name + ".protocol"
            )
        ip = item.get("ip") or defaults.default_bind_ip
        if not isinstance(ip, str):
            raise InvalidInput("{}.ip must be a string".format(name), field=name + ".ip")
        key = (ip, external)
        allocation = PortAllocation(internal=internal, external=external, ip=ip)
        if key in seen and seen[key] != allocation:
            raise InvalidInput(
                "{}: {}:{} is allocated twice".format(name, ip, external), field=name
            )
        # The Panel may list a port once per protocol: every allocation is
        # bound on both tcp and udp anyway, so duplicates collapse.
        seen[key] = allocation
    return tuple(seen.values())


def _aliases(params: Mapping[str, Any], server_id: str) -> tuple[str, ...]:
    out: list[str] = []
    raw = params.get("aliases") or []
    if not isinstance(raw, list):
        raise InvalidInput("aliases must be a list of strings", field="aliases")
    for value in [*raw, params.get("panelId")]:
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidInput("aliases must be strings", field="aliases")
        value = str(value)
        if value != server_id and value not in out:
            out.append(value)
    return tuple(out)


def _stop(params: Mapping[str, Any]) -> StopMethod:
    raw = params.get("stop")
    if raw is None or raw == "":
        return StopMethod()
    timeout: float | None = None
    if isinstance(raw, Mapping):
        kind = raw.get("type")
        value = raw.get("value")
        timeout = _number(raw.get("timeout"), "stop.timeout", minimum=0, default=-1)
        timeout = None if timeout < 0 else timeout
        if not isinstance(value, str) or not value:
            raise InvalidInput("stop.value must be a string", field="stop.value")
    elif isinstance(raw, str):
        kind, value = None, raw
    else:
        raise InvalidInput("stop must be a string or an object", field="stop")
    if value == "^C":
        kind, value = "signal", "SIGINT"
    if kind is None:
        kind = "signal" if _SIGNAL.match(value) else "command"
    if kind not in ("signal", "command"):
        raise InvalidInput("stop.type must be signal or command", field="stop.type")
    if kind == "signal" and not _SIGNAL.match(value):
        raise InvalidInput("stop signal {!r} is not a signal name".format(value), field="stop")
    return StopMethod(kind=kind, value=value, timeout=timeout)


def _startup_done(params: Mapping[str, Any]) -> StartupDone | None:
    raw = params.get("startupDone", params.get("startup_done"))
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        return StartupDone(pattern=raw)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("pattern"), str):
        raise InvalidInput("startupDone must be a string or {pattern, regex}", field="startupDone")
    done = StartupDone(pattern=raw["pattern"], regex=bool(raw.get("regex", False)))
    if done.regex:
        try:
            re.compile(done.pattern)
        except re.error as e:
            raise InvalidInput(
                "startupDone.pattern is not a regular expression: {}".format(e),
                field="startupDone.pattern",
            ) from None
    return done


def _install(params: Mapping[str, Any]) -> InstallScript | None:
    raw = params.get("install")
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"script": raw}
    if not isinstance(raw, Mapping):
        raise InvalidInput("install must be an object", field="install")
    script = raw.get("script")
    if not isinstance(script, str) or not script.strip():
        raise InvalidInput("install.script must be a non-empty string", field="install.script")
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise InvalidInput("install.image must be a string", field="install.image")
    entrypoint = raw.get("entrypoint") or "/bin/sh"
    if not isinstance(entrypoint, str):
        raise InvalidInput("install.entrypoint must be a string", field="install.entrypoint")
    timeout = _number(raw.get("timeout"), "install.timeout", minimum=0, default=-1)
    return InstallScript(
        script=script, image=image, entrypoint=entrypoint, timeout=None if timeout < 0 else timeout
    )


def _user(params: Mapping[str, Any], defaults: ServersConfig) -> str | None:
    raw = params.get("user")
    if raw is None or raw == "":
        return "{}:{}".format(defaults.container_uid, defaults.container_gid)
    if raw == "image":
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not _USER.match(raw):
        raise InvalidInput('user must be "uid:gid" or "image"', field="user")
    if ":" not in raw:
        raw = "{}:{}".format(raw, raw)
    return raw


def parse_spec(server_id: str, params: Mapping[str, Any], defaults: ServersConfig) -> ServerSpec:
    """Validate a ``create_server`` payload into a ``ServerSpec``."""
    server_id = validate_server_id(server_id)
    image = _str(params, "image", required=True)
    if any(c.isspace() for c in image):
        raise InvalidInput("image must not contain spaces", field="image")
    skip = params.get("skipScripts", params.get("skip_scripts", False))
    crash_restart = params.get("crashRestart", params.get("crash_restart", True))
    return ServerSpec(
        server_id=server_id,
        name=_str(params, "name", default=server_id),
        image=image,
        startup=_str(params, "startup"),
        environment=_environment(params),
        limits=_limits(params, defaults),
        ports=_ports(params, defaults),
        aliases=_aliases(params, server_id),
        stop=_stop(params),
        startup_done=_startup_done(params),
        install=_install(params),
        skip_scripts=bool(skip),
        crash_restart=bool(crash_restart),
        user=_user(params, defaults),
    )


def spec_from_json(text: str) -> ServerSpec:
    """Rebuild a ``ServerSpec`` from ``ServerSpec.to_json``."""
    raw = json.loads(text)
    return ServerSpec(
        server_id=raw["server_id"],
        name=raw["name"],
        image=raw["image"],
        startup=raw["startup"],
        environment=dict(raw["environment"]),
        limits=Limits(**raw["limits"]),
        ports=tuple(PortAllocation(**p) for p in raw["ports"]),
        aliases=tuple(raw["aliases"]),
        stop=StopMethod(**raw["stop"]),
        startup_done=StartupDone(**raw["startup_done"]) if raw["startup_done"] else None,
        install=InstallScript(**raw["install"]) if raw["install"] else None,
        skip_scripts=raw["skip_scripts"],
        crash_restart=raw["crash_restart"],
        user=raw["user"],
    )


def merge_update(
    spec: ServerSpec, params: Mapping[str, Any], defaults: ServersConfig
) -> ServerSpec:
    """
    ``spec`` with the fields present in an update payload replaced.

    Only what the payload names changes; ``limits`` and ``environment`` merge
    key by key, so ``{"limits": {"memory": 2048}}`` keeps the other limits.
    """
    current: dict[str, Any] = {
        "name": spec.name,
        "image": spec.image,
        "startup": spec.startup,
        "environment": dict(spec.environment),
        "limits": {
            "memory": spec.limits.memory_mb,
            "swap": spec.limits.swap_mb,
            "disk": spec.limits.disk_mb,
            "cpu": spec.limits.cpu_percent,
            "io": spec.limits.io_weight,
            "pids": spec.limits.pids,
        },
        "ports": [asdict(p) for p in spec.ports],
        "aliases": list(spec.aliases),
        "stop": asdict(spec.stop) | {"type": spec.stop.kind},
        "startupDone": asdict(spec.startup_done) if spec.startup_done else None,
        "install": asdict(spec.install) if spec.install else None,
        "skipScripts": spec.skip_scripts,
        "crashRestart": spec.crash_restart,
        "user": spec.user or "image",
    }
    merged = dict(current)
    for key, value in params.items():
        if key in ("environment", "limits") and isinstance(value, Mapping):
            merged[key] = {**current[key], **value}
        elif key == "aliases" and isinstance(value, list):
            merged[key] = list(dict.fromkeys([*current["aliases"], *value]))
        else:
            merged[key] = value
    return parse_spec(spec.server_id, merged, defaults)


def fill_startup(spec: ServerSpec) -> str:
    """
    The startup line with ``{{VAR}}`` placeholders filled.

    Values come from the environment plus ``SERVER_MEMORY`` (MB),
    ``SERVER_PORT`` and ``SERVER_IP``; ``{{env.VAR}}`` (Pterodactyl eggs) works
    too.  An unknown placeholder becomes empty rather than staying literal.
    """
    env = server_environment(spec)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith(("env.", "server.build.")):
            name = name.split(".")[-1]
        return env.get(name, "")

    return _PLACEHOLDER.sub(replace, spec.startup)


def server_environment(spec: ServerSpec) -> dict[str, str]:
    """The container's environment: the payload's plus the agent's variables."""
    env = dict(spec.environment)
    first = spec.ports[0] if spec.ports else None
    env["SERVER_MEMORY"] = str(spec.limits.memory_mb)
    if first is not None:
        env["SERVER_PORT"] = str(first.internal)
        env["SERVER_IP"] = first.ip
    else:
        env.setdefault("SERVER_PORT", "")
        env.setdefault("SERVER_IP", "0.0.0.0")
    return env


def startup_command(line: str) -> list[str] | None:
    """
    The container ``Cmd`` for a filled startup line.

    A plain command is split and run directly, so that the game process is the
    container's PID 1 and receives stop signals itself; anything that needs a
    shell (pipes, ``&&``, variables) runs under ``/bin/sh -c``.  Empty = keep
    the image's own command.
    """
    line = line.strip()
    if not line:
        return None
    if not (set(line) & _SHELL_CHARS):
        try:
            return shlex.split(line)
        except ValueError:
            pass
    return ["/bin/sh", "-c", line]


def memory_limits(limits: Limits) -> dict[str, int]:
    """``Memory``/``MemorySwap`` in bytes (empty when memory is unlimited)."""
    if limits.memory_mb <= 0:
        return {}
    memory = limits.memory_mb * MB
    if limits.swap_mb < 0:
        swap = -1
    else:
        swap = memory + limits.swap_mb * MB
    return {"Memory": memory, "MemorySwap": swap}


def nano_cpus(cpu_percent: float) -> int:
    """Docker ``NanoCpus`` for a percentage of one core (0 = unlimited)."""
    return int(round(cpu_percent / 100.0 * 1e9))


def blkio_weight(io_weight: int) -> int:
    """The block I/O weight clamped to Docker's 10-1000."""
    return max(10, min(1000, io_weight))


def resources(spec: ServerSpec, defaults: ServersConfig) -> dict[str, Any]:
    """The ``HostConfig`` resource fields (also what ``container_update`` takes)."""
    out: dict[str, Any] = dict(memory_limits(spec.limits))
    out["NanoCpus"] = nano_cpus(spec.limits.cpu_percent)
    out["BlkioWeight"] = blkio_weight(spec.limits.io_weight)
    if spec.limits.pids > 0:
        out["PidsLimit"] = spec.limits.pids
    return out


def port_bindings(
    spec: ServerSpec,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, str]]]]:
    """``ExposedPorts`` and ``PortBindings``: each allocation on tcp and udp."""
    exposed: dict[str, dict[str, Any]] = {}
    bindings: dict[str, list[dict[str, str]]] = {}
    for allocation in spec.ports:
        for protocol in ("tcp", "udp"):
            key = "{}/{}".format(allocation.internal, protocol)
            exposed[key] = {}
            bindings.setdefault(key, []).append(
                {"HostIp": allocation.ip, "HostPort": str(allocation.external)}
            )
    return exposed, bindings


def labels(spec: ServerSpec, role: str = "server") -> dict[str, str]:
    """The labels every container of this server carries."""
    return {
        MANAGED_LABEL: "true",
        SERVER_ID_LABEL: spec.server_id,
        ROLE_LABEL: role,
        SPEC_HASH_LABEL: spec.digest(),
    }


def container_body(
    spec: ServerSpec, data_path: str, defaults: ServersConfig, network_mode: str = "bridge"
) -> dict[str, Any]:
    """The Docker ``POST /containers/create`` body of the server's container."""
    env = server_environment(spec)
    line = fill_startup(spec)
    env["STARTUP"] = line
    exposed, bindings = port_bindings(spec)
    host_config: dict[str, Any] = {
        **resources(spec, defaults),
        "Binds": ["{}:{}".format(data_path, DATA_MOUNT)],
        "PortBindings": bindings,
        "NetworkMode": network_mode,
        "Tmpfs": {"/tmp": "rw,exec,nosuid,size={}m".format(defaults.tmpfs_size_mb)},
        # The agent owns restarts (crash policy and loop guard), not Docker.
        "RestartPolicy": {"Name": "no"},
        # json-file keeps the console in Docker's logs, which is where lines
        # printed while the agent was down are recovered from.
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "20m", "max-file": "2"}},
        "SecurityOpt": ["no-new-privileges"],
        "CapDrop": [
            "setpcap", "mknod", "audit_write", "net_raw", "dac_override", "fowner",
            "fsetid", "net_bind_service", "sys_chroot", "setfcap",
        ],
        "Init": False,
    }
    body: dict[str, Any] = {
        "Image": spec.image,
        "Env": ["{}={}".format(k, v) for k, v in sorted(env.items())],
        "Labels": labels(spec),
        "WorkingDir": DATA_MOUNT,
        "ExposedPorts": exposed,
        "OpenStdin": True,
        "StdinOnce": False,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "Tty": False,
        "HostConfig": host_config,
    }
    cmd = startup_command(line)
    if cmd is not None:
        body["Cmd"] = cmd
    if spec.user:
        body["User"] = spec.user
    return body


def install_body(
    spec: ServerSpec,
    data_path: str,
    script_dir: str,
    defaults: ServersConfig,
    network_mode: str = "bridge",
) -> dict[str, Any]:
    """
    The create body of the one-shot install container.

    Pterodactyl's convention: the data directory at ``/mnt/server``, the script
    at ``/mnt/install/install.sh``, run as root, the server's environment.  It
    joins the servers' network, so an operator's rules for it cover installs too.
    """
    assert spec.install is not None
    env = server_environment(spec)
    return {
        "Image": spec.install.image or spec.image,
        "Env": ["{}={}".format(k, v) for k, v in sorted(env.items())],
        "Labels": labels(spec, role="install"),
        "Entrypoint": [spec.install.entrypoint],
        "Cmd": ["/mnt/install/install.sh"],
        "WorkingDir": "/mnt/server",
        "User": "0:0",
        "Tty": False,
        "OpenStdin": False,
        "HostConfig": {
            **resources(spec, defaults),
            "Binds": [
                "{}:/mnt/server".format(data_path),
                "{}:/mnt/install:ro".format(script_dir),
            ],
            "NetworkMode": network_mode,
            "Tmpfs": {"/tmp": "rw,exec,nosuid,size={}m".format(defaults.tmpfs_size_mb)},
            "RestartPolicy": {"Name": "no"},
            "LogConfig": {"Type": "json-file", "Config": {}},
        },
    }


def uid_gid(spec: ServerSpec) -> tuple[int, int] | None:
    """The numeric owner of the data directory, or None for the image's user."""
    if not spec.user:
        return None
    uid, _, gid = spec.user.partition(":")
    return int(uid), int(gid or uid)
