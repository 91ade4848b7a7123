"""
``make_sftp_service``: the SFTP server as one child service of the agent.

``SftpService`` loads (or generates) the host key and the credentials file
when it starts, listens on its Twisted endpoint, and on stop refuses new
connections, disconnects every session and waits until their open files are
closed.  It is also what the action registry calls for the three SFTP actions
(``set_credentials``, ``revoke_credentials``, ``list_sessions``:
``ISftpService``).

It watches the servers itself, so that access ends with the server: a
``StatusChanged`` to ``suspended`` from the server manager closes that
server's sessions at once, and every ``CHECK_INTERVAL`` seconds each server
with a live session is looked up again, closing the sessions of a server
that was deleted (the manager announces no deletion) or is suspended.  The
check costs one lookup per server with a live session, nothing when there
is none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ctrlagent.asyncs import async_to_deferred
from ctrlagent.errors import ConfigInvalid, ServerNotFound
from ctrlagent.events import ServerRemoved, StatusChanged
from ctrlagent.interfaces import ISftpService
from ctrlagent.sftp.config import CREDENTIALS_NAME, SftpConfig
from ctrlagent.sftp.credentials import SftpCredentials
from ctrlagent.sftp.quota import UsageTracker
from ctrlagent.sftp.sessions import SessionRegistry
from ctrlagent.sftp.throttle import LoginThrottle
from ctrlagent.startup import listen_failure
from ctrlagent.wire.json import to_json

# Seconds between two looks at the servers of the live sessions (deleted or
# suspended ones lose their sessions within that long).
CHECK_INTERVAL = 0.5


@implementer(ISftpService)
class SftpService(MultiService):
    """The SFTP server (see the module).  ``servers`` provides ``IServerManager``."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: SftpConfig,
        state_dir: str,
        *,
        servers: Any,
        threadpool: ThreadPool | None = None,
        credentials: SftpCredentials | None = None,
        use_openat2: bool | None = None,
        panel_http: Any = None,
    ) -> None:
        super().__init__()
        self.setName("sftp")
        self.reactor = reactor
        self.config = config
        self.state_dir = state_dir
        self.servers = servers
        self.threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self.credentials = credentials if credentials is not None else SftpCredentials(
            os.path.join(state_dir, CREDENTIALS_NAME), rounds=config.bcrypt_rounds)
        self.use_openat2 = use_openat2
        self.panel_http = panel_http  # a treq.HTTPClient for the panel backend (tests inject)
        self.checker: Any = None
        self.sessions = SessionRegistry()
        self.usage = UsageTracker(config.disk_usage_ttl)
        self.throttle = LoginThrottle(reactor, config.throttle_base, config.throttle_max,
                                      config.throttle_forget)
        self.factory: Any = None
        self.port: Any = None  # the listening port, once started
        self._endpoint_service: StreamServerEndpointService | None = None
        self._prepared = False
        self._work: set[Deferred[Any]] = set()
        self._watch: LoopingCall | None = None
        self._port_wanted: Deferred[Any] | None = None
        try:
            self.endpoint = serverFromString(reactor, config.endpoint_description())
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigInvalid("sftp.endpoint: {}".format(e)) from None

    # -- start and stop -------------------------------------------------------------

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted hook)
        self._prepare()
        self._listen(super().privilegedStartService)
        self._catch_port()

    def _listen(self, start: Any) -> None:
        """Run ``start``; a port that cannot be bound is one clear line (``StartupError``)."""
        try:
            start()
        except Exception as e:
            raise listen_failure(self.config.endpoint_description(), e, what="SFTP") from None

    def _prepare(self) -> None:
        """Load (or make) the host key and the credentials; build the listener once."""
        from ctrlagent.sftp.ssh import SftpFactory, fingerprint, load_host_key, make_portal

        key = load_host_key(self.config.host_key_path(self.state_dir))
        self.credentials.load()
        self.factory = SftpFactory(self, key, make_portal(self))
        if self._endpoint_service is None:
            svc = StreamServerEndpointService(self.endpoint, self.factory)
            svc._raiseSynchronously = True
            svc.setName("listener")
            svc.setServiceParent(self)
            self._endpoint_service = svc
        else:
            self._endpoint_service.factory = self.factory
        self._prepared = True
        self.log.info("sftp: host key {kind} {fingerprint}, listening on {endpoint}",
                      kind=key.sshType().decode("ascii"), fingerprint=fingerprint(key),
                      endpoint=self.config.endpoint_description())

    def startService(self) -> None:  # noqa: N802 (Twisted hook)
        if not self._prepared:
            self._prepare()
        self._listen(super().startService)
        self._prepared = False  # a stopped service prepares again when restarted
        self._catch_port()
        self.servers.add_listener(self._server_event, console=False)
        self._watch = LoopingCall(self._check_servers)
        self._watch.clock = self.reactor
        self._watch.start(CHECK_INTERVAL, now=False)

    def abort_start(self) -> None:
        """Release the listening port when the agent's start fails (``tap.AgentService``)."""
        if self.port is not None:
            self.port.stopListening()
            self.port = None

    def _catch_port(self) -> None:
        """Learn the listening port once it is bound (once per listen)."""
        svc = self._endpoint_service
        waiting = svc._waitingForPort if svc is not None else None
        if waiting is not None and waiting is not self._port_wanted:
            self._port_wanted = waiting
            waiting.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        if port is None:  # the listener was stopped before this callback ran
            return port
        self.port = port
        host = port.getHost()
        self.log.info("sftp: listening on {host}:{port}", host=getattr(host, "host", host),
                      port=getattr(host, "port", ""))
        return port

    def track(self, d: Deferred[Any]) -> None:
        """Keep ``d`` (a session's cleanup) until it fires; stop waits for it."""
        self._work.add(d)

        def done(result: Any) -> Any:
            self._work.discard(d)
            return result

        d.addBoth(done)

    @async_to_deferred
    async def stopService(self) -> None:  # noqa: N802 (Twisted hook)
        if self._watch is not None:
            if self._watch.running:
                self._watch.stop()
            self._watch = None
            self.servers.remove_listener(self._server_event)
        await super().stopService()
        self.sessions.close_all("the agent is stopping")
        if self._work:
            await DeferredList(list(self._work), consumeErrors=True)

    # -- access ends with the server ----------------------------------------------------

    def _server_event(self, event: object) -> None:
        """
        A server manager event: a suspended server's sessions end now; a
        deleted one's end too, and its login is dropped, so that a server
        created later under the same id inherits no credentials.
        """
        if isinstance(event, StatusChanged) and event.current == "suspended":
            self.close_sessions(event.server_id, "server suspended")
        elif isinstance(event, ServerRemoved):
            forgotten = ensureDeferred(self.forget_server(event.server_id))
            forgotten.addErrback(
                lambda f: self.log.failure(
                    "sftp: dropping the login of deleted server {server_id} failed",
                    f, server_id=event.server_id,
                )
            )
            self.track(forgotten)

    def _check_servers(self) -> None:
        """End the sessions of servers that are gone or suspended (see the module)."""
        for server_id in {s.server_id for s in self.sessions.list()}:
            try:
                state = self.servers.status(server_id)
            except ServerNotFound:
                self.close_sessions(server_id, "server deleted")
                continue
            except Exception:
                self.log.failure("sftp: looking up server {server_id} failed",
                                 server_id=server_id)
                continue
            shape = to_json(state)
            if isinstance(shape, Mapping) and shape.get("status") == "suspended":
                self.close_sessions(server_id, "server suspended")

    # -- what the actions call ------------------------------------------------------------

    def resolve(self, server_id: str) -> str:
        """The canonical id (``ServerNotFound`` for an unknown one)."""
        return str(self.servers.resolve(server_id))

    @async_to_deferred
    async def set_credentials(self, server_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """``set_sftp_credentials``: ``{username, port}``; the server's sessions end."""
        canonical = self.resolve(server_id)
        await deferToThreadPool(self.reactor, self.threadpool, self.credentials.set,
                                canonical, params)
        self.close_sessions(canonical, "credentials changed")
        return {"username": canonical, "port": self.listening_port()}

    @async_to_deferred
    async def revoke_credentials(self, server_id: str) -> dict[str, Any]:
        """``revoke_sftp_credentials``: ``{revoked, closedSessions}``."""
        canonical = self.resolve(server_id)
        existed = await deferToThreadPool(self.reactor, self.threadpool,
                                          self.credentials.revoke, canonical)
        closed = self.close_sessions(canonical, "credentials revoked")
        return {"revoked": existed, "closedSessions": closed}

    def list_sessions(self, server_id: str | None = None) -> dict[str, Any]:
        """``list_sftp_sessions``: ``{sessions: [...]}`` (of one server, or all)."""
        canonical = self.resolve(server_id) if server_id else None
        return {"sessions": [s.public() for s in self.sessions.list(canonical)]}

    @async_to_deferred
    async def forget_server(self, server_id: str) -> dict[str, Any]:
        """A deleted server: end its sessions and drop its login (canonical id)."""
        closed = self.close_sessions(server_id, "server deleted")
        await deferToThreadPool(self.reactor, self.threadpool, self.credentials.revoke,
                                server_id)
        return {"closedSessions": closed}

    def close_sessions(self, server_id: str, reason: str = "access revoked") -> int:
        """Disconnect every live session of ``server_id`` (suspend, delete, revoke)."""
        return self.sessions.close_sessions(server_id, reason)

    def listening_port(self) -> int:
        """The TCP port we listen on (the configured one before we listen)."""
        if self.port is not None:
            host = self.port.getHost()
            if hasattr(host, "port"):
                return int(host.port)
        return self.config.port


def make_sftp_service(
    reactor: Any,
    sftp_config: SftpConfig,
    state_dir: str,
    *,
    servers: Any,
    threadpool: ThreadPool | None = None,
    credentials: SftpCredentials | None = None,
    use_openat2: bool | None = None,
    panel_http: Any = None,
) -> SftpService:
    """
    The SFTP server as a service named ``sftp`` (``tap.build_service`` adds it
    to the agent when ``sftp.enabled``).  ``servers`` provides
    ``IServerManager`` (``resolve`` and ``server_root``); ``threadpool`` is the
    file manager's (default: the reactor's); ``panel_http`` a ``treq.HTTPClient``
    for the panel backend (default: one over the reactor's ``Agent``).
    """
    return SftpService(reactor, sftp_config, state_dir, servers=servers,
                       threadpool=threadpool, credentials=credentials,
                       use_openat2=use_openat2, panel_http=panel_http)
