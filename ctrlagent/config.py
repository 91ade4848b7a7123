"""
The agent's configuration: one frozen tree, loaded once.

Precedence, lowest first: built-in defaults < TOML file (``--config``) <
environment (``PANEL_URL``, ``NODE_ID``, ``AGENT_SECRET``, ...) < command-line
options.  Every validation problem raises ``ConfigInvalid`` with one clear
sentence; ``tap.Options`` turns that into ``usage.UsageError`` so twistd prints
one line and exits non-zero.

This module is pure: it reads files and the given environment mapping, and
imports no reactor.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ctrlagent.errors import ConfigInvalid


@dataclass(frozen=True)
class PanelConfig:
    """
    The optional WebSocket link to the Panel (PROTOCOL.md section 3).

    The current Panel drives agents over HTTP alone and has no WebSocket for
    them, so there is no link unless ``url`` names one (older Panels listen on
    ``ws://<panel>:8080``); ``enabled = false`` turns a configured link off.
    """

    # The Panel's agent WebSocket (ws:// or wss://); empty: no link.
    url: str = ""
    enabled: bool = True
    heartbeat_interval: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    # Delay floor after the Panel refused our credentials (401/403), so that a
    # wrong secret never hammers the Panel.
    refused_backoff: float = 30.0
    open_handshake_timeout: float = 10.0
    auto_ping_interval: float = 20.0
    auto_ping_timeout: float = 10.0
    outbox_size: int = 10_000
    # Console lines per server_log frame, and how long the first line of a
    # frame may wait for more.  One window of a server printing at the default
    # throttle limit (2000 lines/s * 0.05 s) fits one frame, so a flooding
    # server costs the Panel 20 frames a second.  A frame leaves between one
    # window and one and a half after its first line: the frames of servers
    # due within half a window of each other leave together.
    console_batch_lines: int = 100
    console_batch_window: float = 0.05
    # Growth of the reconnect delay and the jitter added on top (a fraction of it).
    backoff_factor: float = 2.0
    backoff_jitter: float = 0.25
    # A session open at least this long resets the backoff; shorter ones count
    # as failed handshakes (a Panel that accepts and closes at once).
    stable_after: float = 10.0
    # Also send the legacy ``server_output``/``server_status`` frames.
    legacy_frames: bool = True
    # Largest message accepted from the Panel (a write_file carries content).
    max_message_bytes: int = 64 * 1024 * 1024
    # For wss:// only: a PEM file of the CA(s) to trust instead of the system
    # store (a Panel behind a private CA or a self-signed certificate).
    tls_ca: str = ""
    # Back-pressure on commands from the Panel: at most this many are handled
    # at once; past it they wait in order, and once the waiting frames add up
    # to ``max_held_bytes`` the agent stops reading the socket until half of
    # them are taken (the Panel's TCP window then slows it down).
    max_in_flight: int = 128
    max_held_bytes: int = 8 * 1024 * 1024

    def dials(self) -> bool:
        """Whether the agent keeps a link to the Panel: a URL is set and the link is enabled."""
        return self.enabled and bool(self.url.strip())


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP API the Panel calls (PROTOCOL.md section 1)."""

    port: int = 8081
    # A full twisted endpoint description; overrides ``port`` when set
    # (``tcp:8081:interface=127.0.0.1``, ``ssl:8443:...``, ``unix:/run/x.sock``).
    endpoint: str = ""
    bind: str = "0.0.0.0"
    tls_cert: str = ""
    tls_key: str = ""
    # Fits a 16 MiB file as base64 inside a JSON envelope.
    max_body_bytes: int = 24 * 1024 * 1024
    cors_origin: str = "*"
    # Open API connections at most.  Past it, a new connection evicts the
    # oldest one that serves no authenticated client (a slow or idle one), or
    # is closed when every connection is busy.
    max_connections: int = 1024
    # Seconds a request's line and headers may take, from its first byte.
    header_timeout: float = 10.0
    # Seconds a kept-alive connection may stay silent between requests.
    idle_timeout: float = 60.0

    def endpoint_description(self) -> str:
        """The twisted ``serverFromString`` description this config means."""
        if self.endpoint:
            return self.endpoint
        iface = _escape_endpoint(self.bind)
        if self.tls_cert:
            key = self.tls_key or self.tls_cert
            return "ssl:{}:interface={}:certKey={}:privateKey={}".format(
                self.port, iface, _escape_endpoint(self.tls_cert), _escape_endpoint(key)
            )
        return "tcp:{}:interface={}".format(self.port, iface)


@dataclass(frozen=True)
class RuntimeConfig:
    """Which container runtime runs the game servers (docs/RUNTIMES.md)."""

    # "docker" (the Docker Engine API at docker.host) or "podman" (Podman's
    # service at podman_host; the [docker] client settings apply to it too).
    kind: str = "docker"
    podman_host: str = "unix:///run/podman/podman.sock"


@dataclass(frozen=True)
class DockerConfig:
    """How the agent reaches and uses the Docker engine."""

    host: str = "unix:///var/run/docker.sock"
    # Lowest engine API the agent speaks; the real version is negotiated once.
    min_api_version: str = "1.41"
    call_timeout: float = 30.0
    stream_silence_timeout: float = 0.0  # 0 = streams may be silent forever
    network_name: str = "ctrl-alt-play"
    network_subnet: str = ""
    pull_policy: str = "if-not-present"
    # registry host -> {"username": .., "password": ..} (or {"auth": base64})
    registry_auths: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    console_line_cap: int = 16 * 1024
    # Seconds between two rounds of reads of the engine's long streams
    # (consoles, events) while data comes: each round takes every stream
    # with data, so at hundreds of servers one wake of the agent takes the
    # lines of many.  While none comes the rounds slow down to four times
    # this apart (a line waits at most 0.1 s by default).  0: each stream is
    # read by itself, as its data comes.
    stream_read_interval: float = 0.025


@dataclass(frozen=True)
class ServersConfig:
    """Defaults for the game servers the agent runs."""

    console_buffer_lines: int = 1000
    console_throttle_lines: int = 2000
    console_throttle_interval: float = 1.0
    # Seconds between copies of the delivered console marks to the store (the
    # journal beside it has every mark at once; the store's copy is what
    # survives a power cut).  0: as fast as the disk commits.
    console_mark_interval: float = 10.0
    stats_interval: float = 2.0
    # Seconds between kernel samples of a running server while nothing
    # follows the figures live (no Panel link connected); a status, metrics
    # or /metrics read still gets a sample at most stats_interval old, read
    # when asked.  0: every stats_interval regardless.
    stats_idle_interval: float = 30.0
    disk_check_interval: float = 60.0
    # Seconds between the looks at the engine's list of containers that
    # catch a game's end no engine event told (a lost event): a server found
    # down at two looks in a row, with no news of it between them, is settled
    # as the event would have (ctrlagent/servers/drift.py).  0: never.
    drift_check_interval: float = 60.0
    crash_restart_window: float = 60.0
    # Whether a game that ends by itself with exit code 0 (not asked, not
    # out of memory) has crashed, as Wings' detect_clean_exit_as_crash: on,
    # it is restarted by its crash policy; off, it is simply offline.  The
    # stop command typed in the console while no power action is under way
    # is not a crash either way: it runs as the Stop action.
    clean_exit_is_crash: bool = True
    stop_timeout: float = 30.0
    pids_limit: int = 512
    tmpfs_size_mb: int = 100
    container_uid: int = 1000
    container_gid: int = 1000
    default_bind_ip: str = "0.0.0.0"
    install_timeout: float = 900.0
    # Who runs install scripts inside their container: "uid:gid", or "server"
    # for the server's own user.  Root by default because real install scripts
    # (Pterodactyl eggs on ghcr.io/pterodactyl/installers:*) run apt-get and
    # chown as root; that root is confined by install_capabilities and
    # no-new-privileges, and the data directory is cleaned afterwards.
    install_user: str = "0:0"
    # The only capabilities an install container keeps (all others dropped):
    #   CHOWN         chown files to their owner (dpkg, tar, the scripts' chown -R)
    #   DAC_OVERRIDE  root writes in the data directory, owned by container_uid
    #   FOWNER        chmod/utime of files root does not own (tar, unzip, chmod +x)
    #   SETUID/SETGID apt-get drops to its _apt user to download (setgroups,
    #                 setresuid); without them apt-get fails
    # Never MKNOD (device nodes), nor FSETID (keeping setuid bits on chown);
    # the agent refuses MKNOD, SYS_ADMIN and ALL here.
    install_capabilities: tuple[str, ...] = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID")
    # Bytes of install output kept in the install log (the rest is counted).
    install_log_max_bytes: int = 16 * 1024 * 1024
    # create_server/reinstall answer after at most this long; a slow pull or
    # install continues in the background (the Panel gives up after 30 s).
    create_answer_timeout: float = 20.0
    # "stream": one long-lived engine stats stream per running server (cheap);
    # "poll": one stats request per server every stats_interval.
    stats_mode: str = "stream"
    # Node ports for servers created without ``ports`` (the Panel sends none):
    # "first-last", each published on tcp and udp at default_bind_ip, free on
    # the host and unused by any other server (stopped ones too), kept in the
    # server's stored definition and released when it is deleted.  "" turns
    # allocation off (such servers publish nothing).
    port_range: str = "25565-25665"
    # Process limits (rlimits) of every game and install container: name =
    # number (soft and hard) or [soft, hard]; names as setrlimit's without
    # RLIMIT_ (nofile, nproc, core, memlock, ...), the ones not named keep
    # the engine's defaults.  nproc is not set by default: it counts every
    # process of the container's uid on the whole host, not per container
    # (servers.pids_limit is the per-container cap); set it where the host's
    # hard limit is below the engine's default (docs/RUNTIMES.md).
    ulimits: Mapping[str, Any] = field(default_factory=lambda: {"nofile": [8192, 8192]})
    # Running servers' figures read straight from the host's cgroup files
    # when the engine runs on this host (one timer for every server, no
    # engine call per sample); false, or an engine elsewhere: stats_mode.
    stats_from_kernel: bool = True
    # Servers reconciled (re-attached after a restart, or started) at once.
    reconcile_concurrency: int = 32


@dataclass(frozen=True)
class FilesConfig:
    """Limits of the file manager."""

    max_read_bytes: int = 16 * 1024 * 1024
    max_list_entries: int = 100_000
    archive_max_ratio: float = 100.0
    archive_max_bytes: int = 10 * 1024 * 1024 * 1024
    mod_download_max_bytes: int = 1024 * 1024 * 1024
    mod_download_timeout: float = 120.0
    mods_dir: str = "mods"
    mod_max_redirects: int = 5
    archive_max_entries: int = 100_000
    search_max_results: int = 1000
    # Names a search looks at before it answers with what it found (truncated).
    search_max_scanned: int = 200_000
    # File operations running in the thread pool at once, all servers together.
    max_concurrent_operations: int = 8
    # Seconds a walked disk-usage figure is trusted (our own writes keep it current).
    disk_usage_ttl: float = 30.0


@dataclass(frozen=True)
class TimeoutsConfig:
    """
    Deadlines of the agent, in seconds (applied through ctrlagent.work.Deadlines).

    Every deadline of the agent is configurable: those an operator already
    sets elsewhere stay there (``servers.stop_timeout``, ``install_timeout``,
    ``create_answer_timeout``, ``docker.call_timeout``, ``panel.*``,
    ``files.mod_download_timeout``); all the others are here, with the
    values the agent always had as defaults.

    The Panel gives up on a command after 30 s and then marks the node
    offline, so every answer it waits for must come before that.
    """

    # A long action (create behind a slow pull, stop with a long timeout, ...)
    # answers with the state it is in after this long; the work goes on.
    command_answer: float = 25.0
    # Any other action answers "still running" after command_answer plus this
    # margin (so a long action's own answer always comes first).
    command_margin: float = 2.0
    # How long a stopping HTTP API waits for the commands still running.
    http_drain: float = 10.0
    # How long /health waits for the engine to answer a ping ...
    engine_ping: float = 3.0
    # ... and how long that answer is reused by the next /health probes.
    engine_ping_cache: float = 1.5
    # How long a killed container may take to be seen gone before the kill
    # is reported as failed.
    kill_grace: float = 10.0
    # How long an exited server's last console lines may take to arrive.
    exit_drain: float = 2.0
    # How long the end of an install's output may take to reach its log.
    install_log_drain: float = 5.0
    # First and longest pause before the engine's event stream is reopened.
    events_retry: float = 0.25
    events_retry_max: float = 2.0
    # How long the Panel link waits for the host's figures (system_info, a
    # pong's load) before it sends what it knows.
    host_info: float = 5.0
    # How long a console command waits for the server's reply lines when the
    # command does not say.
    console_reply_wait: float = 1.0


# The SFTP server's host key, in the state directory unless ``sftp.host_key`` says.
HOST_KEY_NAME = "sftp_host_ed25519_key"


@dataclass(frozen=True)
class SftpConfig:
    """The SFTP server (docs/SFTP.md): one login reaches one server's files."""

    enabled: bool = True
    # Where to listen when ``endpoint`` is empty.
    port: int = 2022
    bind: str = "0.0.0.0"
    # A Twisted server endpoint (tcp:2022, tcp6:2022:interface=\:\:,
    # systemd:domain=INET:index=0); overrides port and bind.
    endpoint: str = ""
    # Empty: <state_dir>/sftp_host_ed25519_key, generated (ed25519, mode 600)
    # on first start.  A key others may read is refused.
    host_key: str = ""
    # "local": credentials set by the Panel through set_sftp_credentials;
    # "panel": the Panel's own accounts (POST /api/auth/login, GET /api/servers/<id>).
    backend: str = "local"
    # The Panel's HTTP base URL (required with backend "panel").
    panel_url: str = ""
    # Seconds a Panel grant is trusted before it is asked again.
    grant_cache_seconds: float = 60.0
    # Failed logins: the n-th failure in a row from one address (or for one
    # username) delays the next answer by throttle_base * 2**(n-1), at most
    # throttle_max; a failure older than throttle_forget is forgotten.
    throttle_base: float = 1.0
    throttle_max: float = 30.0
    throttle_forget: float = 900.0
    # Live SSH connections at once, all servers together, and per address.
    max_sessions: int = 256
    max_sessions_per_address: int = 16
    # Seconds to finish authentication before the connection is dropped.
    login_timeout: float = 60.0
    # Seconds a walked disk-usage figure is trusted (our own writes keep it current).
    disk_usage_ttl: float = 30.0
    # Open file and directory handles per session.
    max_handles: int = 256
    # bcrypt cost of stored passwords.
    bcrypt_rounds: int = 12

    def endpoint_description(self) -> str:
        """The Twisted endpoint string the server listens on."""
        if self.endpoint:
            return self.endpoint
        return "tcp:{}:interface={}".format(self.port, _escape_endpoint(self.bind))

    def host_key_path(self, state_dir: str) -> str:
        """Where the host key lives."""
        return self.host_key or os.path.join(state_dir, HOST_KEY_NAME)


# --- [backups] (docs/BACKUPS.md) ---

BACKUP_DRIVERS = ("local", "s3", "restic")
# S3's own bounds on multipart uploads.
S3_MIN_PART = 5 * 1024 * 1024
S3_MAX_PART = 5 * 1024 * 1024 * 1024
S3_MAX_PARTS = 10_000


@dataclass(frozen=True)
class S3Config:
    """An S3 (or S3-compatible) bucket backups are uploaded to."""

    endpoint: str | None = None
    bucket: str = ""
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    # A file holding the secret key, read at start; refused when others may read it.
    secret_key_file: str | None = None
    path_style: bool = False
    prefix: str = "ctrlagent"
    # Smallest part; grown for big archives so that at most 10,000 parts hold them.
    part_size: int = 64 * 1024 * 1024
    part_retries: int = 5


@dataclass(frozen=True)
class ResticConfig:
    """A restic repository, driven through the ``restic`` binary."""

    repository: str | None = None
    password: str | None = field(default=None, repr=False)
    # Handed to restic as RESTIC_PASSWORD_FILE.
    password_file: str | None = None
    binary: str = "restic"
    timeout: float = 6 * 3600.0


@dataclass(frozen=True)
class Retention:
    """What a schedule keeps: the newest ``last`` and/or those younger than ``days``."""

    # Keep the newest N scheduled backups ...
    last: int | None = None
    # ... and every one younger than this many days.
    days: float | None = None


@dataclass(frozen=True)
class ScheduleDefaults:
    """A node-wide schedule applied to servers without their own (off by default)."""

    # Five fields, UTC; unset: no node-wide schedule.
    cron: str | None = None
    retain: Retention = field(default_factory=Retention)
    driver: str = "local"


@dataclass(frozen=True)
class HooksConfig:
    """
    Console commands around a backup of a running server.

    ``before`` (for example ``save-off``, ``save-all``), then wait until a console line
    matches ``wait_for`` (a regular expression; at most ``wait_timeout``
    seconds, then the backup goes on with a note), and ``after`` once the
    archive is written, whatever its outcome (``save-on``).
    """

    # Console commands sent before the archive is written (save-off, save-all).
    before: tuple[str, ...] = ()
    # A regular expression: the console line that says the world is saved.
    wait_for: str | None = None
    wait_timeout: float = 60.0
    # Console commands sent once the archive is written (save-on).
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackupsConfig:
    """Every backup setting."""

    # Local archives; empty: <state_dir>/backups.
    directory: str = ""
    # The default driver: local, s3 or restic.
    driver: str = "local"
    # Backups and restores at once on the node (the others wait).
    concurrency: int = 2
    # zstd level, 1-19.
    compression_level: int = 3
    # Seconds between two progress events of one backup.
    progress_interval: float = 1.0
    # Seconds a restore waits for a server it stopped to be offline.
    stop_timeout: float = 120.0
    # Seconds between two looks at the schedules.
    schedule_interval: float = 30.0
    s3: S3Config = field(default_factory=S3Config)
    restic: ResticConfig = field(default_factory=ResticConfig)
    schedule: ScheduleDefaults = field(default_factory=ScheduleDefaults)
    hooks: HooksConfig = field(default_factory=HooksConfig)

    def directory_path(self, state_dir: str) -> str:
        """Where local archives go."""
        return self.directory or os.path.join(state_dir, "backups")


# --- [workshop]: Steam Workshop items through steamcmd (README, PROTOCOL.md) ---

WORKSHOP_TIMEOUT_MAX = 24 * 3600.0
STEAM_APP_ID_MAX = 2**32 - 1


@dataclass(frozen=True)
class WorkshopConfig:
    """
    Steam Workshop installs (``install_mod`` with ``type: steam_workshop``):
    ``steamcmd`` run once per item in a helper container, the item copied
    into the server's mods folder.
    """

    # The image holding steamcmd (pulled by docker.pull_policy).
    image: str = "steamcmd/steamcmd:latest"
    # The steamcmd program inside the image, run as the helper's entrypoint.
    steamcmd: str = "steamcmd"
    # The game's Steam app id for payloads without appId; 0: every payload must give one.
    app_id: int = 0
    # Seconds a download may take; past it the helper container is killed.
    timeout: float = 600.0
    # Largest item copied into a server (its disk limit applies too).
    max_item_bytes: int = 4 * 1024 * 1024 * 1024
    # Files and directories one item may hold.
    max_item_entries: int = 100_000
    # The network the helper container joins (it must reach Steam).
    network: str = "bridge"


def validate_workshop(workshop: WorkshopConfig) -> None:
    """Refuse ``[workshop]`` settings that cannot work, naming the setting."""
    if not workshop.image.strip():
        raise ConfigInvalid("workshop.image must not be empty")
    if not workshop.steamcmd.strip() or "\x00" in workshop.steamcmd:
        raise ConfigInvalid("workshop.steamcmd must name the steamcmd program")
    if not 0 <= workshop.app_id <= STEAM_APP_ID_MAX:
        raise ConfigInvalid("workshop.app_id must be a Steam app id (0: none)")
    if not 0 < workshop.timeout <= WORKSHOP_TIMEOUT_MAX:
        raise ConfigInvalid("workshop.timeout must be more than 0 and at most 86400 seconds")
    for name in ("max_item_bytes", "max_item_entries"):
        if getattr(workshop, name) < 1:
            raise ConfigInvalid("workshop.{} must be positive".format(name))
    if not workshop.network.strip():
        raise ConfigInvalid("workshop.network must not be empty")
# --- [metrics]: Prometheus (docs/METRICS.md) ---


@dataclass(frozen=True)
class MetricsConfig:
    """``GET /metrics`` in the Prometheus text format."""

    # Serve /metrics at all.
    enabled: bool = True
    # Empty: /metrics on the API's own listener; else a listener of its own
    # (a Twisted endpoint, e.g. tcp:9108:interface=127.0.0.1).
    endpoint: str = ""
    # The bearer token a scraper must send (Authorization: Bearer <token>);
    # empty: /metrics asks for no credential.  Not the node's secret.
    token: str = field(default="", repr=False)
    # A file holding the token (not readable by others: mode 600).
    token_file: str = ""


def validate_metrics(metrics: MetricsConfig) -> None:
    """Refuse ``[metrics]`` settings that cannot work, naming the setting."""
    if metrics.endpoint and ":" not in metrics.endpoint:
        raise ConfigInvalid(
            "metrics.endpoint: not a Twisted endpoint description (e.g. tcp:9108)"
        )
    if metrics.token_file and not Path(metrics.token_file).is_absolute():
        raise ConfigInvalid("metrics.token_file {!r} must be an absolute path".format(
            metrics.token_file))


def read_metrics_token(metrics: MetricsConfig) -> MetricsConfig:
    """``metrics`` with its token read from ``token_file`` (when no token is given)."""
    if not metrics.token_file or metrics.token:
        return metrics
    try:
        st = os.stat(metrics.token_file)
        if st.st_mode & stat.S_IROTH:
            raise ConfigInvalid("metrics.token_file {} is world-readable; run: chmod 600 {}"
                                .format(metrics.token_file, metrics.token_file))
        with open(metrics.token_file, encoding="utf-8") as f:
            token = f.read(4096).strip()
    except OSError as e:
        raise ConfigInvalid("metrics.token_file {}: {}".format(
            metrics.token_file, e.strerror)) from None
    if not token:
        raise ConfigInvalid("metrics.token_file {} is empty".format(metrics.token_file))
    return replace(metrics, token=token)
# --- [disk]: how each server's disk use is measured and its limit enforced ---


_DISK_MODES = ("auto", "btrfs", "walk")


@dataclass(frozen=True)
class DiskConfig:
    """
    Disk limits and usage (docs/DISK.md).  ``mode``: "btrfs" makes every
    server's data directory a subvolume whose qgroup limit is its disk limit
    (the kernel refuses writes past it; usage is read from the qgroup), and
    enables quotas on the data directory's filesystem; "walk" measures by
    walking the files; "auto" is btrfs when the data directory is on btrfs
    and quotas can be enabled there, else walk.
    """

    mode: str = "auto"
    # Share of one core (and of the disk's time) a usage walk may take: it
    # pauses between batches so that it is busy at most this fraction of the time.
    walk_share: float = 0.25
    # Entries a walk handles between two looks at its budget.
    walk_batch: int = 2000
    # Seconds a directory whose own mtime did not change keeps its counted
    # total without its files being looked at again (0: every file every time).
    # A file rewritten in place does not change its directory's mtime: its new
    # size shows up at the next full look, at most this long after.
    walk_full_interval: float = 300.0


def validate_disk(disk: DiskConfig) -> None:
    """Refuse ``[disk]`` settings that cannot work, naming the setting."""
    if disk.mode not in _DISK_MODES:
        raise ConfigInvalid("disk.mode must be one of {}".format(", ".join(_DISK_MODES)))
    if not isinstance(disk.walk_share, (int, float)) or not 0.01 <= disk.walk_share <= 1:
        raise ConfigInvalid("disk.walk_share must be between 0.01 and 1")
    if not 1 <= disk.walk_batch <= 1_000_000:
        raise ConfigInvalid("disk.walk_batch must be 1-1000000")
    if not 0 <= disk.walk_full_interval <= 86400:
        raise ConfigInvalid("disk.walk_full_interval must be between 0 and 86400 seconds")


@dataclass(frozen=True)
class AgentConfig:
    """The whole configuration tree."""

    node_id: str = "node-1"
    secret: str = field(default="", repr=False)
    development: bool = False
    # Agent state (SQLite store, logs kept by the agent).
    state_dir: str = "/var/lib/ctrlagent"
    # Root of the per-server data directories (``<data_dir>/<server id>``).
    data_dir: str = "/var/lib/ctrlagent/servers"
    panel: PanelConfig = field(default_factory=PanelConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    servers: ServersConfig = field(default_factory=ServersConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    sftp: SftpConfig = field(default_factory=SftpConfig)
    backups: BackupsConfig = field(default_factory=BackupsConfig)
    workshop: WorkshopConfig = field(default_factory=WorkshopConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)

    def __repr__(self) -> str:
        # Never let the secret reach a log line through repr().
        return "AgentConfig(node_id={!r}, development={!r}, state_dir={!r})".format(
            self.node_id, self.development, self.state_dir
        )


# Environment variables: name -> dotted config path.
ENVIRONMENT: Mapping[str, str] = {
    "PANEL_URL": "panel.url",
    "NODE_ID": "node_id",
    "AGENT_SECRET": "secret",
    "AGENT_SECRET_FILE": "secret_file",
    "HEALTH_PORT": "http.port",
    "DOCKER_HOST": "docker.host",
    "CTRLAGENT_RUNTIME": "runtime.kind",
    "PODMAN_HOST": "runtime.podman_host",
    "CTRLAGENT_STATE_DIR": "state_dir",
    "CTRLAGENT_DATA_DIR": "data_dir",
    "CTRLAGENT_PANEL_ENABLED": "panel.enabled",
    "CTRLAGENT_DEVELOPMENT": "development",
    "CTRLAGENT_HTTP_ENDPOINT": "http.endpoint",
    "CTRLAGENT_TLS_CERT": "http.tls_cert",
    "CTRLAGENT_TLS_KEY": "http.tls_key",
    "CTRLAGENT_SFTP_ENABLED": "sftp.enabled",
    "CTRLAGENT_SFTP_ENDPOINT": "sftp.endpoint",
    "CTRLAGENT_SFTP_PORT": "sftp.port",
    "CTRLAGENT_METRICS_TOKEN": "metrics.token",
}


def _escape_endpoint(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default``, or raise ConfigInvalid."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigInvalid("{}: expected a boolean, got {!r}".format(name, value))
    if isinstance(default, (int, float)) and isinstance(value, bool):
        # int(True) is 1: ``port = true`` is a mistake, not port 1.
        kind = "a number" if isinstance(default, float) else "an integer"
        raise ConfigInvalid("{}: expected {}, got {!r}".format(name, kind, value))
    if isinstance(default, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        except (TypeError, ValueError):
            raise ConfigInvalid("{}: expected an integer, got {!r}".format(name, value)) from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigInvalid("{}: expected a number, got {!r}".format(name, value)) from None
    if isinstance(default, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigInvalid("{}: expected a string, got {!r}".format(name, value))
        return str(value)
    if isinstance(default, tuple):
        # A TOML array of strings, or one comma-separated string (environment).
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigInvalid("{}: expected a list of strings, got {!r}".format(name, value))
        return tuple(value)
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigInvalid("{}: expected a table, got {!r}".format(name, value))
        return {str(k): v for k, v in value.items()}
    return value


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, refusing unknown keys."""
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = prefix + key
        if key not in known:
            raise ConfigInvalid("unknown configuration key {!r}".format(name))
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise ConfigInvalid("{}: expected a table".format(name))
            kwargs[key] = _build(type(default), value, name + ".")
        else:
            kwargs[key] = _coerce(name, value, default)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_secret_file(path: str) -> str:
    """
    Read the shared secret from ``path``.

    The file must not be readable by other users: a world-readable secret is
    refused rather than silently accepted.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigInvalid("secret file {}: {}".format(path, e.strerror)) from None
    if st.st_mode & stat.S_IROTH:
        raise ConfigInvalid(
            "secret file {} is world-readable; run: chmod 600 {}".format(path, path)
        )
    with open(path, encoding="utf-8") as f:
        secret = f.read().strip()
    if not secret:
        raise ConfigInvalid("secret file {} is empty".format(path))
    return secret


def load_config(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """
    Load the configuration tree.

    ``overrides`` maps dotted paths (``"http.port"``, ``"secret_file"``) to
    values from the command line; ``None`` values are ignored.
    """
    tree: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                tree = tomllib.load(f)
        except OSError as e:
            raise ConfigInvalid("config file {}: {}".format(config_file, e.strerror)) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigInvalid("config file {}: {}".format(config_file, e)) from None

    layer: dict[str, Any] = {}
    for env_name, dotted in ENVIRONMENT.items():
        if environ is not None and env_name in environ:
            _set_path(layer, dotted, environ[env_name])
    tree = _merge(tree, layer)

    layer = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(layer, dotted, value)
    tree = _merge(tree, layer)

    secret_file = tree.pop("secret_file", None)
    # [backups] has its own parser: ``retain`` is a number or a table.
    backups_table = tree.pop("backups", None)
    config: AgentConfig = _build(AgentConfig, tree)
    config = replace(config, backups=parse_backups_config(backups_table, state_dir=None))
    if secret_file and not config.secret:
        config = replace(config, secret=read_secret_file(str(secret_file)))
    config = replace(config, metrics=read_metrics_token(config.metrics))
    validate(config)
    return config


_PULL_POLICIES = ("always", "if-not-present", "never")
_RUNTIMES = ("docker", "podman")
_CAPABILITY = re.compile(r"[A-Z][A-Z_]{1,31}")
# Capabilities an install container never gets: device nodes, the host's
# namespaces and mounts, everything at once.
_FORBIDDEN_INSTALL_CAPS = frozenset({"MKNOD", "SYS_ADMIN", "ALL"})


def _validate_install(servers: ServersConfig) -> None:
    user = servers.install_user
    if user != "server" and not re.fullmatch(r"[0-9]{1,10}(:[0-9]{1,10})?", user):
        raise ConfigInvalid(
            'servers.install_user {!r} must be "uid:gid" or "server"'.format(user)
        )
    for cap in servers.install_capabilities:
        name = cap.upper().removeprefix("CAP_")
        if not _CAPABILITY.fullmatch(name):
            raise ConfigInvalid(
                "servers.install_capabilities: {!r} is not a capability name".format(cap)
            )
        if name in _FORBIDDEN_INSTALL_CAPS:
            raise ConfigInvalid(
                "servers.install_capabilities must not grant {} to install scripts".format(name)
            )
    if servers.install_log_max_bytes < 0:
        raise ConfigInvalid("servers.install_log_max_bytes must not be negative")


# --- [servers] port_range and ulimits ---

# The process limits a container may set (``setrlimit`` names without
# ``RLIMIT_``, as Docker's and Podman's ``--ulimit`` spell them); the same
# table as ``engine.interface.ULIMIT_NAMES`` (config imports nothing of the
# agent; a test holds the two equal).
ULIMIT_NAMES = (
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
    "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
)
# The largest limit taken (RLIM_INFINITY is 2**64-1; engines take int64).
_ULIMIT_MAX = 2**62


def parse_ulimits(value: Any) -> dict[str, tuple[int, int]]:
    """
    The process limits of a ``servers.ulimits`` setting: a table of name to a
    number (soft and hard alike) or a pair ``[soft, hard]``.  ``ConfigInvalid``
    with a message naming the entry for anything else (an unknown name, a
    negative number, soft above hard).
    """
    if not isinstance(value, Mapping):
        raise ConfigInvalid("servers.ulimits must be a table of name = limit")
    out: dict[str, tuple[int, int]] = {}
    for name, limit in value.items():
        key = "servers.ulimits.{}".format(name)
        if name not in ULIMIT_NAMES:
            raise ConfigInvalid(
                "{}: unknown limit (known: {})".format(key, ", ".join(ULIMIT_NAMES))
            )
        pair = limit if isinstance(limit, (list, tuple)) else (limit, limit)
        if len(pair) != 2 or not all(type(v) is int and 0 <= v <= _ULIMIT_MAX for v in pair):
            raise ConfigInvalid("{}: {!r} is not a number or a [soft, hard] pair of "
                                "non-negative integers".format(key, limit))
        soft, hard = pair
        if soft > hard:
            raise ConfigInvalid(
                "{}: soft limit {} is above the hard limit {}".format(key, soft, hard)
            )
        out[str(name)] = (soft, hard)
    return out


_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*")


def parse_port_range(value: str) -> tuple[int, int] | None:
    """
    ``servers.port_range`` as ``(first, last)``, None when empty (allocation
    off); ``ConfigInvalid`` naming the setting for anything else.
    """
    if not value.strip():
        return None
    match = _PORT_RANGE.fullmatch(value)
    if match is None:
        raise ConfigInvalid(
            'servers.port_range {!r} must be "first-last" (e.g. "25565-25665") or ""'.format(
                value
            )
        )
    first, last = int(match.group(1)), int(match.group(2))
    if not 1 <= first <= last <= 65535:
        raise ConfigInvalid(
            "servers.port_range {!r}: ports are 1-65535, the first not above the last".format(
                value
            )
        )
    return first, last


def _validate_allocations_and_limits(servers: ServersConfig) -> None:
    parse_port_range(servers.port_range)
    parse_ulimits(servers.ulimits)


# --- end of [servers] port_range and ulimits ---


def _validate_timeouts(timeouts: TimeoutsConfig) -> None:
    for f in fields(timeouts):
        value = getattr(timeouts, f.name)
        if f.name in ("command_margin", "engine_ping_cache"):
            # May be zero: no margin, no reuse of an engine ping.
            if not 0 <= value <= 3600:
                raise ConfigInvalid(
                    "timeouts.{} must be between 0 and 3600 seconds".format(f.name)
                )
        elif not 0 < value <= 3600:
            raise ConfigInvalid(
                "timeouts.{} must be more than 0 and at most 3600 seconds".format(f.name)
            )


_SFTP_SECONDS = (
    "grant_cache_seconds", "throttle_base", "throttle_max", "throttle_forget",
    "login_timeout", "disk_usage_ttl",
)


def validate_sftp(sftp: SftpConfig) -> None:
    """Refuse ``[sftp]`` settings that cannot work, naming the setting."""
    if not 0 < sftp.port < 65536:
        raise ConfigInvalid("sftp.port: must be 1-65535")
    if sftp.backend not in ("local", "panel"):
        raise ConfigInvalid("sftp.backend: must be local or panel")
    if sftp.backend == "panel" and not sftp.panel_url.startswith(("http://", "https://")):
        raise ConfigInvalid("sftp.panel_url: an http(s) URL is required with backend panel")
    for name in _SFTP_SECONDS:
        value = getattr(sftp, name)
        if not math.isfinite(value):
            raise ConfigInvalid("sftp.{}: expected a finite number".format(name))
        if value < 0:
            raise ConfigInvalid("sftp.{}: must not be negative".format(name))
    if sftp.throttle_max < sftp.throttle_base:
        raise ConfigInvalid("sftp.throttle_max: must be at least sftp.throttle_base")
    if sftp.login_timeout <= 0:
        raise ConfigInvalid("sftp.login_timeout: must be positive")
    for name in ("max_sessions", "max_sessions_per_address", "max_handles"):
        if not 1 <= getattr(sftp, name) <= 1_000_000:
            raise ConfigInvalid("sftp.{}: must be 1-1000000".format(name))
    if not 4 <= sftp.bcrypt_rounds <= 31:
        raise ConfigInvalid("sftp.bcrypt_rounds: must be 4-31")
    if sftp.endpoint and ":" not in sftp.endpoint:
        raise ConfigInvalid("sftp.endpoint: not a Twisted endpoint description (e.g. tcp:2022)")
    if sftp.host_key and not Path(sftp.host_key).is_absolute():
        raise ConfigInvalid("sftp.host_key: {!r} must be an absolute path".format(sftp.host_key))


def parse_sftp_config(values: Mapping[str, Any] | None) -> SftpConfig:
    """Build and validate the ``[sftp]`` section alone (as ``load_config`` does)."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigInvalid("sftp: expected a table")
    sftp: SftpConfig = _build(SftpConfig, values, "sftp.")
    validate_sftp(sftp)
    return sftp


def validate(config: AgentConfig) -> None:
    """Refuse a configuration the agent cannot run with."""
    if not config.secret and not config.development:
        raise ConfigInvalid(
            "no AGENT_SECRET: set it (or --secret-file), "
            "or pass --development for a local test agent"
        )
    if not config.node_id.strip():
        raise ConfigInvalid("node_id must not be empty")
    if not 0 < config.http.port < 65536:
        raise ConfigInvalid("http.port {} is not a TCP port (1-65535)".format(config.http.port))
    url = urlsplit(config.panel.url.strip())
    if config.panel.url.strip() and (url.scheme not in ("ws", "wss") or not url.hostname):
        raise ConfigInvalid(
            "panel.url {!r} must be a ws:// or wss:// URL (the Panel's agent WebSocket), "
            "or empty for no link: the Panel drives the agent over HTTP".format(config.panel.url)
        )
    for name, host in (
        ("docker.host", config.docker.host),
        ("runtime.podman_host", config.runtime.podman_host),
    ):
        if not host.startswith(("unix://", "tcp://", "http://", "https://")):
            raise ConfigInvalid(
                "{} {!r} must start with unix://, tcp://, http:// or https://".format(name, host)
            )
    if config.runtime.kind not in _RUNTIMES:
        raise ConfigInvalid(
            "runtime.kind {!r} must be one of {}".format(config.runtime.kind, ", ".join(_RUNTIMES))
        )
    if config.docker.pull_policy not in _PULL_POLICIES:
        raise ConfigInvalid(
            "docker.pull_policy must be one of {}".format(", ".join(_PULL_POLICIES))
        )
    if config.http.tls_key and not config.http.tls_cert:
        raise ConfigInvalid("http.tls_key given without http.tls_cert")
    for name, value in (
        ("panel.heartbeat_interval", config.panel.heartbeat_interval),
        ("panel.backoff_initial", config.panel.backoff_initial),
        ("servers.stats_interval", config.servers.stats_interval),
        ("servers.console_throttle_interval", config.servers.console_throttle_interval),
    ):
        if value <= 0:
            raise ConfigInvalid("{} must be positive".format(name))
    if not 0 <= config.docker.stream_read_interval <= 1:
        raise ConfigInvalid("docker.stream_read_interval must be between 0 and 1 second")
    if not 0 <= config.servers.console_mark_interval <= 3600:
        raise ConfigInvalid("servers.console_mark_interval must be between 0 and 3600 seconds")
    if not 0 <= config.servers.stats_idle_interval <= 3600:
        raise ConfigInvalid("servers.stats_idle_interval must be between 0 and 3600 seconds")
    if not 0 <= config.servers.drift_check_interval <= 3600:
        raise ConfigInvalid("servers.drift_check_interval must be between 0 and 3600 seconds")
    _validate_install(config.servers)
    _validate_allocations_and_limits(config.servers)
    if not 1 <= config.servers.reconcile_concurrency <= 1024:
        raise ConfigInvalid("servers.reconcile_concurrency must be between 1 and 1024")
    if config.http.max_body_bytes < 1024:
        raise ConfigInvalid("http.max_body_bytes must be at least 1024")
    if config.http.max_connections < 16:
        raise ConfigInvalid("http.max_connections must be at least 16")
    if config.panel.max_in_flight < 1:
        raise ConfigInvalid("panel.max_in_flight must be at least 1")
    if config.panel.max_held_bytes < 64 * 1024:
        raise ConfigInvalid("panel.max_held_bytes must be at least 65536 (64 KiB)")
    for name, value in (
        ("http.header_timeout", config.http.header_timeout),
        ("http.idle_timeout", config.http.idle_timeout),
    ):
        if not 0 < value <= 86400:
            raise ConfigInvalid("{} must be between 0 and 86400 seconds".format(name))
    _validate_timeouts(config.timeouts)
    validate_sftp(config.sftp)
    validate_backups(config.backups)
    validate_workshop(config.workshop)
    validate_metrics(config.metrics)
    validate_disk(config.disk)
    for name, path in (("state_dir", config.state_dir), ("data_dir", config.data_dir)):
        if not Path(path).is_absolute():
            raise ConfigInvalid("{} {!r} must be an absolute path".format(name, path))


# --- [backups]: parsed apart (``retain`` is a number or a table) ---


def _b_section(mapping: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = mapping.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigInvalid("{}.{} must be a table".format(where, key))
    return value


def _b_unknown(mapping: Mapping[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(mapping) - known)
    if extra:
        raise ConfigInvalid("unknown setting {}.{}".format(where, extra[0]))


def _b_str(mapping: Mapping[str, Any], key: str, where: str, default: str | None) -> Any:
    value = mapping.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise ConfigInvalid("{}.{} must be a string".format(where, key))
    return value


def _b_num(mapping: Mapping[str, Any], key: str, where: str, default: float | None,
         low: float, high: float, integer: bool = False) -> Any:
    value = mapping.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigInvalid("{}.{} must be a number".format(where, key))
    if integer and not isinstance(value, int):
        raise ConfigInvalid("{}.{} must be a whole number".format(where, key))
    if not (low <= value <= high):  # also refuses NaN
        raise ConfigInvalid("{}.{} must be between {} and {}".format(where, key, low, high))
    return value


def _b_bool(mapping: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = mapping.get(key, default)
    if not isinstance(value, bool):
        raise ConfigInvalid("{}.{} must be true or false".format(where, key))
    return value


def _b_commands(mapping: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = mapping.get(key, [])
    if not isinstance(value, list) or not all(
            isinstance(c, str) and c and "\n" not in c and len(c) <= 1024 for c in value):
        raise ConfigInvalid("{}.{} must be a list of one-line console commands".format(
            where, key))
    return tuple(value)


def parse_backup_driver(value: object, where: str = "driver") -> str:
    """A driver name, or ``ConfigInvalid``."""
    if value not in BACKUP_DRIVERS:
        raise ConfigInvalid("{} must be one of {}".format(where, ", ".join(BACKUP_DRIVERS)))
    return str(value)


def parse_retention(value: object, where: str = "retain") -> Retention:
    """
    ``retain``: a whole number (keep the newest N) or a table ``{last?, days?}``
    (keep the newest ``last`` and every backup younger than ``days``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"last": value}
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigInvalid("{} must be a number or a table {{last, days}}".format(where))
    _b_unknown(value, {"last", "days"}, where)
    last = _b_num(value, "last", where, None, 1, 100_000, integer=True)
    days = _b_num(value, "days", where, None, 0.001, 36_500)
    return Retention(last=last, days=days)


def parse_cron(value: object, where: str = "cron") -> str | None:
    """A five-field cron expression (UTC), or None/"" for off."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise ConfigInvalid("{} must be a cron expression".format(where))
    from croniter import croniter

    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ConfigInvalid("{} is not a valid five-field cron expression".format(where))
    return value


def parse_backups_config(mapping: Mapping[str, Any] | None,
                         state_dir: str | None = "/var/lib/ctrlagent") -> BackupsConfig:
    """
    The ``[backups]`` table as a ``BackupsConfig``.  Without a ``directory``,
    it is ``<state_dir>/backups``, or left empty (meaning just that, once
    the state directory is known) when ``state_dir`` is None.
    """
    where = "backups"
    mapping = mapping or {}
    if not isinstance(mapping, Mapping):
        raise ConfigInvalid("backups must be a table")
    _b_unknown(mapping, {"directory", "driver", "concurrency", "compression_level",
                       "progress_interval", "stop_timeout", "schedule_interval", "s3",
                       "restic", "schedule", "hooks"}, where)
    directory = _b_str(mapping, "directory", where,
                       "" if state_dir is None else os.path.join(state_dir, "backups"))
    if directory and not os.path.isabs(directory):
        raise ConfigInvalid("backups.directory must be an absolute path")

    s3m = _b_section(mapping, "s3", where)
    w = where + ".s3"
    _b_unknown(s3m, {"endpoint", "bucket", "region", "access_key", "secret_key",
                   "secret_key_file", "path_style", "prefix", "part_size", "part_retries"}, w)
    secret = _b_str(s3m, "secret_key", w, None)
    secret_file = _b_str(s3m, "secret_key_file", w, None)
    if secret_file is not None:
        secret = _read_backup_secret(secret_file, w + ".secret_key_file")
    endpoint = _b_str(s3m, "endpoint", w, None)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigInvalid("backups.s3.endpoint must be an http:// or https:// URL")
    s3 = S3Config(
        endpoint=endpoint,
        bucket=_b_str(s3m, "bucket", w, ""),
        region=_b_str(s3m, "region", w, "us-east-1"),
        access_key=_b_str(s3m, "access_key", w, None),
        secret_key=secret,
        secret_key_file=secret_file,
        path_style=_b_bool(s3m, "path_style", w, False),
        prefix=_b_str(s3m, "prefix", w, "ctrlagent").strip("/"),
        part_size=_b_num(s3m, "part_size", w, 64 * 1024 * 1024, S3_MIN_PART, S3_MAX_PART,
                       integer=True),
        part_retries=_b_num(s3m, "part_retries", w, 5, 0, 100, integer=True),
    )

    rm = _b_section(mapping, "restic", where)
    w = where + ".restic"
    _b_unknown(rm, {"repository", "password", "password_file", "binary", "timeout"}, w)
    restic = ResticConfig(
        repository=_b_str(rm, "repository", w, None),
        password=_b_str(rm, "password", w, None),
        password_file=_b_str(rm, "password_file", w, None),
        binary=_b_str(rm, "binary", w, "restic"),
        timeout=_b_num(rm, "timeout", w, 6 * 3600.0, 1, 7 * 86400),
    )
    if restic.password is not None and restic.password_file is not None:
        raise ConfigInvalid("backups.restic: set password or password_file, not both")

    sm = _b_section(mapping, "schedule", where)
    w = where + ".schedule"
    _b_unknown(sm, {"cron", "retain", "driver"}, w)
    schedule = ScheduleDefaults(
        cron=parse_cron(sm.get("cron"), w + ".cron"),
        retain=parse_retention(sm.get("retain"), w + ".retain"),
        driver=parse_backup_driver(sm.get("driver", "local"), w + ".driver"),
    )

    hm = _b_section(mapping, "hooks", where)
    w = where + ".hooks"
    _b_unknown(hm, {"before", "wait_for", "wait_timeout", "after"}, w)
    wait_for = _b_str(hm, "wait_for", w, None)
    if wait_for is not None:
        try:
            re.compile(wait_for)
        except re.error as e:
            raise ConfigInvalid("backups.hooks.wait_for is not a regular expression: {}"
                                .format(e)) from None
    hooks = HooksConfig(
        before=_b_commands(hm, "before", w),
        wait_for=wait_for,
        wait_timeout=_b_num(hm, "wait_timeout", w, 60.0, 0.1, 3600),
        after=_b_commands(hm, "after", w),
    )

    config = BackupsConfig(
        directory=directory,
        driver=parse_backup_driver(mapping.get("driver", "local"), "backups.driver"),
        concurrency=_b_num(mapping, "concurrency", where, 2, 1, 64, integer=True),
        compression_level=_b_num(mapping, "compression_level", where, 3, 1, 19, integer=True),
        progress_interval=_b_num(mapping, "progress_interval", where, 1.0, 0.05, 3600),
        stop_timeout=_b_num(mapping, "stop_timeout", where, 120.0, 1, 86400),
        schedule_interval=_b_num(mapping, "schedule_interval", where, 30.0, 1, 3600),
        s3=s3,
        restic=restic,
        schedule=schedule,
        hooks=hooks,
    )
    for name in {config.driver, schedule.driver}:
        check_driver_configured(config, name)
    return config


def validate_backups(backups: BackupsConfig) -> None:
    """
    Refuse a ``[backups]`` tree (parsed, or built in code) the agent cannot
    run with: the checks ``parse_backups_config`` makes of the finished tree.
    """
    if backups.directory and not os.path.isabs(backups.directory):
        raise ConfigInvalid("backups.directory must be an absolute path")
    parse_backup_driver(backups.driver, "backups.driver")
    parse_backup_driver(backups.schedule.driver, "backups.schedule.driver")
    for name, value, low, high in (
        ("concurrency", backups.concurrency, 1, 64),
        ("compression_level", backups.compression_level, 1, 19),
        ("progress_interval", backups.progress_interval, 0.05, 3600),
        ("stop_timeout", backups.stop_timeout, 1, 86400),
        ("schedule_interval", backups.schedule_interval, 1, 3600),
    ):
        if not low <= value <= high:  # also refuses NaN
            raise ConfigInvalid("backups.{} must be between {} and {}".format(name, low, high))
    if backups.restic.password is not None and backups.restic.password_file is not None:
        raise ConfigInvalid("backups.restic: set password or password_file, not both")
    for name in {backups.driver, backups.schedule.driver}:
        check_driver_configured(backups, name)


def check_driver_configured(config: BackupsConfig, driver: str) -> None:
    """``ConfigInvalid`` unless ``driver`` has what it needs."""
    if driver == "s3" and not config.s3.bucket:
        raise ConfigInvalid("backups.s3.bucket is required for the s3 driver")
    if driver == "restic":
        if not config.restic.repository:
            raise ConfigInvalid("backups.restic.repository is required for the restic driver")
        if config.restic.password is None and config.restic.password_file is None:
            raise ConfigInvalid("backups.restic needs password or password_file")


def _read_backup_secret(path: str, where: str) -> str:
    """A secret from a file that is not world-readable."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o004:
            raise ConfigInvalid("{} {} must not be world-readable".format(where, path))
        with open(path, encoding="utf-8") as f:
            return f.read(4096).strip()
    except OSError as e:
        raise ConfigInvalid("{} {} cannot be read ({})".format(where, path, e.strerror)) from None
