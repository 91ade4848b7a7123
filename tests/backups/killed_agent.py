"""
Run as a script by ``test_recovery``: an agent's backup manager that is
SIGKILLed in the middle of a backup.  It prints ``writing`` once the
archive's partial file has bytes in it, then keeps writing slowly.

Usage: python -m tests.backups.killed_agent <base directory>
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor, task
from twisted.python.threadpool import ThreadPool

from ctrlagent.backups import archive
from ctrlagent.backups.config import parse_backups_config
from ctrlagent.backups.drivers import LocalDriver
from ctrlagent.backups.manager import BackupManager
from ctrlagent.backups.store import BackupStore
from ctrlagent.testing.servers import FakeServerManager
from ctrlagent.work import Tracker


class SlowDriver(LocalDriver):
    """
    Writes slowly, and says when the first bytes are on disk: through the
    writer's ``write``, or, where the zstd program writes the partial file
    itself (the local driver's way), by feeding zstd slowly.
    """

    def open_writer(self, server_id: str, backup_id: str) -> Any:
        writer = super().open_writer(server_id, backup_id)
        inner = writer.write
        said = []

        def slow_down() -> None:
            if not said and os.fstat(writer.fd).st_size > 0:
                said.append(1)
                print("writing", flush=True)
            time.sleep(0.05 if not said else 0.5)

        def write(data: bytes) -> None:
            inner(data)
            slow_down()

        def feed(method: Any) -> Any:
            def slowly(*args: Any) -> Any:
                result = method(*args)
                slow_down()
                return result
            return slowly

        writer.write = write  # type: ignore[method-assign]
        archive._Compressor.write = feed(archive._Compressor.write)  # type: ignore[method-assign]
        archive._Compressor.splice = feed(archive._Compressor.splice)  # type: ignore[method-assign]
        return writer


def main(base: Path) -> None:
    config = parse_backups_config({"directory": str(base / "archives"),
                                   "compression_level": 1}, state_dir=str(base / "state"))
    servers = FakeServerManager(data_dir=str(base / "servers"))
    servers.create_server("srv1", {"image": "game"})
    pool = ThreadPool(1, 2)
    pool.start()
    store = BackupStore(reactor, str(base / "state" / "backups.sqlite3"))
    m = BackupManager(config, servers, store, {"local": SlowDriver(config.directory)},
                      reactor=reactor, clock=reactor, threadpool=pool, tracker=Tracker())

    async def go() -> None:
        await m.create_backup("srv1")

    task.deferLater(reactor, 0, lambda: None).addCallback(
        lambda _: task.ensureDeferred(go()))
    reactor.run()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
