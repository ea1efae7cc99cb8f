"""Object storage behind one interface: a local folder (the embedded default) or S3 through boto3.

Objects are addressed by keys ("datasets/acme/ds_x/train.jsonl") inside a store, and handed between
processes as URIs (file:///abs/path or s3://bucket/key) that any process with the same store settings can
read. Writes are atomic: a reader never sees half an object.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from tuneforge_core.errors import InvalidArgument


def _check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or "//" in key or any(p in ("..", ".") for p in parts) or "\\" in key:
        raise InvalidArgument(f"invalid object key '{key}'")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, its size, and a version that changes whenever its content does (the S3
    ETag; the local file's modification time and inode)."""

    key: str
    size: int
    version: str


class ObjectStore(ABC):
    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """The objects whose keys start with `prefix`, by key, with their sizes and versions."""

    @abstractmethod
    def open_object(self, key: str) -> BinaryIO:
        """The object's content as a stream (close it); FileNotFoundError when there is none."""

    def presigned_get_url(self, key: str, ttl_s: int, filename: str = "") -> str | None:
        """A URL that GETs the object without credentials for `ttl_s` seconds, or None where the store
        cannot make one (a local folder: the platform serves those downloads itself)."""
        return None

    @abstractmethod
    def key_of(self, uri: str) -> str:
        """The key of a URI inside this store; InvalidArgument when the URI is not in it."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> str: ...

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> Path: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    def put_bytes(self, key: str, data: bytes) -> str:
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(key, Path(tmp.name))
        finally:
            os.unlink(tmp.name)

    def get_bytes(self, key: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return self.get_file(key, Path(tmp) / "object").read_bytes()

    def put_dir(self, prefix: str, directory: Path) -> str:
        """Uploads every file under `directory`; returns the URI of the prefix."""
        prefix = prefix.rstrip("/")
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                self.put_file(f"{prefix}/{path.relative_to(directory).as_posix()}", path)
        return self.uri(prefix)

    def get_dir(self, prefix: str, dest: Path) -> Path:
        prefix = prefix.rstrip("/")
        keys = self.list_keys(prefix + "/")
        if not keys:
            raise FileNotFoundError(f"no objects under {self.uri(prefix)}")
        for key in keys:
            self.get_file(key, dest / key[len(prefix) + 1:])
        return dest


class LocalObjectStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def local_path(self, key: str) -> Path:
        """The file of `key`, symlinks resolved; InvalidArgument when that lands outside the root."""
        path = self._path(key).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"invalid object key '{key}'")
        return path

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        out = []
        for key in self.list_keys(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            out.append(ObjectInfo(key, st.st_size, f"{st.st_mtime_ns}-{st.st_ino}"))
        return out

    def open_object(self, key: str) -> BinaryIO:
        path = self.local_path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object {path.as_uri()}")
        return path.open("rb")

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        path = Path(unquote(parsed.path)).resolve() if parsed.scheme == "file" else None
        if path is None or not path.is_relative_to(self.root):
            raise InvalidArgument(f"'{uri}' is not inside the object store {self.root.as_uri()}")
        return path.relative_to(self.root).as_posix()

    def put_file(self, key: str, path: Path) -> str:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target.as_uri()

    def get_file(self, key: str, dest: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(f"no object {source.as_uri()}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        return dest

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix.strip("/") else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        # os.walk, not Path.rglob: a folder removed while it is walked (a checkpoint the trainer prunes
        # while its job's artifacts are listed) is skipped, where rglob raised FileNotFoundError.
        keys = []
        for folder, _, names in os.walk(start):
            here = Path(folder)
            keys += [(here / n).relative_to(self.root).as_posix() for n in names
                     if not n.startswith(".tmp-") and (here / n).is_file()]
        return sorted(k for k in keys if k.startswith(prefix))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        target = self.root / prefix.rstrip("/")
        if prefix.endswith("/") and target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        return len(keys)


class S3ObjectStore(ObjectStore):
    """S3 or any S3-compatible server; large files go up as multipart uploads (boto3's transfer manager)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "us-east-1",
                 client: Any = None) -> None:
        import boto3  # imported lazily: local-only deployments never load it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        from botocore.config import Config

        # SigV4 for everything, presigned URLs included (botocore would presign with the legacy SigV2).
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region,
                                             config=Config(signature_version="s3v4"))

    def _full(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        head = len(self.prefix) + 1 if self.prefix else 0
        out: list[ObjectInfo] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=full_prefix):
            out.extend(ObjectInfo(obj["Key"][head:], int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
                       for obj in page.get("Contents", []))
        return sorted(out, key=lambda o: o.key)

    def open_object(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            body: BinaryIO = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no object {self.uri(key)}") from exc
            raise
        return body

    def presigned_get_url(self, key: str, ttl_s: int, filename: str = "") -> str | None:
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        url: str = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)
        return url

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        full = parsed.path.lstrip("/")
        head = f"{self.prefix}/" if self.prefix else ""
        if parsed.scheme != "s3" or parsed.netloc != self.bucket or not full.startswith(head):
            raise InvalidArgument(f"'{uri}' is not inside the object store s3://{self.bucket}/{self.prefix}")
        return full[len(head):]

    def put_file(self, key: str, path: Path) -> str:
        self.client.upload_file(str(path), self.bucket, self._full(key))
        return self.uri(key)

    def get_file(self, key: str, dest: Path) -> Path:
        from botocore.exceptions import ClientError

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._full(key), tmp)
            os.replace(tmp, dest)
        except ClientError as exc:
            Path(tmp).unlink(missing_ok=True)
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no object {self.uri(key)}") from exc
            raise
        return dest

    def list_keys(self, prefix: str) -> list[str]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        head = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=full_prefix):
            keys.extend(obj["Key"][head:] for obj in page.get("Contents", []))
        return sorted(keys)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except ClientError:
            return False

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._full(k)} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)


def open_store(url: str, *, endpoint_url: str = "", region: str = "us-east-1") -> ObjectStore:
    """file:///abs/folder or s3://bucket[/prefix]."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalObjectStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        return S3ObjectStore(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region)
    raise ValueError(f"unsupported storage URL '{url}': use file:///path or s3://bucket/prefix")


def store_from_settings(settings: Any) -> ObjectStore:
    return open_store(settings.resolved_storage_url(), endpoint_url=settings.s3_endpoint_url,
                      region=settings.s3_region)
