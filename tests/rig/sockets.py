"""Unix sockets at paths of any length (``sun_path`` holds 107 bytes)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def bind_unix(path: Path) -> socket.socket:
    """
    A Unix socket bound at ``path``, however deep the path is.

    The socket is bound through ``/proc/self/fd/N/<name>`` of its directory,
    so a test's temp tree (under tox's work dir, wherever the clone lives)
    never makes ``bind`` fail with "AF_UNIX path too long".
    """
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind("/proc/self/fd/{}/{}".format(fd, path.name))
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)
