"""
The agent's Docker Engine API client: typed, asynchronous, Twisted-native.

``DockerClient`` speaks the engine's HTTP API through an injected treq
``HTTPClient`` (see ``ctrlagent.engine.docker.transport``).  It negotiates the API
version once (engines from API 1.41 up) and pins every path under
``/v1.xx``.  Long streams (logs, attach, events, stats) each get a connection
of their own, read by ``rawhttp`` rather than treq (a console line's cost at
hundreds of servers); a client built on an injected ``HTTPClient`` alone
sends them through it too.  Every call has a time limit, every stream a
silence limit, error bodies are read with a size cap, and failures are typed:

- ``DockerUnavailable``: no socket, refused, dropped, timed out (the engine
  is stopped or restarting).  Calls fail fast and work again, without any
  reset, once the engine is back;
- ``NotFound`` (``ContainerGone``, ``ImageNotFound``, ``NetworkNotFound``);
- ``Conflict`` (``DockerConflict``);
- ``DockerError(status, message)`` for anything else.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import select
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from OpenSSL.SSL import Error as SSLError
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
)
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
)
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from ctrlagent.config import DockerConfig
from ctrlagent.engine.connecting import connect_protocol
from ctrlagent.engine.docker.errors import (
    ContainerGone,
    DockerConflict,
    DockerError,
    DockerInvalidInput,
    DockerTimeout,
    DockerUnavailable,
    ImageNotFound,
    NetworkNotFound,
    PullFailed,
    RegistryAuthFailed,
    error_for_status,
)
from ctrlagent.engine.docker.eventstream import ResumableEvents
from ctrlagent.engine.docker.models import (
    DockerEvent,
    PullProgress,
    label_filters,
    parse_event,
    parse_image_ref,
    parse_pull_progress,
)
from ctrlagent.engine.docker.pacing import ReadPacer
from ctrlagent.engine.docker.rawhttp import open_stream, request_bytes
from ctrlagent.engine.docker.stats import ContainerStats, parse_stats
from ctrlagent.engine.docker.stdin import AttachStdinProtocol, StdinPipe, attach_request
from ctrlagent.engine.docker.streams import ItemStream, JsonLinesDecoder, LineStream
from ctrlagent.engine.docker.timefmt import format_since, format_since_ns
from ctrlagent.engine.docker.transport import DockerEndpointFactory, DockerHost, make_http_client

__all__ = [
    "DockerClient",
    "error_for_status",
    "MAX_API_VERSION",
    "MANAGED_LABEL",
    "MANAGED_LABEL_FILTER",
]

T = TypeVar("T")

# The newest API whose behaviour this client knows; newer engines are spoken
# to at this version (they all still serve it).
MAX_API_VERSION = "1.45"
# The label every container of the agent carries, and the filter that selects them.
MANAGED_LABEL = "ctrl-alt-play.managed"
MANAGED_LABEL_FILTER = MANAGED_LABEL + "=true"
CONTAINER_EVENTS = ("start", "die", "oom", "kill", "destroy")
# How long a refused create of a network looks for the one another process
# was making (its name shows only after its pool and bridge: a busy host's
# firewall lock can hold that for a while).
NETWORK_RACE_SECONDS = 5.0

ERROR_BODY_CAP = 64 * 1024
JSON_BODY_CAP = 64 * 1024 * 1024

# Everything that means "no usable answer from the engine" (as opposed to an
# answer that says no): these become DockerUnavailable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    ConnectError,
    ConnectionLost,
    ConnectionDone,
    TwistedTimeoutError,
    OSError,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    SSLError,
)


def _cancelled_by_us(error: BaseException) -> bool:
    """True when an HTTP failure only wraps our own cancellation of the request."""
    reasons = getattr(error, "reasons", None) or []
    return bool(reasons) and all(
        isinstance(r, Failure) and r.check(CancelledError, ConnectingCancelledError)
        for r in reasons
    )


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


def _maybe_raced(refused: DockerError) -> bool:
    """
    Whether a refused network create may be another process's create of the
    same network: a taken name, or a pool overlapping one being made.
    """
    return isinstance(refused, DockerConflict) or "overlap" in str(refused).lower()


def _unavailable(host: DockerHost, error: BaseException) -> DockerUnavailable:
    reason = str(error) or type(error).__name__
    reasons = getattr(error, "reasons", None)
    if reasons:
        reason = "; ".join(str(r.getErrorMessage()) for r in reasons)
    return DockerUnavailable("Docker engine at {} unavailable: {}".format(host.describe(), reason))


class _CappedBody(Protocol):
    """
    Collects a response body of at most ``cap`` bytes.

    With ``truncate`` (error bodies) the rest is dropped and the connection
    closed; otherwise an over-long body is an error.
    """

    def __init__(self, cap: int, truncate: bool) -> None:
        self._cap = cap
        self._truncate = truncate
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted hook)
        if self.finished.called:
            return
        room = self._cap - self._size
        if len(data) > room:
            self._chunks.append(data[:room])
            self._size = self._cap
            if self._truncate:
                self.finished.callback(b"".join(self._chunks))
            else:
                self.finished.errback(
                    DockerError(0, "engine response larger than {} bytes".format(self._cap))
                )
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self._chunks.append(data)
        self._size += len(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if self.finished.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


def _warnings(result: Any) -> list[str]:
    """The ``Warnings`` of a create or update answer, as strings (none when absent)."""
    found = result.get("Warnings") if isinstance(result, dict) else None
    if not isinstance(found, list):
        return []
    return [str(w) for w in found if w]


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, dict) and "message" in doc:
        return str(doc["message"])
    return text


class DockerClient:
    """
    The Docker Engine API, as the agent uses it.

    Build it with ``from_config(reactor, config)``; tests may inject any treq
    ``HTTPClient`` (``StubTreq`` included) and a ``Clock``.
    """

    log = Logger()

    def __init__(
        self,
        http: Any,
        clock: IReactorTime,
        config: DockerConfig,
        endpoints: DockerEndpointFactory | None = None,
        host: DockerHost | None = None,
        pool: Any = None,
        pacer: ReadPacer | None = None,
    ) -> None:
        self._http = http
        self._clock = clock
        self.config = config
        self._endpoints = endpoints
        # Reads the long streams' bodies together (``pacing``); None: the reactor does.
        self.pacer = pacer
        self.host = host or (endpoints.host if endpoints else DockerHost(kind="unix", path="/"))
        self._pool = pool
        # Every API URL starts so (no slash at its end): "http://docker".
        self._base_text = self.host.base_text
        self._api: str | None = None
        self._api_lock = DeferredLock()
        # The engine's own version ("24.0.7", Podman's "4.3.1"), once asked.
        self.engine_version: str | None = None
        # One create of a network at a time per name (``network_ensure``).
        self._network_locks: dict[str, DeferredLock] = {}

    @classmethod
    def from_config(cls, reactor: Any, config: DockerConfig) -> DockerClient:
        """A client for ``config.host`` (unix://, tcp://, https://) on ``reactor``."""
        endpoints = DockerEndpointFactory.from_config(reactor, config)
        http, pool = make_http_client(reactor, endpoints)
        pacer = (ReadPacer(reactor, config.stream_read_interval)
                 if config.stream_read_interval > 0 and IReactorFDSet.providedBy(reactor)
                 and hasattr(select, "epoll") else None)
        return cls(http, reactor, config, endpoints=endpoints, pool=pool, pacer=pacer)

    async def close(self) -> None:
        """
        Close the idle pooled connections (open streams are the caller's: the
        reactor reads them from now on).
        """
        if self.pacer is not None:
            self.pacer.close()
            self.pacer = None
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    # -- plumbing ----------------------------------------------------------

    @property
    def api_version(self) -> str | None:
        """The negotiated API version, or None before the first call."""
        return self._api

    def url(self, *segments: str, query: Mapping[str, Any] | None = None,
            versioned: bool = True) -> str:
        """
        The URL of an API path, as ASCII text: each segment percent-encoded
        as one segment, and each query value as one value, as UTF-8.

        ``versioned`` paths get the negotiated ``/v1.xx`` prefix (negotiate
        first).  Query values that are lists or dicts are sent as JSON.
        Built as text: hyperlink's URL objects cost about half a millisecond
        an engine call on a small host (at a re-attach of 500 servers, a
        tenth of its CPU), and would NFC-normalise non-ASCII text on its way
        to a URI, which changes the name the engine is asked about (U+F900
        becomes U+8C48).
        """
        path = [self._base_text]
        if versioned:
            if self._api is None:
                raise DockerError(0, "API version not negotiated yet")
            path.append("v" + quote(self._api, safe=""))
        path.extend(quote(s, safe="") for s in segments)
        url = "/".join(path) if len(path) > 1 else path[0] + "/"
        pairs = []
        for key, value in (query or {}).items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, (dict, list, tuple)):
                text = json.dumps(value, separators=(",", ":"))
            else:
                text = str(value)
            pairs.append(quote(key, safe="") + "=" + quote(text, safe=""))
        return url + "?" + "&".join(pairs) if pairs else url

    @staticmethod
    def _object_id(value: str, what: str) -> str:
        if not isinstance(value, str) or value in ("", ".", "..") or "\x00" in value:
            raise DockerInvalidInput("invalid {} reference {!r}".format(what, value))
        return value

    async def _timed(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        d: Deferred[T] = Deferred.fromCoroutine(coro)
        if timeout:
            d.addTimeout(timeout, self._clock)
        try:
            return await d
        except DeferredTimeoutError:
            raise DockerTimeout(
                "{}: no answer from the Docker engine within {:.1f}s".format(what, timeout or 0)
            ) from None

    async def _send(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        kind: str = "",
        ok: tuple[int, ...] = (200, 201, 204, 304),
    ) -> Any:
        """Send one request; return the (unread) response of an ``ok`` status."""
        hdrs = Headers()
        for name, value in (headers or {}).items():
            hdrs.setRawHeaders(name, [value])
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            hdrs.setRawHeaders("Content-Type", ["application/json"])
        return await self._answer(
            lambda: self._http.request(method, url, data=data, headers=hdrs, unbuffered=True),
            kind, ok,
        )

    async def _send_streamed(self, method: str, url: str, *, kind: str,
                             ok: tuple[int, ...]) -> Any:
        """
        ``_send`` for a long stream, on a connection of its own read by
        ``rawhttp`` (not twisted.web's client, whose layers a console line
        went through one by one).  Returns the response of an ``ok`` status.
        """
        assert self._endpoints is not None
        parts = urlsplit(url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        try:
            request = request_bytes(method, target, parts.netloc)
        except ValueError as e:
            raise DockerInvalidInput(str(e)) from None
        endpoint = self._endpoints.endpoint()
        return await self._answer(lambda: open_stream(endpoint, request, self.pacer), kind, ok)

    async def _answer(self, send: Callable[[], Awaitable[Any]], kind: str,
                      ok: tuple[int, ...]) -> Any:
        """The response ``send()`` brings when its status is ``ok``; else a typed error."""
        try:
            response = await send()
        except CancelledError:
            raise
        except DockerError:
            raise
        except ConnectingCancelledError:
            # Our own cancellation while connecting (a shutdown): not the engine's fault.
            raise CancelledError() from None
        except _UNAVAILABLE as e:
            if _cancelled_by_us(e):
                raise CancelledError() from None
            raise _unavailable(self.host, e) from None
        if response.code in ok:
            return response
        raw = await self._read(response, ERROR_BODY_CAP, truncate=True)
        raise error_for_status(response.code, _error_message(raw), kind)

    async def _read(self, response: Any, cap: int, truncate: bool = False) -> bytes:
        collector = _CappedBody(cap, truncate)
        response.deliverBody(collector)
        try:
            return await collector.finished
        except DockerError:
            raise
        except _UNAVAILABLE as e:
            if _cancelled_by_us(e):
                raise CancelledError() from None
            raise _unavailable(self.host, e) from None

    async def _call(
        self,
        method: str,
        segments: tuple[str, ...],
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        kind: str = "",
        ok: tuple[int, ...] = (200, 201, 204, 304),
        timeout: float | None = -1.0,
        versioned: bool = True,
        raw: bool = False,
    ) -> Any:
        """One request and its whole (capped) answer, JSON-decoded unless ``raw``."""
        if timeout is not None and timeout < 0:
            timeout = self.config.call_timeout
        what = "{} /{}".format(method, "/".join(segments))

        async def run() -> Any:
            if versioned:
                await self._ensure_api()
            response = await self._send(
                method,
                self.url(*segments, query=query, versioned=versioned),
                body=body,
                headers=headers,
                kind=kind,
                ok=ok,
            )
            content = await self._read(response, JSON_BODY_CAP)
            if raw:
                return content
            if not content.strip():
                return None
            try:
                return json.loads(content)
            except ValueError:
                raise DockerError(response.code, "{}: answer is not JSON".format(what)) from None

        return await self._timed(run(), timeout, what)

    # -- engine ------------------------------------------------------------

    async def call(
        self,
        method: str,
        segments: tuple[str, ...],
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        kind: str = "",
        raw: bool = False,
        timeout: float | None = -1.0,
    ) -> Any:
        """
        One request to a path this client has no method for (a runtime's
        own endpoints beside the Docker ones, e.g. Podman's ``libpod/...``),
        under the negotiated version prefix; the JSON answer (the bytes with
        ``raw``), errors typed.  ``timeout`` -1 is ``call_timeout``, None none.
        """
        return await self._call(method, segments, query=query, body=body, headers=headers,
                                kind=kind, raw=raw, timeout=timeout)

    async def ping(self) -> bool:
        """True when the engine answers; raises ``DockerUnavailable`` otherwise."""
        try:
            body = await self._call("GET", ("_ping",), versioned=False, raw=True, ok=(200,))
        except DockerUnavailable:
            raise
        except DockerError as e:
            raise DockerUnavailable("Docker engine not ready: {}".format(e.message)) from None
        return body.strip() == b"OK"

    async def version(self) -> dict[str, Any]:
        """The engine's version document; negotiates the API version once."""
        doc = await self._call("GET", ("version",), versioned=False)
        if isinstance(doc.get("Version"), str):
            self.engine_version = doc["Version"]
        if self._api is None:
            self._api = self._choose_api(doc)
        return dict(doc)

    def _choose_api(self, doc: dict[str, Any]) -> str:
        server = str(doc.get("ApiVersion") or "")
        if not server:
            raise DockerError(0, "Docker engine did not say its API version")
        if _version_tuple(server) < _version_tuple(self.config.min_api_version):
            raise DockerError(
                0,
                "Docker engine API {} is older than the minimum {} (Docker 20.10)".format(
                    server, self.config.min_api_version
                ),
            )
        chosen = min(server, MAX_API_VERSION, key=_version_tuple)
        self.log.info(
            "Docker engine {engine} (API {server}), speaking API {chosen}",
            engine=doc.get("Version", "?"),
            server=server,
            chosen=chosen,
        )
        return chosen

    async def _ensure_api(self) -> str:
        if self._api is not None:
            return self._api
        await self._api_lock.acquire()
        try:
            if self._api is None:
                await self.version()
        finally:
            self._api_lock.release()
        assert self._api is not None
        return self._api

    async def info(self) -> dict[str, Any]:
        """``GET /info``: the engine's system information."""
        return dict(await self._call("GET", ("info",)))

    async def disk_usage(self) -> dict[str, Any]:
        """``GET /system/df``: disk used by images, containers, volumes, cache."""
        return dict(await self._call("GET", ("system", "df")))

    # -- images ------------------------------------------------------------

    async def image_inspect(self, ref: str) -> dict[str, Any]:
        """The image's inspect document; ``ImageNotFound`` when absent locally."""
        ref = self._object_id(ref, "image")
        return dict(await self._call("GET", ("images", ref, "json"), kind="image"))

    async def image_list(self) -> list[dict[str, Any]]:
        """Every local image (summaries)."""
        return list(await self._call("GET", ("images", "json")))

    async def image_remove(self, ref: str, force: bool = False) -> None:
        """Delete a local image."""
        ref = self._object_id(ref, "image")
        await self._call("DELETE", ("images", ref), query={"force": force}, kind="image")

    def registry_auth(self, registry: str) -> str | None:
        """The ``X-Registry-Auth`` header value for ``registry``, if configured."""
        auths = self.config.registry_auths
        names = [registry]
        if registry == "docker.io":
            names += ["index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io"]
        entry: Mapping[str, str] | None = None
        for key, value in auths.items():
            bare = key.split("://", 1)[-1].rstrip("/")
            if key in names or bare in names or bare.split("/", 1)[0] in names:
                entry = value
                break
        if entry is None:
            return None
        doc: dict[str, str] = {"serveraddress": registry}
        if entry.get("identitytoken"):
            doc["identitytoken"] = entry["identitytoken"]
        elif entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            doc.update(username=user, password=password)
        else:
            doc.update(username=entry.get("username", ""), password=entry.get("password", ""))
        return base64.urlsafe_b64encode(json.dumps(doc).encode("utf-8")).decode("ascii")

    async def image_pull(
        self,
        ref: str,
        on_progress: Callable[[PullProgress], None] | None = None,
    ) -> None:
        """
        Pull ``ref`` from its registry, reporting progress events.

        Raises ``ImageNotFound`` when the registry does not have it and
        ``PullFailed`` when the registry cannot be reached or refuses us.
        """
        ref = self._object_id(ref, "image")
        image = parse_image_ref(ref)
        headers = {}
        auth = self.registry_auth(image.registry)
        if auth is not None:
            headers["X-Registry-Auth"] = auth
        await self._ensure_api()
        url = self.url(
            "images", "create", query={"fromImage": image.repository, "tag": image.tag}
        )

        async def open() -> Any:
            return await self._timed(
                self._send("POST", url, headers=headers, kind="image"),
                self.config.call_timeout,
                "pull " + ref,
            )

        stream: ItemStream[PullProgress] = ItemStream(
            self._clock,
            JsonLinesDecoder(parse_pull_progress),
            open,
            silence_timeout=self.config.stream_silence_timeout or self.config.call_timeout,
            description="pull of " + ref,
        )
        try:
            async for progress in stream:
                if progress.error:
                    raise self._pull_error(ref, image.registry, 0, progress.error)
                if on_progress is not None:
                    on_progress(progress)
        except DockerUnavailable:
            raise
        except PullFailed:
            raise
        except DockerError as e:
            raise self._pull_error(ref, image.registry, e.status, e.message) from None
        finally:
            stream.close()

    @staticmethod
    def _pull_error(ref: str, registry: str, status: int, message: str) -> DockerError:
        lowered = message.lower()
        if status == 404 or any(
            words in lowered
            for words in ("manifest unknown", "not found", "does not exist")
        ):
            return ImageNotFound(
                "image {} not found in registry {}: {}".format(ref, registry, message),
                status or 404,
            )
        if any(
            words in lowered
            for words in ("unauthorized", "no basic auth", "denied", "authentication required")
        ):
            return RegistryAuthFailed(
                status,
                "registry {} refused to serve {} (credentials missing or wrong): {}".format(
                    registry, ref, message
                ),
            )
        return PullFailed(
            status,
            "cannot pull {} from registry {}: {}".format(ref, registry, message),
        )

    async def ensure_image(
        self,
        ref: str,
        policy: str | None = None,
        on_progress: Callable[[PullProgress], None] | None = None,
    ) -> None:
        """
        Make ``ref`` available locally according to the pull policy.

        ``always`` pulls; ``if-not-present`` pulls only when absent; ``never``
        only checks and raises ``ImageNotFound`` when absent.
        """
        policy = policy or self.config.pull_policy
        if policy not in ("always", "if-not-present", "never"):
            raise DockerInvalidInput("unknown pull policy {!r}".format(policy))
        if policy == "always":
            await self.image_pull(ref, on_progress)
            return
        try:
            await self.image_inspect(ref)
            return
        except ImageNotFound:
            if policy == "never":
                raise ImageNotFound(
                    "image {} is not present and the pull policy is 'never'".format(ref)
                ) from None
        await self.image_pull(ref, on_progress)

    # -- containers --------------------------------------------------------

    async def container_create(self, name: str | None, spec: dict[str, Any]) -> str:
        """
        Create a container from the raw create body ``spec``; return its id.

        404 means the image is missing (``ImageNotFound``), 409 that the name
        is taken (``DockerConflict``).
        """
        cid, _warnings = await self.container_create_warned(name, spec)
        return cid

    async def container_create_warned(
        self, name: str | None, spec: dict[str, Any]
    ) -> tuple[str, list[str]]:
        """``container_create`` with the engine's warnings (settings it dropped)."""
        query = {"name": name} if name else None
        result = await self._call(
            "POST", ("containers", "create"), query=query, body=spec, kind="image"
        )
        warnings = _warnings(result)
        for warning in warnings:
            self.log.info("container {name}: engine warning: {warning}", name=name, warning=warning)
        return str(result["Id"]), warnings

    async def container_start(self, cid: str) -> None:
        """Start the container (already running is fine)."""
        cid = self._object_id(cid, "container")
        await self._call("POST", ("containers", cid, "start"), kind="container")

    async def container_stop(self, cid: str, timeout: float | None = None) -> None:
        """Stop with SIGTERM (or its stop signal), SIGKILL after ``timeout`` s."""
        await self._stop_call(cid, "stop", timeout)

    async def container_kill(self, cid: str, signal: str = "SIGKILL", *,
                             libpod: bool = False) -> None:
        """
        Send ``signal`` to the container's main process.  ``libpod``: through
        Podman's own endpoint, which answers once the signal is sent (its
        compatible one, like Docker, waits for a SIGKILL's exit).
        """
        cid = self._object_id(cid, "container")
        path = ("libpod", "containers", cid, "kill") if libpod else ("containers", cid, "kill")
        await self._call("POST", path, query={"signal": signal}, kind="container")

    async def container_restart(self, cid: str, timeout: float | None = None) -> None:
        """Stop (with ``timeout``) and start again."""
        await self._stop_call(cid, "restart", timeout)

    async def _stop_call(self, cid: str, verb: str, timeout: float | None) -> None:
        """``stop`` or ``restart``: the call waits out the engine's own grace (10 s by default)."""
        cid = self._object_id(cid, "container")
        query = {"t": math.ceil(timeout)} if timeout is not None else None
        grace = timeout if timeout is not None else 10.0
        await self._call(
            "POST",
            ("containers", cid, verb),
            query=query,
            kind="container",
            timeout=self.config.call_timeout + grace,
        )

    async def container_remove(self, cid: str, force: bool = False, volumes: bool = False) -> None:
        """Remove the container (``force`` kills a running one first)."""
        cid = self._object_id(cid, "container")
        await self._call(
            "DELETE",
            ("containers", cid),
            query={"force": force, "v": volumes},
            kind="container",
        )

    async def container_inspect(self, cid: str) -> dict[str, Any]:
        """The container's inspect document."""
        cid = self._object_id(cid, "container")
        return dict(await self._call("GET", ("containers", cid, "json"), kind="container"))

    async def container_list(
        self,
        labels: dict[str, str] | list[str] | None = None,
        all: bool = True,
    ) -> list[dict[str, Any]]:
        """Containers carrying every one of ``labels`` (running only unless ``all``)."""
        query: dict[str, Any] = {"all": all}
        filters = label_filters(labels)
        if filters:
            query["filters"] = {"label": filters}
        return list(await self._call("GET", ("containers", "json"), query=query))

    async def container_update(self, cid: str, resources: dict[str, Any]) -> list[str]:
        """Change resource limits of a (running) container live; the engine's warnings."""
        cid = self._object_id(cid, "container")
        result = await self._call(
            "POST", ("containers", cid, "update"), body=resources, kind="container"
        )
        warnings = _warnings(result)
        for warning in warnings:
            self.log.info("container {cid}: engine warning: {warning}", cid=cid, warning=warning)
        return warnings

    async def container_wait(
        self, cid: str, condition: str = "not-running", timeout: float | None = None
    ) -> int:
        """
        Wait until the container is ``condition``; return its exit code.

        Without ``timeout`` this waits as long as the container runs (a broken
        connection still ends it with ``DockerUnavailable``).
        """
        cid = self._object_id(cid, "container")
        result = await self._call(
            "POST",
            ("containers", cid, "wait"),
            query={"condition": condition},
            kind="container",
            timeout=timeout,
        )
        error = (result.get("Error") or {}).get("Message")
        if error:
            raise DockerError(0, "wait for {}: {}".format(cid, error))
        return int(result.get("StatusCode", -1))

    async def container_rename(self, cid: str, new_name: str) -> None:
        """Give the container a new name (409 when it is taken)."""
        cid = self._object_id(cid, "container")
        await self._call(
            "POST", ("containers", cid, "rename"), query={"name": new_name}, kind="container"
        )

    # -- networks ----------------------------------------------------------

    async def network_inspect(self, name: str) -> dict[str, Any]:
        """The network's inspect document (``NetworkNotFound`` when absent)."""
        name = self._object_id(name, "network")
        return dict(await self._call("GET", ("networks", name), kind="network"))

    async def network_ensure(
        self,
        name: str,
        subnet: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """
        The agent's bridge network ``name``, created when missing.

        An existing network is returned as it is, even when its subnet differs
        (changing it would cut running servers off).  Callers of this client
        that find it missing wait for one another's create; a create refused
        while another process made the network (the engine answers a taken
        name, or, with a subnet, a pool overlapping the first's, before the
        name can be looked up) gets that network once its name shows, within
        ``NETWORK_RACE_SECONDS``.  Any other refusal is the engine's error at
        once (an invalid subnet, a predefined name, another network already
        holding an overlapping subnet), and an engine that cannot be reached
        says so.
        """
        try:
            return await self.network_inspect(name)
        except NetworkNotFound:
            pass
        lock = self._network_locks.setdefault(name, DeferredLock())
        await lock.acquire()
        try:
            return await self._network_create(name, subnet, labels)
        finally:
            lock.release()
            if not lock.locked and self._network_locks.get(name) is lock:
                del self._network_locks[name]

    async def _network_create(
        self, name: str, subnet: str | None, labels: dict[str, str] | None
    ) -> dict[str, Any]:
        try:
            return await self.network_inspect(name)  # made by a caller before this one
        except NetworkNotFound:
            pass
        spec: dict[str, Any] = {
            "Name": name,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "Labels": dict(labels or {}),
        }
        if subnet:
            spec["IPAM"] = {"Driver": "default", "Config": [{"Subnet": subnet}]}
        try:
            await self._call("POST", ("networks", "create"), body=spec, kind="network")
        except DockerUnavailable:
            raise
        except DockerError as refused:
            if not _maybe_raced(refused):
                raise  # an invalid subnet, a predefined name, the engine's own failure
            if subnet and await self._subnet_held(subnet, name):
                raise refused  # another network has that subnet: no race explains it
            deadline = self._clock.seconds() + NETWORK_RACE_SECONDS
            pause = 0.05
            while True:
                try:
                    return await self.network_inspect(name)  # made meanwhile: use it
                except NetworkNotFound:
                    pass
                if self._clock.seconds() >= deadline:
                    raise refused from None
                await deferLater(self._clock, pause, lambda: None)
                pause = min(pause * 2, 0.5)
        return await self.network_inspect(name)

    async def _subnet_held(self, subnet: str, name: str) -> bool:
        """Whether a network other than ``name`` already has a subnet overlapping ``subnet``."""
        try:
            wanted = ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            return False
        for net in await self._call("GET", ("networks",), kind="network"):
            if not isinstance(net, dict) or net.get("Name") == name:
                continue
            for config in (net.get("IPAM") or {}).get("Config") or []:
                held = config.get("Subnet") if isinstance(config, dict) else None
                try:
                    other = ipaddress.ip_network(str(held), strict=False)
                except ValueError:
                    continue
                if other.version == wanted.version and other.overlaps(wanted):
                    return True
        return False

    async def network_remove(self, name: str) -> None:
        """Remove a network."""
        name = self._object_id(name, "network")
        await self._call("DELETE", ("networks", name), kind="network")

    # -- console -----------------------------------------------------------

    def _stream_opener(self, method: str, segments: tuple[str, ...],
                       query: Mapping[str, Any], kind: str) -> Callable[[], Awaitable[Any]]:
        async def open() -> Any:
            await self._ensure_api()
            url = self.url(*segments, query=query)
            send = self._send if self._endpoints is None else self._send_streamed
            return await self._timed(
                send(method, url, kind=kind, ok=(200,)),
                self.config.call_timeout,
                "{} /{}".format(method, "/".join(segments)),
            )

        return open

    def logs(
        self,
        cid: str,
        *,
        follow: bool,
        tail: int | str = "all",
        since: float | None = None,
        timestamps: bool = False,
        tty: bool = False,
        since_ns: int | None = None,
    ) -> LineStream:
        """
        The container's log as ``(stream, line)`` items.

        ``follow`` keeps the stream open for new lines; ``tail`` limits the
        backlog; ``since`` (epoch seconds) or ``since_ns`` (exact nanoseconds)
        skips older lines (the engine keeps those stamped at it); ``timestamps``
        prefixes each line with the engine's RFC 3339 stamp.
        """
        cid = self._object_id(cid, "container")
        query: dict[str, Any] = {
            "stdout": True,
            "stderr": True,
            "follow": follow,
            "tail": str(tail),
            "timestamps": timestamps,
        }
        if since_ns is not None:
            query["since"] = format_since_ns(since_ns)
        elif since is not None:
            query["since"] = format_since(since)
        return LineStream.console(
            self._clock,
            self._stream_opener("GET", ("containers", cid, "logs"), query, "container"),
            tty=tty,
            line_cap=self.config.console_line_cap,
            silence_timeout=self.config.stream_silence_timeout if follow else 0.0,
            description="logs of {}".format(cid[:12]),
            verify_end=self._console_end_check(cid, "log") if follow else None,
        )

    def attach_output(
        self, cid: str, tty: bool = False, logs: bool = False, stream: bool = True
    ) -> LineStream:
        """
        The container's live output (from now on, or with its past ``logs``).

        Output only: no ``Upgrade`` is sent, the engine streams until the
        container stops or the stream is closed.  ``stream=False`` with
        ``logs=True`` reads the past output and ends.  The engine sends this
        stream without HTTP chunking, so it is the fastest console path.
        """
        cid = self._object_id(cid, "container")
        query = {"stream": stream, "stdout": True, "stderr": True, "logs": logs}
        return LineStream.console(
            self._clock,
            self._stream_opener("POST", ("containers", cid, "attach"), query, "container"),
            tty=tty,
            line_cap=self.config.console_line_cap,
            silence_timeout=self.config.stream_silence_timeout,
            description="attach to {}".format(cid[:12]),
            verify_end=self._console_end_check(cid, "console"),
        )

    async def attach_stdin(self, cid: str) -> StdinPipe:
        """
        A pipe to the container's stdin (the container needs ``OpenStdin``).

        A raw hijacked attach over a fresh connection; it stays open until
        closed or until the server's process exits (``closed`` fires then),
        and closing it leaves the container running.  Attach again after every
        start: a pipe is bound to the process it was opened for.
        """
        cid = self._object_id(cid, "container")
        if self._endpoints is None:
            raise DockerError(0, "attach_stdin needs a client built with an endpoint factory")
        await self._ensure_api()
        # stderr=1 (discarded) makes the engine close the pipe when the server
        # exits, so ``closed`` fires then; stdin alone would stay open, bound to
        # the dead process's stdin.  Game servers write little to stderr, and
        # with a TTY there is no separate stderr at all.
        url = self.url(
            "containers", cid, "attach", query={"stream": True, "stdin": True, "stderr": True}
        )
        path = url[url.index("/", url.index("//") + 2) :]
        host_header = "docker" if self.host.kind == "unix" else self.host.hostname
        protocol = AttachStdinProtocol(attach_request(path, host_header))

        async def connect() -> StdinPipe:
            assert self._endpoints is not None
            try:
                await connect_protocol(self._endpoints.endpoint(), protocol)
            except ConnectingCancelledError:
                raise CancelledError() from None
            except _UNAVAILABLE as e:
                raise _unavailable(self.host, e) from None
            await protocol.ready
            return StdinPipe(protocol)

        try:
            return await self._timed(connect(), self.config.call_timeout, "attach stdin")
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            raise

    # -- stats -------------------------------------------------------------

    async def stats_once(self, cid: str, one_shot: bool = False) -> ContainerStats:
        """
        One stats sample.

        By default the engine samples twice (about a second apart) so the CPU
        percent is meaningful; ``one_shot`` answers at once with CPU at 0.
        """
        cid = self._object_id(cid, "container")
        query: dict[str, Any] = {"stream": False}
        if one_shot:
            query["one-shot"] = True
        doc = await self._call("GET", ("containers", cid, "stats"), query=query, kind="container")
        return parse_stats(doc)

    def stats_stream(self, cid: str) -> ItemStream[ContainerStats]:
        """A sample about every second while the container runs."""
        cid = self._object_id(cid, "container")
        return ItemStream(
            self._clock,
            JsonLinesDecoder(parse_stats),
            self._stream_opener(
                "GET", ("containers", cid, "stats"), {"stream": True}, "container"
            ),
            silence_timeout=self.config.stream_silence_timeout,
            high_water=100,
            description="stats of {}".format(cid[:12]),
            verify_end=self._console_end_check(cid, "stats"),
        )

    # -- events ------------------------------------------------------------

    def events(
        self,
        labels: dict[str, str] | list[str] | str | None = MANAGED_LABEL_FILTER,
        since: float | None = None,
        until: float | None = None,
        actions: tuple[str, ...] | None = CONTAINER_EVENTS,
        on_open: Callable[[], None] | None = None,
    ) -> ItemStream[DockerEvent]:
        """
        Container events (start, die, oom, kill, destroy) of containers with
        ``labels``, from ``since`` (epoch seconds; now when None).

        The stream only ends by ``close()`` or by an error; see
        ``ResumableEvents`` for one that survives engine restarts.
        """
        filters: dict[str, list[str]] = {"type": ["container"]}
        if label_filters(labels):
            filters["label"] = label_filters(labels)
        if actions:
            filters["event"] = list(actions)
        query: dict[str, Any] = {"filters": filters}
        if since is not None:
            query["since"] = format_since(since)
        if until is not None:
            query["until"] = format_since(until)
        return ItemStream(
            self._clock,
            JsonLinesDecoder(parse_event),
            self._stream_opener("GET", ("events",), query, ""),
            silence_timeout=self.config.stream_silence_timeout,
            high_water=10_000,
            description="event stream",
            on_open=on_open,
            verify_end=self._event_stream_ended if until is None else None,
        )

    async def _event_stream_ended(self, error: DockerError | None) -> DockerError | None:
        # Without ``until`` the engine never ends an event stream by itself.
        try:
            await self.ping()
        except DockerUnavailable as e:
            return DockerUnavailable("event stream ended: {}".format(e.message))
        return error or DockerUnavailable("the Docker engine ended the event stream")

    def _console_end_check(self, cid: str, what: str) -> Callable[
        [DockerError | None], Awaitable[DockerError | None]
    ]:
        """How a container's stream ended: engine gone, container gone, or its end."""

        async def check(error: DockerError | None) -> DockerError | None:
            try:
                await self.ping()
            except DockerUnavailable as e:
                return DockerUnavailable(
                    "{} stream of {} ended: {}".format(what, cid[:12], e.message)
                )
            if error is None:
                return None
            try:
                await self.container_inspect(cid)
            except ContainerGone:
                return ContainerGone(
                    "container {} was removed while its {} was streamed".format(cid[:12], what)
                )
            except DockerError as e:
                return e
            return error

        return check

    def resumable_events(
        self,
        labels: dict[str, str] | list[str] | str | None = MANAGED_LABEL_FILTER,
        since: float | None = None,
        **kw: Any,
    ) -> ResumableEvents:
        """Events that survive breaks (see ``ResumableEvents``)."""

        def open_stream(start: float, on_open: Callable[[], None]) -> ItemStream[DockerEvent]:
            return self.events(labels, since=start, on_open=on_open)

        return ResumableEvents(open_stream, self._clock, since=since, **kw)
