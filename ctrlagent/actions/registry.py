"""
The one table of actions behind both transports.

``Dispatcher.dispatch(command)`` looks the action up (PROTOCOL.md section 2,
plus a few aliases and the legacy names of older Panels), validates the
payload with small typed helpers, resolves the server id through the server
manager (any id the Panel uses, an alias, a label, a container name), calls the
server or file manager and returns the ``data`` the Panel reads.

Every payload first passes ``ctrlagent.wire.command.check_payload`` (one bounded
walk: non-finite or absurd numbers, runaway nesting and unusable text are
``INVALID_PAYLOAD`` naming the field), whichever transport it came by.

Errors are ``ctrlagent.errors.CtrlAgentError``s carrying the protocol code; the
transports map them to their failure shapes.  Anything else is a bug: it is
logged with its traceback and reported as ``EXECUTION_ERROR`` without leaking
the traceback to the Panel.

Long actions (``create_server`` behind a slow pull, ``stop_server`` with a long
timeout, ...) answer within ``timeouts.command_answer`` seconds even when the
manager is slower than promised, any other action within
``command_answer + command_margin`` (``ctrlagent.work.Deadlines``); the work
continues in the background and its outcome shows in status and events.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent.config import TimeoutsConfig
from ctrlagent.errors import CtrlAgentError, InvalidInput, UnknownAction
from ctrlagent.interfaces import IFileManager, IServerManager, ServerRoot
from ctrlagent.wire.command import (
    MAX_SAFE_NUMBER,
    ActionResult,
    Command,
    IDispatcher,
    check_payload,
    printable,
    unusable_text,
)
from ctrlagent.wire.json import to_json
from ctrlagent.work import Deadlines, Tracker

# ---------------------------------------------------------------------------
# Typed payload helpers.  Each names the offending field in its InvalidInput so
# that the Panel (and a human reading its logs) sees which field was wrong.

_MISSING = object()


def _present(params: Mapping[str, Any], name: str) -> Any:
    value = params.get(name, _MISSING)
    return _MISSING if value is None else value


def require_str(params: Mapping[str, Any], name: str, *, allow_empty: bool = False) -> str:
    """The string field ``name``; missing, non-string or (unless allowed) empty is invalid."""
    value = _present(params, name)
    if value is _MISSING:
        raise InvalidInput("{} is required".format(name), field=name)
    if not isinstance(value, str):
        raise InvalidInput("{} must be a string".format(name), field=name)
    if not allow_empty and not value:
        raise InvalidInput("{} must not be empty".format(name), field=name)
    return value


def optional_str(params: Mapping[str, Any], name: str, default: str | None = None) -> str | None:
    """The string field ``name`` or ``default`` when absent/null."""
    value = _present(params, name)
    if value is _MISSING:
        return default
    if not isinstance(value, str):
        raise InvalidInput("{} must be a string".format(name), field=name)
    return value


def optional_int(
    params: Mapping[str, Any],
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """
    The integer field ``name`` (an integral number or a string of digits, as
    some Panels send query-string values), or ``default``; bounds are enforced.
    """
    value = _present(params, name)
    if value is _MISSING:
        return default
    result: int
    if isinstance(value, bool):
        raise InvalidInput("{} must be an integer".format(name), field=name)
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        result = int(value)
    else:
        raise InvalidInput("{} must be an integer".format(name), field=name)
    if minimum is not None and result < minimum:
        raise InvalidInput("{} must be at least {}".format(name, minimum), field=name)
    if maximum is not None and result > maximum:
        raise InvalidInput("{} must be at most {}".format(name, maximum), field=name)
    return result


def optional_number(
    params: Mapping[str, Any], name: str, default: float | None, *, minimum: float | None = None
) -> float | None:
    """The numeric field ``name`` (int or float, not bool) or ``default``."""
    value = _present(params, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise InvalidInput("{} must be a number".format(name), field=name) from None
        else:
            raise InvalidInput("{} must be a number".format(name), field=name)
    if not math.isfinite(value):
        raise InvalidInput("{} must be a finite number".format(name), field=name)
    if abs(value) > MAX_SAFE_NUMBER:
        raise InvalidInput("{} is out of range".format(name), field=name)
    if minimum is not None and value < minimum:
        raise InvalidInput("{} must be at least {}".format(name, minimum), field=name)
    return float(value)


def check_limits(params: Mapping[str, Any]) -> None:
    """
    Refuse ``limits`` entries that spell a non-finite or absurd number as text
    (``"inf"``, ``"1e999"``); numbers themselves already passed
    ``check_payload``.  Other text is left to the server manager to judge.
    """
    limits = optional_mapping(params, "limits")
    for key, value in (limits or {}).items():
        if not isinstance(value, str):
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if not math.isfinite(number) or abs(number) > MAX_SAFE_NUMBER:
            where = "limits.{}".format(printable(key, 64))
            raise InvalidInput("{} must be a finite number".format(where), field=where)


def optional_bool(params: Mapping[str, Any], name: str, default: bool = False) -> bool:
    """The boolean field ``name`` (also ``"true"``/``"false"``) or ``default``."""
    value = _present(params, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidInput("{} must be a boolean".format(name), field=name)


def optional_mapping(params: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The object field ``name`` or None."""
    value = _present(params, name)
    if value is _MISSING:
        return None
    if not isinstance(value, Mapping):
        raise InvalidInput("{} must be an object".format(name), field=name)
    return dict(value)


def optional_list(params: Mapping[str, Any], name: str) -> list[Any] | None:
    """The array field ``name`` or None."""
    value = _present(params, name)
    if value is _MISSING:
        return None
    if not isinstance(value, list):
        raise InvalidInput("{} must be an array".format(name), field=name)
    return value


def require_choice(
    params: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str | None = None
) -> str:
    """The string field ``name`` restricted to ``choices`` (``default`` when absent)."""
    value = optional_str(params, name, default)
    if value is None:
        raise InvalidInput("{} is required".format(name), field=name)
    if value not in choices:
        raise InvalidInput("{} must be one of {}".format(name, ", ".join(choices)), field=name)
    return value


# ---------------------------------------------------------------------------
# The host view the dispatcher needs (ctrlagent.system.SystemInfo provides it).


class HostInfo(Protocol):
    """What ``system.*`` and ``get_system_metrics`` ask of the host."""

    async def snapshot(self) -> dict[str, Any]:
        """Host cpu/memory/disk/uptime/load."""

    async def system_info(self, node_id: str | None = None) -> dict[str, Any]:
        """The ``system_info`` union shape of PROTOCOL.md section 3."""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def _settle(value: Any) -> Any:
    """Await ``value`` if the domain returned a Deferred or coroutine; pass it through otherwise."""
    if isinstance(value, Deferred) or inspect.isawaitable(value):
        return await value
    return value


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        value = to_json(value)  # a record of wire/: its registered shape
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError("domain returned {!r} where a dict was expected".format(type(value)))


def _float(value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return 0.0
    return result if result == result else 0.0


def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def panel_metrics(raw: Mapping[str, Any]) -> dict[str, Any]:
    """
    Coerce a metrics sample into exactly what the Panel parses: numbers, an
    integer ``players`` and an always-present ``network``.  A missing or odd
    field becomes zero rather than breaking the Panel's poller.
    """
    network = raw.get("network")
    if not isinstance(network, Mapping):
        network = {}
    out = dict(raw)
    out.update(
        cpu=_float(raw.get("cpu")),
        memory=_float(raw.get("memory")),
        disk=_float(raw.get("disk")),
        network={"in": _int(network.get("in")), "out": _int(network.get("out"))},
        players=_int(raw.get("players")),
        timestamp=raw.get("timestamp") or _now_iso(),
    )
    return out


Handler = Callable[[Command], Awaitable[ActionResult]]

_MODE = re.compile(r"[0-7]{3,4}")
_POWER_ACTIONS = ("start", "stop", "restart", "kill")
_ALIAS_CARRIERS = frozenset({"create_server", "server_create", "update_server", "server_update"})
_MAX_LINES = 100_000


@implementer(IDispatcher)
class Dispatcher:
    """
    Runs every action of PROTOCOL.md section 2 against the injected domain.

    ``servers`` and ``files`` provide ``IServerManager`` and ``IFileManager``;
    ``system`` is the host view (``SystemInfo``); ``deadlines`` bounds long
    actions and keeps the work that outlives its answer.  A dispatcher built
    without ``deadlines`` (tests) makes its own from ``clock``, ``tracker``
    and ``long_action_deadline`` (default: ``TimeoutsConfig.command_answer``).
    """

    log = Logger()

    def __init__(
        self,
        *,
        servers: IServerManager,
        files: IFileManager,
        system: HostInfo,
        deadlines: Deadlines | None = None,
        clock: IReactorTime | None = None,
        tracker: Tracker | None = None,
        long_action_deadline: float | None = None,
    ) -> None:
        self._servers = servers
        self._files = files
        self._system = system
        if deadlines is None:
            if clock is None:
                raise TypeError("Dispatcher needs deadlines or a clock")
            timeouts = TimeoutsConfig()
            if long_action_deadline is not None:
                timeouts = replace(timeouts, command_answer=long_action_deadline)
            deadlines = Deadlines(clock, tracker if tracker is not None else Tracker(), timeouts)
        self._deadlines = deadlines
        s = self
        self._table: dict[str, Handler] = {
            # servers
            "create_server": s._create_server,
            "start_server": s._start_server,
            "stop_server": s._stop_server,
            "restart_server": s._restart_server,
            "kill_server": s._kill_server,
            "delete_server": s._delete_server,
            "get_server_status": s._get_server_status,
            "get_status": s._get_server_status,
            "list_servers": s._list_servers,
            "get_server_metrics": s._get_server_metrics,
            "get_system_metrics": s._get_system_metrics,
            "get_server_logs": s._get_server_logs,
            "send_server_command": s._send_server_command,
            "power_server": s._power_server,
            "update_server": s._update_server,
            "suspend_server": s._suspend_server,
            "unsuspend_server": s._unsuspend_server,
            "reinstall_server": s._reinstall_server,
            # console
            "console:command": s._console_command,
            "console:history": s._console_history,
            "console:status": s._console_status,
            "console:connect": s._console_status,
            "console:disconnect": s._console_disconnect,
            "console:clear": s._console_clear,
            "console:download": s._console_download,
            # files
            "list_files": s._list_files,
            "search_files": s._search_files,
            "read_file": s._read_file,
            "write_file": s._write_file,
            "create_directory": s._create_directory,
            "delete_file": s._delete_file,
            "rename_file": s._rename_file,
            "download_file": s._download_file,
            "upload_file": s._upload_file,
            "get_file_info": s._get_file_info,
            "set_file_permissions": s._set_file_permissions,
            "create_archive": s._create_archive,
            "extract_archive": s._extract_archive,
            # mods
            "install_mod": s._install_mod,
            "uninstall_mod": s._uninstall_mod,
            "list_mods": s._list_mods,
            # the node itself
            "system.ping": s._ping,
            "system.status": s._system_status,
            "system.info": s._system_info,
            "get_system_info": s._system_info,
        }
        # Legacy typed-frame names (PROTOCOL.md section 3) and the Go agent's
        # spellings, so that whichever transport hands them over is understood.
        for legacy, modern in {
            "server_create": "create_server",
            "server_start": "start_server",
            "server_stop": "stop_server",
            "server_restart": "restart_server",
            "server_kill": "kill_server",
            "server_delete": "delete_server",
            "server_status": "get_server_status",
            "server_command": "send_server_command",
            "server_power": "power_server",
            "server_update": "update_server",
            "server_suspend": "suspend_server",
            "server_unsuspend": "unsuspend_server",
            "server_reinstall": "reinstall_server",
            "file_read": "read_file",
            "file_write": "write_file",
            "ping": "system.ping",
        }.items():
            self._table[legacy] = self._table[modern]

    # -- the entry point -------------------------------------------------

    def actions(self) -> list[str]:
        """Every action name the dispatcher answers (for discovery and docs)."""
        return sorted(self._table)

    def dispatch(self, command: Command) -> Deferred[ActionResult]:
        """Run ``command``; see ``IDispatcher.dispatch``."""
        return Deferred.fromCoroutine(self._dispatch(command))

    async def _dispatch(self, command: Command) -> ActionResult:
        handler = self._table.get(command.action)
        if handler is None:
            raise UnknownAction("unknown action: {}".format(command.action[:100]))
        action = command.action
        # Both transports' payloads pass this one walk before any action reads
        # them: no infinite or absurd number, no runaway nesting, no text that
        # the filesystem or a console could not take.
        check_payload(command.params)
        if command.server_id is not None and unusable_text(command.server_id):
            raise InvalidInput(
                "serverId holds a lone surrogate, which is not text", field="serverId"
            )

        timeouts = self._deadlines.timeouts
        deadline = timeouts.command_answer + timeouts.command_margin

        def still_running() -> ActionResult:
            # Answering before the Panel's 30 s keeps the node "online" there;
            # the work itself goes on and its outcome shows in the server.
            raise CtrlAgentError(
                "{} is still running after {:g} s; it continues in the background".format(
                    action, deadline
                ),
                code="EXECUTION_ERROR",
            )

        return await self._deadlines.answer_by(
            self._run_handler(handler, command),
            deadline,
            what=printable("{} {}".format(action, command.server_id or "")),
            fallback=still_running,
        )

    async def _run_handler(self, handler: Handler, command: Command) -> ActionResult:
        try:
            await self._learn_aliases(command)
            return await handler(command)
        except CtrlAgentError:
            raise
        except Exception:
            self.log.failure(
                "action {action} for server {server_id} failed unexpectedly",
                action=command.action,
                server_id=printable(command.server_id),
            )
            raise CtrlAgentError(
                "internal error while running {}".format(command.action), code="EXECUTION_ERROR"
            ) from None

    # -- helpers -----------------------------------------------------------

    async def _learn_aliases(self, command: Command) -> None:
        """
        Register the other ids a payload names (``panelId``, ``aliases``) for
        the server it addresses, so that the Panel's second id works from then
        on (PROTOCOL.md section 2).  Create and update carry them themselves.
        """
        if command.action in _ALIAS_CARRIERS or not command.server_id:
            return
        p = command.params
        wanted = [
            p.get("panelId"),
            *(p.get("aliases") or [] if isinstance(p.get("aliases"), list) else []),
        ]
        names = [
            str(a)
            for a in wanted
            if isinstance(a, (str, int)) and not isinstance(a, bool) and a != ""
        ]
        if not names:
            return
        try:
            server_id = str(self._servers.resolve(command.server_id))
        except CtrlAgentError:
            return  # the action itself reports the unknown server
        new: list[str] = []
        for name in names:
            try:
                owner = str(self._servers.resolve(name))
            except CtrlAgentError:
                new.append(name)
                continue
            if owner != server_id:
                self.log.warn(  # noqa: G010 - twisted.logger's method
                    "{alias} already names server {owner}; not an alias of {server_id}",
                    alias=printable(name),
                    owner=printable(owner),
                    server_id=printable(server_id),
                )
        if new:
            await _settle(self._servers.update(server_id, {"aliases": new}))
            self.log.info(
                "server {server_id} is also known as {aliases}",
                server_id=printable(server_id),
                aliases=[printable(name) for name in new],
            )

    def _server_id(self, command: Command) -> str:
        """The canonical id of the server the command names (SERVER_NOT_FOUND otherwise)."""
        if not command.server_id:
            raise InvalidInput("serverId is required", field="serverId")
        return str(self._servers.resolve(command.server_id))

    async def _root(self, command: Command) -> ServerRoot:
        server_id = self._server_id(command)
        root: ServerRoot = await _settle(self._servers.server_root(server_id))
        return root

    async def _bounded(
        self, work: Any, description: str, fallback: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """
        Wait for ``work`` at most ``timeouts.command_answer`` seconds.

        The Panel gives up after 30 s and then marks the node offline, so an
        action that overruns is answered with ``fallback()`` (the state it is
        in now) and finishes in the background under the tracker, which logs
        a failure; its outcome reaches the Panel through status and events.
        """
        return _as_dict(
            await self._deadlines.answer_by(
                _settle(work),
                self._deadlines.timeouts.command_answer,
                what=printable(description),
                fallback=fallback,
            )
        )

    def _status_now(self, server_id: str, default: str) -> Callable[[], dict[str, Any]]:
        def fallback() -> dict[str, Any]:
            try:
                status = _as_dict(self._servers.status(server_id))
            except CtrlAgentError:
                status = {"serverId": server_id, "status": default}
            status.setdefault("serverId", server_id)
            status["pending"] = True
            return status

        return fallback

    # -- servers -------------------------------------------------------------

    async def _create_server(self, command: Command) -> ActionResult:
        if not command.server_id:
            raise InvalidInput("serverId is required", field="serverId")
        p = command.params
        require_str(p, "image")
        optional_str(p, "name")
        optional_str(p, "startup")
        optional_mapping(p, "environment")
        check_limits(p)
        ports = optional_list(p, "ports")
        for i, port in enumerate(ports or []):
            if not isinstance(port, Mapping):
                raise InvalidInput("ports[{}] must be an object".format(i), field="ports")
        optional_bool(p, "skipScripts")
        aliases = optional_list(p, "aliases")
        if aliases is not None and not all(isinstance(a, str) for a in aliases):
            raise InvalidInput("aliases must be an array of strings", field="aliases")
        optional_str(p, "panelId")
        server_id = command.server_id
        data = await self._bounded(
            self._servers.create_server(server_id, dict(p)),
            "create_server {}".format(server_id),
            lambda: {"serverId": server_id, "status": "installing", "pending": True},
        )
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} created".format(server_id))

    async def _start_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = await self._bounded(
            self._servers.start(server_id),
            "start_server {}".format(server_id),
            self._status_now(server_id, "starting"),
        )
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} starting".format(server_id))

    async def _stop_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        signal = optional_str(command.params, "signal")
        if signal is not None:
            signal = signal.upper()
            if not signal.startswith("SIG"):
                signal = "SIG" + signal
            if not re.fullmatch(r"SIG[A-Z0-9]{2,10}", signal):
                raise InvalidInput("signal must be a signal name", field="signal")
        timeout = optional_number(command.params, "timeout", None, minimum=0)
        data = await self._bounded(
            self._servers.stop(server_id, signal=signal, timeout=timeout),
            "stop_server {}".format(server_id),
            self._status_now(server_id, "stopping"),
        )
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} stopping".format(server_id))

    async def _restart_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = await self._bounded(
            self._servers.restart(server_id),
            "restart_server {}".format(server_id),
            self._status_now(server_id, "stopping"),
        )
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} restarting".format(server_id))

    async def _kill_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = _as_dict(await _settle(self._servers.kill(server_id)))
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} killed".format(server_id))

    async def _delete_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        purge = optional_bool(command.params, "purgeFiles", False)
        data = await self._bounded(
            self._servers.delete(server_id, purge_files=purge),
            "delete_server {}".format(server_id),
            lambda: {"serverId": server_id, "status": "deleting", "pending": True},
        )
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} deleted".format(server_id))

    async def _power_server(self, command: Command) -> ActionResult:
        action = require_choice(command.params, "action", _POWER_ACTIONS)
        handler = {
            "start": self._start_server,
            "stop": self._stop_server,
            "restart": self._restart_server,
            "kill": self._kill_server,
        }[action]
        return await handler(command)

    async def _update_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        p = command.params
        optional_str(p, "image")
        optional_str(p, "startup")
        optional_mapping(p, "environment")
        check_limits(p)
        data = _as_dict(await _settle(self._servers.update(server_id, dict(p))))
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} updated".format(server_id))

    async def _suspend_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = await self._bounded(
            self._servers.suspend(server_id),
            "suspend_server {}".format(server_id),
            self._status_now(server_id, "stopping"),
        )
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} suspended".format(server_id))

    async def _unsuspend_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = _as_dict(await _settle(self._servers.unsuspend(server_id)))
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} unsuspended".format(server_id))

    async def _reinstall_server(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = await self._bounded(
            self._servers.reinstall(server_id),
            "reinstall_server {}".format(server_id),
            lambda: {"serverId": server_id, "status": "installing", "pending": True},
        )
        data.setdefault("serverId", server_id)
        return ActionResult(data, "server {} reinstalling".format(server_id))

    async def _get_server_status(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = _as_dict(await _settle(self._servers.status(server_id)))
        data.setdefault("serverId", server_id)
        return ActionResult(data)

    async def _list_servers(self, command: Command) -> ActionResult:
        servers = list(await _settle(self._servers.list_servers()) or [])
        return ActionResult({"servers": servers, "count": len(servers)})

    async def _get_server_metrics(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        raw = _as_dict(await _settle(self._servers.server_metrics(server_id)))
        data = panel_metrics(raw)
        data.setdefault("serverId", server_id)
        return ActionResult(data)

    async def _get_server_logs(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        lines = optional_int(command.params, "lines", 100, minimum=1, maximum=_MAX_LINES)
        logs = [str(x) for x in await _settle(self._servers.console_history(server_id, lines))]
        return ActionResult({"serverId": server_id, "logs": logs, "lines": len(logs)})

    async def _send_server_command(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        line = require_str(command.params, "command")
        data = _as_dict(await _settle(self._servers.send_command(server_id, line)))
        data.setdefault("serverId", server_id)
        data.setdefault("command", line)
        return ActionResult(data, "command sent")

    # -- console -----------------------------------------------------------

    async def _console_command(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        line = require_str(command.params, "command")
        response = await _settle(self._servers.console_command(server_id, line))
        if isinstance(response, (list, tuple)):
            response = "\n".join(str(x) for x in response)
        return ActionResult(
            {
                "serverId": server_id,
                "command": line,
                "response": "" if response is None else str(response),
            }
        )

    async def _console_history(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        lines = optional_int(command.params, "lines", 100, minimum=1, maximum=_MAX_LINES)
        history = [str(x) for x in await _settle(self._servers.console_history(server_id, lines))]
        return ActionResult({"serverId": server_id, "history": history, "lines": len(history)})

    async def _console_status(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        data = _as_dict(await _settle(self._servers.console_status(server_id)))
        data.setdefault("connected", False)
        data.setdefault("lastActivity", None)
        data.setdefault("bufferSize", 0)
        return ActionResult(data)

    async def _console_disconnect(self, command: Command) -> ActionResult:
        # The agent's console attachment belongs to the server, not to one
        # viewer, so "disconnect" only acknowledges (the Panel reads success).
        server_id = self._server_id(command)
        return ActionResult({"serverId": server_id})

    async def _console_clear(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        self._servers.console_clear(server_id)
        return ActionResult({"serverId": server_id}, "console cleared")

    async def _console_download(self, command: Command) -> ActionResult:
        server_id = self._server_id(command)
        fmt = require_choice(command.params, "format", ("txt", "json"), "txt")
        history = [
            str(x) for x in await _settle(self._servers.console_history(server_id, _MAX_LINES))
        ]
        if fmt == "json":
            content = json.dumps(
                {"serverId": server_id, "exportedAt": _now_iso(), "lines": history}
            )
        else:
            content = "\n".join(history) + ("\n" if history else "")
        return ActionResult(
            {"serverId": server_id, "format": fmt, "content": content, "lines": len(history)}
        )

    # -- files -------------------------------------------------------------

    async def _files_call(
        self, method: str, command: Command, *args: Any, **kw: Any
    ) -> dict[str, Any]:
        root = await self._root(command)
        return _as_dict(await _settle(getattr(self._files, method)(root, *args, **kw)))

    async def _list_files(self, command: Command) -> ActionResult:
        p = command.params
        path = optional_str(p, "path", "/") or "/"
        limit = _present(p, "limit")
        limit_value = None if limit is _MISSING else optional_int(p, "limit", 0, minimum=1)
        offset = optional_int(p, "offset", 0, minimum=0)
        data = await self._files_call("list_files", command, path, limit=limit_value, offset=offset)
        data.setdefault("files", [])
        return ActionResult(data)

    async def _search_files(self, command: Command) -> ActionResult:
        p = command.params
        path = optional_str(p, "path", "/") or "/"
        query = require_str(p, "query")
        file_type = require_choice(p, "fileType", ("file", "directory", "all"), "all")
        data = await self._files_call("search_files", command, path, query, file_type)
        data.setdefault("files", [])
        return ActionResult(data)

    async def _read_file(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        return ActionResult(await self._files_call("read_file", command, path))

    async def _write_file(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        content = require_str(command.params, "content", allow_empty=True)
        return ActionResult(
            await self._files_call("write_file", command, path, content), "file written"
        )

    async def _create_directory(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        return ActionResult(
            await self._files_call("create_directory", command, path), "directory created"
        )

    async def _delete_file(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        return ActionResult(await self._files_call("delete_file", command, path), "deleted")

    async def _rename_file(self, command: Command) -> ActionResult:
        old = require_str(command.params, "oldPath")
        new = require_str(command.params, "newPath")
        return ActionResult(await self._files_call("rename_file", command, old, new), "renamed")

    async def _download_file(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        return ActionResult(await self._files_call("download_file", command, path))

    async def _upload_file(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        content = require_str(command.params, "content", allow_empty=True)
        encoding = require_choice(command.params, "encoding", ("base64", "utf8", "utf-8"), "base64")
        if encoding == "utf-8":
            encoding = "utf8"
        # Chunked uploads may name their piece explicitly instead of by
        # ``<path>.chunk<N>``; only pass what was sent, so the plain call
        # matches IFileManager exactly.
        chunks: dict[str, int] = {}
        p = command.params
        if _present(p, "chunkIndex") is not _MISSING:
            chunks["chunk_index"] = optional_int(p, "chunkIndex", 0, minimum=0)
        if _present(p, "totalChunks") is not _MISSING:
            chunks["total_chunks"] = optional_int(p, "totalChunks", 1, minimum=1)
        return ActionResult(
            await self._files_call("upload_file", command, path, content, encoding, **chunks),
            "uploaded",
        )

    async def _get_file_info(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        return ActionResult(await self._files_call("get_file_info", command, path))

    async def _set_file_permissions(self, command: Command) -> ActionResult:
        path = require_str(command.params, "path")
        mode = command.params.get("mode")
        # Some clients send 644 as a JSON number; its decimal digits are the octal mode.
        if isinstance(mode, int) and not isinstance(mode, bool):
            mode = str(mode)
        if not isinstance(mode, str) or not _MODE.fullmatch(mode):
            raise InvalidInput("mode must be an octal mode like 644 or 0755", field="mode")
        return ActionResult(
            await self._files_call("set_file_permissions", command, path, mode), "permissions set"
        )

    async def _create_archive(self, command: Command) -> ActionResult:
        p = command.params
        files = optional_list(p, "files")
        if not files or not all(isinstance(f, str) and f for f in files):
            raise InvalidInput("files must be a non-empty array of paths", field="files")
        archive_path = require_str(p, "archivePath")
        fmt = require_choice(p, "format", ("zip", "tar", "tar.gz"), "tar.gz")
        return ActionResult(
            await self._files_call("create_archive", command, files, archive_path, fmt),
            "archive created",
        )

    async def _extract_archive(self, command: Command) -> ActionResult:
        archive_path = require_str(command.params, "archivePath")
        extract_path = optional_str(command.params, "extractPath", "/") or "/"
        return ActionResult(
            await self._files_call("extract_archive", command, archive_path, extract_path),
            "archive extracted",
        )

    # -- mods ----------------------------------------------------------------

    async def _install_mod(self, command: Command) -> ActionResult:
        p = command.params
        for name in ("type", "workshopId", "name", "downloadUrl", "modUrl", "version"):
            optional_str(p, name)
        mod_id = p.get("modId")
        if mod_id is not None and (isinstance(mod_id, bool) or not isinstance(mod_id, (str, int))):
            raise InvalidInput("modId must be a string", field="modId")
        if not any(p.get(k) for k in ("workshopId", "modId", "downloadUrl", "modUrl")):
            raise InvalidInput("modId, workshopId or downloadUrl is required", field="modId")
        params = dict(p)
        if mod_id is not None:
            params["modId"] = str(mod_id)
        return ActionResult(await self._files_call("install_mod", command, params), "mod installed")

    async def _uninstall_mod(self, command: Command) -> ActionResult:
        mod_id = command.params.get("modId")
        if isinstance(mod_id, int) and not isinstance(mod_id, bool):
            mod_id = str(mod_id)
        if not isinstance(mod_id, str) or not mod_id:
            raise InvalidInput("modId is required", field="modId")
        root = await self._root(command)
        data = _as_dict(await _settle(self._files.uninstall_mod(root, mod_id)))
        # The Panel refreshes its list from this answer: hand back what is left.
        data.update(_as_dict(await _settle(self._files.list_mods(root))))
        return ActionResult(data, "mod uninstalled")

    async def _list_mods(self, command: Command) -> ActionResult:
        data = await self._files_call("list_mods", command)
        mods = list(data.get("mods") or [])
        data["mods"] = mods
        data.setdefault("count", len(mods))
        return ActionResult(data)

    # -- the node ----------------------------------------------------------

    async def _server_count(self) -> int:
        return len(list(await _settle(self._servers.list_servers()) or []))

    async def _ping(self, command: Command) -> ActionResult:
        return ActionResult({"message": "pong", "timestamp": _now_iso()}, "pong")

    async def _get_system_metrics(self, command: Command) -> ActionResult:
        snap = await self._system.snapshot()
        data = dict(snap)
        data["serverCount"] = await self._server_count()
        data.setdefault("timestamp", _now_iso())
        return ActionResult(data)

    async def _system_status(self, command: Command) -> ActionResult:
        snap = await self._system.snapshot()
        servers = list(await _settle(self._servers.list_servers()) or [])
        running = sum(1 for s in servers if isinstance(s, Mapping) and s.get("status") == "running")
        data = dict(snap)
        data.update(
            status="online",
            serverCount=len(servers),
            runningServers=running,
            timestamp=_now_iso(),
        )
        return ActionResult(data)

    async def _system_info(self, command: Command) -> ActionResult:
        return ActionResult(await self._system.system_info())
