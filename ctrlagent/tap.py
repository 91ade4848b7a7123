"""
The composition root: ``twistd -n ctrlagent``.

``Options`` parses the command line and loads the configuration (defaults <
TOML file < environment < options); ``makeService`` builds every component with
explicit dependencies and returns one named ``MultiService``:

    ctrlagent (AgentService, holding the root Tracker)
    +-- banner    logs what the agent serves, once
    +-- servers   ServerManager: containers, console, stats, crash recovery, store
    +-- sftp      SftpService: SFTP on serverFromString(sftp endpoint), if enabled
    +-- backups   BackupManager: archives, restores, schedules (its own thread pool)
    +-- panel     PanelLink: Autobahn WebSocket client to the Panel (ClientService)
    +-- http      Klein API on serverFromString(http endpoint)
    +-- heap      (twistd only) moves the startup heap out of the collector's way

``build_service`` is one ``_build_*`` function per area: the background work
and deadlines (``work``), the container engine, the servers, the files and the
host, the SFTP server, the backups, the action registry, and the two transports.  Children
start in the order above and stop in reverse: the API stops accepting first,
then the Panel link closes, then the backups finish or are cancelled, then
the SFTP sessions end, then the server
manager detaches from the containers (game servers keep running); last, the
work left in the root tracker is cancelled and waited for.  This module starts
nothing itself and is the only one that imports the global reactor.

Every startup failure ends the process non-zero with one line naming the
problem (``ctrlagent: error: ...``) and no traceback: while the service tree is
built (on stderr, before twistd starts logging), and while it starts (the
store, the data directory, the API port; in the log), where the services that
already hold threads are released first so that the process really exits.
A service manager's ``Restart=`` then sees a failure, not a process that holds
its port and answers nothing.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from ctrlagent import __version__
from ctrlagent.config import AgentConfig, load_config
from ctrlagent.daemon import DaemonStatus, daemonizing, tell_the_parent_our_line
from ctrlagent.errors import ConfigInvalid
from ctrlagent.startup import describe_startup_failure
from ctrlagent.work import Deadlines, Tracker, async_to_deferred

if TYPE_CHECKING:
    from ctrlagent.actions import Dispatcher
    from ctrlagent.backups.manager import BackupManager
    from ctrlagent.engine.docker import DockerClient
    from ctrlagent.files.manager import FileManager
    from ctrlagent.metrics import AgentMetrics
    from ctrlagent.panel.link import PanelLink
    from ctrlagent.servers.manager import ServerManager
    from ctrlagent.sftp.service import SftpService
    from ctrlagent.system import SystemInfo


class Options(usage.Options):
    """Command-line options; each overrides the config file and environment."""

    synopsis = "[options]"
    longdesc = (
        "Runs the Ctrl-Alt-Play node agent: an HTTP API for the Panel (default port 8081), "
        "an optional WebSocket link to the Panel (PANEL_URL) "
        "and the game servers in Docker (DOCKER_HOST). "
        "Settings come from defaults, then --config (TOML), then the environment "
        "(PANEL_URL, NODE_ID, AGENT_SECRET, AGENT_SECRET_FILE, HEALTH_PORT, DOCKER_HOST, "
        "CTRLAGENT_STATE_DIR, CTRLAGENT_DATA_DIR, ...), then these options. "
        "The secret is never taken from the command line (it would show in ps): use "
        "AGENT_SECRET or --secret-file (a file not readable by others)."
    )

    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["node-id", None, None, "This node's id, the Panel's node uuid (NODE_ID; default node-1)."],
        [
            "panel-url",
            None,
            None,
            "The Panel's agent WebSocket URL, for Panels that have one "
            "(PANEL_URL; default: none, the Panel drives the agent over HTTP).",
        ],
        [
            "secret-file",
            None,
            None,
            "File holding the shared secret (AGENT_SECRET_FILE); mode 600.",
        ],
        ["port", "p", None, "HTTP API port (HEALTH_PORT; default 8081).", int],
        ["bind", None, None, "HTTP API interface address (default 0.0.0.0)."],
        [
            "endpoint",
            None,
            None,
            "HTTP API as a twisted endpoint description, e.g. ssl:8443:... "
            "(overrides --port/--bind).",
        ],
        ["tls-cert", None, None, "PEM certificate (with chain) to serve the API over TLS."],
        ["tls-key", None, None, "PEM private key for --tls-cert (default: the cert file)."],
        [
            "docker-host",
            None,
            None,
            "Docker Engine API (DOCKER_HOST; default unix:///var/run/docker.sock).",
        ],
        [
            "state-dir",
            None,
            None,
            "Agent state directory (CTRLAGENT_STATE_DIR; default /var/lib/ctrlagent).",
        ],
        [
            "data-dir",
            None,
            None,
            "Root of the servers' data directories "
            "(CTRLAGENT_DATA_DIR; default /var/lib/ctrlagent/servers).",
        ],
    ]

    optFlags = [
        ["development", None, "Development mode: allow running without a secret."],
        ["no-panel", None, "Do not dial the Panel's WebSocket (HTTP API only)."],
    ]

    _OVERRIDES = {
        "node-id": "node_id",
        "panel-url": "panel.url",
        "secret-file": "secret_file",
        "port": "http.port",
        "bind": "http.bind",
        "endpoint": "http.endpoint",
        "tls-cert": "http.tls_cert",
        "tls-key": "http.tls_key",
        "docker-host": "docker.host",
        "state-dir": "state_dir",
        "data-dir": "data_dir",
    }

    config: AgentConfig

    def opt_version(self) -> None:
        """Print the agent's version and exit."""
        print("ctrlagent", __version__)  # noqa: T201 - a CLI answer, not a log line
        raise SystemExit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse, and on a bad value print one clear line and exit 1.

        twistd would print the whole usage text before the error; an operator
        reading journald wants the one line that says what is wrong.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write("ctrlagent: error: {} (see: twistd -n ctrlagent --help)\n".format(e))
            raise SystemExit(1) from None

    def postOptions(self) -> None:
        overrides: dict[str, Any] = {
            dotted: self[name] for name, dotted in self._OVERRIDES.items() if self[name] is not None
        }
        if self["development"]:
            overrides["development"] = True
        if self["no-panel"]:
            overrides["panel.enabled"] = False
        try:
            self.config = load_config(self["config"], os.environ, overrides)
        except ConfigInvalid as e:
            raise usage.UsageError(str(e)) from None


log = Logger(namespace="ctrlagent.tap")


class AgentService(MultiService):
    """
    The agent's top service.  A child that fails to start ends the process:
    the children are told to release what they hold (``abort_start``), one
    critical line names the problem and ``SystemExit(1)`` leaves twistd
    before its reactor runs.

    On stop, the children stop first (in reverse order), each cancelling and
    waiting for its own scope of the background work; then whatever is left
    in the root ``tracker`` (work whose answer was already given, such as a
    late command) is cancelled and waited for, so that nothing the agent
    started outlives its service tree.
    """

    def __init__(self, tracker: Tracker | None = None) -> None:
        super().__init__()
        self.tracker = tracker
        # Set by makeService when twistd daemonizes: the waiting parent is
        # told the critical line (ctrlagent.daemon).
        self.daemon_status: DaemonStatus | None = None

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted hook)
        try:
            super().privilegedStartService()
        except Exception as e:
            self._startup_failed(e)

    def startService(self) -> None:  # noqa: N802 (Twisted hook)
        try:
            super().startService()
        except Exception as e:
            self._startup_failed(e)

    @async_to_deferred
    async def stopService(self) -> None:  # noqa: N802 (Twisted hook)
        await super().stopService()
        if self.tracker is None:
            return
        if len(self.tracker):
            log.info(
                "cancelling {count} pieces of background work left at shutdown",
                count=len(self.tracker),
            )
        self.tracker.cancel_all()
        await self.tracker.wait()

    def _startup_failed(self, error: Exception) -> NoReturn:
        for child in list(self):
            abort = getattr(child, "abort_start", None)
            if callable(abort):
                try:
                    abort()
                except Exception as e:
                    log.info("releasing {name} failed: {error}", name=child.name, error=e)
        self.running = False
        problem = describe_startup_failure(error)
        log.critical("ctrlagent: error: {problem}", problem=problem)
        if self.daemon_status is not None:
            self.daemon_status.failed("ctrlagent: error: " + problem)
        raise SystemExit(1)


class _StartupBanner(Service):
    """Logs what the agent is about to serve, once, with no secret in it."""

    name = "banner"

    def __init__(self, config: AgentConfig) -> None:
        self._config = config

    def startService(self) -> None:
        from ctrlagent.panel.backoff import without_query

        super().startService()
        c = self._config
        log.info(
            "ctrlagent {version} node {node_id}: http {endpoint}, docker {docker}, panel {panel}, "
            "state {state_dir}, data {data_dir}{dev}",
            version=__version__,
            node_id=c.node_id,
            endpoint=c.http.endpoint_description(),
            docker=c.docker.host,
            panel=without_query(c.panel.url) if c.panel.dials() else "no WebSocket link",
            state_dir=c.state_dir,
            data_dir=c.data_dir,
            dev=" (development mode)" if c.development else "",
        )


# The modules below are imported inside the functions that use them, so that
# `twistd ctrlagent --help` stays fast and cheap.


def build_service(reactor: Any, config: AgentConfig) -> AgentService:
    """Build the agent's service tree on ``reactor`` (tests call this directly)."""
    tracker, deadlines = _build_work(reactor, config)
    top = AgentService(tracker)
    top.setName("ctrlagent")
    _StartupBanner(config).setServiceParent(top)
    metrics = _build_metrics(config)
    docker = _build_engine(reactor, config)
    servers = _build_servers(reactor, config, top, docker, tracker, deadlines, metrics)
    files, host = _build_files_and_host(reactor, config, docker, servers, deadlines)
    sftp = _build_sftp(reactor, config, top, servers, files)
    backups = _build_backups(reactor, config, top, servers, tracker)
    dispatcher = _build_actions(servers, files, host, deadlines, sftp, backups)
    link = _build_transports(
        reactor, config, top, dispatcher, servers, host, docker, tracker, deadlines, backups,
        metrics,
    )
    if metrics is not None:
        _watch_metrics(metrics, dispatcher, servers, link, tracker)
    return top


def _build_metrics(config: AgentConfig) -> AgentMetrics | None:
    """
    The agent's Prometheus metrics (``metrics/``), one registry per agent,
    unless ``metrics.enabled`` is false.  The engine seam and the API report
    to it as things happen; ``_watch_metrics`` hands it what it reads at
    scrape time once everything is built.
    """
    if not config.metrics.enabled:
        return None
    from ctrlagent.metrics import AgentMetrics

    return AgentMetrics()


def _watch_metrics(
    metrics: AgentMetrics,
    dispatcher: Dispatcher,
    servers: ServerManager,
    link: PanelLink | None,
    tracker: Tracker,
) -> None:
    """What the metrics read at scrape time: the servers, the Panel link, the work."""
    metrics.set_actions(dispatcher.actions())
    metrics.watch_servers(servers)
    if link is not None:
        metrics.watch_link(link.stats)
    metrics.watch_work(tracker)


def _build_work(reactor: Any, config: AgentConfig) -> tuple[Tracker, Deadlines]:
    """
    One tracker for all background work (each service cancels and waits only
    its own scope of it when it stops) and one deadline helper, whose late
    work (answers given before the work finished) has its own scope.
    """
    tracker = Tracker("agent")
    return tracker, Deadlines(reactor, tracker.scope("late answers"), config.timeouts)


def _build_engine(reactor: Any, config: AgentConfig) -> DockerClient:
    """
    The container engine's API client: Docker's at ``docker.host``, or
    Podman's Docker-compatible one at ``runtime.podman_host``.
    """
    from ctrlagent.engine import engine_client_config
    from ctrlagent.engine.docker import DockerClient

    return DockerClient.from_config(reactor, engine_client_config(config))


def _build_servers(
    reactor: Any,
    config: AgentConfig,
    top: MultiService,
    docker: DockerClient,
    tracker: Tracker,
    deadlines: Deadlines,
    metrics: AgentMetrics | None = None,
) -> ServerManager:
    """
    The game servers (service ``servers``): containers, console, stats, store;
    with metrics, every engine call goes through ``MeteredEngine``.
    """
    from ctrlagent.engine import make_engine
    from ctrlagent.engine.lifetime import close_engine
    from ctrlagent.servers.manager import make_server_manager

    engine = make_engine(reactor, config, docker)
    if metrics is not None:
        from ctrlagent.metrics import MeteredEngine

        engine = MeteredEngine(engine, metrics.observe_engine, reactor)
    servers = make_server_manager(
        reactor, config, engine, tracker=tracker.scope("servers"), deadlines=deadlines,
        close_engine=lambda: close_engine(engine),
    )
    servers.setName("servers")
    servers.setServiceParent(top)
    return servers


def _build_files_and_host(
    reactor: Any, config: AgentConfig, docker: DockerClient, servers: ServerManager,
    deadlines: Deadlines,
) -> tuple[FileManager, SystemInfo]:
    """
    The servers' files (Steam Workshop items through steamcmd on the servers'
    engine) and the host's own figures (no services: called on demand).
    """
    from ctrlagent.files.manager import FileManager
    from ctrlagent.servers.workshop import SteamCmdDownloader
    from ctrlagent.system import make_host

    workshop = SteamCmdDownloader(reactor, servers.engine, config, deadlines)
    files = FileManager(reactor=reactor, config=config.files, workshop=workshop)
    host = make_host(reactor, config, engine_version=lambda: _engine_version(docker))
    return files, host


def _build_sftp(
    reactor: Any, config: AgentConfig, top: MultiService, servers: ServerManager, files: FileManager
) -> SftpService | None:
    """
    The SFTP server (service ``sftp``, when ``sftp.enabled``): after the
    servers, whose files it serves, and before the transports, so that it
    stops after them; its file work runs in the file manager's thread pool.
    """
    if not config.sftp.enabled:
        return None
    from ctrlagent.sftp.service import make_sftp_service

    sftp = make_sftp_service(
        reactor, config.sftp, config.state_dir, servers=servers, threadpool=files.threadpool
    )
    sftp.setServiceParent(top)
    return sftp


def _build_backups(
    reactor: Any, config: AgentConfig, top: MultiService, servers: ServerManager, tracker: Tracker
) -> BackupManager:
    """
    The backups (service ``backups``): after the servers and SFTP, whose
    files they read and write, and before the transports, so that they stop
    after the API stopped taking commands.  The manager's own thread pool
    (``backups.concurrency + 2`` threads) starts and stops with it; a
    backups database that cannot be used ends the start with one line
    (``BackupStoreUnusable``), and never stops the servers' own store.
    """
    from ctrlagent.backups.manager import build_backup_manager

    backups = build_backup_manager(
        config.backups,
        servers,
        reactor=reactor,
        clock=reactor,
        tracker=tracker.scope("backups"),
        state_dir=config.state_dir,
        data_dir=config.data_dir,
    )
    backups.setServiceParent(top)
    return backups


def _build_actions(
    servers: ServerManager,
    files: FileManager,
    host: SystemInfo,
    deadlines: Deadlines,
    sftp: SftpService | None = None,
    backups: BackupManager | None = None,
) -> Dispatcher:
    """The one registry of actions both transports call."""
    from ctrlagent.actions import Dispatcher

    return Dispatcher(
        servers=servers, files=files, system=host, deadlines=deadlines, sftp=sftp, backups=backups
    )


def _build_transports(
    reactor: Any,
    config: AgentConfig,
    top: MultiService,
    dispatcher: Dispatcher,
    servers: ServerManager,
    host: SystemInfo,
    docker: DockerClient,
    tracker: Tracker,
    deadlines: Deadlines,
    backups: BackupManager | None = None,
    metrics: AgentMetrics | None = None,
) -> PanelLink | None:
    """
    The Panel link (service ``panel``, only when a Panel WebSocket URL is
    configured and the link is enabled) and the HTTP API (``http``).  The link
    is optional: the API reports its state under ``panelLink`` and never as
    the node's ``connected``.  The link forwards the backups' events too; the
    API serves their archives through the backups package's ``serve_download``.
    With metrics, ``GET /metrics`` is served by the API, or by a listener of
    its own (service ``metrics``) when ``metrics.endpoint`` is set.
    """
    from ctrlagent.api.app import AgentApi, make_http_service
    from ctrlagent.panel.link import PanelLink

    metrics_page: Any = None
    if metrics is not None:
        from ctrlagent.api.metrics import MetricsResource

        metrics_page = MetricsResource(metrics.registry, config.metrics.token, reactor)

    link: PanelLink | None = None
    if config.panel.dials():
        link = PanelLink(
            reactor,
            config,
            dispatcher,
            servers,
            system_info=lambda: host.system_info(config.node_id),
            load=host.system_load,
            tracker=tracker.scope("panel"),
            backups=backups,
        )
        link.setName("panel")
        link.setServiceParent(top)
        panel = link
        # The link forwards every sample while connected: then every server
        # is sampled at the full rate; otherwise seldom, and when read.
        servers.follow_figures(lambda: panel.connected)
    else:
        servers.follow_figures(lambda: False)

    api = AgentApi(
        config=config,
        dispatcher=dispatcher,
        servers=servers,
        panel_link=None if link is None else link.state,
        docker_ping=lambda: _engine_ping(docker),
        clock=reactor,
        version=__version__,
        tracker=tracker.scope("http"),
        deadlines=deadlines,
        backup_download=None if backups is None else _backup_download(backups),
        metrics=None if config.metrics.endpoint else metrics_page,
        observe_command=None if metrics is None else metrics.observe_request,
        disk_report=lambda: servers.data.report(list(servers.servers)),
    )
    http: IService = make_http_service(
        reactor, config, api, drain_timeout=config.timeouts.http_drain
    )
    http.setName("http")
    http.setServiceParent(top)
    if metrics_page is not None and config.metrics.endpoint:
        _metrics_listener(reactor, config.metrics.endpoint, metrics_page).setServiceParent(top)
    return link


def _metrics_listener(reactor: Any, endpoint: str, page: Any) -> IService:
    """
    ``GET /metrics`` on a listener of its own (service ``metrics``); a port it
    cannot bind ends the start, as the API's does.
    """
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.endpoints import serverFromString

    from ctrlagent.api.metrics import metrics_site

    service = StreamServerEndpointService(serverFromString(reactor, endpoint), metrics_site(page))
    service._raiseSynchronously = True
    service.setName("metrics")
    return service


def _backup_download(backups: BackupManager) -> Any:
    """The API's download handler over ``backups`` (the API does not import backups/)."""
    from ctrlagent.backups.http import serve_download

    def download(request: Any, server_id: str, backup_id: str) -> Any:
        return serve_download(request, backups, server_id, backup_id)

    return download


@async_to_deferred
async def _engine_ping(docker: DockerClient) -> bool:
    """True if the engine answers its ping (never fails: /health reports, it does not raise)."""
    try:
        return bool(await docker.ping())
    except Exception:
        return False


@async_to_deferred
async def _engine_version(docker: DockerClient) -> str | None:
    """The engine's version, or None when it does not answer."""
    try:
        version = await docker.version()
    except Exception:
        return None
    return str(version.get("Version")) if version else None


def makeService(options: Options) -> AgentService:
    """twistd's entry point: build the agent on the global reactor."""
    from twisted.internet import reactor

    from ctrlagent.heap import StartupHeapFreeze

    try:
        top = build_service(reactor, options.config)
    except Exception as e:
        # twistd has not started logging yet: stderr is the operator's terminal.
        sys.stderr.write("ctrlagent: error: {}\n".format(describe_startup_failure(e)))
        raise SystemExit(1) from None
    # Only in the agent's own process: tests that build the service in
    # pytest's process should not freeze pytest's heap.
    StartupHeapFreeze(reactor).setServiceParent(top)
    twistd_options = daemonizing(options)
    if twistd_options is not None:
        top.daemon_status = DaemonStatus(twistd_options)
        tell_the_parent_our_line()
    return top
