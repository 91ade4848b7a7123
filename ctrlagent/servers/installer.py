"""
A server's install script: run once in its own container (``-install``),
its output copied to a log in the agent's state directory (``InstallLog``)
and the console buffer, then the data directory swept, whatever happened.

The script runs whatever the egg says, as root: its output and everything it
leaves in the data directory are untrusted.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from ctrlagent.engine.interface import ILogStream
from ctrlagent.errors import CtrlAgentError, EngineError, NotFound
from ctrlagent.servers.console import ConsoleLine, ConsolePipeline
from ctrlagent.servers.containers import install_container
from ctrlagent.servers.oneshot import wait_for_exit
from ctrlagent.servers.services import ServerServices
from ctrlagent.servers.spec import ServerSpec


class Installer:
    """Runs one server's install script (``script``) and keeps its log."""

    log = Logger()

    def __init__(self, server_id: str, services: ServerServices, console: ConsolePipeline) -> None:
        self.server_id = server_id
        self._services = services
        self._console = console

    @property
    def log_path(self) -> str:
        """Where the install script's output goes (in the agent's state directory)."""
        return os.path.join(
            self._services.config.state_dir, "install-logs", self.server_id + ".log"
        )

    async def script(self, spec: ServerSpec, owner: tuple[int, int]) -> tuple[int, str]:
        """
        Run the install container, then clean the data directory, whatever happened;
        ``(exit code, reason)``.

        The script ran as root in a container: whatever its exit code (a
        failure, a timeout, a container that vanished, an engine error, even
        our own shutdown), the data directory is swept before anything else
        touches it (ownership, setuid/setgid bits, special files).  A sweep
        that fails fails the install.
        """
        try:
            code, reason = await self._run(spec)
        finally:
            problem = await self._clean(owner)
        if problem is not None:
            if code != 0:
                return code, "{}; {}".format(reason, problem)
            raise CtrlAgentError(problem)
        return code, reason

    async def _clean(self, owner: tuple[int, int]) -> str | None:
        """The recursive prepare pass; the problem as a sentence, None when clean."""
        try:
            await self._services.data.prepare(self.server_id, owner, recursive=True)
        except CancelledError:
            raise
        except (OSError, CtrlAgentError) as e:
            text = e.message if isinstance(e, CtrlAgentError) else (e.strerror or str(e))
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "server {server_id}: cleaning the data directory after the install failed:"
                " {error}",
                server_id=self.server_id,
                error=text,
            )
            return "cleaning the data directory after the install failed: {}".format(text)
        except Exception:
            self.log.failure(
                "server {server_id}: cleaning the data directory after the install failed",
                server_id=self.server_id,
            )
            return "cleaning the data directory after the install failed"
        return None

    async def _run(self, spec: ServerSpec) -> tuple[int, str]:
        """Run the install container; ``(exit code, reason)``."""
        services = self._services
        engine = services.engine
        data = services.data
        config = services.config
        script = spec.install
        assert script is not None
        script_dir = os.path.join(config.state_dir, "install", self.server_id)
        log = InstallLog(self.log_path, config.servers.install_log_max_bytes)
        await data.in_thread(_write_script, script_dir, script.script)
        await data.in_thread(log.create)
        name = spec.container_name + "-install"
        try:
            await engine.remove(name)
        except NotFound:
            pass
        await services.network.ensure()
        container = install_container(
            spec, data.path(self.server_id), script_dir, config.servers, services.network.mode
        )
        cid = await engine.create(container)
        timeout = script.timeout
        if timeout is None:
            timeout = config.servers.install_timeout
        deadlines = services.deadlines
        try:
            await engine.start(cid)
            self._console.notice(
                "install script running (log: {})".format(os.path.basename(log.path))
            )
            stream = engine.output(cid, follow=True)
            copied = services.tracker.run(self._copy_log(stream, log), "install log")
            ended = await wait_for_exit(engine, deadlines, cid, timeout)
            if ended.timed_out:
                stream.close()
                await data.in_thread(log.append, ["[ctrlagent] install timed out"])
                return -1, "install script timed out after {:g} s".format(timeout)
            code = ended.code
            await deadlines.within(copied, config.timeouts.install_log_drain)
            if ended.gone is not None:
                # Removed behind the agent's back while it ran.
                return code, "install container gone: {}".format(ended.gone)
            if code != 0:
                return code, "install script exited with code {}".format(code)
            return 0, ""
        finally:
            try:
                await engine.remove(cid)
            except NotFound:
                pass
            await data.in_thread(shutil.rmtree, script_dir, True)

    async def _copy_log(self, stream: ILogStream, log: InstallLog) -> None:
        clock = self._services.clock
        buffer = self._console.buffer
        writable = True
        try:
            async for batch in stream.batches(1000):
                lines: list[str] = [line.text for line in batch]
                for line in lines:
                    buffer.append(ConsoleLine(clock.seconds(), "install", line))
                if not writable:
                    continue
                try:
                    await self._services.data.in_thread(log.append, lines)
                except OSError as e:
                    # A full state disk, or the file replaced by a link: the
                    # output still reaches the console buffer, the log stops.
                    writable = False
                    self.log.warn(  # noqa: G010 (twisted.logger has warn)
                        "server {server_id}: install log {path} not written: {error}",
                        server_id=self.server_id,
                        path=log.path,
                        error=e.strerror or e,
                    )
        except EngineError:
            return


class InstallLog:
    """
    The install script's output, in a file of the agent's state directory.

    The text comes from the install container, which runs whatever the egg
    says: it is untrusted.  The file is opened without following a link
    (wherever it is, a link planted in its place must not redirect our
    writes) and holds at most ``max_bytes``; what comes after is counted in
    one closing line, not written.  Used from the disk thread pool only.
    """

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped_lines = 0

    def create(self) -> None:
        """Start an empty log (replacing the previous install's)."""
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        _unlink_entry(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC,
                     0o640)
        os.close(fd)
        self.written = 0
        self.dropped_lines = 0

    def append(self, lines: list[str]) -> None:
        """Add ``lines`` up to the size bound; count the rest."""
        data = bytearray()
        room = self.max_bytes - self.written
        for index, line in enumerate(lines):
            encoded = (line + "\n").encode("utf-8", "replace")
            if len(encoded) > room:
                if self.dropped_lines == 0:
                    note = "[ctrlagent] install log truncated at {} bytes\n".format(
                        self.max_bytes
                    ).encode()
                    data += note
                self.dropped_lines += len(lines) - index
                break
            data += encoded
            room -= len(encoded)
        if not data:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.written += len(data)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _unlink_entry(path: str) -> None:
    """Remove ``path`` if it is a file or a link (never what a link points to)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)


def _write_script(script_dir: str, script: str) -> None:
    """Write ``install.sh`` into a fresh ``script_dir`` (mounted read-only into the container)."""
    if os.path.islink(script_dir):
        os.unlink(script_dir)
    else:
        shutil.rmtree(script_dir, ignore_errors=True)
    os.makedirs(script_dir, mode=0o755, exist_ok=True)
    path = os.path.join(script_dir, "install.sh")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o755)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, 0o755)  # whatever the umask: the container must run it
        f.write(script.replace("\r\n", "\n"))
