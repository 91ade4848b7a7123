"""
The SSH side of the SFTP server (``twisted.conch``): host key, logins,
the one channel type we open, the factory.

- ``load_host_key`` generates an ed25519 host key on first start (mode 600,
  written atomically) and refuses one others may read.
- ``ServerLoginChecker`` is the ``twisted.cred`` checker of the local
  backend: the username is a server id (or any alias the server manager
  resolves), the password is checked against a bcrypt hash in the thread
  pool, a key against the server's OpenSSH public keys.
- ``SftpRealm`` gives each login an ``SftpUser`` bound to exactly one
  server's data directory.  Its only channel is a session whose only
  request is the ``sftp`` subsystem: shell, exec, pty, env, agent and X11
  requests are refused (with one line on stderr for shell and exec), port
  forwarding channels and global requests are unknown.
- ``ThrottledUserAuth`` delays failed logins per address and per username
  (``throttle.LoginThrottle``) and logs them with the address; it registers a
  session when a login succeeds.
- ``SftpFactory`` counts connections (total and per address) and refuses
  those beyond the limits before any key exchange.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections import deque
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch import avatar as conch_avatar
from twisted.conch import error as conch_error
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import (
    channel,
    common,
    connection,
    factory,
    keys,
    transport,
    userauth,
)
from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ctrlagent.errors import ConfigInvalid, CtrlAgentError
from ctrlagent.interfaces import ServerRoot
from ctrlagent.sftp.credentials import SftpCredentials
from ctrlagent.sftp.filesystem import ServerFiles, ServerFileSystem
from ctrlagent.sftp.protocol import SftpProtocol
from ctrlagent.sftp.sessions import Login, Session
from ctrlagent.sftp.throttle import LoginThrottle
from ctrlagent.wire.json import to_json

log = Logger(namespace="ctrlagent.sftp")

# The window and packet size we offer the client on the SFTP channel: a
# window of 4 MiB keeps a 64-request pipeline of 32 KiB writes flowing.
CHANNEL_WINDOW = 4 * 1024 * 1024
CHANNEL_MAX_PACKET = 256 * 1024

SFTP_ONLY = b"This account is for SFTP only.\r\n"
# Channels open at once on one connection.
MAX_CHANNELS = 8


# -- host key -------------------------------------------------------------------

def load_host_key(path: str) -> keys.Key:
    """The host key at ``path``, generated (ed25519, mode 600) when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return _generate_host_key(path)
    except OSError as e:
        raise ConfigInvalid("sftp host key {}: {}".format(path, e.strerror)) from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise ConfigInvalid(
                "sftp host key {} is readable by others (mode {:o}); chmod 600 it".format(
                    path, st.st_mode & 0o777))
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(1024 * 1024)
    finally:
        os.close(fd)
    try:
        key = keys.Key.fromString(data)
    except Exception:
        raise ConfigInvalid("sftp host key {} is not a private key".format(path)) from None
    if key.isPublic():
        raise ConfigInvalid("sftp host key {} is a public key".format(path))
    return key


def _generate_host_key(path: str) -> keys.Key:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption())
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, ".{}.{}".format(os.path.basename(path),
                                                     secrets.token_hex(6)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # Never replace a key another process made meanwhile.
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
    except FileExistsError:
        return load_host_key(path)
    except OSError as e:
        raise ConfigInvalid("sftp host key {}: {}".format(path, e.strerror)) from None
    log.info("sftp: generated a new host key {path}", path=path)
    return keys.Key.fromString(pem)


def fingerprint(key: keys.Key) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    value = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + str(value).rstrip("=")


# -- logins ---------------------------------------------------------------------


@implementer(ICredentialsChecker)
class ServerLoginChecker:
    """Passwords and keys of the local backend (see the module)."""

    credentialInterfaces = (cred_credentials.IUsernamePassword,
                            cred_credentials.ISSHPrivateKey)

    def __init__(self, reactor: Any, threadpool: ThreadPool, servers: Any,
                 credentials: SftpCredentials) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.servers = servers
        self.credentials = credentials

    def _server_id(self, username: bytes) -> str | None:
        try:
            name = username.decode("utf-8")
        except UnicodeDecodeError:
            return None
        try:
            return str(self.servers.resolve(name))
        except CtrlAgentError:
            return None

    def requestAvatarId(self, credentials: Any) -> Any:  # noqa: N802
        server_id = self._server_id(credentials.username)
        if cred_credentials.IUsernamePassword.providedBy(credentials):
            return Deferred.fromCoroutine(self._password(server_id, credentials.password))
        return self._key(server_id, credentials)

    async def _password(self, server_id: str | None, password: bytes) -> Login:
        ok = await deferToThreadPool(self.reactor, self.threadpool,
                                     self.credentials.check_password, server_id or "",
                                     password)
        login = self.credentials.get(server_id) if server_id else None
        if not ok or login is None or server_id is None:
            raise UnauthorizedLogin("wrong username or password")
        return Login(server_id, login.read_only)

    def _key(self, server_id: str | None, credentials: Any) -> Deferred[Login]:
        login = self.credentials.get(server_id) if server_id else None
        if login is None or server_id is None or credentials.blob not in login.key_blobs():
            return fail(UnauthorizedLogin("key not accepted"))
        if not credentials.signature:
            return fail(conch_error.ValidPublicKey())
        try:
            key = keys.Key.fromString(credentials.blob)
            valid = key.verify(credentials.signature, credentials.sigData)
        except Exception:
            valid = False
        if not valid:
            return fail(UnauthorizedLogin("bad signature"))
        return succeed(Login(server_id, login.read_only))


class SftpUser(conch_avatar.ConchUser):
    """
    One login: one server's root, read-only or not.  Only ``session``
    channels, and in them only the ``sftp`` subsystem.
    """

    def __init__(self, service: Any, login: Login, root: ServerRoot, username: str) -> None:
        super().__init__()
        self.service = service
        self.login = login
        self.root = root
        self.username = username
        self.session: Session | None = None
        self.channelLookup[b"session"] = SftpSessionChannel

    def attach(self, ssh: transport.SSHServerTransport) -> None:
        """Register the session of this login's connection (unless it is gone already)."""
        if ssh.transport is None or getattr(ssh.transport, "disconnected", False):
            # The client left while its password was being checked: Twisted
            # will never log this avatar out, so it must not be registered.
            return
        peer = ssh.transport.getPeer()
        address = getattr(peer, "host", "?")

        def disconnect(reason: str) -> None:
            ssh.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, reason.encode("ascii",
                                                                                  "replace"))

        self.session = Session(server_id=self.login.server_id, username=self.username,
                               remote_address=address, started_at=time.time(),
                               disconnect=disconnect)
        self.service.sessions.add(self.session)

    def logout(self) -> None:
        """The connection ended."""
        if self.session is not None:
            self.service.sessions.remove(self.session)

    def global_tcpip_forward(self, data: bytes) -> int:
        """Port forwarding is refused."""
        return 0


class _ChannelTransport:
    """The transport an ``SftpProtocol`` writes to: its SSH channel."""

    disconnecting = False

    def __init__(self, chan: SftpSessionChannel) -> None:
        self.chan = chan

    def write(self, data: bytes) -> None:
        self.chan.write(data)

    def writeSequence(self, seq: list[bytes]) -> None:  # noqa: N802
        self.chan.write(b"".join(seq))

    def loseConnection(self) -> None:  # noqa: N802
        self.disconnecting = True
        self.chan.loseConnection()

    def getPeer(self) -> IAddress:  # noqa: N802
        return _tcp(self.chan).getPeer()  # type: ignore[no-any-return]

    def getHost(self) -> IAddress:  # noqa: N802
        return _tcp(self.chan).getHost()  # type: ignore[no-any-return]


def _tcp(chan: channel.SSHChannel) -> Any:
    """The TCP transport under an SSH channel."""
    conn: Any = chan.conn
    return conn.transport.transport


class SftpSessionChannel(channel.SSHChannel):
    """A session channel that serves the ``sftp`` subsystem and nothing else."""

    name = b"session"

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("localWindow", CHANNEL_WINDOW)
        kw.setdefault("localMaxPacket", CHANNEL_MAX_PACKET)
        super().__init__(*args, **kw)
        self.protocol: SftpProtocol | None = None
        # Answers waiting for the client's window.  Twisted's channel keeps
        # them in one bytes object that it appends to and re-slices, which is
        # quadratic in the backlog (a download spent most of its time there);
        # a queue of chunks is linear, and its size tells the SFTP protocol
        # to stop taking requests while the client is slow to read.
        self._pending: deque[bytes] = deque()
        self.pending_bytes = 0

    # -- output with the client's window ----------------------------------------

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self.pending_bytes += len(data)
        self._flush()

    def _flush(self) -> None:
        send = self.conn.sendData  # type: ignore[union-attr]
        packet = self.remoteMaxPacket
        while self._pending and self.remoteWindowLeft > 0:
            head = self._pending[0]
            n = min(len(head), self.remoteWindowLeft)
            if n == len(head):
                self._pending.popleft()
                chunk = head
            else:
                chunk, self._pending[0] = head[:n], head[n:]
            for offset in range(0, n, packet):
                send(self, chunk[offset:offset + packet])
            self.remoteWindowLeft -= n
            self.pending_bytes -= n
        if self.closing and not self._pending:
            self.conn.sendClose(self)  # type: ignore[union-attr]

    def addWindowBytes(self, data: int) -> None:  # noqa: N802
        self.remoteWindowLeft += data
        self._flush()
        if self.protocol is not None and not self._pending:
            self.protocol.output_drained()

    def loseConnection(self) -> None:  # noqa: N802
        if self.closing:
            return
        self.closing = 1
        if not self._pending:
            self.conn.sendClose(self)  # type: ignore[union-attr]

    def request_subsystem(self, data: bytes) -> int:
        try:
            name, _ = common.getNS(data)
        except Exception:
            return 0
        user = self.avatar
        if name != b"sftp" or self.protocol is not None or not isinstance(user, SftpUser):
            return 0
        service = user.service
        server_id = user.root.server_id
        files = ServerFiles(user.root, service.usage, user.login.read_only,
                            use_openat2=service.use_openat2,
                            locked=lambda: service.servers.files_locked(server_id))
        fs = ServerFileSystem(service.reactor, service.threadpool, files)
        tcp = _tcp(self)
        self.protocol = SftpProtocol(
            fs, max_handles=service.config.max_handles, counters=user.session,
            pause=tcp.pauseProducing, resume=tcp.resumeProducing,
            backlog=lambda: self.pending_bytes,
            label="sftp {}@{}".format(user.username, getattr(tcp.getPeer(), "host", "?")))
        service.track(self.protocol.finished)
        self.protocol.makeConnection(_ChannelTransport(self))  # type: ignore[arg-type]
        return 1

    def _refuse(self, what: str) -> int:
        """
        Shell and exec: accepted, answered with one line on stderr and exit
        status 1, then closed, as OpenSSH's ``ForceCommand internal-sftp``
        does, so that the user reads why (a refused request only shows
        "request failed on channel 0").
        """
        if self.protocol is not None:
            return 0
        log.info("sftp: answered a {what} request with 'SFTP only'", what=what)
        user: Any = self.avatar
        user.service.reactor.callLater(0, self._say_sftp_only)
        return 1

    def _say_sftp_only(self) -> None:
        if self.closing:
            return
        self.writeExtended(connection.EXTENDED_DATA_STDERR, SFTP_ONLY)
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", 1))  # type: ignore[union-attr]
        self.loseConnection()

    def request_shell(self, data: bytes) -> int:
        return self._refuse("shell")

    def request_exec(self, data: bytes) -> int:
        return self._refuse("exec")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.protocol is not None:
            self.protocol.dataReceived(data)

    def eofReceived(self) -> None:  # noqa: N802
        self.loseConnection()

    def closed(self) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(conch_error.ConchError("channel closed")))


@implementer(IRealm)
class SftpRealm:
    """Turns a ``Login`` into an ``SftpUser`` on that server's directory."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, ...]:  # noqa: N802,N803
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH logins")
        login, username = avatarId
        servers = self.service.servers
        try:
            state = servers.status(login.server_id)
            root = servers.server_root(login.server_id)
        except CtrlAgentError:
            raise UnauthorizedLogin("the server is gone") from None
        shape = to_json(state)
        if isinstance(shape, dict) and shape.get("status") == "suspended":
            # As Wings does: a suspended server's files are out of reach too.
            raise UnauthorizedLogin("the server is suspended")
        user = SftpUser(self.service, login, root, username)
        return IConchUser, user, user.logout


class ThrottledUserAuth(userauth.SSHUserAuthServer):
    """``ssh-userauth`` with per-address and per-username delays after failures."""

    passwordDelay = 0  # our throttle decides

    def serviceStarted(self) -> None:  # noqa: N802
        ssh: Any = self.transport
        sftp = ssh.factory.sftp
        self.loginTimeout = sftp.config.login_timeout
        self.clock = sftp.reactor
        super().serviceStarted()

    def _address(self) -> str:
        ssh: Any = self.transport
        peer = ssh.transport.getPeer()
        return str(getattr(peer, "host", "?"))

    @staticmethod
    def _throttle_name(sftp: Any, user: bytes) -> str:
        """
        The name failures count against: the server's canonical id when the
        username resolves (so that guessing through its aliases counts once),
        else the username as sent.
        """
        name = user.decode("utf-8", "replace")[:128]
        try:
            return "server:" + str(sftp.servers.resolve(name))
        except Exception:
            return name

    def tryAuth(self, kind: bytes, user: bytes, data: bytes) -> Deferred[Any]:  # noqa: N802
        ssh: Any = self.transport
        throttle: LoginThrottle = ssh.factory.sftp.throttle
        address = self._address()
        sent = user.decode("utf-8", "replace")[:128]
        username = self._throttle_name(ssh.factory.sftp, user)
        counted = kind == b"password" or (kind == b"publickey" and data[:1] not in (b"", b"\x00"))
        wait = throttle.wait_before(address, username) if counted else 0.0
        if wait > 0:
            d: Deferred[Any] = deferLater(self.clock, wait, super().tryAuth, kind, user, data)
        else:
            d = super().tryAuth(kind, user, data)

        def ok(result: Any) -> Any:
            if counted:
                throttle.succeeded(address, username)
            return result

        def failed(f: Failure) -> Any:
            if not counted or not f.check(UnauthorizedLogin):
                return f
            delay = throttle.failed(address, username)
            log.info("sftp: failed {method} login for {username!r} from {address} "
                     "({count} in a row; next answer in {delay:.1f} s)",
                     method=kind.decode("ascii", "replace"), username=sent,
                     address=address, count=throttle.failures(address, username), delay=delay)
            return deferLater(self.clock, delay, lambda: f)

        return d.addCallbacks(ok, failed)

    def auth_publickey(self, packet: bytes) -> Deferred[Any]:
        # Twisted logs an error for a key blob it cannot parse: a client's
        # mistake is not the agent's error.
        try:
            _, blob, _ = common.getNS(packet[1:], 2)
            keys.Key.fromString(blob)
        except Exception:
            return fail(UnauthorizedLogin("unsupported or bad key"))
        return super().auth_publickey(packet)

    def _cbFinishedAuth(self, result: Any) -> None:  # noqa: N802
        super()._cbFinishedAuth(result)
        _, user, _ = result
        ssh: Any = self.transport
        if isinstance(user, SftpUser):
            user.attach(ssh)


class _Portal:
    """A ``twisted.cred`` portal that tells the realm the username too."""

    def __init__(self, realm: SftpRealm, checker: Any) -> None:
        self.realm = realm
        self.checker = checker

    def listCredentialsInterfaces(self) -> list[Any]:  # noqa: N802
        return list(self.checker.credentialInterfaces)

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        username = credentials.username.decode("utf-8", "replace")
        d = Deferred.fromCoroutine(self._login(credentials, username, interfaces))
        return d

    async def _login(self, credentials: Any, username: str,
                     interfaces: tuple[Any, ...]) -> Any:
        login = await self.checker.requestAvatarId(credentials)
        return self.realm.requestAvatar((login, username), None, *interfaces)


class SftpConnection(connection.SSHConnection):
    """
    ``ssh-connection`` that refuses every channel but ``session`` and treats a
    client's window overrun as the client's mistake (Twisted logs both as
    errors, with a traceback for the first).
    """

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:  # noqa: N802
        channel_type, rest = common.getNS(packet)
        (sender,) = struct.unpack(">L", rest[:4])
        if channel_type != b"session":
            log.info("sftp: refused a {kind!r} channel (SFTP only)",
                     kind=channel_type[:64].decode("ascii", "replace"))
            self._refuse_open(sender, connection.OPEN_UNKNOWN_CHANNEL_TYPE,
                              b"this server only serves SFTP")
            return
        if len(self.channels) >= MAX_CHANNELS:
            # Each SFTP channel holds the root's fd and handles: bound them.
            log.info("sftp: refused a channel: {n} already open on this connection",
                     n=len(self.channels))
            self._refuse_open(sender, connection.OPEN_RESOURCE_SHORTAGE,
                              b"too many channels")
            return
        super().ssh_CHANNEL_OPEN(packet)

    def _refuse_open(self, sender: int, reason: int, text: bytes) -> None:
        self.transport.sendPacket(  # type: ignore[union-attr]
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, reason) + common.NS(text) + common.NS(b""))

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:  # noqa: N802
        local, length = struct.unpack(">2L", packet[:8])
        chan = self.channels[local]
        if length > chan.localWindowLeft or length > chan.localMaxPacket:
            log.info("sftp: closing a channel: the client overran its window")
            self.sendClose(chan)
            return
        super().ssh_CHANNEL_DATA(packet)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:  # noqa: N802
        # A client has nothing to say on stderr to an SFTP server.
        return None


class SftpServerTransport(transport.SSHServerTransport):
    """
    The SSH transport: counts itself in its factory while connected, offers
    no compression, and answers a packet that does not parse by
    disconnecting the client (logged with its address, without a traceback)
    instead of letting the exception reach the reactor.
    """

    supportedCompressions = [b"none"]

    _login_timer: Any = None

    def connectionMade(self) -> None:  # noqa: N802
        factory_: Any = self.factory
        factory_.connected(self)
        # Twisted's own login timeout starts only after the key exchange: a
        # client that connects and says nothing would hold its slot forever.
        self._login_timer = factory_.sftp.reactor.callLater(
            factory_.sftp.config.login_timeout, self._login_timed_out)
        super().connectionMade()

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if getattr(self, "avatar", None) is None:
            log.info("sftp: disconnecting {address}: no login within the timeout",
                     address=self._address())
            self.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                                b"login timeout")

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        factory_: Any = self.factory
        factory_.disconnected(self)
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        super().connectionLost(reason)

    def _address(self) -> str:
        tcp: Any = self.transport
        return str(getattr(tcp.getPeer(), "host", "?")) if tcp is not None else "?"

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:  # noqa: N802,N803
        if self._dropped:
            return
        try:
            super().dispatchMessage(messageNum, payload)
        except Exception as e:
            self._dropped = True
            log.info("sftp: disconnecting {address}: malformed SSH message {num} ({error})",
                     address=self._address(), num=messageNum, error=type(e).__name__)
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"malformed message")

    _dropped = False

    def receiveError(self, reasonCode: int, description: bytes) -> None:  # noqa: N802,N803
        log.info("sftp: {address} disconnected with code {code}: {description!r}",
                 address=self._address(), code=reasonCode, description=description[:200])


class SftpFactory(factory.SSHFactory):
    """The SSH server factory (see the module)."""

    protocol = SftpServerTransport
    services = {
        b"ssh-userauth": ThrottledUserAuth,
        b"ssh-connection": SftpConnection,
    }

    def __init__(self, sftp: Any, host_key: keys.Key, portal: Any) -> None:
        self.sftp = sftp
        self.portal = portal
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.privateKeys = {host_key.sshType(): host_key}
        self.primes = None
        self._per_address: dict[str, int] = {}
        self._total = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:  # noqa: N802
        host = str(getattr(addr, "host", "?"))
        config = self.sftp.config
        if self._total >= config.max_sessions:
            log.info("sftp: refusing a connection from {address}: {n} connections open",
                     address=host, n=self._total)
            return None
        if self._per_address.get(host, 0) >= config.max_sessions_per_address:
            log.info("sftp: refusing a connection from {address}: too many from it",
                     address=host)
            return None
        return super().buildProtocol(addr)

    def connected(self, t: SftpServerTransport) -> None:
        tcp: Any = t.transport
        host = str(getattr(tcp.getPeer(), "host", "?"))
        t._sftp_host = host  # type: ignore[attr-defined]
        self._total += 1
        self._per_address[host] = self._per_address.get(host, 0) + 1

    def disconnected(self, t: SftpServerTransport) -> None:
        host = getattr(t, "_sftp_host", None)
        if host is None:
            return
        self._total -= 1
        left = self._per_address.get(host, 1) - 1
        if left > 0:
            self._per_address[host] = left
        else:
            self._per_address.pop(host, None)


def make_portal(service: Any) -> _Portal:
    """The portal of the configured backend (``local`` or ``panel``)."""
    checker: Any
    if service.config.backend == "panel":
        from ctrlagent.sftp.panel import PanelLoginChecker

        http = service.panel_http
        if http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent

            http = HTTPClient(Agent(service.reactor))
        checker = PanelLoginChecker(service.reactor, http, service.config.panel_url,
                                    service.servers, service.config.grant_cache_seconds)
    else:
        checker = ServerLoginChecker(service.reactor, service.threadpool, service.servers,
                                     service.credentials)
    service.checker = checker
    return _Portal(SftpRealm(service), checker)

