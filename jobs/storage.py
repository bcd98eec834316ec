"""Local paths and s3:// URIs behind one small interface.

Two clients, each for what it does well (system design, "Object storage"):
- pyarrow's `S3FileSystem` for Parquet and file listings; it takes host:port plus a scheme (`endpoint_override`,
  `scheme`).
- boto3 for small objects (commit records, manifests, images by URI); it takes a full endpoint URL and can do a
  create-only conditional PUT (`If-None-Match: *`).

Credentials never pass through here: both clients read the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles, instance roles), and nothing here logs them. A `Storage` is
picklable (clients are made lazily in each process), so Ray tasks can carry one.
"""

import os
import stat
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from flashu_batch.jobs.spec import StorageSpec

# Error codes of servers that do not implement conditional writes (as opposed to "the object exists": 412).
_NO_CONDITIONAL_PUT = {"NotImplemented", "InvalidArgument", "InvalidRequest", "501"}
# Timeouts and retries, chosen rather than inherited: boto3 waits 60 s per connection attempt by default, so a dead
# endpoint would stall a job for minutes. A reachable store accepts a connection in well under CONNECT_TIMEOUT_S;
# READ_TIMEOUT_S bounds a stalled transfer; ATTEMPTS rides out a brief outage without hiding a dead endpoint.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
ATTEMPTS = 4
PROBE_TIMEOUT_S, PROBE_ATTEMPTS = 3.0, 2  # the up-front reachability check: fail in seconds, not minutes


class ObjectTooLarge(ValueError):
    """read_bytes refused an object over its max_bytes, having read at most max_bytes + 1 bytes of it. `size` is its
    size when the file system or the store said so, None when only the capped read found it too large (a file that
    grew, a /proc file whose size reads 0)."""

    def __init__(self, uri: str, size: int | None, max_bytes: int):
        if size is None:
            super().__init__(f"{uri} is over the {max_bytes}-byte limit (its size was not known in advance; reading "
                             f"stopped at {max_bytes + 1} bytes)")
        else:
            super().__init__(f"{uri} is {size} bytes, over the {max_bytes}-byte limit")
        self.size = size


class NotARegularFile(ValueError):
    """A local path that names a directory, FIFO, device or socket (or a symlink to one): refused before it is
    opened, since reading a FIFO with no writer blocks forever and a device such as /dev/zero never ends."""

    def __init__(self, path: str, kind: str):
        super().__init__(f"{path!r} is {kind}, not a regular file")
        self.path, self.kind = path, kind


class StorageUnreachable(RuntimeError):
    """The S3 endpoint a job needs does not answer; raised before any work (see Storage.check_reachable)."""


class StorageUnavailable(RuntimeError):
    """A read failed for a reason that says nothing about the object: no connection, a timeout, a connection
    dropped mid-transfer, a 5xx or throttling answer (after the client's own retries). Not the row's fault: the
    task that made the read fails and is retried (scheduler/pipeline.py, RETRIED_STORAGE_ERRORS)."""

    MARKER = "storage unavailable"

    def __init__(self, uri: str, error: BaseException):
        super().__init__(f"{self.MARKER} reading {uri}: {type(error).__name__}: {error}")


# Error codes of a store that is overloaded or failing, as opposed to codes about the object or the request
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded",
                    "ServiceUnavailable", "InternalError", "TooManyRequests"}


def is_transient(error: BaseException) -> bool:
    """Whether an S3 client error is the store's passing trouble rather than an answer about the object."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(error, (ConnectionError, HTTPClientError, IncompleteReadError)):  # refused, reset, timed out
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return False


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Path join for both kinds of URI (s3 keys always use '/')."""
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(uri, *parts)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"Expected an s3://bucket/key URI, got {uri!r}.")
    return parsed.netloc, parsed.path.lstrip("/")


def _without_userinfo(url: str) -> str:
    """An endpoint URL fit for a message: a user:password@ part (from AWS_ENDPOINT_URL) is never shown."""
    parsed = urlparse(url)
    return parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl()


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_regular(path: str, mode: int) -> None:
    """NotARegularFile unless `mode` (of os.stat, which follows symlinks) is a regular file's."""
    if stat.S_ISREG(mode):
        return
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), f"of file type {stat.S_IFMT(mode):#o}")
    if os.path.islink(path):
        kind = f"a symbolic link to {kind}"
    raise NotARegularFile(path, kind)


def _read_local(path: str, max_bytes: int | None) -> bytes:
    """A local file's bytes, at most max_bytes + 1 of them read (see Storage.read_bytes)."""
    _check_regular(path, os.stat(path).st_mode)  # before opening: open() on a FIFO with no writer blocks forever
    # O_NONBLOCK: a path swapped for a FIFO after the stat still opens at once (and fstat refuses it); on a regular
    # file it changes nothing
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    with open(os.open(path, flags), "rb") as f:
        info = os.fstat(f.fileno())
        _check_regular(path, info.st_mode)
        if max_bytes is None:
            return f.read()
        if info.st_size > max_bytes:  # refused without reading any of it
            raise ObjectTooLarge(path, info.st_size, max_bytes)
        data = _read_at_most(f, max_bytes + 1)  # the stat may be wrong: /proc files say 0, a file may grow
        if len(data) > max_bytes:
            raise ObjectTooLarge(path, None, max_bytes)
        return data


def _read_at_most(stream, limit: int) -> bytes:
    """Up to `limit` bytes of a file or HTTP body: one read may return fewer than asked before the end."""
    chunks, size = [], 0
    while size < limit:
        chunk = stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _stated_size(response: dict) -> int | None:
    """An object's whole size as a GET's headers state it: Content-Range's total for a ranged answer (206), else
    Content-Length (a server that ignored the Range answers 200 with the whole object); None when unstated."""
    content_range = response.get("ContentRange")
    if not content_range:
        return response.get("ContentLength")
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


class Storage:
    def __init__(self, settings: StorageSpec | None = None):
        self.settings = settings or StorageSpec()
        self._s3 = None
        self._arrow_s3 = None
        self._conditional_put = self.settings.conditional_put != "never"

    def __getstate__(self):  # clients hold sockets and locks: each process makes its own
        return {"settings": self.settings, "_s3": None, "_arrow_s3": None, "_conditional_put": self._conditional_put}

    # ---- clients -------------------------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str | None:
        return (self.settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)

    @property
    def region(self) -> str:
        return (self.settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                or "us-east-1")

    def s3_client(self):
        """boto3 S3 client: full endpoint URL, region, addressing style; credentials from the environment."""
        if self._s3 is None:
            self._s3 = self._new_s3_client(CONNECT_TIMEOUT_S, READ_TIMEOUT_S, ATTEMPTS)
        return self._s3

    def _new_s3_client(self, connect_timeout: float, read_timeout: float, attempts: int):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            config=Config(s3={"addressing_style": self._addressing_style}, connect_timeout=connect_timeout,
                          read_timeout=read_timeout, retries={"mode": "standard", "max_attempts": attempts}))

    @property
    def _addressing_style(self) -> str:
        return {None: "auto", True: "path", False: "virtual"}[self.settings.path_style]

    def arrow_fs(self, uri: str):
        """(pyarrow FileSystem, path inside it) for a URI; pyarrow takes host:port and the scheme separately."""
        import pyarrow.fs as pafs

        if not is_s3(uri):
            return pafs.LocalFileSystem(), os.path.abspath(uri)
        if self._arrow_s3 is None:
            kwargs = dict(region=self.region, allow_delayed_open=True,  # small files: one PUT, no multipart
                          connect_timeout=CONNECT_TIMEOUT_S, request_timeout=READ_TIMEOUT_S,
                          retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS))
            if self.endpoint_url:
                parsed = urlparse(self.endpoint_url)
                kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
            if self.settings.path_style is False:
                kwargs["force_virtual_addressing"] = True
            self._arrow_s3 = pafs.S3FileSystem(**kwargs)
        bucket, key = split_s3(uri)
        return self._arrow_s3, f"{bucket}/{key}"

    # ---- small objects -------------------------------------------------------------------------------------------

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes. Raises FileNotFoundError when it does not exist, NotARegularFile for a local path that
        is no file, ObjectTooLarge when it is over max_bytes, StorageUnavailable when the store failed for a passing
        reason (retry later). With max_bytes, at most max_bytes + 1 bytes are ever read, whatever a size query said:
        a file can grow after its stat, a /proc file's size reads 0, a server can send a wrong Content-Length."""
        if not is_s3(uri):
            return _read_local(uri, max_bytes)
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return self._read_object(bucket, key, uri, max_bytes)
        except Exception as e:
            if isinstance(e, ClientError) and e.response["Error"]["Code"] in ("NoSuchKey", "404", "NoSuchBucket"):
                raise FileNotFoundError(f"{uri} does not exist ({e.response['Error']['Code']})") from None
            if is_transient(e):
                raise StorageUnavailable(uri, e) from e
            raise

    def _read_object(self, bucket: str, key: str, uri: str, max_bytes: int | None) -> bytes:
        """GET, capped: a ranged GET asks for max_bytes + 1 bytes, and the body is read with the same cap, so a
        server that ignores the Range or states a wrong Content-Length still cannot make this read more."""
        from botocore.exceptions import ClientError

        if max_bytes is None:
            with self.s3_client().get_object(Bucket=bucket, Key=key)["Body"] as body:
                return body.read()
        try:
            response = self.s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")
        except ClientError as e:
            if e.response["Error"]["Code"] == "InvalidRange":  # 416: an empty object has no byte 0 to start at
                return b""
            raise
        with response["Body"] as body:  # closed unread past the cap: the connection is dropped, not drained
            data = _read_at_most(body, max_bytes + 1)
        if len(data) > max_bytes:
            stated = _stated_size(response)
            raise ObjectTooLarge(uri, stated if stated is not None and stated > max_bytes else None, max_bytes)
        return data

    def check_reachable(self, uris: list[str]) -> None:
        """Fail fast when the S3 endpoint behind any s3:// URI does not answer: one HEAD per bucket with a short
        timeout and PROBE_ATTEMPTS tries, so a wrong endpoint costs seconds, not minutes of retries, and nothing is
        written. Raises StorageUnreachable naming the endpoint (never credentials), or FileNotFoundError for a
        bucket that is not there (also what a wrong endpoint that is not S3 answers). Other answers (403: this
        identity may not list the bucket but may read its objects) are left to the operations themselves."""
        buckets = sorted({split_s3(u)[0] for u in uris if is_s3(u)})
        if not buckets:
            return
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        probe = self._new_s3_client(PROBE_TIMEOUT_S, PROBE_TIMEOUT_S, PROBE_ATTEMPTS)
        endpoint = _without_userinfo(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region})"
        for bucket in buckets:
            try:
                probe.head_bucket(Bucket=bucket)
            except ClientError as e:
                if e.response["Error"]["Code"] in ("404", "NoSuchBucket", "NotFound"):
                    raise FileNotFoundError(f"bucket {bucket!r} does not exist at S3 endpoint {endpoint}. Check the "
                                            f"bucket names in the spec and storage.endpoint_url.") from None
            except (ConnectionError, HTTPClientError) as e:  # refused, timed out, DNS, TLS
                raise StorageUnreachable(
                    f"S3 endpoint {endpoint} is unreachable (bucket {bucket!r}: {type(e).__name__}, after "
                    f"{PROBE_ATTEMPTS} tries of {PROBE_TIMEOUT_S:g}s). Check storage.endpoint_url (or "
                    f"AWS_ENDPOINT_URL) and that the endpoint is reachable from the driver and every Ray node; "
                    f"nothing was read or written.") from None

    def read_many(self, uris: list[str]) -> list[bytes]:
        """read_bytes for many small objects, 16 at a time (listing-then-reading commit records is I/O bound)."""
        if len(uris) <= 1:
            return [self.read_bytes(u) for u in uris]
        self.s3_client() if any(is_s3(u) for u in uris) else None  # make the client once, before the threads
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(self.read_bytes, uris))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Create or replace, atomically for readers (local: rename; S3: a PUT is atomic)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)

    def create(self, uri: str, data: bytes) -> bool:
        """Create-only write: True if this call created the object, False if it already existed.

        Local: the bytes go to a temporary file that is hard-linked to the name (atomic, fails if the name exists).
        S3: PUT with If-None-Match: * (412 = exists). A server without conditional writes gets HEAD-then-PUT
        (settings.conditional_put); see StorageSpec.conditional_put for why that is still safe for commits.
        """
        if not is_s3(uri):
            os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
            tmp = f"{uri}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, uri)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        if self._conditional_put:
            try:
                self.s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                code = e.response["Error"]["Code"]
                status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if code == "PreconditionFailed" or status == "412":
                    return False
                if code == "ConditionalRequestConflict" or status == "409":  # a concurrent create of the same key
                    return False if self.exists(uri) else self.create(uri, data)
                if self.settings.conditional_put == "always" or not ({code, status} & _NO_CONDITIONAL_PUT):
                    raise
                print(f"storage: the S3 server refused a conditional PUT ({code}); using HEAD-then-PUT for "
                      f"create-only writes (storage.conditional_put)", file=sys.stderr)
                self._conditional_put = False
        if self.exists(uri):
            return False
        self.s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return True

    def move(self, src: str, dst: str) -> None:
        """Move an object within one store, replacing `dst` (local: a rename, atomic; S3: server-side copy, then
        delete: readers see `dst` whole or not at all). A `src` that is gone while `dst` exists counts as moved (a
        retried move)."""
        if not is_s3(dst):
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            try:
                os.replace(src, dst)
            except FileNotFoundError:
                if not os.path.exists(dst):
                    raise
            return
        from botocore.exceptions import ClientError

        (src_bucket, src_key), (bucket, key) = split_s3(src), split_s3(dst)
        try:
            self.s3_client().copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key})
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound") or not self.exists(dst):
                raise
            return
        self.delete(src)

    def exists(self, uri: str) -> bool:
        if not is_s3(uri):
            return os.path.exists(uri)
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            self.s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3_client().delete_object(Bucket=bucket, Key=key)
        elif os.path.exists(uri):
            os.unlink(uri)

    def list(self, prefix: str) -> list[dict]:
        """Files under a folder / prefix, recursively: [{"uri", "size", "mtime"}] sorted by uri ([] if none)."""
        import pyarrow.fs as pafs

        fs, path = self.arrow_fs(prefix)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(path.rstrip("/")):].lstrip("/")
            out.append({"uri": join(prefix, rel), "size": info.size,
                        "mtime": info.mtime.timestamp() if info.mtime else None})
        return sorted(out, key=lambda f: f["uri"])

    def is_file(self, uri: str) -> bool:
        import pyarrow.fs as pafs

        fs, path = self.arrow_fs(uri)
        return fs.get_file_info(path).type == pafs.FileType.File
