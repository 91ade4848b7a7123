"""
``steamcmd`` in a helper container: how a Steam Workshop item is downloaded.

One container per item, through the engine seam only: the image
``workshop.image`` runs ``workshop.steamcmd`` with the real program's
command line::

    steamcmd +force_install_dir /steam +login anonymous
             +workshop_download_item <app id> <item id> +quit

as the server's user, every capability dropped, no device, a bounded
output, ``HOME`` and the install directory on a fresh staging directory of
the agent's state directory (``<state_dir>/workshop/<token>``).  steamcmd
puts the item at ``<install dir>/steamapps/workshop/content/<app>/<item>``
and says so in one line; a failure is one ``ERROR!`` line (it may still exit
0), a login failure a ``FAILED`` one:

    Success. Downloaded item 123 to "/steam/steamapps/workshop/content/4000/123" (5 bytes)
    ERROR! Download item 123 failed (Failure).

``outcome`` reads those (pure).  The path in the success line is never
used: the item is looked for where steamcmd was told to put it, read by the
file manager's confined copy (``files.workshop.copy_item``).  Whatever
happens (an error line, an exit code, ``workshop.timeout``, an engine
failure, a copy refused), the helper container is removed and the staging
directory deleted.  Waiting for the exit (and the kill past the deadline) is
``oneshot.wait_for_exit``, as for a server's install script.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from ctrlagent.config import AgentConfig
from ctrlagent.engine.interface import (
    Confinement,
    ContainerSpec,
    IContainerEngine,
    Mount,
    ResourceLimits,
)
from ctrlagent.errors import EngineError, InvalidInput, NotFound
from ctrlagent.files import trees
from ctrlagent.files.paths import Components
from ctrlagent.files.workshop import IWorkshopDownloader, WorkshopDownloadFailed
from ctrlagent.servers.containers import ROLE_LABEL
from ctrlagent.servers.oneshot import wait_for_exit
from ctrlagent.work import Deadlines

# Where the staging directory is seen inside the helper container.
STEAM_MOUNT = "/steam"
WORKSHOP_LABEL = "ctrl-alt-play.workshop-item"
OWNER_LABEL = "ctrl-alt-play.workshop-owner"
NAME_PREFIX = "ctrlagent-workshop-"
# Output kept by the engine for the outcome (steamcmd says little).
OUTPUT_MAX_BYTES = 1024 * 1024
# Lines of output read back; the outcome is in the last ones.
MAX_OUTPUT_LINES = 5000
LIMITS = ResourceLimits(memory_bytes=1024 * 1024 * 1024, memory_swap_bytes=1024 * 1024 * 1024,
                        cpu_percent=100.0, pids=256)
MAX_REASON_CHARS = 200

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_SUCCESS = re.compile(r"Success\. Downloaded item (\d+)\b")
_ITEM_FAILED = re.compile(r"ERROR! Download item (\d+) failed \(([^)]*)\)")
_ERROR = re.compile(r"\bERROR!?\s*(.*)")
_FAILED = re.compile(r"\.\.\.\s*FAILED\s*(?:\(([^)]*)\))?")


def item_components(app_id: int, item_id: str) -> Components:
    """Where steamcmd puts an item below its install directory."""
    return ("steamapps", "workshop", "content", str(app_id), item_id)


def steamcmd_arguments(app_id: int, item_id: str) -> tuple[str, ...]:
    """steamcmd's command line for one anonymous item download."""
    return ("+force_install_dir", STEAM_MOUNT, "+login", "anonymous",
            "+workshop_download_item", str(app_id), item_id, "+quit")


def _clean(text: str) -> str:
    """A line of the helper's (untrusted) output as printable, bounded text."""
    text = _ANSI.sub("", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return text[:MAX_REASON_CHARS]


@dataclass(frozen=True)
class Outcome:
    """What steamcmd said: ``ok``, else ``reason`` (its words, cleaned)."""

    ok: bool
    reason: str = ""


def outcome(lines: list[str], item_id: str, exit_code: int) -> Outcome:
    """
    Read steamcmd's output and exit code (pure).  Success needs the success
    line for this very item, no error line and exit code 0.
    """
    succeeded = False
    failure = ""
    for raw in lines:
        # The real steamcmd sometimes writes a line without its newline, so
        # the next message runs on ("...failed (Failure).Unloading Steam API").
        line = _ANSI.sub("", raw).replace("\r", "\n")
        for part in line.split("\n"):
            m = _ITEM_FAILED.search(part)
            if m:
                failure = failure or (m.group(2) or "failed")
                continue
            m = _SUCCESS.search(part)
            if m:
                succeeded = succeeded or m.group(1) == item_id
                continue
            m = _ERROR.search(part)
            if m and not failure:
                failure = m.group(1) or "error"
                continue
            m = _FAILED.search(part)
            if m and not failure:
                failure = "{} failed ({})".format(
                    part[:m.start()].strip(), m.group(1) or "no reason given")
    if failure:
        return Outcome(False, _clean(failure) or "failed")
    if exit_code != 0:
        return Outcome(False, "steamcmd exited with code {}".format(exit_code))
    if not succeeded:
        return Outcome(False, "steamcmd did not report the item downloaded")
    return Outcome(True)


@implementer(IWorkshopDownloader)
class SteamCmdDownloader:
    """
    Runs steamcmd once per item in a helper container (``IWorkshopDownloader``).

    ``engine`` is the container engine; ``threadpool`` does the staging
    directory's filesystem work; ``deadlines`` bounds the download.
    """

    log = Logger()

    def __init__(self, reactor: Any, engine: IContainerEngine, config: AgentConfig,
                 deadlines: Deadlines, threadpool: Any = None) -> None:
        self.reactor = reactor
        self.engine = engine
        self.config = config.workshop
        self.staging_root = os.path.join(config.state_dir, "workshop")
        self.deadlines = deadlines
        self.threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self.max_item_bytes = self.config.max_item_bytes
        self.max_item_entries = self.config.max_item_entries
        # Which agent's helpers a container is: this state directory's (two
        # agents may share an engine, never a state directory).
        self.owner_label = hashlib.sha256(self.staging_root.encode()).hexdigest()[:16]
        # The tokens of the downloads running now; anything else is a leftover.
        self._active: set[str] = set()

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    def container(self, name: str, staging: str, app_id: int, item_id: str,
                  owner: tuple[int, int]) -> ContainerSpec:
        """The helper container of one download."""
        return ContainerSpec(
            name=name,
            image=self.config.image,
            labels={ROLE_LABEL: "workshop", WORKSHOP_LABEL: "{}/{}".format(app_id, item_id),
                    OWNER_LABEL: self.owner_label},
            env={"HOME": STEAM_MOUNT},
            entrypoint=(self.config.steamcmd,),
            command=steamcmd_arguments(app_id, item_id),
            user="{}:{}".format(*owner),
            working_dir=STEAM_MOUNT,
            mounts=(Mount(staging, STEAM_MOUNT),),
            network=self.config.network,
            limits=LIMITS,
            confinement=Confinement(cap_drop=("ALL",), no_devices=True),
            tmpfs={"/tmp": "rw,exec,nosuid,nodev,size=256m"},
            output_max_bytes=OUTPUT_MAX_BYTES,
        )

    async def download(
        self,
        app_id: int | None,
        item_id: str,
        owner: tuple[int, int],
        use: Callable[[str, Components], Awaitable[Any]],
    ) -> Any:
        """See ``IWorkshopDownloader.download``."""
        app = app_id or self.config.app_id
        if not app:
            raise InvalidInput("no Steam app id: give appId, or set workshop.app_id on the node",
                               field="appId")
        token = secrets.token_hex(8)
        await self._sweep()
        self._active.add(token)
        try:
            return await self._download(token, app, item_id, owner, use)
        finally:
            self._active.discard(token)

    async def _sweep(self) -> None:
        """
        Remove what an agent killed mid-download left: its helper containers
        (this agent's label, no running download of ours) and staging folders.
        """
        for state in await self.engine.list({OWNER_LABEL: self.owner_label}):
            token = next((n.lstrip("/")[len(NAME_PREFIX):] for n in state.names
                          if n.lstrip("/").startswith(NAME_PREFIX)), None)
            if token is not None and token not in self._active:
                try:
                    await self.engine.remove(state.id)
                except NotFound:
                    pass
        try:
            # The live set: a download starting meanwhile is in it before
            # its staging folder exists.
            await self._in_thread(_remove_leftovers, self.staging_root, self._active)
        except OSError as e:
            self.log.warn(  # noqa: G010 (twisted.logger has warn)
                "workshop staging leftovers in {path} not removed: {error}",
                path=self.staging_root, error=e.strerror or e)

    async def _download(self, token: str, app: int, item_id: str, owner: tuple[int, int],
                        use: Callable[[str, Components], Awaitable[Any]]) -> Any:
        staging = await self._in_thread(_make_staging, self.staging_root, token, owner)
        try:
            await self._run(staging, token, app, item_id, owner)
            try:
                return await use(staging, item_components(app, item_id))
            except WorkshopDownloadFailed as e:
                # What steamcmd left was not an item (no folder, a link).
                e.details = {"workshopId": item_id, "appId": app, "reason": e.message,
                             **e.details}
                raise
        finally:
            try:
                await self._in_thread(_remove_staging, self.staging_root, token)
            except OSError as e:
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "workshop staging directory {path} not removed: {error}",
                    path=staging, error=e.strerror or e)

    async def _run(self, staging: str, token: str, app_id: int, item_id: str,
                   owner: tuple[int, int]) -> None:
        """Run steamcmd; ``WorkshopDownloadFailed`` unless it reported the item downloaded."""
        engine = self.engine
        details = {"workshopId": item_id, "appId": app_id}
        await engine.ensure_image(self.config.image)
        cid = await engine.create(self.container(
            NAME_PREFIX + token, staging, app_id, item_id, owner))
        try:
            await engine.start(cid)
            ended = await wait_for_exit(engine, self.deadlines, cid, self.config.timeout)
            if ended.timed_out:
                raise WorkshopDownloadFailed(
                    "steamcmd did not download workshop item {} of app {} within {:g} s".format(
                        item_id, app_id, self.config.timeout),
                    details=dict(details, reason="timeout"))
            if ended.gone is not None:
                raise WorkshopDownloadFailed(
                    "the steamcmd helper container of workshop item {} vanished: {}".format(
                        item_id, ended.gone), details=dict(details, reason="container gone"))
            code = ended.code
            lines = await self._output(cid)
        finally:
            try:
                await engine.remove(cid)
            except NotFound:
                pass
            except EngineError as e:
                self.log.warn(  # noqa: G010 (twisted.logger has warn)
                    "workshop helper container {cid} not removed: {error}",
                    cid=cid, error=e.message)
        result = outcome(lines, item_id, code)
        if not result.ok:
            raise WorkshopDownloadFailed(
                "steamcmd could not download workshop item {} of app {}: {}".format(
                    item_id, app_id, result.reason),
                details=dict(details, reason=result.reason))

    async def _output(self, cid: str) -> list[str]:
        """The helper's kept output (its last lines)."""
        stream = self.engine.output(cid, follow=False, tail=MAX_OUTPUT_LINES)
        lines: list[str] = []
        try:
            async for batch in stream.batches(1000):
                lines.extend(line.text for line in batch)
        except EngineError:
            pass
        finally:
            stream.close()
        return lines[-MAX_OUTPUT_LINES:]


def _make_staging(root: str, token: str, owner: tuple[int, int]) -> str:
    """A fresh staging directory the helper's user (``owner``) may write."""
    os.makedirs(root, mode=0o711, exist_ok=True)
    path = os.path.join(root, token)
    os.mkdir(path, 0o700)
    if os.geteuid() == 0:
        os.chown(path, *owner)
    return path


def _remove_staging(root: str, token: str) -> None:
    """Delete a staging directory by fd, never following what the helper left in it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        trees.remove_tree(fd, token)
    finally:
        os.close(fd)


def _remove_leftovers(root: str, active: set[str]) -> None:
    """Delete every staging folder of ``root`` but the ``active`` ones."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        for name in os.listdir(fd):
            if name not in active:
                trees.remove_tree(fd, name)
    finally:
        os.close(fd)
