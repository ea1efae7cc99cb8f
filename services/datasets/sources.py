"""Where CreateDataset imports from: S3, Google Cloud Storage and the Hugging Face Hub (or a local copy).

A source is read in two steps, both blocking (the manager runs them in worker threads):
- `check()`, before CreateDataset returns: the source exists, the credentials open it and it fits the size
  limit, so the caller gets NOT_FOUND / UNAUTHENTICATED / PERMISSION_DENIED / RESOURCE_EXHAUSTED at once
  instead of a dataset that fails later;
- `fetch()`, in the background: the bytes go to a temp file as JSONL, counted, hashed and cut off at the
  size limit while they stream, then take the same validation and splitting path as an upload.

Secrets never reach a log line, an exception message or a Dataset: they live in `Credentials` (hidden from
repr) and in the boto3 / datasets calls that need them. Without credentials, S3 and GCS are read
anonymously: the server never lends its own cloud identity to a caller (that would let anyone read the
platform's buckets).

Nor does the server send requests wherever a caller points it: `source.endpoint_url` must be AWS S3's or
GCS's own endpoint (https), or one the operator allows (`EndpointAllowlist`,
TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST). Anything else, a loopback or private address above all, is
INVALID_ARGUMENT before any request is made (server-side request forgery: cloud metadata services, admin
ports, other tenants' services on the server's network).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, Protocol
from urllib.parse import urlparse

from tuneforge.v1 import dataset_pb2, dataset_service_pb2

from services.datasets.converters import format_from_proto, options_from_proto, split_config_from_proto
from services.datasets.domain import UploadSpec
from tuneforge_core.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TuneForgeError,
    Unauthenticated,
    Unavailable,
    Violations,
)
from tuneforge_core.reasons import Reason

GCS_ENDPOINT = "https://storage.googleapis.com"
# S3's own endpoints: s3.amazonaws.com, s3.<region>.amazonaws.com, s3-<region>..., dualstack and FIPS
# variants, virtual-hosted <bucket>.s3..., and the China regions' amazonaws.com.cn.
AWS_S3_HOST_RE = re.compile(r"^(?:[a-z0-9][a-z0-9.-]*\.)?s3(?:[.-][a-z0-9-]+)*\.amazonaws\.com(?:\.cn)?\Z")
GCS_HOSTS = frozenset({"storage.googleapis.com"})
ALLOWLIST_SETTING = "TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST"
# Bucket names of S3 (3-63) and GCS (up to 222 with dots); the server gives the precise rule on use.
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]\Z")
MAX_KEY_BYTES = 1024
# The longest source address a CreateDataset call may give: source.s3_uri, gcs_uri, huggingface_id and
# endpoint_url. Far above any real one (an S3 URI is at most about 1,250: a 222-character bucket and a
# 1,024-byte key), it bounds what the server parses, keeps as the dataset's source and carries into every
# DatasetChanged event.
MAX_SOURCE_ADDRESS = 2048
# C0 control characters and DEL: urlparse silently drops tabs and line breaks (and leading ones of the
# others), so "s3://buc\nket/key" was read as another object than the one written; none belongs in an
# address or a credential.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Each credential of SourceCredentials. STS session tokens are the longest (AWS sets no fixed size; they
# run to a few KB); the whole request is stored sealed while the import runs.
MAX_CREDENTIAL = 16 * 1024
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?\Z")
SPLIT_RE = re.compile(r"^[\w.-]{1,64}\Z")
# A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk holds one of these.
SAVED_MARKERS = ("dataset_dict.json", "state.json")
PROVIDER_NAMES = {"s3": "S3", "gcs": "GCS"}


class ImportCancelled(Exception):
    """Raised inside a fetch when the import was cancelled (shutdown, dataset deleted)."""


# -- requests --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Input-only secrets of a CreateDataset call; repr shows none of them."""

    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    huggingface_token: str = field(default="", repr=False)


@dataclass(frozen=True)
class ObjectSource:
    """One object in S3 or GCS (through GCS's S3-compatible XML API)."""

    provider: Literal["s3", "gcs"]
    bucket: str
    key: str
    region: str
    endpoint_url: str

    @property
    def field(self) -> str:
        return "source.s3_uri" if self.provider == "s3" else "source.gcs_uri"

    @property
    def uri(self) -> str:
        return f"{'s3' if self.provider == 's3' else 'gs'}://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face dataset: a hub id, or a local folder under TUNEFORGE_HF_LOCAL_ROOT."""

    dataset: str
    config: str = ""
    split: str = ""
    streaming: bool = False
    max_rows: int = 0
    local_path: Path | None = None

    field = "source.huggingface_id"

    @property
    def uri(self) -> str:
        return f"hf://{self.dataset}" + (f":{self.split}" if self.split else "")


Source = ObjectSource | HubSource


@dataclass(frozen=True)
class ImportRequest:
    """A CreateDataset call as domain values. `source` is the raw message: `parse_source` checks it."""

    spec: UploadSpec
    source: dataset_pb2.DatasetSource
    credentials: Credentials


def import_request_from_proto(request: dataset_service_pb2.CreateDatasetRequest) -> ImportRequest:
    c = request.credentials
    spec = UploadSpec(
        organization=request.organization,
        name=request.name,
        description=request.description,
        format=format_from_proto(request.format, "format"),
        split=split_config_from_proto(request.split),
        request_id=request.request_id,
        tokenizer=request.tokenizer,
        max_length=request.max_length,
        min_examples=request.min_examples if request.HasField("min_examples") else None,
        options=options_from_proto(request.options),
        column_mapping=dict(request.column_mapping.columns),
        issue_limit=request.issue_limit if request.HasField("issue_limit") else None,
    )
    return ImportRequest(
        spec=spec,
        source=request.source,
        credentials=Credentials(c.access_key_id, c.secret_access_key, c.session_token, c.huggingface_token),
    )


def _port(parsed: Any) -> int | None:
    """The URL's port, the scheme's default when it names none; None when it is not a port."""
    try:
        port = parsed.port
    except ValueError:
        return None
    return port or {"http": 80, "https": 443}.get(parsed.scheme)


def _host(parsed: Any) -> str:
    return (parsed.hostname or "").rstrip(".").lower()


@dataclass(frozen=True)
class AllowedEndpoint:
    """One allowlist entry: a host (any port, or the one given) or a URL prefix (scheme, host, port and
    leading path segments must all match)."""

    host: str
    port: int | None = None
    scheme: str = ""
    path: str = ""

    @classmethod
    def parse(cls, entry: str) -> AllowedEndpoint:
        if "://" in entry:
            parsed = urlparse(entry)
            if parsed.scheme not in ("http", "https") or not _host(parsed) or _port(parsed) is None:
                raise ValueError(f"'{entry}' is not an http(s) URL prefix with a host")
            return cls(_host(parsed), _port(parsed), parsed.scheme, parsed.path.rstrip("/"))
        parsed = urlparse(f"//{entry}")
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if not _host(parsed) or port == -1 or parsed.path or parsed.username is not None:
            raise ValueError(f"'{entry}' is not a host or host:port")
        return cls(_host(parsed), port)

    def matches(self, parsed: Any) -> bool:
        if _host(parsed) != self.host:
            return False
        if self.port is not None and _port(parsed) != self.port:
            return False
        if self.scheme and parsed.scheme != self.scheme:
            return False
        path = parsed.path.rstrip("/")
        return not self.path or path == self.path or path.startswith(self.path + "/")


@dataclass(frozen=True)
class EndpointAllowlist:
    """Where CreateDataset may send S3/GCS requests besides AWS S3 and GCS themselves (over https).

    Parsed from TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST: comma-separated hosts ("minio.internal",
    "10.0.0.5:9000", "[::1]:8333") or URL prefixes ("https://s3.example.com/tenant-a"). Empty: AWS and GCS
    only. Names are compared as written, never resolved: an allowed name is the operator's to keep pointed
    at the right address.
    """

    entries: tuple[AllowedEndpoint, ...] = ()

    @classmethod
    def parse(cls, value: str) -> EndpointAllowlist:
        return cls(tuple(AllowedEndpoint.parse(e.strip()) for e in value.split(",") if e.strip()))

    @classmethod
    def from_environment(cls) -> EndpointAllowlist:
        from services.datasets.settings import DatasetSettings

        return cls.parse(DatasetSettings().import_endpoint_allowlist)

    def problem(self, endpoint: str) -> str | None:
        """Why the server must not send requests to `endpoint` (a well-formed http(s) URL), or None."""
        parsed = urlparse(endpoint)
        host = _host(parsed)
        if any(entry.matches(parsed) for entry in self.entries):
            return None
        if AWS_S3_HOST_RE.match(host) or host in GCS_HOSTS:
            https = parsed.scheme == "https"
            return None if https else "AWS S3 and GCS endpoints are reached over https only"
        if _is_internal(host):
            return (
                f"'{host}' is a loopback, private or link-local address, which this server does not contact "
                f"unless the operator allows it ({ALLOWLIST_SETTING})"
            )
        return (
            f"'{host}' is not AWS S3, Google Cloud Storage or an endpoint this deployment allows "
            f"({ALLOWLIST_SETTING})"
        )


def _is_internal(host: str) -> bool:
    """A loopback, private, link-local or otherwise non-public literal address, or localhost."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not address.is_global


def _check_address(v: Violations, value: str, field_path: str) -> bool:
    """Whether a source address is short enough and free of control characters; else adds why."""
    if len(value) > MAX_SOURCE_ADDRESS:
        v.add(field_path, f"must be at most {MAX_SOURCE_ADDRESS} characters (it is {len(value)})")
        return False
    if CONTROL_RE.search(value):
        v.add(field_path, "must not contain control characters (a tab, a line break, ...)")
        return False
    return True


def _parse_url(v: Violations, value: str, field_path: str) -> Any:
    """urlparse(value), or None with the reason added: it raises ValueError on a bracketed host that is not
    an IPv6 address ("http://[x") or a host that NFKC normalization turns into '/', '?', '#', '@' or ':'."""
    if value[:1].isspace():
        v.add(field_path, "must not begin with whitespace")
        return None
    try:
        return urlparse(value)
    except ValueError as exc:
        v.add(field_path, f"is not a well-formed URL: {exc}")
        return None


def _check_endpoint(v: Violations, endpoint: str, allowlist: EndpointAllowlist | None) -> None:
    if not endpoint or not _check_address(v, endpoint, "source.endpoint_url"):
        return
    parsed = _parse_url(v, endpoint, "source.endpoint_url")
    if parsed is None:
        return
    well_formed = v.check(
        parsed.scheme in ("http", "https") and bool(parsed.hostname) and _port(parsed) is not None,
        "source.endpoint_url",
        "must be an http:// or https:// URL with a host",
    )
    v.check(
        parsed.username is None and parsed.password is None,
        "source.endpoint_url",
        "must not carry user info; put secrets in credentials",
    )
    v.check(
        not parsed.query and not parsed.fragment, "source.endpoint_url", "must not have a query or a fragment"
    )
    if well_formed:
        problem = (allowlist if allowlist is not None else EndpointAllowlist.from_environment()).problem(
            endpoint
        )
        if problem is not None:
            v.add("source.endpoint_url", problem)


def _parse_object_uri(
    v: Violations, uri: str, provider: Literal["s3", "gcs"], field_path: str
) -> tuple[str, str] | None:
    scheme = "s3" if provider == "s3" else "gs"
    parsed = _parse_url(v, uri, field_path)
    if parsed is None:
        return None
    if parsed.scheme != scheme or not parsed.netloc:
        v.add(field_path, f"must look like {scheme}://bucket/path/to/file.jsonl")
        return None
    bucket, key = parsed.netloc, uri[len(f"{scheme}://{parsed.netloc}/") :]
    ok = v.check(
        bool(BUCKET_RE.match(bucket)) and ".." not in bucket,
        field_path,
        f"bucket '{bucket}' is not a valid bucket name (lowercase letters, digits, '.', '-', '_')",
    )
    ok &= v.check(
        bool(key) and not key.endswith("/"), field_path, "must name one object, not a bucket or a folder"
    )
    ok &= v.check(
        len(key.encode()) <= MAX_KEY_BYTES,
        field_path,
        f"the object key must be at most {MAX_KEY_BYTES} bytes",
    )
    ok &= v.check(
        not parsed.query and not parsed.fragment and "\\" not in key,
        field_path,
        "must not have a query, a fragment or backslashes",
    )
    return (bucket, key) if ok else None


def _parse_hub(v: Violations, proto: dataset_pb2.DatasetSource, local_root: Path | None) -> HubSource | None:
    raw = proto.huggingface_id.strip()
    dataset, split = raw, proto.huggingface_split
    head, sep, tail = raw.rpartition(":")
    if sep and head and SPLIT_RE.match(tail):
        dataset, split = head, proto.huggingface_split or tail
    v.check(
        not split or bool(SPLIT_RE.match(split)),
        "source.huggingface_split",
        "must be 1-64 letters, digits, '_', '.' or '-'",
    )
    v.check(
        not proto.huggingface_config or bool(SPLIT_RE.match(proto.huggingface_config)),
        "source.huggingface_config",
        "must be 1-64 letters, digits, '_', '.' or '-'",
    )
    local_path = None
    if dataset.startswith("/"):
        if local_root is None:
            v.add(
                "source.huggingface_id",
                "local paths are not enabled on this server (an operator sets "
                "TUNEFORGE_HF_LOCAL_ROOT); use a hub dataset id such as 'owner/name'",
            )
            return None
        # resolve() follows symlinks, so a link inside the root cannot lead outside it.
        local_path = Path(dataset).resolve()
        root = local_root.resolve()
        if not local_path.is_relative_to(root) or ".." in PurePosixPath(dataset).parts:
            v.add("source.huggingface_id", f"local paths must lie under {root}")
            return None
    elif not HUB_ID_RE.match(dataset) or ".." in dataset:
        v.add(
            "source.huggingface_id",
            "must be a hub dataset id such as 'owner/name' (optionally with "
            "':split'), or an absolute local path",
        )
        return None
    if v:
        return None
    return HubSource(
        dataset=dataset,
        config=proto.huggingface_config,
        split=split,
        streaming=proto.streaming,
        max_rows=proto.max_rows,
        local_path=local_path,
    )


def parse_source(
    v: Violations,
    proto: dataset_pb2.DatasetSource,
    credentials: Credentials,
    local_root: Path | None,
    endpoint_allowlist: EndpointAllowlist | None = None,
) -> Source | None:
    """The checked source of a CreateDataset call, or None with every problem added to `v`.

    `endpoint_allowlist` is the service's TUNEFORGE_IMPORT_ENDPOINT_ALLOWLIST; None reads it from the
    environment (where a DatasetSettings' own fields come from too).
    """
    kind = proto.WhichOneof("source")
    if kind is None:
        v.add("source", "is required: set one of s3_uri, gcs_uri or huggingface_id")
        return None
    if kind == "upload_filename":
        v.add(
            "source.upload_filename",
            "is set by UploadDataset only; CreateDataset imports from s3_uri, gcs_uri or huggingface_id",
        )
        return None
    v.check(proto.max_rows >= 0, "source.max_rows", "must not be negative")
    for name in ("access_key_id", "secret_access_key", "session_token", "huggingface_token"):
        secret = getattr(credentials, name)  # named in the error, never shown
        v.check(len(secret) <= MAX_CREDENTIAL, f"credentials.{name}",
                f"must be at most {MAX_CREDENTIAL} characters")
        v.check(not CONTROL_RE.search(secret), f"credentials.{name}",
                "must not contain control characters (a tab, a line break, ...)")
    if not _check_address(v, getattr(proto, kind), f"source.{kind}"):
        return None
    if kind == "huggingface_id":
        for name in ("region", "endpoint_url"):
            v.check(not getattr(proto, name), f"source.{name}", "applies to s3_uri and gcs_uri only")
        v.check(
            not (credentials.access_key_id or credentials.secret_access_key or credentials.session_token),
            "credentials",
            "a Hugging Face source takes credentials.huggingface_token only",
        )
        return _parse_hub(v, proto, local_root)
    provider: Literal["s3", "gcs"] = "s3" if kind == "s3_uri" else "gcs"
    for name in ("huggingface_config", "huggingface_split", "streaming", "max_rows"):
        v.check(not getattr(proto, name), f"source.{name}", "applies to huggingface_id only")
    v.check(
        not credentials.huggingface_token, "credentials.huggingface_token", "applies to huggingface_id only"
    )
    v.check(
        bool(credentials.access_key_id) == bool(credentials.secret_access_key),
        "credentials.secret_access_key" if credentials.access_key_id else "credentials.access_key_id",
        "access_key_id and secret_access_key go together (both, or neither for a public object)",
    )
    v.check(
        not credentials.session_token or bool(credentials.access_key_id),
        "credentials.session_token",
        "needs access_key_id and secret_access_key",
    )
    v.check(
        len(proto.region) <= 64 and re.fullmatch(r"[a-z0-9-]*", proto.region) is not None,
        "source.region",
        "must be a region name such as 'eu-west-1'",
    )
    _check_endpoint(v, proto.endpoint_url, endpoint_allowlist)
    where = _parse_object_uri(v, getattr(proto, kind), provider, f"source.{kind}")
    if where is None or v:
        return None
    region = proto.region or ("us-east-1" if provider == "s3" else "auto")
    endpoint = proto.endpoint_url or (GCS_ENDPOINT if provider == "gcs" else "")
    return ObjectSource(provider, where[0], where[1], region, endpoint)


# -- reading ---------------------------------------------------------------------------------------------


def too_large(source: Source, limit: int, size: int | None = None) -> ResourceExhausted:
    what = f"is {size} bytes" if size is not None else "grew past the limit while it was read"
    return ResourceExhausted(
        f"{source.uri} {what}, more than this server's import limit of {limit} bytes; import a smaller "
        "file (max_rows for Hugging Face sources) or ask an operator to raise TUNEFORGE_MAX_UPLOAD_BYTES.",
        reason=Reason.UPLOAD_TOO_LARGE,
        metadata={"limit_bytes": str(limit), "source": source.uri},
        violations=[FieldViolation(source.field, f"larger than the import limit of {limit} bytes")],
    )


class Sink:
    """Writes the imported bytes to a file: counts, hashes, enforces the limit and honours cancellation
    on every write, so an oversized or cancelled import stops within one chunk."""

    def __init__(self, out: IO[bytes], source: Source, limit: int, cancelled: threading.Event) -> None:
        self.out = out
        self.source = source
        self.limit = limit
        self.cancelled = cancelled
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        if self.cancelled.is_set():
            raise ImportCancelled()
        self.size += len(data)
        if self.size > self.limit:
            raise too_large(self.source, self.limit)
        self.out.write(data)
        self.digest.update(data)
        return len(data)


@dataclass(frozen=True)
class FetchSettings:
    """How a source is read: the size limit, S3/GCS multipart sizes, and the S3/GCS network timeouts in
    seconds (to connect, and for each read of a response; TUNEFORGE_IMPORT_*_TIMEOUT_S)."""

    limit: int
    multipart_threshold: int
    multipart_chunk: int
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


class SourceReader(Protocol):
    def check(self) -> None:
        """Fails with the error the caller should see if the source cannot be imported."""

    def fetch(self, dest: Path, work_dir: Path, cancelled: threading.Event) -> tuple[int, str]:
        """Writes the source to `dest` as JSONL; returns (size in bytes, hex SHA-256)."""


def open_reader(source: Source, credentials: Credentials, settings: FetchSettings) -> SourceReader:
    if isinstance(source, ObjectSource):
        return ObjectReader(source, credentials, settings)
    return HubReader(source, credentials, settings)


# Error codes of S3 (and GCS's XML API) and what they mean for the caller.
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId": "credentials.access_key_id",
    "SignatureDoesNotMatch": "credentials.secret_access_key",
    "InvalidToken": "credentials.session_token",
    "ExpiredToken": "credentials.session_token",
    "TokenRefreshRequired": "credentials.session_token",
}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem", "UserProjectAccountProblem"}
_WRONG_REGION = {
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
    "301",
    "IllegalLocationConstraintException",
}


def object_error(exc: Exception, source: ObjectSource) -> TuneForgeError:
    """The kit error for a boto3 failure reading `source`. Provider messages carry no secrets."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        ConnectTimeoutError,
        HTTPClientError,
        ParamValidationError,
        ReadTimeoutError,
    )

    name, where = PROVIDER_NAMES[source.provider], source.uri
    meta = {"source": where}
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        meta["provider_code"] = code
        if code in _NOT_FOUND:
            what = f"bucket '{source.bucket}'" if code == "NoSuchBucket" else "object"
            return NotFound(
                f"{where}: the {what} does not exist (or these credentials cannot see it).",
                metadata={**meta, "resource_type": "source_object", "resource": where},
                violations=[FieldViolation(source.field, f"the {what} does not exist")],
            )
        if code in _BAD_CREDENTIALS:
            return Unauthenticated(
                f"{name} rejected the credentials for {where} ({code}): check {_BAD_CREDENTIALS[code]}.",
                metadata=meta,
                violations=[FieldViolation(_BAD_CREDENTIALS[code], f"rejected by {name}: {code}")],
            )
        if code in _DENIED:
            return PermissionDenied(
                f"{name} denied reading {where}: the credentials are valid but may not read this object"
                " (or none were given and it is not public).",
                metadata=meta,
                violations=[FieldViolation(source.field, "access denied by the bucket's policy")],
            )
        if code in _WRONG_REGION:
            return InvalidArgument(
                f"{where} is not served from region '{source.region}' at this endpoint "
                f"({code}); set source.region to the bucket's region.",
                metadata=meta,
                violations=[FieldViolation("source.region", "not the bucket's region")],
            )
        if code == "InvalidBucketName":
            return InvalidArgument(
                f"{name} says '{source.bucket}' is not a valid bucket name.",
                metadata=meta,
                violations=[FieldViolation(source.field, "invalid bucket name")],
            )
        return Unavailable(
            f"{name} could not serve {where} ({code or 'no error code'}); retry later.", metadata=meta
        )
    if isinstance(exc, ParamValidationError):
        return InvalidArgument(
            f"{where} is not a valid {name} location.",
            metadata=meta,
            violations=[FieldViolation(source.field, "rejected by the S3 client")],
        )
    if isinstance(exc, ConnectionError | HTTPClientError):
        endpoint = source.endpoint_url or "AWS"
        slow = isinstance(exc, ConnectTimeoutError | ReadTimeoutError)
        timed_out = " (it did not answer in time)" if slow else ""
        return Unavailable(
            f"Could not reach {name} at {endpoint} to read {where}{timed_out}; check "
            "source.endpoint_url, or retry later.",
            metadata={**meta, "endpoint": endpoint},
        )
    raise exc


class ObjectReader:
    """Reads one object through boto3; large objects come as concurrent ranged GETs."""

    def __init__(
        self, source: ObjectSource, credentials: Credentials, settings: FetchSettings, client: Any = None
    ) -> None:
        self.source = source
        self.settings = settings
        self.client = client or self._client(credentials)

    def _client(self, credentials: Credentials) -> Any:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        # Every request has both timeouts, so a source that accepts and never answers (or stops
        # answering) fails the attempt instead of holding an import thread for ever.
        options: dict[str, Any] = {
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": self.settings.connect_timeout,
            "read_timeout": self.settings.read_timeout,
        }
        if self.source.provider == "gcs":
            # GCS's XML API takes SigV4 with HMAC keys and path-style URLs, but not the CRC checksums
            # boto3 adds by default.
            options.update(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
        if not credentials.access_key_id:
            options["signature_version"] = UNSIGNED
        session = boto3.session.Session(
            aws_access_key_id=credentials.access_key_id or None,
            aws_secret_access_key=credentials.secret_access_key or None,
            aws_session_token=credentials.session_token or None,
        )
        return session.client(
            "s3",
            region_name=self.source.region,
            endpoint_url=self.source.endpoint_url or None,
            config=Config(**options),
        )

    def check(self) -> None:
        """A one-byte ranged GET: unlike HEAD, its error responses carry a code (a HEAD says only 403,
        not whether the key, the signature or the policy is wrong), and Content-Range gives the size."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(
                Bucket=self.source.bucket, Key=self.source.key, Range="bytes=0-0"
            )
            response["Body"].close()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return  # a 0-byte object: validation will say it is empty
            raise object_error(exc, self.source) from None
        except BotoCoreError as exc:
            raise object_error(exc, self.source) from None
        total = str(response.get("ContentRange", "")).rpartition("/")[2]
        size = int(total) if total.isdigit() else int(response.get("ContentLength", 0))
        if size > self.settings.limit:
            raise too_large(self.source, self.settings.limit, size)

    def fetch(self, dest: Path, work_dir: Path, cancelled: threading.Event) -> tuple[int, str]:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        # s3transfer tries a download that times out again (5 times by default, each with boto3's own 3
        # attempts): twice is enough, so a source that stopped answering ends the import sooner.
        config = TransferConfig(
            multipart_threshold=self.settings.multipart_threshold,
            multipart_chunksize=self.settings.multipart_chunk,
            max_concurrency=4,
            num_download_attempts=2,
        )
        with dest.open("wb") as out:
            # Sink has no seek(), so s3transfer hands it the ranges in order: hashing stays sequential.
            sink = Sink(out, self.source, self.settings.limit, cancelled)
            try:
                self.client.download_fileobj(self.source.bucket, self.source.key, sink, Config=config)
            except (ClientError, BotoCoreError) as exc:
                raise object_error(exc, self.source) from None
        return sink.size, sink.digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} value")


def _hub_error(exc: Exception, source: HubSource) -> TuneForgeError:
    """The kit error for a `datasets` failure; its messages name paths and ids, never tokens."""
    from datasets.exceptions import DatasetNotFoundError

    meta = {"source": source.uri}
    if isinstance(exc, DatasetNotFoundError | FileNotFoundError):
        return NotFound(
            f"{source.uri}: the dataset was not found ({exc}).",
            metadata={**meta, "resource_type": "huggingface_dataset", "resource": source.dataset},
            violations=[FieldViolation(source.field, "not found")],
        )
    if isinstance(exc, ValueError) and "split" in str(exc).lower():
        return InvalidArgument(
            f"{source.uri}: {exc}",
            metadata=meta,
            violations=[FieldViolation("source.huggingface_split", str(exc))],
        )
    if isinstance(exc, ValueError) and "config" in str(exc).lower():
        return InvalidArgument(
            f"{source.uri}: {exc}",
            metadata=meta,
            violations=[FieldViolation("source.huggingface_config", str(exc))],
        )
    if isinstance(exc, ConnectionError | OSError):
        return Unavailable(f"Could not reach the Hugging Face Hub for {source.uri}: {exc}", metadata=meta)
    return InvalidArgument(
        f"{source.uri} could not be loaded: {type(exc).__name__}: {exc}",
        metadata=meta,
        violations=[FieldViolation(source.field, "could not be loaded")],
    )


def pick_split(loaded: Any, source: HubSource) -> Any:
    """One split of a loaded dataset: the requested one, else "train", else the only one."""
    if not isinstance(loaded, Mapping):
        return loaded
    names = list(loaded.keys())
    chosen = source.split or ("train" if "train" in names else (names[0] if len(names) == 1 else ""))
    if chosen not in names:
        wanted = (
            f"has no split '{source.split}'" if source.split else "has several splits and none is 'train'"
        )
        raise InvalidArgument(
            f"{source.uri} {wanted}; choose one of: {', '.join(names)}.",
            metadata={"source": source.uri, "splits": ",".join(names)},
            violations=[FieldViolation("source.huggingface_split", f"choose one of: {', '.join(names)}")],
        )
    return loaded[chosen]


class HubReader:
    """Loads a dataset with the `datasets` library and writes its rows as JSONL."""

    def __init__(self, source: HubSource, credentials: Credentials, settings: FetchSettings) -> None:
        self.source = source
        self.token = credentials.huggingface_token or None
        self.settings = settings

    def _saved(self) -> bool:
        path = self.source.local_path
        return path is not None and any((path / m).is_file() for m in SAVED_MARKERS)

    def check(self) -> None:
        """Local sources are checked in full (cheap: save_to_disk folders are memory-mapped); hub ids are
        checked when the import runs, so a slow or offline hub never holds up the call."""
        path = self.source.local_path
        if path is None:
            self._refuse_local_shadow()
            return
        if not path.exists():
            raise NotFound(
                f"{self.source.uri}: no such file or folder.",
                metadata={"source": self.source.uri},
                violations=[FieldViolation(self.source.field, "no such file or folder")],
            )
        if self._saved():
            self._load(None)

    def _refuse_local_shadow(self) -> None:
        """`load_dataset` reads a folder or file of the given name in the working directory before it asks
        the hub, so a hub id naming one (say "services") would import the server's own files."""
        if Path(self.source.dataset).exists():
            raise InvalidArgument(
                f"'{self.source.dataset}' names a path on the server, so it cannot be read as a hub id.",
                metadata={"source": self.source.uri},
                violations=[
                    FieldViolation(self.source.field, "names a path on the server, not a hub dataset")
                ],
            )

    def _load(self, cache_dir: Path | None) -> Any:
        import datasets

        source = self.source
        if source.local_path is None:
            self._refuse_local_shadow()
        try:
            if self._saved():
                assert source.local_path is not None
                loaded = pick_split(datasets.load_from_disk(str(source.local_path)), source)
                return loaded.to_iterable_dataset() if source.streaming else loaded
            loaded = datasets.load_dataset(
                str(source.local_path or source.dataset),
                name=source.config or None,
                split=None if source.streaming else (source.split or None),
                streaming=source.streaming,
                token=self.token,
                cache_dir=str(cache_dir) if cache_dir else None,
            )
            return pick_split(loaded, source)
        except TuneForgeError:
            raise
        except Exception as exc:
            raise _hub_error(exc, source) from None

    def fetch(self, dest: Path, work_dir: Path, cancelled: threading.Event) -> tuple[int, str]:
        # A cache of its own under the import's work dir: removed with it, shared with no other import.
        rows: Iterable[Mapping[str, Any]] = self._load(work_dir / "hf-cache")
        limit = self.source.max_rows
        with dest.open("wb") as out:
            sink = Sink(out, self.source, self.settings.limit, cancelled)
            for n, row in enumerate(rows, start=1):
                try:
                    line = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=_json_default)
                except (TypeError, ValueError) as exc:
                    raise InvalidArgument(
                        f"{self.source.uri}: row {n} holds {exc}, which a JSONL dataset cannot carry "
                        "(images and audio are not imported from Hugging Face sources).",
                        metadata={"source": self.source.uri, "row": str(n)},
                        violations=[FieldViolation(self.source.field, f"row {n}: {exc}")],
                    ) from None
                sink.write(line.encode() + b"\n")
                if limit and n >= limit:
                    break
        return sink.size, sink.digest.hexdigest()


class UnreadableSource:
    """Stands in for the reader of an import that cannot resume, so it ends FAILED with `message`."""

    def __init__(self, message: str) -> None:
        self.message = message

    def check(self) -> None:
        raise TuneForgeError(self.message)

    def fetch(self, dest: Path, work_dir: Path, cancelled: threading.Event) -> tuple[int, str]:
        raise TuneForgeError(self.message)
