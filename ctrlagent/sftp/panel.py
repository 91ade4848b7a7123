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

Learning aliases.  The Panel names a server by two ids (its ``id`` and its
``uuid``; PROTOCOL.md section 2) and its ``GET /api/servers/<id>`` answer
(``{"data": {"id", "uuid", ..}}``) carries both.  When that answer is about
the id the login asked for, and one of its two ids names a server here, the
other id is recorded as that server's alias (``update(server, {"aliases":
[..]})``, kept in the store), so the Panel's other id works everywhere from
then on.  That is why a server id the agent does not know yet is still put
to the Panel: a login whose ids name no server here is refused, as is one
whose two ids name two different servers (logged, nothing recorded).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
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
        server_id = self._resolve(server_ref)
        now = self.reactor.seconds()
        self._grants = {k: t for k, t in self._grants.items() if t > now}
        digest = self._digest(username, password)
        if server_id is not None and digest in self._grants:
            return Login(server_id, read_only=False)
        record = await self._ask_panel(email, password, server_ref)
        if record is None:
            raise UnauthorizedLogin("the Panel refused the login")
        learnt = await self._learn_aliases(server_ref, record)
        server_id = server_id or learnt
        if server_id is None:
            raise UnauthorizedLogin("no such server")
        if self.cache_seconds > 0:
            self._grants[digest] = now + self.cache_seconds
        return Login(server_id, read_only=False)

    def _resolve(self, server_ref: str) -> str | None:
        """The canonical id of the server ``server_ref`` names here, or None."""
        try:
            return str(self.servers.resolve(server_ref))
        except CtrlAgentError:
            return None

    async def _learn_aliases(self, server_ref: str, record: Mapping[str, Any]) -> str | None:
        """
        Record the ids of the Panel's ``record`` that name no server here as
        aliases of the one server its other id names (see the module); the
        canonical id of that server, or None.
        """
        ids = [
            value for value in (record.get("id"), record.get("uuid"))
            if isinstance(value, str) and value
        ]
        if server_ref not in ids:
            return None  # not an answer about the server asked for
        owners = {value: self._resolve(value) for value in ids}
        known = {owner for owner in owners.values() if owner is not None}
        if len(known) != 1:
            if len(known) > 1:
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "sftp: the Panel's server {ids} names two servers here ({owners}); "
                    "no alias recorded",
                    ids=ids, owners=sorted(known))
            return None
        (server_id,) = known
        unknown = [value for value, owner in owners.items() if owner is None]
        if unknown:
            try:
                await maybeDeferred(self.servers.update, server_id, {"aliases": unknown})
            except CtrlAgentError as e:
                self.log.warn(  # noqa: G010
                    "sftp: could not record {aliases} as aliases of server {server_id}: {error}",
                    aliases=unknown, server_id=server_id, error=e.message)
            else:
                self.log.info(
                    "sftp: the Panel says server {server_id} is also {aliases}; alias recorded",
                    server_id=server_id, aliases=unknown)
        return server_id

    async def _ask_panel(
        self, email: str, password: bytes, server_ref: str
    ) -> Mapping[str, Any] | None:
        """
        The Panel's record of ``server_ref`` (``data`` of its answer; ``{}``
        when it has none) if it accepts the login for it, else None.
        """
        self.panel_calls += 1
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        try:
            response = await self.http.post(
                self.panel_url + "/api/auth/login",
                data=json.dumps({"email": email, "password": text}).encode("utf-8"),
                headers={b"Content-Type": [b"application/json"]}, timeout=TIMEOUT)
            body = await self._body(response)
            if not 200 <= response.code < 300:
                return None
            token = self._token(body)
            if token is None:
                return None
            response = await self.http.get(
                self.panel_url + "/api/servers/" + quote(server_ref, safe=""),
                headers={b"Authorization": [b"Bearer " + token.encode("ascii", "replace")]},
                timeout=TIMEOUT)
            body = await self._body(response)
            if not 200 <= int(response.code) < 300:
                return None
            return self._record(body)
        except Exception as e:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "sftp: the Panel at {url} did not answer a login check: {error}",
                url=self.panel_url, error=type(e).__name__)
            return None

    @staticmethod
    def _record(body: bytes) -> Mapping[str, Any]:
        """The server record of a ``GET /api/servers/<id>`` answer (``{}`` if none)."""
        try:
            data = json.loads(body)
        except ValueError:
            return {}
        if isinstance(data, dict):
            inner = data.get("data")
            if isinstance(inner, dict):
                return inner
        return {}

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
