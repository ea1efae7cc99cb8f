"""Downloading a job's artifacts over the URLs GetJobArtifacts hands out: resumable, and checked.

Each file goes to `<name>.part` first; an interrupted download resumes from the bytes the `.part` file
holds (an HTTP Range request; a server that ignores it sends the whole file again and the `.part` file
starts over). Only a file whose size and SHA-256 match what GetJobArtifacts said is renamed into place; a
mismatch removes the `.part` file and raises `ChecksumMismatch`. A file already in place with the right
checksum is not fetched again, so running the same download twice finishes what the first left.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tuneforge.v1 import artifact_pb2

CHUNK_BYTES = 1024 * 1024
# (file path within the artifact, bytes of it on disk so far): called as bytes arrive.
Progress = Callable[[str, int], None]


class DownloadError(Exception):
    """A download that did not complete; what it got so far stays in the `.part` file for a resume."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class LinkRefused(DownloadError):
    """The server refused the URL (HTTP 403): it expired, or it was not one the platform signed."""


class ChecksumMismatch(DownloadError):
    """The downloaded bytes are not the artifact's: the `.part` file was removed."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
                         "the downloaded file was removed")
        self.path, self.expected, self.actual = path, expected, actual


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def target_of(directory: Path, relative: str) -> Path:
    """Where a file of an artifact goes under `directory`; refuses paths that would leave it."""
    parts = PurePosixPath(relative).parts
    if (not relative or relative.startswith("/") or "\\" in relative
            or any(p in ("", ".", "..") for p in parts)):
        raise DownloadError(f"refusing the artifact file path {relative!r}")
    return directory.joinpath(*parts)


def _complete(path: Path, file: artifact_pb2.ArtifactFile) -> bool:
    return path.is_file() and path.stat().st_size == file.size_bytes and sha256_of(path) == file.sha256


def download_file(file: artifact_pb2.ArtifactFile, target: Path, *, progress: Progress | None = None,
                  context: ssl.SSLContext | None = None, timeout_s: float = 60.0) -> Path:
    """Fetches one file to `target` (resuming `<target>.part`) and checks its SHA-256."""
    report = progress or (lambda _path, _done: None)
    if _complete(target, file):
        report(file.path, file.size_bytes)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > file.size_bytes:
        part.unlink()
        have = 0
    if have < file.size_bytes or not part.exists():
        headers = {"Range": f"bytes={have}-"} if have else {}
        request = urllib.request.Request(file.download_url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
                resumed = have > 0 and response.status == 206 and str(
                    response.headers.get("Content-Range", "")).startswith(f"bytes {have}-")
                have = have if resumed else 0
                report(file.path, have)
                with part.open("ab" if resumed else "wb") as out:
                    for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                        out.write(block)
                        have += len(block)
                        report(file.path, have)
        except urllib.error.HTTPError as err:
            text = err.read(300).decode(errors="replace").strip().splitlines()
            detail = f"HTTP {err.code}" + (f": {text[0]}" if text else "")
            if err.code == 416:  # the .part file does not fit the file any more: start over next time
                part.unlink(missing_ok=True)
            cls = LinkRefused if err.code == 403 else DownloadError
            raise cls(f"download of {file.path} refused ({detail})", err.code) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise DownloadError(f"download of {file.path} interrupted ({reason}); run it again to resume") \
                from None
    else:
        report(file.path, have)
    actual = sha256_of(part)
    if actual != file.sha256 or part.stat().st_size != file.size_bytes:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(file.path, file.sha256, actual)
    os.replace(part, target)
    return target


def download_artifact_files(artifact: artifact_pb2.JobArtifact, directory: Path, *,
                            progress: Progress | None = None,
                            refresh: Callable[[], artifact_pb2.JobArtifact] | None = None,
                            context: ssl.SSLContext | None = None) -> list[Path]:
    """Every file of the artifact into `directory` (its paths below it). A URL refused midway (it expired
    during a long download) is replaced once through `refresh`, which lists the artifact again."""
    out = []
    current = {f.path: f for f in artifact.files}
    for path in [f.path for f in artifact.files]:
        target = target_of(directory, path)
        try:
            out.append(download_file(current[path], target, progress=progress, context=context))
        except LinkRefused:
            if refresh is None:
                raise
            fresh = refresh()
            current = {f.path: f for f in fresh.files}
            if path not in current:
                raise DownloadError(f"{path} is no longer part of {artifact.name}") from None
            out.append(download_file(current[path], target, progress=progress, context=context))
    return out
