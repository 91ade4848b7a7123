"""
The one registry of actions behind both transports, and its one pipeline.

Each action is declared once, as an ``ActionSpec`` in the module of its family
(``servers``, ``console``, ``files``, ``mods``, ``node``): its names, its
payload (``ctrlagent.actions.payload``), the handler that calls the domain,
the message of its answer and, for long actions, the answer to give when the
domain is slower than the Panel waits.

``ActionRegistry.dispatch(command)`` runs every command through the same steps,
in this order (PROTOCOL.md section 2):

1. look the action up by name or alias (``UNKNOWN_ACTION``);
2. ``ctrlagent.wire.command.check_payload``: one bounded walk of the whole
   payload, whichever transport brought it (non-finite or absurd numbers,
   runaway nesting and unusable text are ``INVALID_PAYLOAD`` naming the field);
3. learn the other ids the payload names for its server (``panelId``,
   ``aliases``), unless the action registers them itself (create/update);
4. resolve the server (missing: ``INVALID_PAYLOAD serverId``; unknown:
   ``SERVER_NOT_FOUND``) and check the payload's fields, in the order the
   action declares (file and mod actions check their fields first);
5. run the handler: an action with a ``pending`` answer gives it once the
   domain has taken ``timeouts.command_answer`` seconds; any action answers
   ``EXECUTION_ERROR`` "still running" after ``command_answer +
   command_margin``; late work goes on under the tracker
   (``ctrlagent.work.Deadlines``) and its outcome shows in status and events;
6. anything but a ``CtrlAgentError`` is a bug: logged with its traceback and
   answered ``EXECUTION_ERROR`` without leaking the traceback to the Panel.

``dispatch`` runs the pipeline itself up to its first wait: a command that
never waits (a status or metrics read) is answered there and then, with no
coroutine driver, timer or deadline; one that waits is handed to Twisted to
drive from that wait on (``_Started``), under its deadline.

``Dispatcher`` is the registry under the name and constructor the rest of the
agent grew up with.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent.errors import CtrlAgentError, InvalidInput, UnknownAction
from ctrlagent.interfaces import IServerManager
from ctrlagent.records import record
from ctrlagent.wire.command import (
    ActionResult,
    Command,
    IDispatcher,
    check_payload,
    printable,
    unusable_text,
)
from ctrlagent.wire.json import to_json
from ctrlagent.wire.tables import ACTION_ALIASES
from ctrlagent.wire.time import iso_ms
from ctrlagent.work import Deadlines

from .payload import Payload


def now_iso() -> str:
    """The wall-clock time as the Panel reads it (``wire.time.iso_ms``)."""
    return iso_ms(time.time())


def json_object(result: object) -> dict[str, Any]:
    """
    A domain result read as a JSON object, for a handler that reads or adds
    to it: a record through ``ctrlagent.wire.json.to_json``, a Mapping as a
    copy, None as ``{}``; anything else is a bug of the domain.
    """
    value = to_json(result)
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError("domain returned {!r} where an object was expected".format(type(result)))


@record
class Call:
    """One command on its way to a handler: the server resolved, the payload parsed."""

    command: Command
    server_id: str | None
    params: Mapping[str, Any]

    @property
    def server(self) -> str:
        """The resolved server id (for actions whose payload requires one)."""
        assert self.server_id is not None, "action without a server"
        return self.server_id


@dataclass(frozen=True)
class ActionSpec:
    """
    One action, declared once.

    ``handler`` returns the ``data`` of the answer (a record or a Mapping;
    None is ``{}``).  ``message``: the answer's message, a format string with
    ``{server_id}`` or a function of the call.  ``pending``: the answer when
    the domain overruns ``timeouts.command_answer`` (the work goes on).
    ``names_server``: a Mapping answer without ``serverId`` gets the resolved
    id.  ``carries_aliases``: the action registers ``panelId``/``aliases``
    itself.  ``forward``: the name of the action this one stands for, picked
    from its parsed params (``power_server``).
    """

    name: str
    family: str
    summary: str
    payload: Payload
    handler: Callable[[Call], Coroutine[Any, Any, object]]
    message: str | Callable[[Call], str] | None = None
    aliases: tuple[str, ...] = ()
    pending: Callable[[Call], object] | None = None
    names_server: bool = False
    carries_aliases: bool = False
    forward: Callable[[Mapping[str, Any]], str] | None = None


async def _resume(started: Coroutine[Any, Any, ActionResult], waits_on: Any) -> ActionResult:
    """The rest of a coroutine already run up to its first wait (``waits_on``)."""
    return await _Started(started, waits_on)


class _Started:
    """
    Awaiting it goes on with a coroutine that has already run up to its first
    wait, as ``await`` would have: what that wait gives is sent in, what it
    raises thrown in, and the coroutine's next waits are the awaiter's, until
    it returns.
    """

    def __init__(self, started: Coroutine[Any, Any, ActionResult], waits_on: Any) -> None:
        self._coroutine = started
        self._waits_on = waits_on

    def __await__(self) -> Generator[Any, Any, ActionResult]:
        coroutine, waits_on = self._coroutine, self._waits_on
        while True:
            try:
                given = yield waits_on
            except GeneratorExit:
                # Closed (collected while waiting): close it too, as ``await`` does.
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    waits_on = coroutine.throw(error)
                except StopIteration as done:
                    return cast(ActionResult, done.value)
            else:
                try:
                    waits_on = coroutine.send(given)
                except StopIteration as done:
                    return cast(ActionResult, done.value)


def _schema_name(action: str) -> str:
    """``console:command`` -> ``ConsoleCommandPayload`` (a valid OpenAPI component name)."""
    words = action.replace(":", "_").replace(".", "_").split("_")
    return "".join(word.capitalize() for word in words if word) + "Payload"


@implementer(IDispatcher)
class ActionRegistry:
    """
    Every action of PROTOCOL.md section 2, behind one pipeline (see the module).

    ``servers`` resolves server ids and learns aliases; ``deadlines`` bounds
    every answer and keeps the work that outlives it.
    """

    log = Logger()

    def __init__(self, *, servers: IServerManager, deadlines: Deadlines) -> None:
        self._servers = servers
        self._deadlines = deadlines
        self._specs: dict[str, ActionSpec] = {}
        self._by_name: dict[str, ActionSpec] = {}

    def register(self, spec: ActionSpec) -> None:
        """
        Add ``spec`` with its aliases (its own and those ``wire.tables.ACTION_ALIASES``
        gives its name); a name or alias that is already taken is a ``ValueError``.
        """
        listed = tuple(alias for alias, name in ACTION_ALIASES.items() if name == spec.name)
        spec = replace(spec, aliases=tuple(dict.fromkeys((*spec.aliases, *listed))))
        for name in (spec.name, *spec.aliases):
            if name in self._by_name:
                raise ValueError(
                    "action name {} is taken by {}".format(name, self._by_name[name].name)
                )
        self._specs[spec.name] = spec
        for name in (spec.name, *spec.aliases):
            self._by_name[name] = spec

    def names(self) -> list[str]:
        """Every name the registry answers, aliases included, sorted."""
        return sorted(self._by_name)

    def actions(self) -> list[str]:
        """Every action name (for discovery and docs): ``names()``."""
        return self.names()

    def specs(self) -> list[ActionSpec]:
        """Every action once, in registration order."""
        return list(self._specs.values())

    def openapi_schemas(self) -> dict[str, Any]:
        """
        The OpenAPI component schemas of the actions: the ``Action`` name enum,
        one ``<Name>Payload`` schema per action and ``ActionCommand``, the
        Panel's command shape for each action with its payload.
        """
        schemas: dict[str, Any] = {
            "Action": {
                "type": "string",
                "description": "An action of the agent (aliases included).",
                "enum": self.names(),
            }
        }
        commands: list[dict[str, Any]] = []
        for spec in self.specs():
            name = _schema_name(spec.name)
            payload = spec.payload.schema()
            payload["description"] = spec.summary
            schemas[name] = payload
            command: dict[str, Any] = {
                "type": "object",
                "description": "{} ({}).".format(spec.summary, spec.family),
                "required": ["action"],
                "properties": {
                    "action": {"type": "string", "enum": [spec.name, *spec.aliases]},
                    "serverId": {"type": "string"},
                    "payload": {"$ref": "#/components/schemas/" + name},
                },
            }
            if spec.payload.server in ("required", "new"):
                command["required"] = ["action", "serverId"]
            commands.append(command)
        schemas["ActionCommand"] = {
            "description": "The Panel's command shape, action by action.",
            "oneOf": commands,
        }
        return schemas

    # -- the pipeline ----------------------------------------------------

    def dispatch(self, command: Command) -> Deferred[ActionResult]:
        """Run ``command``; see ``IDispatcher.dispatch``."""
        pipeline = self._checked(command)
        try:
            waits_on = pipeline.send(None)
        except StopIteration as answered:
            # Answered at once (a status or metrics read): no Deferred to
            # drive it, no deadline to keep, so no timer, no second coroutine
            # and no description to format.
            return succeed(answered.value)
        except BaseException:
            return fail()
        # It waits on something: Twisted drives the rest, as it would have
        # from the start.
        work = Deferred.fromCoroutine(_resume(pipeline, waits_on))
        return Deferred.fromCoroutine(self._answer_by_deadline(command, work))

    async def _answer_by_deadline(
        self, command: Command, work: Deferred[ActionResult]
    ) -> ActionResult:
        """``work``, or ``EXECUTION_ERROR`` "still running" past the Panel's patience."""
        timeouts = self._deadlines.timeouts
        deadline = timeouts.command_answer + timeouts.command_margin
        action = command.action

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
            work,
            deadline,
            what=printable("{} {}".format(action, command.server_id or "")),
            fallback=still_running,
        )

    async def _checked(self, command: Command) -> ActionResult:
        """Steps 1-2 of the pipeline, then ``_run``."""
        spec = self._by_name.get(command.action)
        if spec is None:
            raise UnknownAction("unknown action: {}".format(command.action[:100]))
        check_payload(command.params)
        if command.server_id is not None and unusable_text(command.server_id):
            raise InvalidInput(
                "serverId holds a lone surrogate, which is not text", field="serverId"
            )
        return await self._run(spec, command)

    async def _run(self, spec: ActionSpec, command: Command) -> ActionResult:
        try:
            if not spec.carries_aliases:
                await self._learn_aliases(command)
            return await self._call(spec, command)
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

    async def _call(self, spec: ActionSpec, command: Command) -> ActionResult:
        payload = spec.payload
        params: Mapping[str, Any] | None = None
        if payload.before_server:
            params = payload.validate(command.params)
        server_id = self._server(payload, command)
        if params is None:
            params = payload.validate(command.params, server_id)
        if spec.forward is not None:
            return await self._call(self._specs[spec.forward(params)], command)
        call = Call(command, server_id, params)
        if spec.pending is None:
            data = await spec.handler(call)
        else:
            pending = spec.pending
            data = await self._deadlines.answer_by(
                spec.handler(call),
                self._deadlines.timeouts.command_answer,
                what=printable("{} {}".format(spec.name, server_id or "")),
                fallback=lambda: pending(call),
            )
        return ActionResult(self._data(spec, call, data), self._message(spec, call))

    def _server(self, payload: Payload, command: Command) -> str | None:
        """The id of the server ``command`` addresses, as ``payload.server`` says."""
        if payload.server == "none" or (payload.server == "optional" and not command.server_id):
            return None
        if not command.server_id:
            raise InvalidInput("serverId is required", field="serverId")
        if payload.server == "new":
            return command.server_id
        return str(self._servers.resolve(command.server_id))

    @staticmethod
    def _data(spec: ActionSpec, call: Call, data: object) -> dict[str, Any]:
        if data is None:
            return {}
        if spec.names_server and isinstance(data, Mapping) and "serverId" not in data:
            return {**data, "serverId": call.server_id}
        # A record goes on untouched: the transports serialise it (wire.json.to_json).
        return cast(dict[str, Any], data)

    @staticmethod
    def _message(spec: ActionSpec, call: Call) -> str | None:
        if spec.message is None or isinstance(spec.message, str) and "{" not in spec.message:
            return spec.message
        if isinstance(spec.message, str):
            return spec.message.format(server_id=call.server_id)
        return spec.message(call)

    async def _learn_aliases(self, command: Command) -> None:
        """
        Register the other ids a payload names (``panelId``, ``aliases``) for
        the server it addresses, so that the Panel's second id works from then
        on (PROTOCOL.md section 2).
        """
        if not command.server_id:
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
            await cast(Awaitable[object], self._servers.update(server_id, {"aliases": new}))
            self.log.info(
                "server {server_id} is also known as {aliases}",
                server_id=printable(server_id),
                aliases=[printable(name) for name in new],
            )
