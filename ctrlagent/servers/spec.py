"""
A game server's definition: the ``create_server`` payload parsed and validated
into a frozen ``ServerSpec`` (its containers are built by ``servers.containers``).

Pure: no reactor, no I/O.  Every problem raises ``InvalidInput`` naming the
payload field (``limits.memory``, ``ports[1].external``, ...), which the
dispatcher reports as ``INVALID_PAYLOAD``.

Numbers are numbers: JSON numbers or decimal strings, never booleans, never
NaN or an infinity (``1e999`` parses as one), and never beyond the bounds
below, so nothing derived from them (CPU time, bytes of memory) can
overflow later, in the background, where nobody can be told:

=================  =======================================================
``limits.memory``  0 (unlimited) .. 16 TiB in MB (16,777,216)
``limits.swap``    -1 (unlimited), 0 (none) .. 16 TiB in MB
``limits.disk``    0 (unlimited) .. 1 PiB in MB (1,073,741,824)
``limits.cpu``     0 (unlimited) .. 409,600 % (4,096 cores)
``limits.io``      0 .. 10,000 (then clamped to Docker's 10..1000)
``limits.pids``    up to 4,194,304 (the kernel's PID_MAX_LIMIT); 0, null or
                   negative mean the agent's ``servers.pids_limit``, never
                   "no limit"
ports              1 .. 65535
``stop.timeout``   0 .. 86,400 s;  ``install.timeout``: 0 .. 86,400 s
``user``           uid and gid 0 .. 4,294,967,294
=================  =======================================================

Names (the server id, aliases, environment keys, signals, the user) are
matched whole (``fullmatch``): a trailing newline is not part of a name.

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
import ipaddress
import json
import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from ctrlagent.config import ServersConfig
from ctrlagent.errors import InvalidInput

# The prefix of a server's container name (``ServerSpec.container_name``);
# the containers' labels and mounts live in ``servers.containers``.
CONTAINER_PREFIX = "ctrl-alt-play-"

MB = 1024 * 1024

# A server id ends up in a container name, a label and a directory name: keep
# it to what all three accept, with no path separators.
# Every pattern below is used with ``fullmatch`` (``$`` also matches before a
# final newline, so ``match`` with ``^...$`` would take "id\n").
_SERVER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
_SIGNAL = re.compile(r"SIG[A-Z0-9]{1,16}")
_USER = re.compile(r"[0-9]{1,10}(:[0-9]{1,10})?")
# A number written as a string: plain decimal notation only (no "inf", "nan",
# "0x10" or "1_000", which ``float`` would take).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")

# Bounds of the payload's numbers (see the module docstring).
MAX_MEMORY_MB = 16 * 1024 * 1024
MAX_DISK_MB = 1024 * 1024 * 1024
MAX_CPU_PERCENT = 100 * 4096
MAX_IO_WEIGHT = 10_000
MAX_PIDS = 4_194_304
MAX_TIMEOUT = 86_400.0
MAX_ID = 4_294_967_294
MAX_PORTS = 1024
MAX_ALIASES = 64
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
            return self._compiled.search(line) is not None
        return self.pattern in line

    @cached_property
    def _compiled(self) -> re.Pattern[str]:
        """The regex, compiled once (not a field: the spec's JSON is its fields)."""
        return re.compile(self.pattern)


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
        """The name of the server's container."""
        return container_name(self.server_id)

    def to_json(self) -> str:
        """A JSON form for the store (``spec_from_json`` reverses it)."""
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self) -> str:
        """A short hash of everything that shapes the container."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def container_name(server_id: str) -> str:
    """The name of a server's container."""
    return CONTAINER_PREFIX + server_id


def validate_server_id(server_id: Any) -> str:
    """Return ``server_id`` if it is usable as a name, label and directory."""
    if not isinstance(server_id, str) or not _SERVER_ID.fullmatch(server_id):
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
    if "\x00" in value:
        raise InvalidInput("{} must not contain NUL characters".format(key), field=key)
    return value


def _number(
    value: Any, name: str, *, minimum: float, maximum: float, default: float
) -> float:
    """
    A finite number in ``[minimum, maximum]`` from a JSON number or a decimal string.

    ``None`` and ``""`` give ``default``.  Booleans, NaN, infinities (a JSON
    ``1e999``, the strings ``"inf"``/``"Infinity"``) and anything out of bounds
    are ``InvalidInput`` naming the field.
    """
    if value is None or (isinstance(value, str) and value == ""):
        return float(default)
    if isinstance(value, bool):
        raise InvalidInput("{} must be a number, not a boolean".format(name), field=name)
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 64 or not _DECIMAL.fullmatch(text):
            raise InvalidInput("{} must be a number".format(name), field=name)
        value = float(text)
    if isinstance(value, int):
        # Compared as an integer: a huge one must not reach float() (OverflowError).
        if not minimum <= value <= maximum:
            raise _out_of_range(name, minimum, maximum)
        return float(value)
    if not isinstance(value, float):
        raise InvalidInput("{} must be a number".format(name), field=name)
    if not math.isfinite(value):
        raise InvalidInput("{} must be a finite number".format(name), field=name)
    if not minimum <= value <= maximum:
        raise _out_of_range(name, minimum, maximum)
    return value


def _out_of_range(name: str, minimum: float, maximum: float) -> InvalidInput:
    return InvalidInput(
        "{} must be between {:,g} and {:,g}".format(name, minimum, maximum).replace(",", " "),
        field=name,
    )


def _int(value: Any, name: str, *, minimum: int, maximum: int, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if not minimum <= value <= maximum:
            raise _out_of_range(name, minimum, maximum)
        return value
    number = _number(value, name, minimum=minimum, maximum=maximum, default=default)
    if not number.is_integer():
        raise InvalidInput("{} must be a whole number".format(name), field=name)
    return int(number)


def _flag(params: Mapping[str, Any], name: str, *keys: str, default: bool) -> bool:
    """A boolean field: JSON true/false (or 0/1, "true"/"false"); absent = ``default``."""
    value: Any = None
    for key in keys:
        if params.get(key) is not None:
            value = params[key]
            break
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise InvalidInput("{} must be true or false".format(name), field=name)


def env_value(value: Any, name: str = "environment") -> str:
    """
    An environment value as a string (``true``/``false`` for booleans).

    A float must be finite (a JSON ``1e999`` is an infinity); a string must
    not hold NUL, which no process environment can carry.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput("{} must be a finite number".format(name), field=name)
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInput("{} must not contain NUL characters".format(name), field=name)
        return value
    raise InvalidInput("{} must be a string, number or boolean".format(name), field=name)


def _environment(params: Mapping[str, Any]) -> dict[str, str]:
    raw = params.get("environment")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidInput("environment must be an object", field="environment")
    env: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise InvalidInput(
                "environment key {!r} is not a variable name".format(key), field="environment"
            )
        env[key] = env_value(value, "environment." + key)
    return env


def _limits(params: Mapping[str, Any], defaults: ServersConfig) -> Limits:
    raw = params.get("limits")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidInput("limits must be an object", field="limits")
    # 0, null or a negative number keep the agent's safe default: a PID limit
    # is only ever lifted by the operator (servers.pids_limit = 0), never by a
    # payload.
    pids = _int(raw.get("pids"), "limits.pids", minimum=-MAX_PIDS, maximum=MAX_PIDS,
                default=defaults.pids_limit)
    return Limits(
        memory_mb=_int(raw.get("memory"), "limits.memory", minimum=0, maximum=MAX_MEMORY_MB,
                       default=0),
        swap_mb=_int(raw.get("swap"), "limits.swap", minimum=-1, maximum=MAX_MEMORY_MB,
                     default=0),
        disk_mb=_int(raw.get("disk"), "limits.disk", minimum=0, maximum=MAX_DISK_MB, default=0),
        cpu_percent=_number(raw.get("cpu"), "limits.cpu", minimum=0, maximum=MAX_CPU_PERCENT,
                            default=0.0),
        io_weight=_int(raw.get("io"), "limits.io", minimum=0, maximum=MAX_IO_WEIGHT,
                       default=500),
        pids=pids if pids > 0 else defaults.pids_limit,
    )


def check_limits(limits: Limits) -> Limits:
    """
    ``limits`` if every field is a number within the payload's bounds, else ``ValueError``.

    For definitions read back from the store: one written before the bounds
    existed (``cpu_percent`` = Infinity) must be refused at load, not
    overflow in the background at the next start.
    """
    checks: tuple[tuple[str, Any, float, float], ...] = (
        ("memory_mb", limits.memory_mb, 0, MAX_MEMORY_MB),
        ("swap_mb", limits.swap_mb, -1, MAX_MEMORY_MB),
        ("disk_mb", limits.disk_mb, 0, MAX_DISK_MB),
        ("cpu_percent", limits.cpu_percent, 0, MAX_CPU_PERCENT),
        ("io_weight", limits.io_weight, 0, MAX_IO_WEIGHT),
        ("pids", limits.pids, -MAX_PIDS, MAX_PIDS),
    )
    for name, value, low, high in checks:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
            or (name != "cpu_percent" and not float(value).is_integer())
        ):
            raise ValueError("stored limit {} = {!r} is not valid".format(name, value))
    return limits


def _port(value: Any, name: str) -> int:
    return _int(value, name, minimum=1, maximum=65535, default=0)


def _bind_ip(value: Any, name: str, default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise InvalidInput("{} must be a string".format(name), field=name)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidInput("{} must be an IP address".format(name), field=name) from None


def _ports(params: Mapping[str, Any], defaults: ServersConfig) -> tuple[PortAllocation, ...]:
    raw = params.get("ports")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidInput("ports must be a list", field="ports")
    if len(raw) > MAX_PORTS:
        raise InvalidInput("ports: at most {} allocations".format(MAX_PORTS), field="ports")
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
        ip = _bind_ip(item.get("ip"), name + ".ip", defaults.default_bind_ip)
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
    if len(raw) > MAX_ALIASES:
        raise InvalidInput("aliases: at most {}".format(MAX_ALIASES), field="aliases")
    for value in [*raw, params.get("panelId")]:
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidInput("aliases must be strings", field="aliases")
        if isinstance(value, int) and not 0 <= value <= MAX_ID:
            raise InvalidInput("alias {} is out of range".format(value), field="aliases")
        value = str(value)
        # An alias names the server wherever its id does: the same rules.
        if not _SERVER_ID.fullmatch(value):
            raise InvalidInput(
                "alias {!r} must be 1-128 characters of letters, digits, '_', '.', '-'".format(
                    value[:140]
                ),
                field="aliases",
            )
        if value != server_id and value not in out:
            out.append(value)
    return tuple(out)


def _timeout(raw: Mapping[str, Any], name: str) -> float | None:
    """A timeout in seconds, or None for the agent's default (absent or negative)."""
    timeout = _number(raw.get("timeout"), name, minimum=-1, maximum=MAX_TIMEOUT, default=-1)
    return None if timeout < 0 else timeout


def _stop(params: Mapping[str, Any]) -> StopMethod:
    raw = params.get("stop")
    if raw is None or raw == "":
        return StopMethod()
    timeout: float | None = None
    if isinstance(raw, Mapping):
        kind = raw.get("type")
        value = raw.get("value")
        timeout = _timeout(raw, "stop.timeout")
        if not isinstance(value, str) or not value:
            raise InvalidInput("stop.value must be a string", field="stop.value")
    elif isinstance(raw, str):
        kind, value = None, raw
    else:
        raise InvalidInput("stop must be a string or an object", field="stop")
    if value == "^C":
        kind, value = "signal", "SIGINT"
    if kind is None:
        kind = "signal" if _SIGNAL.fullmatch(value) else "command"
    if kind not in ("signal", "command"):
        raise InvalidInput("stop.type must be signal or command", field="stop.type")
    if kind == "signal" and not _SIGNAL.fullmatch(value):
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
    regex = _flag(raw, "startupDone.regex", "regex", default=False)
    done = StartupDone(pattern=raw["pattern"], regex=regex)
    if done.regex:
        try:
            done._compiled  # noqa: B018 (compiled once: refused here, kept for matching)
        except (re.error, RecursionError, OverflowError) as e:
            raise InvalidInput(
                "startupDone.pattern is not a regular expression: {}".format(e),
                field="startupDone.pattern",
            ) from None
    return done


def _image(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput("{} must be a string".format(name), field=name)
    if any(c.isspace() or c == "\x00" for c in value):
        raise InvalidInput("{} must not contain spaces".format(name), field=name)
    return value


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
    if image is not None:
        image = _image(image, "install.image")
    entrypoint = raw.get("entrypoint") or "/bin/sh"
    if not isinstance(entrypoint, str) or "\x00" in entrypoint:
        raise InvalidInput("install.entrypoint must be a string", field="install.entrypoint")
    return InstallScript(
        script=script, image=image, entrypoint=entrypoint,
        timeout=_timeout(raw, "install.timeout"),
    )


def _user(params: Mapping[str, Any], defaults: ServersConfig) -> str | None:
    raw = params.get("user")
    if raw is None or raw == "":
        return "{}:{}".format(defaults.container_uid, defaults.container_gid)
    if raw == "image":
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not _USER.fullmatch(raw):
        raise InvalidInput('user must be "uid:gid" or "image"', field="user")
    if ":" not in raw:
        raw = "{}:{}".format(raw, raw)
    if any(int(part) > MAX_ID for part in raw.split(":")):
        raise InvalidInput("user: uid and gid must be at most {}".format(MAX_ID), field="user")
    return raw


def parse_spec(server_id: str, params: Mapping[str, Any], defaults: ServersConfig) -> ServerSpec:
    """Validate a ``create_server`` payload into a ``ServerSpec``."""
    server_id = validate_server_id(server_id)
    if not isinstance(params, Mapping):
        raise InvalidInput("the payload must be an object", field="payload")
    if params.get("image") in (None, ""):
        raise InvalidInput("image is required", field="image")
    image = _image(params.get("image"), "image")
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
        skip_scripts=_flag(params, "skipScripts", "skipScripts", "skip_scripts", default=False),
        crash_restart=_flag(params, "crashRestart", "crashRestart", "crash_restart",
                            default=True),
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
        limits=check_limits(Limits(**raw["limits"])),
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


def uid_gid(spec: ServerSpec) -> tuple[int, int] | None:
    """The numeric owner of the data directory, or None for the image's user."""
    if not spec.user:
        return None
    uid, _, gid = spec.user.partition(":")
    return int(uid), int(gid or uid)
