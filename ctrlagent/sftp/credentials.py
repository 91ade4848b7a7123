"""
The local SFTP logins: one per server, in a JSON file in the state directory.

The file (``sftp_credentials.json``, mode 600) holds, per canonical server
id, a bcrypt hash of the password (of its SHA-256, so that no password is cut
at bcrypt's 72 bytes), the OpenSSH public keys allowed, and the read-only
flag.  It is replaced atomically (a temp file, fsync, rename, fsync of the
directory).  Passwords are never stored, logged or kept in memory beyond the
call that hashes or checks them.  Hashing and checking are slow on purpose,
so they run in the thread pool; the file is written there too.

The service closes a server's live sessions (on the reactor) once ``set`` or
``revoke`` has put the new state on disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from twisted.conch.ssh import keys
from twisted.logger import Logger

from ctrlagent.errors import ConfigInvalid, InvalidInput

MIN_PASSWORD = 8
MAX_PASSWORD = 1024
MAX_KEYS = 32
MAX_KEY_CHARS = 16 * 1024
_SCHEME = "bcrypt-sha256$"


def _prehash(password: bytes) -> bytes:
    return base64.b64encode(hashlib.sha256(password).digest())


def hash_password(password: str, rounds: int = 12) -> str:
    """The stored form of ``password`` (slow: call it in the thread pool)."""
    import bcrypt

    return _SCHEME + bcrypt.hashpw(_prehash(password.encode("utf-8")),
                                   bcrypt.gensalt(rounds)).decode("ascii")


def check_password(stored: str | None, password: bytes) -> bool:
    """Whether ``password`` matches ``stored`` (slow: thread pool)."""
    import bcrypt

    if stored is None or not stored.startswith(_SCHEME):
        # Spend the same time, so that a missing login looks like a wrong password.
        bcrypt.checkpw(b"x", _DUMMY_HASH)
        return False
    try:
        return bool(bcrypt.checkpw(_prehash(password), stored[len(_SCHEME):].encode("ascii")))
    except ValueError:
        return False


# A real hash of a string no one sends, checked when there is no login.
_DUMMY_HASH = b"$2b$12$lnrGUupp/8cOIobr7c/LXOTBZft0zzb/d67b/9Nh7p5yxmV4x9F3K"


def parse_public_key(text: object) -> str:
    """One OpenSSH public key line, normalised (``type base64``), or ``InvalidInput``."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_KEY_CHARS:
        raise InvalidInput("each public key must be an OpenSSH public key line",
                           field="publicKeys")
    try:
        key = keys.Key.fromString(text.strip().encode("ascii"))
    except Exception:
        raise InvalidInput("not an OpenSSH public key: {}".format(text.strip()[:40]),
                           field="publicKeys") from None
    if not key.isPublic():
        raise InvalidInput("publicKeys must hold public keys, never private ones",
                           field="publicKeys")
    return str(key.toString("OPENSSH").decode("ascii"))


@dataclass(frozen=True)
class ServerLogin:
    """The local login of one server."""

    server_id: str
    password_hash: str | None
    public_keys: tuple[str, ...]
    read_only: bool
    updated_at: float

    def key_blobs(self) -> set[bytes]:
        """The raw blobs of the allowed keys."""
        out = set()
        for text in self.public_keys:
            try:
                out.add(keys.Key.fromString(text.encode("ascii")).blob())
            except Exception:
                continue
        return out

    def to_json(self) -> dict[str, Any]:
        return {"passwordHash": self.password_hash, "publicKeys": list(self.public_keys),
                "readOnly": self.read_only, "updatedAt": self.updated_at}


class SftpCredentials:
    """
    The store of local logins (see the module).  ``load`` reads the file
    (call it once at start); ``set``, ``revoke`` and ``check_*`` are
    thread-side (blocking) and safe to call from several threads.
    """

    log = Logger()

    def __init__(self, path: str, *, rounds: int = 12) -> None:
        self.path = path
        self.rounds = rounds
        self._logins: dict[str, ServerLogin] = {}
        self._lock = threading.Lock()

    # -- file ----------------------------------------------------------------

    def load(self) -> None:
        """Read the file; a missing one is an empty store."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigInvalid("sftp credentials {}: {}".format(self.path, e.strerror)) from None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(64 * 1024 * 1024)
        finally:
            os.close(fd)
        try:
            data = json.loads(raw)
            servers = data["servers"]
            logins = {}
            for server_id, entry in servers.items():
                logins[server_id] = ServerLogin(
                    server_id=server_id,
                    password_hash=entry.get("passwordHash"),
                    public_keys=tuple(entry.get("publicKeys") or ()),
                    read_only=bool(entry.get("readOnly", False)),
                    updated_at=float(entry.get("updatedAt", 0.0)),
                )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigInvalid("sftp credentials {}: not a credentials file".format(
                self.path)) from None
        with self._lock:
            self._logins = logins

    def _save(self, logins: dict[str, ServerLogin]) -> None:
        body = json.dumps({"version": 1, "servers": {k: v.to_json() for k, v in
                                                     sorted(logins.items())}},
                          indent=1).encode("utf-8")
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, ".{}.{}".format(os.path.basename(self.path),
                                                     secrets.token_hex(6)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- reads -------------------------------------------------------------------

    def get(self, server_id: str) -> ServerLogin | None:
        """The login of ``server_id`` (canonical id), if any."""
        with self._lock:
            return self._logins.get(server_id)

    def check_password(self, server_id: str, password: bytes) -> bool:
        """Whether ``password`` opens ``server_id`` (slow: thread pool)."""
        login = self.get(server_id)
        return check_password(login.password_hash if login else None, password)

    def check_key(self, server_id: str, blob: bytes) -> bool:
        """Whether the public key ``blob`` may open ``server_id``."""
        login = self.get(server_id)
        return login is not None and blob in login.key_blobs()

    # -- changes (thread-side) -------------------------------------------------------

    def set(self, server_id: str, params: dict[str, Any]) -> ServerLogin:
        """
        Set the login of ``server_id`` from a ``set_sftp_credentials`` payload:
        ``password`` (replaces; ``null`` removes), ``publicKeys`` (replaces),
        ``readOnly``.  Missing fields keep their value; the result must allow
        some way in.
        """
        if not isinstance(params, dict):
            raise InvalidInput("payload must be an object", field="payload")
        password = params.get("password")
        if password is not None and (not isinstance(password, str)
                                     or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD):
            raise InvalidInput("password must be a string of {}-{} characters".format(
                MIN_PASSWORD, MAX_PASSWORD), field="password")
        public_keys = params.get("publicKeys")
        if public_keys is not None:
            if not isinstance(public_keys, list) or len(public_keys) > MAX_KEYS:
                raise InvalidInput("publicKeys must be a list of at most {} keys".format(
                    MAX_KEYS), field="publicKeys")
            public_keys = [parse_public_key(k) for k in public_keys]
        read_only = params.get("readOnly")
        if read_only is not None and not isinstance(read_only, bool):
            raise InvalidInput("readOnly must be true or false", field="readOnly")
        old = self.get(server_id)
        password_hash = old.password_hash if old else None
        if "password" in params:
            password_hash = hash_password(password, self.rounds) if password else None
        login = ServerLogin(
            server_id=server_id,
            password_hash=password_hash,
            public_keys=tuple(public_keys) if public_keys is not None else (
                old.public_keys if old else ()),
            read_only=read_only if read_only is not None else (old.read_only if old else False),
            updated_at=time.time(),
        )
        if login.password_hash is None and not login.public_keys:
            raise InvalidInput("set a password or at least one public key", field="password")
        with self._lock:
            logins = dict(self._logins)
            logins[server_id] = login
            self._save(logins)
            self._logins = logins
        self.log.info("sftp: credentials of {server_id} set ({keys} keys, password {pw}, "
                      "{mode})", server_id=server_id, keys=len(login.public_keys),
                      pw="set" if login.password_hash else "none",
                      mode="read-only" if login.read_only else "read-write")
        return login

    def revoke(self, server_id: str) -> bool:
        """Remove the login of ``server_id``; whether there was one."""
        with self._lock:
            if server_id not in self._logins:
                existed = False
            else:
                logins = dict(self._logins)
                del logins[server_id]
                self._save(logins)
                self._logins = logins
                existed = True
        if existed:
            self.log.info("sftp: credentials of {server_id} revoked", server_id=server_id)
        return existed
