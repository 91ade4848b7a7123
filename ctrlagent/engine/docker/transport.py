"""
How the Docker client reaches the engine: ``DOCKER_HOST`` parsing, the
endpoint factory and the treq ``HTTPClient`` built on it.

- ``unix:///path/docker.sock`` → ``UNIXClientEndpoint``;
- ``tcp://host:2375`` or ``http://host:2375`` → plain TCP;
- ``https://host:2376``, or ``tcp://`` with TLS files configured → TLS (CA,
  client certificate and key from ``DockerConfig``).

Every request goes through ``Agent.usingEndpointFactory``, so the URL only
names the API path; the endpoint decides where the bytes go.  The console
stdin protocol asks the same factory for a raw connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hyperlink import DecodedURL
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from ctrlagent.config import DockerConfig
from ctrlagent.engine.docker.errors import DockerInvalidInput

__all__ = ["DockerHost", "parse_docker_host", "DockerEndpointFactory", "make_http_client"]


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without start/stop log lines."""

    noisy = False


@dataclass(frozen=True)
class DockerHost:
    """Where the engine listens, parsed from a ``DOCKER_HOST`` value."""

    kind: str  # "unix", "tcp" or "tls"
    path: str = ""
    hostname: str = ""
    port: int = 0

    @property
    def base_text(self) -> str:
        """
        What every API URL starts with (the Host header it implies), as ASCII
        text without a closing slash: "http://docker".
        """
        if self.kind == "unix":
            return "http://docker"
        # An IPv6 address goes in brackets ("tcp://[::1]:2375"); a name that
        # is not ASCII in its IDNA form.
        if ":" in self.hostname:
            host = "[{}]".format(self.hostname)
        elif self.hostname.isascii():
            host = self.hostname
        else:
            host = self.hostname.encode("idna").decode("ascii")
        return "http://{}:{}".format(host, self.port)

    def describe(self) -> str:
        """A human description for error messages."""
        if self.kind == "unix":
            return "unix://" + self.path
        return "{}://{}:{}".format(self.kind, self.hostname, self.port)


def parse_docker_host(host: str, tls: bool = False) -> DockerHost:
    """
    Parse a ``DOCKER_HOST`` value.

    ``tls`` says that TLS files are configured, which turns ``tcp://`` into
    TLS as the docker CLI does with ``DOCKER_TLS_VERIFY``.
    """
    if host.startswith("unix://"):
        path = host[len("unix://") :]
        if not path.startswith("/"):
            raise DockerInvalidInput(
                "docker host {!r}: unix socket path must be absolute".format(host)
            )
        return DockerHost(kind="unix", path=path)
    for prefix, kind, default_port in (
        ("tcp://", "tls" if tls else "tcp", 2376 if tls else 2375),
        ("http://", "tcp", 2375),
        ("https://", "tls", 2376),
    ):
        if host.startswith(prefix):
            url = DecodedURL.from_text(host)
            if not url.host:
                raise DockerInvalidInput("docker host {!r} names no host".format(host))
            return DockerHost(kind=kind, hostname=url.host, port=url.port or default_port)
    raise DockerInvalidInput(
        "docker host {!r} must start with unix://, tcp://, http:// or https://".format(host)
    )


def _tls_options(host: DockerHost, config: DockerConfig) -> Any:
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

    trust_root: Any = None
    if config.tls_ca:
        with open(config.tls_ca, "rb") as f:
            trust_root = Certificate.loadPEM(f.read())
    client_cert: Any = None
    if config.tls_cert:
        with open(config.tls_cert, "rb") as f:
            pem = f.read()
        with open(config.tls_key or config.tls_cert, "rb") as f:
            key = f.read()
        client_cert = PrivateCertificate.loadPEM(pem + b"\n" + key)
    return optionsForClientTLS(
        host.hostname, trustRoot=trust_root, clientCertificate=client_cert
    )


# A Unix socket address holds 108 bytes, the terminating NUL included.
SOCKET_PATH_MAX = 107


@implementer(IStreamClientEndpoint)
class UnixPathEndpoint:
    """
    A Unix socket at a path of any length.

    A path longer than a socket address holds (a socket deep in a long state
    or temp directory) is reached through ``/proc/self/fd/<a descriptor of
    its directory>/<name>``, the descriptor held only while connecting;
    otherwise the connect would fail inside the reactor with a ``TypeError``
    (``OSError("AF_UNIX path too long")`` carries no errno) instead of a
    clear connect error.
    """

    def __init__(self, reactor: Any, path: str, timeout: int = 30) -> None:
        self._reactor = reactor
        self.path = path
        self._timeout = timeout

    def connect(self, protocolFactory: Any) -> Deferred[Any]:  # noqa: N803 (Twisted's name)
        if len(os.fsencode(self.path)) <= SOCKET_PATH_MAX:
            return UNIXClientEndpoint(self._reactor, self.path, timeout=self._timeout).connect(
                protocolFactory
            )
        directory, name = os.path.split(self.path)
        try:
            fd = os.open(directory or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            return fail(ConnectError(string="{}: {}".format(directory, e.strerror or e)))
        address = "/proc/self/fd/{}/{}".format(fd, name)
        if len(os.fsencode(address)) > SOCKET_PATH_MAX:
            os.close(fd)
            return fail(ConnectError(string="socket name {!r} is too long".format(name)))

        def close(result: Any) -> Any:
            os.close(fd)
            return result

        d: Deferred[Any] = UNIXClientEndpoint(
            self._reactor, address, timeout=self._timeout
        ).connect(protocolFactory)
        return d.addBoth(close)


@implementer(IAgentEndpointFactory)
class DockerEndpointFactory:
    """Every URI maps to the one engine endpoint (Unix socket, TCP or TLS)."""

    def __init__(
        self,
        reactor: Any,
        host: DockerHost,
        connect_timeout: float = 10.0,
        tls_options: Any = None,
    ) -> None:
        self._reactor = reactor
        self.host = host
        self._timeout = connect_timeout
        self._tls = tls_options

    @classmethod
    def from_config(cls, reactor: Any, config: DockerConfig) -> DockerEndpointFactory:
        """The factory for ``config.host`` with ``config``'s TLS files."""
        host = parse_docker_host(config.host, tls=bool(config.tls_ca or config.tls_cert))
        tls = _tls_options(host, config) if host.kind == "tls" else None
        return cls(reactor, host, connect_timeout=config.call_timeout, tls_options=tls)

    def endpoint(self) -> IStreamClientEndpoint:
        """A fresh client endpoint to the engine."""
        if self.host.kind == "unix":
            timeout = max(1, int(self._timeout))
            return UnixPathEndpoint(self._reactor, self.host.path, timeout=timeout)
        tcp = HostnameEndpoint(
            self._reactor, self.host.hostname, self.host.port, timeout=self._timeout
        )
        if self.host.kind == "tls":
            return wrapClientTLS(self._tls, tcp)
        return tcp

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:  # noqa: N802 (Twisted hook)
        """``IAgentEndpointFactory``: ignore the URI, always the engine."""
        return self.endpoint()


def make_http_client(
    reactor: Any, factory: DockerEndpointFactory, persistent: int = 4
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client whose every request goes to the engine, with a small pool."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    # Every new engine connection would log "Starting factory ..." at info
    # level; an operator reading the journal has no use for that.
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = persistent
    pool.cachedConnectionTimeout = 30
    agent = Agent.usingEndpointFactory(reactor, factory, pool=pool)
    return HTTPClient(agent), pool
