"""
``ctrlagent diagnostics``: what an operator pastes into a bug report.

Versions, the agent's answers (health, status, the engine as the agent sees
it), the effective configuration with every secret replaced by
``<redacted>``, the state and data directories, the ports the agent should
listen on, and the last lines of its log.  Each part that cannot be had says
why in one line instead; the report is produced even when the agent is not
running or the configuration does not load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from ctrlagent import __version__
from ctrlagent.cli.client import AgentClient, CliError, target_of
from ctrlagent.config import AgentConfig

REDACTED = "<redacted>"
# A key whose value is a secret, wherever it stands in the tree.
_SECRET_KEYS = ("secret", "secret_key", "password", "token", "registry_auths")
_PACKAGES = ("twisted", "klein", "treq", "autobahn", "prometheus-client", "boto3")


def redacted(tree: Any) -> Any:
    """``tree`` (a dataclass tree as dicts) with every secret's value replaced."""
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if key in _SECRET_KEYS and value not in (None, "", {}, ()):
                out[key] = REDACTED
            else:
                out[key] = redacted(value)
        return out
    if isinstance(tree, (list, tuple)):
        return [redacted(v) for v in tree]
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and key not in _SECRET_KEYS:
            rows.extend(_flatten(value, prefix + key + "."))
        else:
            rows.append((prefix + key, value))
    return rows


def _versions() -> list[str]:
    lines = [
        "ctrlagent {} (this command, {})".format(__version__, os.path.dirname(__file__)),
        "python {} ({})".format(platform.python_version(), sys.executable),
        "platform {}".format(platform.platform()),
    ]
    for name in _PACKAGES:
        try:
            lines.append("{} {}".format(name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            lines.append("{} not installed".format(name))
    return lines


def _agent(client: AgentClient) -> tuple[list[str], dict[str, Any] | None]:
    lines: list[str] = ["api {}".format(client.target.describe())]
    try:
        _, health = client.request("GET", "/health", auth=False, ok_statuses=(503,))
    except CliError as e:
        return lines + ["not answering: {}".format(e.message)], None
    if isinstance(health, dict):
        lines.extend("health.{} {}".format(k, health[k]) for k in sorted(health))
    info: dict[str, Any] | None = None
    try:
        _, status = client.request("GET", "/api/status")
        if isinstance(status, dict):
            lines.extend("status.{} {}".format(k, status[k]) for k in sorted(status))
        data = client.command("system.info")
        info = data if isinstance(data, dict) else None
    except CliError as e:
        lines.append("authenticated requests: {}".format(e.message))
    return lines, info


def _engine(config: AgentConfig, info: dict[str, Any] | None) -> list[str]:
    kind = config.runtime.kind or "docker"
    host = config.runtime.podman_host if kind == "podman" else config.docker.host
    lines = ["runtime {} at {}".format(kind, host)]
    if info is None:
        lines.append("engine details: the agent did not tell (not answering)")
        return lines
    for key in sorted(info):
        value = info[key]
        if isinstance(value, (str, int, float, bool)) or value is None:
            lines.append("{} {}".format(key, value))
    return lines


def _directory(name: str, path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        return "{} {}: MISSING ({})".format(name, path, e.strerror)
    if not os.path.isdir(path):
        return "{} {}: NOT A DIRECTORY".format(name, path)
    usage = shutil.disk_usage(path)
    return "{} {}: owner {}:{} mode {:o}, {} by this user, {:.1f} GiB free of {:.1f} GiB".format(
        name, path, st.st_uid, st.st_gid, st.st_mode & 0o7777,
        "writable" if os.access(path, os.W_OK) else "not writable",
        usage.free / 2**30, usage.total / 2**30,
    )


def _port(name: str, host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=2):
            return "{} {}:{}: listening".format(name, host, port)
    except OSError as e:
        return "{} {}:{}: NOT LISTENING ({})".format(name, host, port, e.strerror or e)


def _ports(config: AgentConfig, client: AgentClient | None) -> list[str]:
    lines = []
    if client is not None and not client.target.unix_path:
        lines.append(_port("api", client.target.host, client.target.port))
    elif client is not None:
        path = client.target.unix_path
        lines.append("api unix:{}: {}".format(path, "present" if os.path.exists(path)
                                               else "MISSING"))
    if config.sftp.enabled:
        sftp = config.sftp
        if sftp.endpoint:
            lines.append("sftp {} (an endpoint: not probed)".format(sftp.endpoint))
        else:
            lines.append(_port("sftp", "127.0.0.1" if sftp.bind in ("0.0.0.0", "::", "")
                               else sftp.bind, sftp.port))
    else:
        lines.append("sftp disabled")
    if config.metrics.enabled:
        lines.append("metrics {}".format(config.metrics.endpoint or "on the api listener"))
    return lines


def _log_tail(args: argparse.Namespace, secret: str) -> list[str]:
    count = max(1, min(args.log_lines, 10_000))
    if args.log:
        try:
            with open(args.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * count))
                lines = f.read().decode("utf-8", "replace").splitlines()[-count:]
        except OSError as e:
            return ["log {}: {}".format(args.log, e.strerror)]
    elif shutil.which("journalctl"):
        try:
            done = subprocess.run(
                ["journalctl", "-u", "ctrlagent", "-n", str(count), "--no-pager", "-o", "cat"],
                capture_output=True, text=True, timeout=10, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return ["journalctl: {}".format(e)]
        lines = (done.stdout or done.stderr).splitlines()[-count:]
    else:
        return ["no log: give the agent's log file with --log (no journalctl here)"]
    if secret:
        lines = [line.replace(secret, REDACTED) for line in lines]
    return lines


def report(args: argparse.Namespace, config: AgentConfig | str) -> str:
    """The whole report as text."""
    out: list[str] = ["# ctrlagent diagnostics, {}".format(
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))]

    def section(title: str, lines: list[str]) -> None:
        out.append("")
        out.append("## " + title)
        # Log lines and names may hold what a game server wrote: nothing that does not print.
        out.extend("".join(c if c == "\t" or c.isprintable() else "?" for c in line)
                   for line in lines)

    section("versions", _versions())
    if isinstance(config, str):
        section("configuration", ["NOT LOADED: {}".format(config)])
        section("log", _log_tail(args, ""))
        return "\n".join(out) + "\n"
    client: AgentClient | None
    try:
        client = AgentClient(target_of(config, args.url), config.secret, timeout=10)
    except CliError as e:
        client = None
        section("agent", [e.message])
    info = None
    if client is not None:
        lines, info = _agent(client)
        section("agent", lines)
    section("engine", _engine(config, info))
    tree = redacted(dataclasses.asdict(config))
    section("configuration (secrets redacted)",
            ["{} = {!r}".format(k, v) for k, v in _flatten(tree)])
    section("directories", [_directory("state_dir", config.state_dir),
                            _directory("data_dir", config.data_dir)])
    section("ports", _ports(config, client))
    section("log (last lines)", _log_tail(args, config.secret))
    return "\n".join(out) + "\n"
