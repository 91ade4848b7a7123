"""
The panel backend: log in to SFTP with the Panel's own account.

The username is ``<email>.<server id>`` (the last dot splits them; the server
id is any id the Panel and the agent know the server by).  The password is
checked by the Panel itself: ``POST <panel>/api/auth/login {email, password}``
answers a token (``data.token``), then ``GET <panel>/api/servers/<id>`` with
``Authorization: Bearer <token>`` must answer 2xx for that server; anything
else refuses the login.  A grant is cached for ``grant_cache_seconds`` under
a keyed digest of the credentials (HMAC-SHA256 with a random key that lives
only in this process), so the password itself is never kept, and a changed
password misses the cache.  Bodies are size-capped and every call has a
timeout; an unreachable Panel refuses the login (logged without the
password).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any
from urllib.parse import quote

from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent.errors import CtrlAgentError
from ctrlagent.sftp.sessions import Login

MAX_BODY = 1024 * 1024
TIMEOUT = 10.0


def split_username(username: str) -> tuple[str, str] | None:
    """``(email, server id)`` of ``<email>.<server id>``, or None."""
    email, dot, server = username.rpartition(".")
    if not dot or "@" not in email or not server:
        return None
    return email, server


@implementer(ICredentialsChecker)
class PanelLoginChecker:
    """Checks a login against the Panel (see the module)."""

    credentialInterfaces = (cred_credentials.IUsernamePassword,)
    log = Logger()

    def __init__(self, reactor: Any, http: Any, panel_url: str, servers: Any,
                 cache_seconds: float) -> None:
        self.reactor = reactor
        self.http = http  # a treq.HTTPClient
        self.panel_url = panel_url.rstrip("/")
        self.servers = servers
        self.cache_seconds = cache_seconds
        self._key = secrets.token_bytes(32)
        self._grants: dict[bytes, float] = {}
        self.panel_calls = 0

    def _digest(self, username: str, password: bytes) -> bytes:
        return hmac.new(self._key, username.encode("utf-8") + b"\0" + password,
                        hashlib.sha256).digest()

    def requestAvatarId(self, credentials: Any) -> Any:  # noqa: N802
        return Deferred.fromCoroutine(self._check(credentials.username, credentials.password))

    async def _check(self, raw_username: bytes, password: bytes) -> Login:
        try:
            username = raw_username.decode("utf-8")
        except UnicodeDecodeError:
            raise UnauthorizedLogin("bad username") from None
        parts = split_username(username)
        if parts is None:
            raise UnauthorizedLogin("the username must be <email>.<server id>")
        email, server_ref = parts
        try:
            server_id = str(self.servers.resolve(server_ref))
        except CtrlAgentError:
            raise UnauthorizedLogin("no such server") from None
        now = self.reactor.seconds()
        self._grants = {k: t for k, t in self._grants.items() if t > now}
        digest = self._digest(username, password)
        if digest in self._grants:
            return Login(server_id, read_only=False)
        if not await self._ask_panel(email, password, server_ref):
            raise UnauthorizedLogin("the Panel refused the login")
        if self.cache_seconds > 0:
            self._grants[digest] = now + self.cache_seconds
        return Login(server_id, read_only=False)

    async def _ask_panel(self, email: str, password: bytes, server_ref: str) -> bool:
        self.panel_calls += 1
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return False
        try:
            response = await self.http.post(
                self.panel_url + "/api/auth/login",
                data=json.dumps({"email": email, "password": text}).encode("utf-8"),
                headers={b"Content-Type": [b"application/json"]}, timeout=TIMEOUT)
            body = await self._body(response)
            if not 200 <= response.code < 300:
                return False
            token = self._token(body)
            if token is None:
                return False
            response = await self.http.get(
                self.panel_url + "/api/servers/" + quote(server_ref, safe=""),
                headers={b"Authorization": [b"Bearer " + token.encode("ascii", "replace")]},
                timeout=TIMEOUT)
            await self._body(response)
            return 200 <= int(response.code) < 300
        except Exception as e:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "sftp: the Panel at {url} did not answer a login check: {error}",
                url=self.panel_url, error=type(e).__name__)
            return False

    @staticmethod
    async def _body(response: Any) -> bytes:
        parts: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_BODY:
                raise ValueError("the Panel's answer is too large")
            parts.append(data)

        import treq

        await treq.collect(response, collect)
        return b"".join(parts)

    @staticmethod
    def _token(body: bytes) -> str | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if isinstance(data, dict):
            inner = data.get("data")
            token = inner.get("token") if isinstance(inner, dict) else data.get("token")
            if isinstance(token, str) and token and len(token) < 8192:
                return token
        return None
