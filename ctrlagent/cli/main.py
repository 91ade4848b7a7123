"""
``ctrlagent <command>``: the commands, parsed with ``argparse``.

    ctrlagent [--config PATH] [--url URL] status
    ctrlagent servers
    ctrlagent power <id> start|stop|restart|kill
    ctrlagent console <id>
    ctrlagent alias <id> <other id>
    ctrlagent sftp <id> [--generate | --password-stdin] [--public-key FILE] [--read-only]
    ctrlagent diagnostics [--log FILE] [--lines N]
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import secrets
import select
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ctrlagent.cli.client import (
    EXIT_USAGE,
    AgentClient,
    CliError,
    server_path,
    target_of,
)
from ctrlagent.config import AgentConfig, load_config
from ctrlagent.errors import ConfigInvalid

# Where the packaged unit's agent reads its configuration (packaging/ctrlagent.service):
# the TOML file, and the environment file systemd hands it (EnvironmentFile=).
DEFAULT_CONFIG = "/etc/ctrlagent/agent.toml"
DEFAULT_ENV_FILE = "/etc/ctrlagent/env"
POWER_WORDS = ("start", "stop", "restart", "kill")
# Console lines asked for at each look (the API's history route).
CONSOLE_WINDOW = 500
# What a console line may keep of the terminal's control sequences: colours (SGR).
_SGR = re.compile(r"\x1b\[[0-9;]{0,32}m")


def config_path(given: str | None, environ: dict[str, str]) -> str | None:
    """``--config``, else ``CTRLAGENT_CONFIG``, else the packaged file when it exists."""
    if given:
        return given
    if environ.get("CTRLAGENT_CONFIG"):
        return environ["CTRLAGENT_CONFIG"]
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def environment(given: str | None, environ: dict[str, str]) -> dict[str, str]:
    """
    The agent's environment: the variables of its environment file (systemd's
    ``EnvironmentFile=`` format: ``KEY=value`` lines, ``#`` comments), under
    this process's own.  The file is ``--env-file``, else ``CTRLAGENT_ENV_FILE``,
    else the packaged one when it exists.
    """
    path = given or environ.get("CTRLAGENT_ENV_FILE") or (
        DEFAULT_ENV_FILE if os.path.exists(DEFAULT_ENV_FILE) else None)
    merged: dict[str, str] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(1024 * 1024)
        except OSError as e:
            raise CliError("environment file {}: {}".format(path, e.strerror), EXIT_USAGE) from None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")) or "=" not in line:
                continue
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            merged[key.strip()] = value
    merged.update(environ)
    return merged


def load(args: argparse.Namespace) -> AgentConfig:
    """The agent's configuration, loaded exactly as the agent loads it."""
    overrides: dict[str, Any] = {}
    if args.secret_file:
        overrides["secret_file"] = args.secret_file
    environ = environment(args.env_file, dict(os.environ))
    try:
        return load_config(config_path(args.config, environ), environ, overrides)
    except ConfigInvalid as e:
        raise CliError("configuration: {}".format(e), EXIT_USAGE) from None


def client_of(args: argparse.Namespace, config: AgentConfig) -> AgentClient:
    return AgentClient(target_of(config, args.url), config.secret, timeout=args.timeout)


# -- commands -------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """The node: health, Panel link, engine, servers."""
    config = load(args)
    client = client_of(args, config)
    _, health = client.request("GET", "/health", auth=False, ok_statuses=(503,))
    _, status = client.request("GET", "/api/status")
    health = health if isinstance(health, dict) else {}
    status = status if isinstance(status, dict) else {}
    rows = [
        ("agent", "{} at {}".format(health.get("status", "?"), client.target.describe())),
        ("node", str(status.get("nodeId", health.get("nodeId", "?")))),
        ("version", str(status.get("version", health.get("version", "?")))),
        ("uptime", str(health.get("uptime", "?"))),
        ("panel link", "connected" if health.get("connected") else "not connected"),
        ("engine", "answers" if health.get("docker") else "NOT ANSWERING"),
        ("servers", str(status.get("serverCount", "?"))),
    ]
    for name, value in rows:
        out.write("{:<11} {}\n".format(name, value))
    return 0


def cmd_servers(args: argparse.Namespace, out: TextIO) -> int:
    """Every server: id, state, CPU, memory, uptime, name."""
    client = client_of(args, load(args))
    data = client.data("GET", "/api/servers") or {}
    servers = data.get("servers", []) if isinstance(data, dict) else []
    out.write("{:<34} {:<14} {:>6} {:>10} {:>10}  {}\n".format(
        "ID", "STATE", "CPU%", "MEMORY", "UPTIME", "NAME"))
    for s in servers:
        res = s.get("resources") or {}
        out.write("{:<34} {:<14} {:>6} {:>10} {:>10}  {}\n".format(
            _printable(s.get("serverId")),
            _printable(s.get("status")),
            "{:.1f}".format(res["cpu"]) if "cpu" in res else "-",
            "{:.0f} MiB".format(res["memory"]) if "memory" in res else "-",
            _duration(s.get("uptime")),
            _printable(s.get("name")),
        ))
    out.write("{} server{}\n".format(len(servers), "" if len(servers) == 1 else "s"))
    return 0


def cmd_power(args: argparse.Namespace, out: TextIO) -> int:
    """A power action; answers at once with the state the server is in."""
    client = client_of(args, load(args))
    data = client.data("POST", server_path(args.server_id, "power"), {"action": args.action})
    state = data.get("status", "?") if isinstance(data, dict) else "?"
    out.write("{} {}: {}\n".format(args.action, _printable(args.server_id), _printable(state)))
    return 0


def cmd_alias(args: argparse.Namespace, out: TextIO) -> int:
    """Teach the agent another id of a server."""
    client = client_of(args, load(args))
    data = client.data("POST", server_path(args.server_id, "aliases"), {"alias": args.alias})
    aliases = data.get("aliases") if isinstance(data, dict) else None
    out.write("{} is also {}\n".format(
        _printable(args.server_id),
        ", ".join(_printable(a) for a in aliases) if aliases else _printable(args.alias),
    ))
    return 0


def cmd_sftp(args: argparse.Namespace, out: TextIO) -> int:
    """Set a server's SFTP login (``set_sftp_credentials``)."""
    client = client_of(args, load(args))
    payload: dict[str, Any] = {}
    generated = None
    if args.generate:
        generated = payload["password"] = secrets.token_urlsafe(18)
    elif args.password_stdin:
        payload["password"] = sys.stdin.readline().rstrip("\r\n")
    elif not args.public_key and sys.stdin.isatty():
        first = getpass.getpass("SFTP password for {}: ".format(args.server_id))
        if first != getpass.getpass("again: "):
            raise CliError("the two passwords differ")
        payload["password"] = first
    if args.public_key:
        keys: list[str] = []
        for path in args.public_key:
            try:
                with open(path, encoding="utf-8") as f:
                    keys.extend(line.strip() for line in f if line.strip())
            except OSError as e:
                raise CliError("public key {}: {}".format(path, e.strerror), EXIT_USAGE) from None
        payload["publicKeys"] = keys
    if args.read_only:
        payload["readOnly"] = True
    if not payload:
        raise CliError("nothing to set: --generate, --password-stdin or --public-key", EXIT_USAGE)
    data = client.command("set_sftp_credentials", args.server_id, **payload) or {}
    out.write("sftp login of {}: user {} port {}\n".format(
        _printable(args.server_id), _printable(data.get("username")),
        _printable(data.get("port"))))
    if generated is not None:
        out.write("password: {}\n".format(generated))
    return 0


def cmd_console(args: argparse.Namespace, out: TextIO) -> int:
    """
    Follow the server's console and send typed lines as commands.  Ctrl-C
    (or the end of input with ``--exit-on-eof``) leaves; the server goes on.
    """
    # Ctrl-C leaves even when the shell that started us ignores SIGINT (a
    # background job, a script without job control): Python then keeps it
    # ignored and the console could only be killed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    client = client_of(args, load(args))
    logs = server_path(args.server_id, "logs") + "?lines={}".format(CONSOLE_WINDOW)
    commands = server_path(args.server_id, "commands")

    def fetch() -> list[str]:
        data = client.data("GET", logs)
        lines = data.get("logs", []) if isinstance(data, dict) else []
        return [str(line) for line in lines]

    seen = fetch()
    for line in seen[-args.lines:] if args.lines else []:
        out.write(terminal_safe(line) + "\n")
    out.flush()
    sys.stderr.write("[following the console of {}; type a command and Enter; Ctrl-C leaves, "
                     "the server keeps running]\n".format(_printable(args.server_id)))
    stdin = sys.stdin.fileno()
    typed = b""
    reading = True
    try:
        while True:
            ready, _, _ = select.select([stdin] if reading else [], [], [], args.interval)
            if ready:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    reading = False
                    if args.exit_on_eof:
                        _print_new(out, seen, fetch())
                        return 0
                typed += chunk
                while b"\n" in typed:
                    raw, typed = typed.split(b"\n", 1)
                    text = raw.decode("utf-8", "replace").rstrip("\r")
                    if text:
                        client.data("POST", commands, {"command": text})
            seen = _print_new(out, seen, fetch())
    except KeyboardInterrupt:
        sys.stderr.write("\n[left the console of {}; the server keeps running]\n".format(
            _printable(args.server_id)))
        return 0


def terminal_safe(line: str) -> str:
    """
    A console line fit for the operator's terminal: the game server writes
    it, so every character that does not print (controls, bidi overrides)
    but tab becomes ``?``, and of the escape sequences only colours stay (no
    cursor moves, title changes or other terminal tricks).
    """
    kept = _SGR.split(line)
    colours = _SGR.findall(line)
    parts = [_visible(kept[0])]
    for colour, text in zip(colours, kept[1:], strict=True):
        parts.append(colour)
        parts.append(_visible(text))
    return "".join(parts)


def _visible(text: str) -> str:
    return "".join(c if c == "\t" or c.isprintable() else "?" for c in text)


def _print_new(out: TextIO, seen: list[str], current: list[str]) -> list[str]:
    for line in new_lines(seen, current):
        out.write(terminal_safe(line) + "\n")
    out.flush()
    return current


def new_lines(previous: list[str], current: list[str]) -> list[str]:
    """
    The lines of ``current`` (the console's last lines now) that come after
    ``previous`` (its last lines before): the longest end of ``previous`` that
    starts ``current`` is what both saw.  No overlap: all of ``current`` is new.
    """
    if not previous:
        return current
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return current[k:]
    return current


def cmd_diagnostics(args: argparse.Namespace, out: TextIO) -> int:
    """A report to paste into a bug report (see ``diagnostics.py``)."""
    from ctrlagent.cli.diagnostics import report

    out.write(report(args, load_for_diagnostics(args)))
    return 0


def load_for_diagnostics(args: argparse.Namespace) -> AgentConfig | str:
    """The configuration, or why it cannot be loaded (diagnostics report either)."""
    try:
        return load(args)
    except CliError as e:
        return e.message


# -- helpers ----------------------------------------------------------------------


def _printable(value: object) -> str:
    """A value from the agent, without control characters (a name may hold anything)."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)


def _duration(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "{}d{}h".format(days, hours)
    if hours:
        return "{}h{}m".format(hours, minutes)
    return "{}m{}s".format(minutes, secs)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="ctrlagent",
        description="Talk to this node's ctrlagent: status, servers, power, console, "
        "aliases, SFTP logins, diagnostics.  The agent's address and secret come from its "
        "configuration (--config, CTRLAGENT_CONFIG, else {}; then its environment file "
        "--env-file, else {}, under this shell's environment: AGENT_SECRET, "
        "AGENT_SECRET_FILE, HEALTH_PORT, ...).".format(DEFAULT_CONFIG, DEFAULT_ENV_FILE),
    )
    p.add_argument("-c", "--config", help="the agent's TOML configuration file")
    p.add_argument("--env-file", help="the agent's environment file (default: {} when "
                   "present)".format(DEFAULT_ENV_FILE))
    p.add_argument("--secret-file", help="file holding the node's secret (AGENT_SECRET_FILE)")
    p.add_argument("--url", help="the agent's API (default: from its configuration)")
    p.add_argument("--timeout", type=float, default=35.0, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    commands: list[tuple[str, Callable[..., int], str]] = [
        ("status", cmd_status, "the node's health, Panel link, engine and server count"),
        ("servers", cmd_servers, "every server with its state and figures"),
        ("power", cmd_power, "start, stop, restart or kill a server"),
        ("console", cmd_console, "follow a server's console and send it commands"),
        ("alias", cmd_alias, "teach the agent another id of a server"),
        ("sftp", cmd_sftp, "set a server's SFTP login"),
        ("diagnostics", cmd_diagnostics, "a report to paste into a bug report"),
    ]
    subs = {}
    for name, handler, text in commands:
        s = sub.add_parser(name, help=text, description=text)
        s.set_defaults(handler=handler)
        subs[name] = s
    subs["power"].add_argument("server_id", metavar="id")
    subs["power"].add_argument("action", choices=POWER_WORDS)
    subs["console"].add_argument("server_id", metavar="id")
    subs["console"].add_argument("--lines", type=int, default=50,
                                 help="past lines shown first (default 50)")
    subs["console"].add_argument("--interval", type=float, default=0.5,
                                 help="seconds between looks at the console (default 0.5)")
    subs["console"].add_argument("--exit-on-eof", action="store_true",
                                 help="leave once the input ends (scripts)")
    subs["alias"].add_argument("server_id", metavar="id")
    subs["alias"].add_argument("alias", metavar="other-id")
    subs["sftp"].add_argument("server_id", metavar="id")
    how = subs["sftp"].add_mutually_exclusive_group()
    how.add_argument("--generate", action="store_true", help="a random password, printed once")
    how.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    subs["sftp"].add_argument("--public-key", action="append", metavar="FILE",
                              help="OpenSSH public key file (repeatable; replaces stored keys)")
    subs["sftp"].add_argument("--read-only", action="store_true", help="read and list only")
    subs["diagnostics"].add_argument("--log", metavar="FILE",
                                     help="the agent's log file (default: journalctl -u ctrlagent)")
    subs["diagnostics"].add_argument("--log-lines", type=int, default=50,
                                     help="last log lines shown (default 50)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one ``ctrlagent: error:`` line and a non-zero exit."""
    args = parser().parse_args(argv)
    try:
        code: int = args.handler(args, sys.stdout)
        return code
    except CliError as e:
        sys.stdout.flush()
        sys.stderr.write("ctrlagent: error: {}\n".format(e.message))
        return e.code
    except BrokenPipeError:
        return 0
