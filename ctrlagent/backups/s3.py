"""
The S3 driver: archives uploaded as they are written, by multipart upload.

Blocking (thread-side), over botocore's client (through boto3): the driver
already runs in the thread pool, and botocore brings SigV4 signing,
path-style addressing and S3's error shapes, which a hand-written treq
client would have to redo.

- Memory is bounded by one part: bytes are gathered into a buffer of the
  current part size and uploaded as soon as it is full.
- Part sizes grow so that any archive fits S3's 10,000 parts: the first
  500 parts have ``part_size`` bytes (64 MiB by default), every next 500
  twice as many, capped at 5 GiB; even from the 5 MiB minimum, 10,000
  parts hold more than S3's 5 TiB object limit.
- Each part is retried ``part_retries`` times with exponential backoff
  (0.5 s doubling, at most 30 s) on connection errors, throttling and 5xx.
- An upload that fails or is cancelled is aborted; an agent killed
  mid-upload leaves a multipart upload that ``discard_partial`` aborts on
  the next start (listed by key), so no part is ever left billed.
- An archive smaller than one part is a plain ``PutObject``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from ctrlagent.backups.config import S3_MAX_PART, S3_MAX_PARTS, S3Config
from ctrlagent.backups.drivers import safe_component
from ctrlagent.errors import CtrlAgentError, NotFound

PARTS_PER_STEP = 500
MAX_BACKOFF = 30.0


class S3Error(CtrlAgentError):
    """The object store refused or failed a request."""


def part_size_for(part_number: int, base: int) -> int:
    """The size of part ``part_number`` (1-based) for a ``base`` part size."""
    step = (part_number - 1) // PARTS_PER_STEP
    return min(base * (2 ** step), S3_MAX_PART)


def capacity(base: int) -> int:
    """The largest archive 10,000 parts of growing size hold."""
    return sum(part_size_for(n, base) for n in range(1, S3_MAX_PARTS + 1))


def _retryable(e: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(e, EndpointConnectionError | ConnectionClosedError | ReadTimeoutError):
        return True
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = e.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling")
    return False


def _describe(e: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return "{} ({})".format(err.get("Code", "error"), err.get("Message", ""))[:300]
    return "{}".format(type(e).__name__)


class _Upload:
    """One archive on its way up (see the module docstring)."""

    file_fd = None  # parts go up from memory: written through ``write``

    def __init__(self, driver: S3Driver, key: str) -> None:
        self.driver = driver
        self.client = driver.client
        self.key = key
        self.buf = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.upload_id: str | None = None
        self.most_buffered = 0

    def _next_size(self) -> int:
        return part_size_for(len(self.parts) + 1, self.driver.config.part_size)

    def write(self, data: bytes) -> None:
        self.buf += data
        self.most_buffered = max(self.most_buffered, len(self.buf))
        while len(self.buf) >= self._next_size():
            size = self._next_size()
            part = bytes(self.buf[:size])
            del self.buf[:size]
            self._upload_part(part)

    def _upload_part(self, body: bytes) -> None:
        if self.upload_id is None:
            answer = self.driver.call(lambda: self.client.create_multipart_upload(
                Bucket=self.driver.config.bucket, Key=self.key,
                ContentType="application/zstd"), "starting the upload")
            self.upload_id = answer["UploadId"]
        number = len(self.parts) + 1
        if number > S3_MAX_PARTS:
            raise S3Error("the archive is larger than S3 can take in one object")
        answer = self.driver.call(lambda: self.client.upload_part(
            Bucket=self.driver.config.bucket, Key=self.key, UploadId=self.upload_id,
            PartNumber=number, Body=body), "part {}".format(number))
        self.parts.append({"ETag": answer["ETag"], "PartNumber": number})

    def commit(self) -> str:
        bucket = self.driver.config.bucket
        if self.upload_id is None:
            body = bytes(self.buf)
            self.driver.call(lambda: self.client.put_object(
                Bucket=bucket, Key=self.key, Body=body, ContentType="application/zstd"),
                "the upload")
        else:
            if self.buf:
                self._upload_part(bytes(self.buf))
            self.driver.call(lambda: self.client.complete_multipart_upload(
                Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts}), "completing the upload")
        self.buf = bytearray()
        return self.key

    def abort(self) -> None:
        self.buf = bytearray()
        if self.upload_id is not None:
            upload_id = self.upload_id
            self.upload_id = None
            try:
                self.driver.call(lambda: self.client.abort_multipart_upload(
                    Bucket=self.driver.config.bucket, Key=self.key, UploadId=upload_id),
                    "aborting the upload")
            except S3Error:
                pass  # discard_partial at the next start tries again


class _Body:
    """A ``GetObject`` body as a file (read, close)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def read(self, n: int = -1) -> bytes:
        return bytes(self.body.read(None if n is None or n < 0 else n))

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Driver:
    """Archives as objects ``<prefix>/<server>/<backup id>.tar.zst`` in one bucket."""

    name = "s3"

    def __init__(self, config: S3Config, client: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.sleep = sleep
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                "s3", endpoint_url=config.endpoint, region_name=config.region,
                aws_access_key_id=config.access_key, aws_secret_access_key=config.secret_key,
                config=Config(s3={"addressing_style": "path" if config.path_style else "auto"},
                              retries={"max_attempts": 2, "mode": "standard"},
                              connect_timeout=10, read_timeout=60))
        self.client = client

    def key(self, server_id: str, backup_id: str) -> str:
        """The object key of a backup."""
        parts = [safe_component(server_id), safe_component(backup_id) + ".tar.zst"]
        if self.config.prefix:
            parts.insert(0, self.config.prefix)
        return "/".join(parts)

    def call(self, request: Callable[[], Any], what: str) -> Any:
        """``request()``, retried with backoff when the failure is transient."""
        attempts = self.config.part_retries + 1
        for attempt in range(attempts):
            try:
                return request()
            except Exception as e:
                if attempt + 1 >= attempts or not _retryable(e):
                    raise S3Error("S3 {} failed: {}".format(what, _describe(e))) from None
                self.sleep(min(0.5 * 2 ** attempt, MAX_BACKOFF))
        raise AssertionError("unreachable")

    def open_writer(self, server_id: str, backup_id: str) -> _Upload:
        return _Upload(self, self.key(server_id, backup_id))

    def open_reader(self, location: str, start: int = 0, length: int | None = None
                    ) -> IO[bytes]:
        args: dict[str, Any] = {"Bucket": self.config.bucket, "Key": location}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            args["Range"] = "bytes={}-{}".format(start, end)
        from botocore.exceptions import ClientError

        try:
            answer = self.call(lambda: self.client.get_object(**args), "download")
        except S3Error as e:
            if "NoSuchKey" in str(e):
                raise NotFound("the backup's archive is missing from the bucket") from None
            raise
        except ClientError as e:  # pragma: no cover - call() maps every error
            raise S3Error(_describe(e)) from None
        return _Body(answer["Body"])  # type: ignore[return-value]

    def delete(self, location: str) -> None:
        self.call(lambda: self.client.delete_object(Bucket=self.config.bucket, Key=location),
                  "deletion")

    def delete_all(self, locations: Sequence[str]) -> None:
        for location in locations:
            self.delete(location)

    def discard_partial(self, server_id: str, backup_id: str) -> None:
        key = self.key(server_id, backup_id)
        answer = self.call(lambda: self.client.list_multipart_uploads(
            Bucket=self.config.bucket, Prefix=key), "listing uploads")
        for upload in answer.get("Uploads", []):
            if upload.get("Key") == key:
                self._abort(key, str(upload["UploadId"]))

    def _abort(self, key: str, upload_id: str) -> None:
        self.call(lambda: self.client.abort_multipart_upload(
            Bucket=self.config.bucket, Key=key, UploadId=upload_id), "aborting an upload")

    def free_bytes(self) -> int | None:
        return None
