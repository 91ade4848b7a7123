"""
The SFTP test rig: the real SFTP service on 127.0.0.1 (an ephemeral port)
over a ``FakeServerManager`` whose servers live in a temp data directory,
with its own thread pool; blocking clients (paramiko, OpenSSH's ``sftp``)
run in a second pool or as subprocesses so the reactor keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ctrlagent.sftp.config import SftpConfig
from ctrlagent.sftp.service import SftpService
from ctrlagent.testing.servers import FakeServerManager

T = TypeVar("T")

PASSWORD = "correct horse battery"


@dataclass
class Rig:
    """A running SFTP service and what a test needs around it."""

    service: SftpService
    servers: FakeServerManager
    data_dir: Path
    state_dir: Path
    outside: Path  # a directory next to the data directory, holding the canary
    client_pool: ThreadPool

    @property
    def port(self) -> int:
        return self.service.listening_port()

    def root(self, server_id: str = "srv1") -> Path:
        return self.data_dir / server_id

    def in_thread(self, fn: Callable[..., T], *args: Any) -> Any:
        """Run a blocking client call off the reactor; a Deferred of its result."""
        return deferToThreadPool(reactor, self.client_pool, fn, *args)

    def add_server(self, server_id: str, disk_mb: int | None = None,
                   aliases: tuple[str, ...] = ()) -> None:
        """Define a server (the fake manager's create finishes at once)."""
        params: dict[str, Any] = {"image": "busybox", "aliases": list(aliases)}
        if disk_mb:
            params["limits"] = {"disk": disk_mb}
        d = self.servers.create_server(server_id, params)
        assert d.called, "the fake create should not wait"
        self.root(server_id).mkdir(exist_ok=True)

    async def set_login(self, server_id: str = "srv1", **params: Any) -> dict[str, Any]:
        """``set_sftp_credentials`` for ``server_id`` (the test password by default)."""
        params.setdefault("password", PASSWORD)
        return await self.service.set_credentials(server_id, params)


def make_config(**kw: Any) -> SftpConfig:
    defaults: dict[str, Any] = dict(endpoint="tcp:0:interface=127.0.0.1", bcrypt_rounds=4,
                                    throttle_base=0.05, throttle_max=0.4, login_timeout=30.0)
    defaults.update(kw)
    return SftpConfig(**defaults)


@pytest.fixture
def sftp_config() -> SftpConfig:
    return make_config()


@pytest.fixture
def use_openat2() -> bool | None:
    """The resolver (None: openat2 where the kernel has it); modules may run both."""
    return None


@pytest.fixture
def rig(tmp_path: Path, sftp_config: SftpConfig, use_openat2: bool | None) -> Iterator[Rig]:
    data_dir = tmp_path / "servers"
    state_dir = tmp_path / "state"
    outside = tmp_path / "outside"
    for d in (data_dir, state_dir, outside):
        d.mkdir()
    (outside / "canary.txt").write_text("CANARY-SECRET\n")
    servers = FakeServerManager(clock=reactor, data_dir=str(data_dir))
    pool = ThreadPool(minthreads=1, maxthreads=8, name="sftp-test-files")
    clients = ThreadPool(minthreads=1, maxthreads=8, name="sftp-test-clients")
    pool.start()
    clients.start()
    service = SftpService(reactor, sftp_config, str(state_dir), servers=servers,
                          threadpool=pool, use_openat2=use_openat2)
    service.startService()
    r = Rig(service, servers, data_dir, state_dir, outside, clients)
    r.add_server("srv1", aliases=("panel-uuid-1",))
    try:
        yield r
    finally:
        pytest_twisted.blockon(service.stopService())
        clients.stop()
        pool.stop()


