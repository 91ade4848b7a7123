"""
Serving a backup's archive over HTTP with ``Range`` (for the API's
``GET /api/servers/{id}/backups/{backupId}/download``).

``serve_download`` fills a ``twisted.web`` request: ``200`` with the whole
archive, ``206`` with ``Content-Range`` for one range, ``416`` with
``Content-Range: bytes */size`` for a range that selects nothing.  The body
is streamed as a push producer: chunks are read in the thread pool only
while the client's transport takes them (``pauseProducing`` stops the
reads), so a slow client never makes the agent buffer the archive.  The
route's authentication and error mapping stay the API's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from ctrlagent.backups.manager import BackupDownload, BackupManager, RangeNotSatisfiable

CHUNK = 256 * 1024
_log = Logger(namespace="ctrlagent.backups")


@implementer(IPushProducer)
class _Streamer:
    """Reads ``download`` chunk by chunk into ``request`` while it is not paused."""

    def __init__(self, request: Any, download: BackupDownload) -> None:
        self.request = request
        self.download = download
        self.paused = False
        self.stopped = False
        self._resume: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._resume is not None:
            d, self._resume = self._resume, None
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    async def run(self) -> None:
        try:
            while not self.stopped:
                if self.paused:
                    self._resume = Deferred()
                    await self._resume
                    continue
                chunk = await self.download.read(CHUNK)
                if not chunk or self.stopped:
                    break
                self.request.write(chunk)
        finally:
            self.download.close()


async def serve_download(request: IRequest, backups: BackupManager, server_id: str,
                         backup_id: str) -> bytes:
    """
    Answer ``request`` with the archive (see the module docstring); returns
    the body left to write (``b""``, or a 416's short text).  Domain errors
    (``NotFound``, ``Conflict``) are raised for the API's error mapping.
    """
    req: Any = request
    header = req.getHeader("range")
    try:
        download = await backups.open_download(server_id, backup_id, header)
    except RangeNotSatisfiable as e:
        req.setResponseCode(416)
        req.setHeader("content-range", "bytes */{}".format(e.size))
        return b"requested range not satisfiable\n"
    req.setHeader("accept-ranges", "bytes" if download.sized else "none")
    req.setHeader("content-type", download.content_type)
    req.setHeader("content-disposition",
                  'attachment; filename="{}"'.format(download.filename))
    if download.sized:
        req.setHeader("content-length", str(download.length))
    if download.checksum:
        req.setHeader("etag", '"{}"'.format(download.checksum))
    if download.partial:
        req.setResponseCode(206)
        req.setHeader("content-range", download.content_range())
    if req.method == b"HEAD" or download.length == 0:
        download.close()
        return b""
    streamer = _Streamer(req, download)
    gone: list[bool] = []

    def lost(_: object) -> None:
        # The client went away (or the request ended): stop reading; the
        # channel is gone, so there is no producer left to unregister.
        gone.append(True)
        streamer.stopProducing()

    req.notifyFinish().addBoth(lost)
    req.registerProducer(streamer, True)
    try:
        await streamer.run()
    except Exception as e:  # noqa: BLE001 - the headers are out: no error answer is possible
        # A read that fails mid-body (a vanished file, an unreachable store):
        # the client must not take a short body for the archive, so the
        # connection is cut and the reason logged on one line.
        _log.warn(  # noqa: G010 (twisted.logger has warn)
            "backup {backup_id} of server {server_id}: download cut short: {error}",
            backup_id=backup_id, server_id=server_id, error=getattr(e, "message", None) or e,
        )
        if not gone and req.channel is not None and req.channel.transport is not None:
            req.channel.transport.abortConnection()
    finally:
        if not gone and req.channel is not None:
            req.unregisterProducer()
    return b""
