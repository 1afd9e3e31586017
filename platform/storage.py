"""Object storage: one ``Storage`` built from ``StorageConfig`` gives a boto3 client and a pyarrow
``S3FileSystem`` for the same endpoint and credentials.

Requests retry on throttling (``SlowDown``), 5xx answers and network errors (connection refused while a
server restarts, timeouts) with botocore's ``standard`` retry mode; failures surface as ``StorageError``
subclasses whose messages name the endpoint, bucket and key, never a credential.
"""

from __future__ import annotations

import configparser
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from reflade.platform.config import Config, StorageConfig, default_state_dir
from reflade.platform.progress import byte_bar

CREDENTIALS_FILENAME = "aws_credentials"


@dataclass
class Traffic:
    """Bytes that went through one ``Storage``'s boto3 client while :meth:`Storage.traffic` was open: request
    bodies sent and object bodies received, in total and by S3 operation (``PutObject``, ``GetObject``, ...).
    A server-side copy moves no byte through the client and counts none."""

    sent: int = 0
    received: int = 0
    by_op: dict[str, list[int]] = field(default_factory=dict)
    """operation -> [calls, bytes sent, bytes received]."""
    keys_received: dict[str, int] = field(default_factory=dict)
    """object key -> bytes received (GetObject)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _before_send(self, request, **_) -> None:
        op = request.context.get("reflade_op", "?")
        n = int(request.headers.get("Content-Length") or 0)
        with self._lock:  # a client may be used from several threads (the registry's copies)
            self.sent += n
            row = self.by_op.setdefault(op, [0, 0, 0])
            row[0] += 1
            row[1] += n

    def _before_call(self, params, context, model, **_) -> None:
        context["reflade_op"] = model.name

    def _after_call(self, parsed, model, context, **_) -> None:
        n = int(parsed.get("ContentLength") or 0) if model.name == "GetObject" else 0
        key = context.get("reflade_key")
        with self._lock:
            self.received += n
            self.by_op.setdefault(model.name, [0, 0, 0])[2] += n
            if n and key:
                self.keys_received[key] = self.keys_received.get(key, 0) + n

    def _provide_key(self, params, context, **_) -> None:
        context["reflade_key"] = params.get("Key")


class StorageError(RuntimeError):
    """An object-store operation failed; the message says what, where and what to do."""


class StorageUnreachable(StorageError):
    """No answer from the endpoint (refused, timed out, DNS)."""


class StorageAuthError(StorageError):
    """The endpoint rejected the credentials or the signature."""


class BucketMissing(StorageError):
    """The configured bucket does not exist."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class PreconditionFailed(StorageError):
    """A conditional write lost (``If-None-Match`` on an existing key, ``If-Match`` on a moved ETag)."""


class CredentialsMissing(StorageError):
    """No credentials were configured anywhere."""


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    source: str = ""

    def __repr__(self) -> str:  # never show the keys
        return f"Credentials(source={self.source!r})"


def read_credentials_file(path: str | os.PathLike, profile: str = "default") -> Credentials | None:
    """Read an AWS shared-credentials INI file; None if it lacks the profile."""
    parser = configparser.ConfigParser()
    try:
        parser.read_string(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, configparser.Error) as e:
        raise StorageError(f"cannot read credentials file {path}: {type(e).__name__}") from None
    if profile not in parser:
        return None
    sec = parser[profile]
    if not sec.get("aws_access_key_id") or not sec.get("aws_secret_access_key"):
        return None
    return Credentials(
        sec["aws_access_key_id"], sec["aws_secret_access_key"], sec.get("aws_session_token"), f"file {path}"
    )


def write_credentials_file(path: str | os.PathLike, creds: Credentials, profile: str = "default") -> None:
    """Write an AWS shared-credentials INI file readable by its owner only (mode 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f"[{profile}]\naws_access_key_id = {creds.access_key_id}\naws_secret_access_key = {creds.secret_access_key}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.chmod(path, 0o600)


def resolve_credentials(cfg: StorageConfig, state_dir: Path | None = None) -> Credentials:
    """Credentials in order: the configuration (YAML, REFLADE_STORAGE_*, AWS_* variables), the configured
    credentials file, the embedded stack's file in the state directory.

    Raises:
        CredentialsMissing: none of them has a key pair.
    """
    if cfg.access_key_id and cfg.secret_access_key:
        return Credentials(cfg.access_key_id, cfg.secret_access_key, cfg.session_token, "configuration")
    if cfg.access_key_id or cfg.secret_access_key:
        raise CredentialsMissing(
            "object-store credentials are incomplete: set both the access key id and the secret access key"
        )
    if cfg.credentials_file:
        creds = read_credentials_file(cfg.credentials_file, cfg.profile)
        if creds is None:
            raise CredentialsMissing(
                f"credentials file {cfg.credentials_file} has no profile {cfg.profile!r} with a key pair"
            )
        return creds
    state_dir = state_dir or default_state_dir()
    creds = read_credentials_file(state_dir / CREDENTIALS_FILENAME)
    if creds is not None:
        return creds
    raise CredentialsMissing(
        f"no object-store credentials for {cfg.endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        f"point AWS_SHARED_CREDENTIALS_FILE at a credentials file, or run `reflade up` "
        f"(it keeps the embedded store's credentials in {state_dir})"
    )


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    p = urlparse(uri)
    if p.scheme != "s3" or not p.netloc:
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/key)")
    return p.netloc, p.path.lstrip("/")


class Storage:
    """The object store of one configuration.

    Attributes:
        config: the ``StorageConfig`` it was built from.
        client: a boto3 S3 client (path-style, retrying).
        bucket: the configured bucket name.
    """

    def __init__(self, config: StorageConfig, state_dir: Path | None = None):
        config.validate()
        self.config = config
        self.bucket = config.bucket
        self.endpoint = config.endpoint.rstrip("/")
        self._creds = resolve_credentials(config, state_dir)
        self.client = self._make_client(config.max_attempts)
        self._fs = None

    @classmethod
    def from_config(cls, cfg: Config) -> Storage:
        return cls(cfg.storage, cfg.stack.resolved_state_dir())

    def _make_client(self, max_attempts: int):
        cfg = self.config
        boto_cfg = BotoConfig(
            region_name=cfg.region,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            # Checksums on every PUT are not supported by every S3 server; send them only when required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self._creds.access_key_id,
            aws_secret_access_key=self._creds.secret_access_key,
            aws_session_token=self._creds.session_token,
            config=boto_cfg,
        )

    # ------------------------------------------------------------------ pyarrow
    @property
    def fs(self):
        """A ``pyarrow.fs.S3FileSystem`` on the same endpoint, for Ray Data and Ray Train."""
        if self._fs is None:
            from pyarrow import fs as pafs

            u = urlparse(self.endpoint)
            self._fs = pafs.S3FileSystem(
                access_key=self._creds.access_key_id,
                secret_key=self._creds.secret_access_key,
                session_token=self._creds.session_token,
                region=self.config.region,
                scheme=u.scheme,
                endpoint_override=u.netloc,
                connect_timeout=self.config.connect_timeout_s,
                request_timeout=self.config.read_timeout_s,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.config.max_attempts),
            )
        return self._fs

    @contextmanager
    def traffic(self) -> Iterator[Traffic]:
        """Count the bytes this storage's boto3 client sends and receives inside the ``with`` block (the pyarrow
        filesystem ``fs`` is not counted)."""
        t = Traffic()
        events = self.client.meta.events
        hooks = [
            ("provide-client-params.s3", t._provide_key),
            ("before-call.s3", t._before_call),
            ("before-send.s3", t._before_send),
            ("after-call.s3", t._after_call),
        ]
        for name, fn in hooks:
            events.register(name, fn)
        try:
            yield t
        finally:
            for name, fn in hooks:
                events.unregister(name, fn)

    # ------------------------------------------------------------------ URIs
    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def path(self, key: str) -> str:
        """``bucket/key``: the form pyarrow filesystems and ``RunConfig(storage_path=...)`` take."""
        return f"{self.bucket}/{key}"

    def key_of(self, uri: str) -> str:
        bucket, key = parse_uri(uri)
        if bucket != self.bucket:
            raise ValueError(f"{uri} is not in the configured bucket {self.bucket!r}")
        return key

    # ------------------------------------------------------------------ errors
    def _explain(self, exc: Exception, op: str, key: str | None = None) -> StorageError:
        where = self.uri(key) if key else f"bucket {self.bucket!r}"
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return CredentialsMissing("no object-store credentials were found")
        if isinstance(
            exc,
            (
                botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ConnectionClosedError,
            ),
        ):
            reason = (
                "connection refused"
                if "refused" in str(exc).lower()
                or isinstance(exc, botocore.exceptions.EndpointConnectionError)
                else type(exc).__name__
            )
            return StorageUnreachable(
                f"cannot reach object store at {self.endpoint}: {reason}; is `reflade up` running?"
            )
        if isinstance(exc, botocore.exceptions.ReadTimeoutError):
            return StorageUnreachable(f"object store at {self.endpoint} timed out during {op} {where}")
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
                return StorageAuthError(
                    f"object store at {self.endpoint} rejected the credentials ({code}) "
                    f"from {self._creds.source or 'the configuration'}; check the access key and secret"
                )
            if code in ("AccessDenied", "403") or status == 403:
                return StorageAuthError(
                    f"access denied by the object store at {self.endpoint} for {op} {where}: "
                    f"wrong credentials, or the key may not use this bucket"
                )
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and key is None):
                return BucketMissing(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it "
                    f"(`reflade up` does for the embedded store) or set storage.bucket"
                )
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFound(f"no object at {where}")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412):
                return PreconditionFailed(f"conditional write to {where} lost ({code or status})")
            return StorageError(f"{op} {where} failed at {self.endpoint}: {code or status}")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return StorageError(f"{op} {where} failed at {self.endpoint}: {type(exc).__name__}")
        if isinstance(exc, boto3.exceptions.Boto3Error):
            # The transfer manager wraps the client's error (S3UploadFailedError, RetriesExceededError).
            cause = getattr(exc, "last_exception", None) or exc.__context__
            if isinstance(cause, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)):
                return self._explain(cause, op, key)
            return StorageError(f"{op} {where} failed at {self.endpoint}: {type(exc).__name__}")
        raise exc

    def _call(self, op: str, key: str | None, fn, **kw):
        try:
            return fn(**kw)
        except (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            boto3.exceptions.Boto3Error,
        ) as e:
            raise self._explain(e, op, key) from None

    # ------------------------------------------------------------------ bucket
    def check(self) -> None:
        """Fail fast, with a clear error, if the endpoint, the credentials or the bucket is wrong."""
        probe = self._make_client(1)
        try:
            probe.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            err = self._explain(e, "check", None)
            if isinstance(err, BucketMissing):
                # HEAD answers 404 with no code for a missing bucket; a bad key also gives 403 there.
                self._check_credentials(probe)
            raise err from None
        finally:
            probe.close()

    def _check_credentials(self, probe) -> None:
        try:
            probe.list_buckets()
        except botocore.exceptions.ClientError as e:
            raise self._explain(e, "list buckets", None) from None

    def ensure_bucket(self) -> bool:
        """Create the bucket if it does not exist; True if it was created."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except botocore.exceptions.ClientError as e:
            if self._explain(e, "check", None).__class__ is not BucketMissing:
                raise self._explain(e, "check", None) from None
        self._call("create bucket", None, self.client.create_bucket, Bucket=self.bucket)
        return True

    # ------------------------------------------------------------------ small objects
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Write one object; returns its ETag.

        Args:
            if_none_match: create only if the key does not exist (``If-None-Match: *``).
            if_match: replace only if the current ETag is this one (compare-and-swap).

        Raises:
            PreconditionFailed: the condition did not hold.
        """
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data, "ContentType": content_type}
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            kw["IfMatch"] = if_match
        resp = self._call("put", key, self.client.put_object, **kw)
        return resp["ETag"]

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        """Read one object whole; returns (body, ETag). A connection dropped mid-body is retried."""
        for attempt in range(self.config.max_attempts):
            resp = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=key)
            try:
                return resp["Body"].read(), resp["ETag"]
            except (botocore.exceptions.BotoCoreError, OSError) as e:
                if attempt + 1 >= self.config.max_attempts:
                    raise StorageError(
                        f"reading {self.uri(key)} from {self.endpoint} failed mid-body: {type(e).__name__}"
                    ) from None
        raise AssertionError("unreachable")

    def put_json(
        self, key: str, obj: Any, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write a small JSON object in one PUT (atomic: readers see the old or the new body, never a mix)."""
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        return self.put_bytes(
            key, data, if_none_match=if_none_match, if_match=if_match, content_type="application/json"
        )

    def get_json(self, key: str) -> tuple[Any, str]:
        data, etag = self.get_bytes(key)
        try:
            return json.loads(data), etag
        except json.JSONDecodeError:
            raise StorageError(f"{self.uri(key)} is not valid JSON") from None

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=key)
            return True
        except ObjectNotFound:
            return False

    def head(self, key: str) -> dict[str, Any]:
        return self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=key)

    def list(
        self, prefix: str, delimiter: str | None = None, start_after: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Objects under a prefix (dicts with Key, Size, LastModified, ETag), all pages, in key order;
        with ``start_after``, only keys after that one."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = delimiter
        if start_after:
            kw["StartAfter"] = start_after
        token = None
        while True:
            if token:
                kw["ContinuationToken"] = token
            resp = self._call("list", prefix, self.client.list_objects_v2, **kw)
            yield from resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def list_prefixes(self, prefix: str) -> list[str]:
        """The immediate sub-prefixes of ``prefix`` (which should end with '/')."""
        out: list[str] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        token = None
        while True:
            if token:
                kw["ContinuationToken"] = token
            resp = self._call("list", prefix, self.client.list_objects_v2, **kw)
            out += [p["Prefix"] for p in resp.get("CommonPrefixes", [])]
            if not resp.get("IsTruncated"):
                return out
            token = resp["NextContinuationToken"]

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            resp = self._call(
                "delete", keys[i], self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": chunk}
            )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"could not delete {len(resp['Errors'])} of {len(chunk)} objects at {self.endpoint}, e.g. "
                    f"{self.uri(first.get('Key', '?'))}: {first.get('Code', '?')}"
                )

    def copy(self, src_key: str, dst_key: str, size: int | None = None) -> None:
        """Copy one object to another key of the bucket, server-side: no byte passes through this process.

        Objects of 5 GiB or more (``size``; one CopyObject's limit) are copied in parts (UploadPartCopy).
        """
        if size is not None and size >= 5 * 1024**3:
            self._call(
                "copy",
                src_key,
                self.client.copy,
                CopySource={"Bucket": self.bucket, "Key": src_key},
                Bucket=self.bucket,
                Key=dst_key,
                Config=self._transfer_config(),
            )
            return
        self._call(
            "copy",
            src_key,
            self.client.copy_object,
            CopySource={"Bucket": self.bucket, "Key": src_key},
            Bucket=self.bucket,
            Key=dst_key,
        )

    # ------------------------------------------------------------------ large files
    def _transfer_config(self) -> TransferConfig:
        mb = 1024 * 1024
        return TransferConfig(
            multipart_threshold=self.config.multipart_threshold_mb * mb,
            multipart_chunksize=self.config.multipart_chunk_mb * mb,
            max_concurrency=self.config.max_concurrency,
        )

    def upload_file(self, path: str | os.PathLike, key: str, *, progress: bool | None = None) -> None:
        """Stream a local file up (multipart above ``multipart_threshold_mb``), with a progress bar."""
        size = os.path.getsize(path)
        with byte_bar(size, f"upload {Path(path).name}", progress) as bar:
            self._call(
                "upload",
                key,
                self.client.upload_file,
                Filename=str(path),
                Bucket=self.bucket,
                Key=key,
                Config=self._transfer_config(),
                Callback=bar.update,
            )

    def download_file(self, key: str, path: str | os.PathLike, *, progress: bool | None = None) -> None:
        """Stream an object down (multipart ranges for large ones), with a progress bar."""
        size = int(self.head(key)["ContentLength"])
        with byte_bar(size, f"download {Path(key).name}", progress) as bar:
            try:
                self.client.download_file(
                    Bucket=self.bucket,
                    Key=key,
                    Filename=str(path),
                    Config=self._transfer_config(),
                    Callback=bar.update,
                )
            except (
                botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError,
                boto3.exceptions.Boto3Error,
            ) as e:
                raise self._explain(e, "download", key) from None

    def open_read(self, key: str):
        """A streaming body (file-like ``read(n)``) of one object."""
        return self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=key)["Body"]
