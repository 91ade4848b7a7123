"""Blocking SFTP clients for the tests (run them in ``Rig.in_thread``)."""

from __future__ import annotations

import paramiko


def connect(port: int, username: str, password: str | None = None,
            pkey: paramiko.PKey | None = None) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    """A paramiko SFTP session on 127.0.0.1:port."""
    t = paramiko.Transport(("127.0.0.1", port))
    t.banner_timeout = 10
    try:
        t.connect(username=username, password=password, pkey=pkey)
        sftp = paramiko.SFTPClient.from_transport(t)
    except BaseException:
        t.close()
        raise
    assert sftp is not None
    return t, sftp
