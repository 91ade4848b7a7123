"""
The agent's HTTP API (PROTOCOL.md section 1): a Klein app as a class.

Every dependency is injected, so tests drive the real routes in memory with
``treq.testing.StubTreq(api.app.resource())`` and fakes behind them.

The Panel marks a node offline on any non-2xx answer, so ``POST /api/command``
answers HTTP 200 even for a failed command (``success: false`` with a code);
only a bad credential (401), an unparseable body (400) and an oversized body
(413) are HTTP errors there.  The small REST surface for operators
(``/api/servers...``) uses ordinary HTTP status codes instead.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar, cast

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import HTTPException

from ctrlagent.api.openapi import openapi_document
from ctrlagent.api.site import make_http_service
from ctrlagent.config import AgentConfig
from ctrlagent.errors import CtrlAgentError, InvalidInput, ParseError
from ctrlagent.interfaces import IServerManager
from ctrlagent.wire import http as envelopes
from ctrlagent.wire.command import ActionResult, Command, IDispatcher, parse_command, printable
from ctrlagent.wire.json import decode_body, encode, to_json
from ctrlagent.wire.tables import POWER_WORDS
from ctrlagent.wire.time import iso_ms
from ctrlagent.work import Deadlines, Tracker, async_to_deferred

# Re-exported: the composition root imports both from here.
__all__ = ["AgentApi", "authenticated", "make_http_service"]

F = TypeVar("F", bound=Callable[..., Awaitable[bytes]])

# Fills a response with a backup's archive (``request, server_id, backup_id``),
# returning the body left to write; raises ``CtrlAgentError`` before it writes.
BackupDownload = Callable[[IRequest, str, str], Awaitable[bytes]]

# Told of every HTTP command once answered: ``(action, seconds, ok)`` (the metrics).
CommandObserver = Callable[[str, float, bool], None]

def human_duration(seconds: float) -> str:
    """``3d 4h 5m 6s`` (leading zero units left out)."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m")]
    out: list[str] = []
    for value, unit in parts:
        if value or out:
            out.append("{}{}".format(value, unit))
    out.append("{}s".format(secs))
    return " ".join(out)


def authenticated(f: F) -> F:
    """
    Refuse the request with 401 unless it carries the node's secret, as
    ``Authorization: Bearer <secret>`` or ``X-API-Key: <secret>``.
    """

    @functools.wraps(f)
    async def wrapper(self: AgentApi, request: IRequest, *args: Any, **kwargs: Any) -> bytes:
        self._cors(request)
        if not self.authorized(request):
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="ctrlagent"')
            return self._json(request, envelopes.auth_failed())
        return await f(self, request, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class AgentApi:
    """
    The HTTP routes, over an injected dispatcher and server manager.

    ``panel_link()`` is the optional WebSocket link's own state
    (``PanelLink.state``: ``{enabled, connected, state, url, lastError,
    since}``), None when the agent has no link; ``link_connected()`` is the
    older, up-or-down form of it (tests).  Either is reported under
    ``panelLink`` and never as the node's ``connected``: the Panel drives the
    agent over HTTP, and a node whose optional link is down is still online
    (PROTOCOL.md section 1).  ``docker_ping()`` whether the Docker
    engine answers (waiting ``timeouts.engine_ping``), cached for
    ``timeouts.engine_ping_cache`` so that frequent ``/health`` probes stay
    cheap.  ``tracker`` is the API's share of the agent's work (the commands
    in flight, which ``drain`` waits for); ``deadlines`` shields them from
    clients that leave.  Both default to the API's own.  ``backup_download``
    answers ``GET /api/servers/{id}/backups/{backupId}/download`` (tap.py
    passes the backups package's ``serve_download``; None: no backups here).
    ``metrics`` answers ``GET /metrics`` (None: 404) and ``observe_command``
    is told of every command answered (both from tap.py's metrics).
    ``disk_report`` gives ``/health``'s ``disk`` (the node's disk mode).
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        *,
        config: AgentConfig,
        dispatcher: IDispatcher,
        servers: IServerManager,
        docker_ping: Callable[[], Deferred[bool]],
        clock: IReactorTime,
        version: str,
        panel_link: Callable[[], Mapping[str, Any]] | None = None,
        link_connected: Callable[[], bool] | None = None,
        tracker: Tracker | None = None,
        deadlines: Deadlines | None = None,
        backup_download: BackupDownload | None = None,
        metrics: IResource | None = None,
        observe_command: CommandObserver | None = None,
        disk_report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._observe_command = observe_command
        self._disk_report = disk_report
        self._backup_download = backup_download
        self._dispatcher = dispatcher
        self._servers = servers
        # A manager without kept answers (a stand-in) leaves every read to the registry.
        self._read_answer: Callable[[str, str], bytes | None] | None = getattr(
            servers, "read_answer", None
        )
        self._panel_link = panel_link
        self._link_connected = link_connected
        self._docker_ping = docker_ping
        self._clock = clock
        self._version = version
        self._started = clock.seconds()
        timeouts = config.timeouts
        self._docker_cache_seconds = timeouts.engine_ping_cache
        self._docker_ping_timeout = timeouts.engine_ping
        self._docker_state: tuple[float, bool] | None = None
        self._docker_waiters: list[Deferred[bool]] | None = None
        self._secret = config.secret.encode("utf-8")
        self._cors_headers = (
            (b"Access-Control-Allow-Origin", config.http.cors_origin.encode()),
            *_CORS_HEADERS,
        )
        self._plain_head = self._plain_response_head()
        # Commands still running (this API's share of the agent's work), so
        # that shutdown can let them finish.
        self._tracker = tracker if tracker is not None else Tracker("http")
        self._deadlines = (
            deadlines if deadlines is not None else Deadlines(clock, self._tracker, timeouts)
        )

    def resource(self) -> IResource:
        """
        The API as the listener serves it: Klein's routes, with the Panel's
        ``POST /api/command`` (nearly every request a node gets) answered
        without Klein's per-request routing (see ``_CommandFirst``).
        """
        return _CommandFirst(self, self.app.resource())

    def render_command(self, request: IRequest) -> int:
        """
        ``POST /api/command`` as Klein would answer it, without the routing:
        the same handler (credentials, body, dispatch), the same error
        handler, the answer written and the request finished; a client that
        goes away cancels the handler (its dispatch is shielded).
        """
        # As Klein does: the route's two segments move to the prepath.
        request.prepath.extend(request.postpath[:2])  # type: ignore[attr-defined]
        request.postpath = request.postpath[2:]  # type: ignore[attr-defined]
        answer = Deferred.fromCoroutine(self.command(request))
        if answer.called:
            # Answered at once (a status read): nothing to cancel, no timer.
            answer.addCallbacks(
                lambda body: self._answered(request, body),
                lambda failure: self._answered(request, self._failed(request, failure)),
            ).addErrback(self._unwritten)
            return NOT_DONE_YET
        finished = [False]

        def gone(result: object) -> None:
            finished[0] = True

        request.notifyFinish().addBoth(gone)  # type: ignore[attr-defined]
        request.notifyFinish().addErrback(lambda _: answer.cancel())  # type: ignore[attr-defined]

        def failed(failure: Failure) -> bytes | None:
            if finished[0]:
                # The client left: Klein's rule, a cancellation is no news.
                if not failure.check(CancelledError):
                    self.log.failure("unhandled error processing request", failure)
                return None
            return self._failed(request, failure)

        def write(body: bytes | None) -> None:
            if body is not None and not finished[0]:
                self._answered(request, body)

        answer.addErrback(failed).addCallback(write).addErrback(self._unwritten)
        return NOT_DONE_YET

    def _unwritten(self, failure: Failure) -> None:
        self.log.failure("unhandled error writing the answer to a command", failure)

    def _failed(self, request: IRequest, failure: Failure) -> bytes:
        """The route's error handler (``unexpected_error``), outside Klein."""
        return self.unexpected_error(request, failure)

    @staticmethod
    def _answered(request: IRequest, body: bytes) -> None:
        if body:
            request.write(body)
        request.finish()  # type: ignore[attr-defined]

    def answer_plain_command(
        self, authorization: bytes | None, api_key: bytes | None, body: bytes
    ) -> bytes | _Dispatched | None:
        """
        ``POST /api/command`` as the listener's plain-command path asks it
        (``api/site.py``), without a ``Request``: the response after its Date
        line when the command succeeded at once (a status or metrics read),
        recorded in the metrics as the route records it; the dispatched work
        (a ``Handover``) when it did not, which the route then answers as
        usual from its own ``Request``; or None, having done nothing, for
        whatever the route answers without a dispatch (a wrong secret, a
        body that does not parse): the route answers it.

        The route stays the reference for every answer but a success at
        once: nothing here writes an error, and no command is ever
        dispatched twice.
        """
        # The listener hands over bodies within http.max_body_bytes only.
        if not self.offers_secret(authorization, api_key):
            return None
        started = self._clock.seconds()
        plain = _bare_command(body) if len(body) <= _BARE_BODY_BYTES else None
        if plain is not None and plain[1] is not None:
            # A status or metrics read the manager keeps (servers/reads.py).
            kept = self._read_answer(plain[0], plain[1]) if self._read_answer else None
            if kept is not None:
                self._observe(plain[0], started, True)
                return self._plain_head + b"%d\r\n\r\n" % len(kept) + kept
        if plain is not None:
            command = Command(plain[0], plain[1], {})
        else:
            try:
                command = parse_command(decode_body(body))
            except Exception:
                # A 400, a coded failure, or a logged 500: the route's to answer.
                return None
        try:
            work = self._dispatcher.dispatch(command)
            assert isinstance(work, Deferred)
        except Exception:
            return _Dispatched(self, command, started, fail())
        if not work.called or work.paused:
            # Not answered yet (or waiting for an inner Deferred): the route's.
            return _Dispatched(self, command, started, work)
        result = cast("ActionResult | Failure", work.result)
        if isinstance(result, Failure):
            # Failures are the route's to answer and log, as ever.
            work.addErrback(_handed_on)
            return _Dispatched(self, command, started, fail(result))
        try:
            answer = encode(envelopes.success(result))
        except Exception:
            # A result that cannot be written: the route logs it and answers 500.
            return _Dispatched(self, command, started, succeed(result))
        self._observe(command.action, started, True)
        return self._plain_head + b"%d\r\n\r\n" % len(answer) + answer

    def _unclaimed(self, handed: _Dispatched) -> None:
        """A command the plain path started that no request took over (a bug)."""
        what = "{} left without its request".format(printable(handed.command.action))
        self.log.error("{what}", what=what)
        self._tracker.track(handed.work, what)

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _json(request: IRequest, body: Any) -> bytes:
        for name, value in _JSON_HEADERS:
            request.setHeader(name, value)
        data = encode(body)
        # A known length spares the client chunked framing.
        request.setHeader(b"Content-Length", b"%d" % len(data))
        return data

    def _cors(self, request: IRequest) -> None:
        for name, value in self._cors_headers:
            request.setHeader(name, value)

    def _plain_response_head(self) -> bytes:
        """
        The headers of a command's JSON answer as Twisted writes them after
        its Date line (``_cors`` then ``_json``), up to the Content-Length
        value: the plain-command path's answers are byte for byte the route's.
        """
        headers = Headers()
        for name, value in (*self._cors_headers, *_JSON_HEADERS, (b"Content-Length", b"")):
            headers.setRawHeaders(name, [value])
        lines = [name + b": " + values[0] for name, values in headers.getAllRawHeaders()]
        return b"\r\n".join(lines)

    def authorized(self, request: IRequest) -> bool:
        """
        Whether ``request`` carries the node's secret (``Authorization:
        Bearer`` or ``X-API-Key``).  The listener also asks this at the
        headers, before it reads any body.
        """
        return self.offers_secret(
            request.getHeader(b"authorization"), request.getHeader(b"x-api-key")
        )

    def offers_secret(self, auth: bytes | None, key: bytes | None) -> bool:
        """
        Whether an ``Authorization`` value (``Bearer <secret>``) or an
        ``X-API-Key`` value is the node's secret, compared in constant time.
        """
        if not self._secret:
            # validate() only allows an empty secret in development mode.
            return bool(self._config.development)
        offered: list[bytes] = []
        if auth:
            scheme, _, token = auth.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                offered.append(token.strip())
        if key:
            offered.append(key.strip())
        # Compare every candidate so that timing does not reveal which one was checked.
        ok = False
        for token in offered:
            ok |= hmac.compare_digest(token, self._secret)
        return ok

    def _read_body(self, request: IRequest) -> Any:
        """
        The decoded JSON body.  ``LimitedSite`` already refused oversized bodies
        before reading them; this check covers other hosting (tests, proxies).
        """
        limit = self._config.http.max_body_bytes
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _TooLarge(limit)
        content = request.content
        raw = content.read(limit + 1) if content is not None else b""
        if len(raw) > limit:
            raise _TooLarge(limit)
        # Every way a body can fail to decode is a ParseError (400), never a 500.
        return decode_body(raw)

    async def _run(self, command: Command, handed: _Dispatched | None = None) -> ActionResult:
        """
        Dispatch ``command`` (or take the work the plain-command path
        ``handed`` over, already dispatched) shielded from the client going
        away: a Panel that times out must not cancel a half-done create or stop.
        """
        started = self._clock.seconds() if handed is None else handed.started
        ok = False
        try:
            work = self._dispatcher.dispatch(command) if handed is None else handed.work
            assert isinstance(work, Deferred)
            if work.called and not work.paused:
                # Answered at once (a status read): nothing is left to shield
                # from a client that goes away, nor for a drain to wait for.
                answered: ActionResult = await work
                ok = True
                return answered
            result: ActionResult = await self._deadlines.shielded(
                self._tracker.hold(work),
                what="{} after its client left".format(printable(command.action)),
                expected=(CtrlAgentError,),
            )
            ok = True
            return result
        finally:
            self._observe(command.action, started, ok)

    def _observe(self, action: str | None, started: float, ok: bool) -> None:
        """Tell the metrics of one answered command (the one place that does)."""
        if self._observe_command is not None:
            self._observe_command(action or "", self._clock.seconds() - started, ok)

    @async_to_deferred
    async def drain(self, timeout: float) -> None:
        """
        Fire once every command in flight has finished, or after ``timeout``
        seconds, whichever comes first (used when the HTTP service stops).
        """
        await self._deadlines.within(self._tracker.wait(), timeout)

    @property
    def in_flight(self) -> int:
        """How many commands are running right now."""
        return len(self._tracker)

    async def _docker_ok(self) -> bool:
        now = self._clock.seconds()
        if (
            self._docker_state is not None
            and now - self._docker_state[0] < self._docker_cache_seconds
        ):
            return self._docker_state[1]
        if self._docker_waiters is not None:
            # A ping is already in flight: share its answer.
            waiter: Deferred[bool] = Deferred()
            self._docker_waiters.append(waiter)
            return await waiter
        self._docker_waiters = []
        try:
            ping = self._docker_ping()
            ping.addTimeout(self._docker_ping_timeout, self._clock)
            ok = bool(await ping)
        except Exception as e:
            # An unreachable engine is what /health reports, not an agent error.
            self.log.info("docker ping failed: {error}", error=str(e) or type(e).__name__)
            ok = False
        self._docker_state = (self._clock.seconds(), ok)
        waiters, self._docker_waiters = self._docker_waiters, None
        for w in waiters:
            w.callback(ok)
        return ok

    def _uptime(self) -> float:
        return max(0.0, self._clock.seconds() - self._started)

    def _link_state(self) -> dict[str, Any]:
        """``panelLink``: the optional WebSocket link's own state (never raises)."""
        try:
            if self._panel_link is not None:
                return dict(self._panel_link())
            if self._link_connected is not None:
                up = bool(self._link_connected())
                return {**_NO_LINK, "enabled": True, "connected": up,
                        "state": "connected" if up else "disconnected"}
        except Exception:
            self.log.failure("link state check failed")
            return {**_NO_LINK, "enabled": True, "state": "unknown"}
        return dict(_NO_LINK)

    # -- node routes ---------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        """The Panel probes ``/health``; a browser landing on ``/`` is sent there."""
        request.setResponseCode(301)
        request.setHeader(b"Location", b"/health")
        return b""

    @app.route("/health", methods=["GET", "HEAD"])
    async def health(self, request: IRequest) -> bytes:
        """
        Discovery probe (no auth).  200 whenever the agent can serve; 503 only
        when the Docker engine is unreachable, since then no server can be
        managed.  ``connected`` says whether the Panel can command this agent,
        which it does over this HTTP API: answering at all means it can.  The
        Panel registers a node offline when ``connected`` is false, so the
        optional WebSocket link's state goes under ``panelLink`` instead.
        """
        docker = await self._docker_ok()
        uptime = self._uptime()
        request.setResponseCode(200 if docker else 503)
        body: dict[str, Any] = {
            "status": "healthy" if docker else "degraded",
            "nodeId": self._config.node_id,
            "version": self._version,
            "uptime": human_duration(uptime),
            "uptimeSeconds": int(uptime),
            "timestamp": iso_ms(self._clock.seconds()),
            "connected": True,
            "docker": docker,
            "panelLink": self._link_state(),
        }
        if self._disk_report is not None:
            # How disk limits are enforced (docs/DISK.md): the mode, and the
            # servers under each.
            body["disk"] = self._disk_report()
        return self._json(request, body)

    @app.route("/api/discovery", methods=["GET"])
    def discovery(self, request: IRequest) -> bytes:
        """What kind of agent answers here (no auth, like /health)."""
        self._cors(request)
        return self._json(
            request,
            {
                "type": "ctrl-alt-play-agent",
                "version": self._version,
                "name": "Ctrl-Alt-Play Agent",
                "nodeUuid": self._config.node_id,
                "nodeId": self._config.node_id,
            },
        )

    @app.route("/api/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """The OpenAPI 3 description of this API."""
        self._cors(request)
        actions = getattr(self._dispatcher, "actions", None)
        listed = actions() if callable(actions) else None
        schemas = getattr(self._dispatcher, "openapi_schemas", None)
        return self._json(
            request,
            openapi_document(self._version, listed, schemas() if callable(schemas) else None),
        )

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> IResource | bytes:
        """Prometheus metrics (``api/metrics.py``: its own token, not the secret)."""
        if self._metrics is None:
            request.setResponseCode(404)
            return self._json(request, envelopes.route_error(404, "Not Found"))
        return self._metrics

    @app.route("/api", methods=["OPTIONS"])
    @app.route("/api/<path:rest>", methods=["OPTIONS"])
    def preflight(self, request: IRequest, rest: str = "") -> bytes:
        """CORS preflight: allowed without credentials, as browsers send none."""
        self._cors(request)
        request.setResponseCode(200)
        return b""

    @app.route("/api/status", methods=["GET"])
    @authenticated
    async def status(self, request: IRequest) -> bytes:
        """What the Panel shows for the node: online, version, uptime, server count."""
        return self._json(
            request,
            {
                "online": True,
                "version": self._version,
                "uptime": round(self._uptime(), 3),
                "serverCount": len(to_json(self._servers.list_servers())),
                "lastSeen": iso_ms(self._clock.seconds()),
                "nodeId": self._config.node_id,
                "panelLink": self._link_state(),
            },
        )

    # -- the Panel's command endpoint ------------------------------------------

    @app.route("/api/command", methods=["POST"])
    @authenticated
    async def command(self, request: IRequest) -> bytes:
        """Run one command; a failed command is still HTTP 200 (see module docstring)."""
        handed = getattr(request, "handover", None)
        if isinstance(handed, _Dispatched) and not handed.claimed:
            # Parsed and dispatched on the plain-command path already.
            handed.claimed = True
            command = handed.command
        else:
            handed = None
            try:
                command = parse_command(self._read_body(request))
            except _TooLarge as e:
                self._observe(None, self._clock.seconds(), False)
                request.setResponseCode(413)
                return self._json(request, envelopes.too_large(e.limit))
            except ParseError as e:
                self._observe(None, self._clock.seconds(), False)
                request.setResponseCode(400)
                return self._json(request, envelopes.failure(e))
            except CtrlAgentError as e:
                self._observe(None, self._clock.seconds(), False)
                return self._json(request, envelopes.failure(e))
        try:
            result = await self._run(command, handed)
        except CtrlAgentError as e:
            self.log.debug(
                "command {action} failed: {code} {message}",
                action=command.action,
                code=e.code,
                message=e.message,
            )
            return self._json(request, envelopes.failure(e))
        return self._json(request, envelopes.success(result))

    # -- REST for operators and scripts ----------------------------------------

    async def _rest(self, request: IRequest, command: Command) -> bytes:
        try:
            result = await self._run(command)
        except CtrlAgentError as e:
            request.setResponseCode(envelopes.rest_status(e.code))
            return self._json(request, envelopes.failure(e))
        return self._json(request, envelopes.success(result))

    def _rest_body(self, request: IRequest) -> dict[str, Any]:
        body = self._read_body(request)
        if not isinstance(body, dict):
            raise ParseError("request body must be a JSON object")
        return body

    async def _rest_with_body(
        self, request: IRequest, build: Callable[[dict[str, Any]], Command]
    ) -> bytes:
        try:
            command = build(self._rest_body(request))
        except _TooLarge as e:
            self._observe(None, self._clock.seconds(), False)
            request.setResponseCode(413)
            return self._json(request, envelopes.too_large(e.limit))
        except CtrlAgentError as e:
            self._observe(None, self._clock.seconds(), False)
            request.setResponseCode(envelopes.rest_status(e.code, 400))
            return self._json(request, envelopes.failure(e))
        return await self._rest(request, command)

    @app.route("/api/servers", methods=["GET"])
    @authenticated
    async def list_servers(self, request: IRequest) -> bytes:
        """Every managed server's status."""
        return await self._rest(request, Command("list_servers", None, {}))

    @app.route("/api/servers/<server_id>", methods=["GET"])
    @authenticated
    async def server_status(self, request: IRequest, server_id: str) -> bytes:
        """One server's status (by any of its ids)."""
        return await self._rest(request, Command("get_server_status", server_id, {}))

    @app.route("/api/servers/<server_id>/power", methods=["POST"])
    @authenticated
    async def server_power(self, request: IRequest, server_id: str) -> bytes:
        """``{"action": "start"|"stop"|"restart"|"kill", "signal"?, "timeout"?}``."""

        def build(body: dict[str, Any]) -> Command:
            action = body.get("action")
            if not isinstance(action, str) or action not in POWER_WORDS:
                raise InvalidInput(
                    "action must be one of {}".format(", ".join(POWER_WORDS)), field="action"
                )
            params = {k: v for k, v in body.items() if k != "action"}
            return Command(POWER_WORDS[action], server_id, params)

        return await self._rest_with_body(request, build)

    @app.route("/api/servers/<server_id>/commands", methods=["POST"])
    @authenticated
    async def server_command(self, request: IRequest, server_id: str) -> bytes:
        """``{"command": "say hi"}``: one line to the server's console."""
        return await self._rest_with_body(
            request,
            lambda body: Command(
                "send_server_command", server_id, {"command": body.get("command")}
            ),
        )

    @app.route("/api/servers/<server_id>/aliases", methods=["POST"])
    @authenticated
    async def server_aliases(self, request: IRequest, server_id: str) -> bytes:
        """
        ``{"alias": "<the Panel's other id>"}``: record that the server is also
        known by ``alias`` (``add_server_alias``); 409 when it names another server.
        """
        return await self._rest_with_body(
            request,
            lambda body: Command("add_server_alias", server_id, {"alias": body.get("alias")}),
        )

    @app.route("/api/servers/<server_id>/logs", methods=["GET"])
    @authenticated
    async def server_logs(self, request: IRequest, server_id: str) -> bytes:
        """The last ``?lines=`` console lines (default 100)."""
        params: dict[str, Any] = {}
        lines = request.args.get(b"lines") if request.args else None
        if lines:
            params["lines"] = lines[0].decode("utf-8", "replace")
        return await self._rest(request, Command("get_server_logs", server_id, params))

    @app.route("/api/servers/<server_id>/backups/<backup_id>/download", methods=["GET", "HEAD"])
    @authenticated
    async def backup_download(self, request: IRequest, server_id: str, backup_id: str) -> bytes:
        """
        A backup's archive: ``200`` whole, ``206`` for one ``Range: bytes=a-b``,
        ``416`` for a range past its end; errors are JSON with their REST status.
        """
        if self._backup_download is None:
            request.setResponseCode(envelopes.rest_status("CONFLICT"))
            return self._json(
                request,
                envelopes.failure(
                    CtrlAgentError("backups are not available on this node", code="CONFLICT")
                ),
            )
        try:
            return await self._backup_download(request, server_id, backup_id)
        except CtrlAgentError as e:
            if getattr(request, "startedWriting", False):
                # Part of the archive is out: the only honest end is a cut
                # connection (the client sees fewer bytes than Content-Length).
                self.log.info(
                    "download of backup {backup_id} stopped: {error}",
                    backup_id=printable(backup_id),
                    error=e.message,
                )
                request.loseConnection()  # type: ignore[attr-defined]
                return b""
            request.setResponseCode(envelopes.rest_status(e.code))
            return self._json(request, envelopes.failure(e))

    # -- errors ----------------------------------------------------------------

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        """Unknown routes and wrong methods answer JSON, not HTML."""
        error = failure.value
        assert isinstance(error, HTTPException)
        path = request.path or b""
        if path.startswith(b"/api"):
            self._cors(request)
        code = error.code or 500
        valid = [m for m in getattr(error, "valid_methods", None) or () if m != "OPTIONS"]
        if code == 405 and not valid:
            # Only the catch-all CORS preflight matched: the path does not exist.
            code = 404
        request.setResponseCode(code)
        if code == 405:
            request.setHeader(b"Allow", ", ".join(valid).encode("ascii"))
        return self._json(request, envelopes.route_error(code, error.name))

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        """A bug in a route: log it, answer JSON 500 without the traceback."""
        if failure.check(CancelledError):
            # The client went away; Klein cancels the handler.  Nothing to say.
            return b""
        self.log.failure("unexpected error serving {path}", failure, path=request.path)
        request.setResponseCode(500)
        return self._json(request, envelopes.internal_error())


# The headers ``AgentApi._cors`` sets after the configured origin, and those
# of every JSON answer (``_json``, which adds the Content-Length).
_CORS_HEADERS = (
    (b"Access-Control-Allow-Methods", b"GET, POST, PUT, DELETE, OPTIONS"),
    (b"Access-Control-Allow-Headers", b"Content-Type, Authorization, X-API-Key"),
    (b"Access-Control-Max-Age", b"600"),
)
_JSON_HEADERS = (
    (b"Content-Type", b"application/json; charset=utf-8"),
    (b"Cache-Control", b"no-store"),
)


# Bodies up to this size may be remembered by ``_bare_command``.
_BARE_BODY_BYTES = 256


@functools.lru_cache(maxsize=4096)
def _bare_command(body: bytes) -> tuple[str, str | None] | None:
    """
    ``(action, server_id)`` of a command body that says nothing else (no
    params, no id), as ``parse_command(decode_body(body))`` reads it; None
    for any other body, or one that does not parse.

    A pure function of the bytes, kept for the last few thousand bodies: the
    Panel reads the same servers' status and metrics again and again, with
    the very same body.
    """
    try:
        command = parse_command(decode_body(body))
    except Exception:
        return None
    if command.params or command.command_id is not None:
        return None
    return command.action, command.server_id


def _handed_on(failure: Failure) -> None:
    """A failure passed on to another Deferred: nothing left to report here."""


class _Dispatched:
    """
    A command the plain-command path parsed and dispatched without answering
    it at once (``api/site.py``'s ``Handover``): the route's request for the
    same bytes takes it (``claimed``) and answers it from ``work``, with the
    shielding, tracking and deadline of any command.
    """

    claimed = False

    def __init__(
        self, api: AgentApi, command: Command, started: float, work: Deferred[ActionResult]
    ) -> None:
        self._api = api
        self.command = command
        self.started = started
        self.work = work

    def unclaimed(self) -> None:
        """No request took the work: keep it tracked, and log the bug."""
        self._api._unclaimed(self)


# ``panelLink`` of an agent without a WebSocket link to the Panel.
_NO_LINK: Mapping[str, Any] = MappingProxyType(
    {
        "enabled": False,
        "connected": False,
        "state": "disabled",
        "url": None,
        "lastError": None,
        "since": None,
    }
)


class _CommandFirst(Resource):
    """
    The root resource of the listener: ``POST /api/command`` goes straight to
    ``AgentApi.render_command``, every other request to Klein's routes.

    Klein binds a werkzeug URL map, matches the path and chains three
    Deferreds for every request: at the Panel's rate of status and metrics
    reads, a fifth of the agent's time per answer went there.  The command
    route is one fixed path and method, so it needs none of that.
    """

    isLeaf = True

    def __init__(self, api: AgentApi, routes: IResource) -> None:
        super().__init__()
        self._api = api
        self._routes = routes

    def render(self, request: IRequest) -> Any:
        """Answer the command endpoint here, hand anything else to Klein."""
        if (
            request.method == b"POST"
            and request.path == b"/api/command"
            and not request.prepath  # type: ignore[attr-defined]
        ):
            return self._api.render_command(request)
        return self._routes.render(request)


class _TooLarge(CtrlAgentError):
    code = "INVALID_PAYLOAD"

    def __init__(self, limit: int) -> None:
        super().__init__("request body exceeds the limit of {} bytes".format(limit))
        self.limit = limit
