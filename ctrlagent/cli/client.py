"""
The CLI's HTTP client of the local agent: where the agent listens (from its
configuration), the node's secret on every request, and one clear error per
way a request can fail.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ctrlagent.config import AgentConfig

# Exit codes: a refused command, the agent not answering, a refused secret.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_AUTH = 4

_ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


class CliError(Exception):
    """One line for stderr, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Target:
    """Where the agent's API listens: ``http``/``https`` host and port, or a Unix socket."""

    scheme: str
    host: str
    port: int
    unix_path: str = ""

    def describe(self) -> str:
        if self.unix_path:
            return "unix:" + self.unix_path
        host = "[{}]".format(self.host) if ":" in self.host else self.host
        return "{}://{}:{}".format(self.scheme, host, self.port)


def _endpoint_parts(description: str) -> tuple[list[str], dict[str, str]]:
    """A Twisted endpoint description's positional and keyword parts (``\\:`` escapes)."""
    parts: list[str] = []
    current = ""
    escaped = False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    positional = [p for p in parts if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts if "=" in p)
    return positional, keywords


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in _ANY_ADDRESS else host


def target_of(config: AgentConfig, url: str | None = None) -> Target:
    """Where the agent of ``config`` answers (``url`` overrides, as ``--url``)."""
    if url:
        scheme, _, rest = url.partition("://")
        if scheme not in ("http", "https") or not rest:
            raise CliError("--url must be an http:// or https:// URL", EXIT_USAGE)
        hostport = rest.split("/", 1)[0]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            host, port = hostport, "443" if scheme == "https" else "80"
        return Target(scheme, host.strip("[]"), int(port))
    http = config.http
    if not http.endpoint:
        scheme = "https" if http.tls_cert else "http"
        return Target(scheme, _loopback(http.bind), http.port)
    positional, keywords = _endpoint_parts(http.endpoint)
    kind = positional[0] if positional else ""
    if kind == "unix":
        path = keywords.get("address") or (positional[1] if len(positional) > 1 else "")
        return Target("http", "localhost", 0, unix_path=path)
    if kind in ("tcp", "ssl", "tcp6"):
        port = keywords.get("port") or (positional[1] if len(positional) > 1 else "")
        if not port.isdigit():
            raise CliError("cannot read a port from http.endpoint {!r}".format(http.endpoint),
                           EXIT_USAGE)
        host = _loopback(keywords.get("interface", ""))
        return Target("https" if kind == "ssl" else "http", host, int(port))
    raise CliError(
        "http.endpoint {!r}: use --url to say where the agent answers".format(http.endpoint),
        EXIT_USAGE,
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    """Requests to the agent at ``target`` with ``secret``; answers decoded from JSON."""

    def __init__(self, target: Target, secret: str, timeout: float = 35.0) -> None:
        self.target = target
        self._secret = secret
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        t = self.target
        if t.unix_path:
            return _UnixConnection(t.unix_path, self.timeout)
        if t.scheme == "https":
            # The agent on this node, by its loopback address: its certificate
            # names the node's public host, not 127.0.0.1.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(t.host, t.port, timeout=self.timeout,
                                               context=context)
        return http.client.HTTPConnection(t.host, t.port, timeout=self.timeout)

    def request(
        self, method: str, path: str, body: Any = None, auth: bool = True,
        ok_statuses: tuple[int, ...] = (),
    ) -> tuple[int, Any]:
        """``(status, decoded body)``; a refused or failed request is a ``CliError``."""
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = "Bearer " + self._secret
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        where = self.target.describe()
        connection = self._connection()
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read(64 * 1024 * 1024)
            status = response.status
        except (ConnectionRefusedError, FileNotFoundError):
            raise CliError("the agent is not running (nothing answers at {})".format(where),
                           EXIT_NOT_RUNNING) from None
        except TimeoutError:
            raise CliError("the agent at {} did not answer within {:g} s".format(
                where, self.timeout), EXIT_NOT_RUNNING) from None
        except ssl.SSLError as e:
            raise CliError("TLS with the agent at {} failed: {}".format(where, e.reason or e),
                           EXIT_NOT_RUNNING) from None
        except (OSError, http.client.HTTPException) as e:
            raise CliError("cannot reach the agent at {}: {}".format(
                where, getattr(e, "strerror", None) or e), EXIT_NOT_RUNNING) from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode("utf-8", "replace")
        if status == 401:
            raise CliError(
                "the agent refused the secret (401): this command read another secret than "
                "the agent runs with (check --config, AGENT_SECRET, AGENT_SECRET_FILE)",
                EXIT_AUTH,
            )
        if status >= 400 and status not in ok_statuses:
            raise CliError(_failure_text(status, answer))
        return status, answer

    def data(self, method: str, path: str, body: Any = None) -> Any:
        """The ``data`` of a successful answer; a failure is a ``CliError``."""
        _, answer = self.request(method, path, body)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise CliError(_failure_text(200, answer))
        return answer.get("data") if isinstance(answer, dict) else answer

    def command(self, action: str, server_id: str | None = None, **payload: Any) -> Any:
        """``POST /api/command``: the ``data`` of a successful action."""
        body: dict[str, Any] = {"action": action, "payload": payload}
        if server_id is not None:
            body["serverId"] = server_id
        return self.data("POST", "/api/command", body)


def server_path(server_id: str, *rest: str) -> str:
    """``/api/servers/<id>/...`` with the id quoted (any bytes an operator typed)."""
    return "/".join(["/api/servers", quote(server_id, safe=""), *rest])


def _failure_text(status: int, answer: Any) -> str:
    if isinstance(answer, dict) and "error" in answer:
        code = answer.get("code")
        return "{}{}".format("{}: ".format(code) if code else "", answer["error"])
    return "the agent answered HTTP {}".format(status)
