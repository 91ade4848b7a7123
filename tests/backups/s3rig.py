"""
A real S3 on loopback for the tests: moto in server mode as a subprocess
on 127.0.0.1 (a free port, a bounded wait for it to answer), and a client.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

STARTUP_TIMEOUT = 30.0


@dataclass
class MotoServer:
    """A moto server process and its endpoint."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    from tests.backups.conftest import require_tool

    require_tool(os.path.exists(moto), "moto[server] (pip install moto[server])")
    port = _free_port()
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = "http://127.0.0.1:{}".format(port)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited with {}".format(proc.returncode))
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not answer within {} s".format(
                        STARTUP_TIMEOUT)) from None
                time.sleep(0.1)
        yield MotoServer(endpoint, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
