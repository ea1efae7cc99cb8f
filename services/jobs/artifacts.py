"""A job's artifacts as GetJobArtifacts answers them: what is stored under the job's output prefix, each
file with its size, SHA-256 and a download URL that expires.

Where things are (the worker's layout, trainer_worker/agent.py and trainer_worker/checkpointing.py):
`jobs/<organization>/<job id>/` holds `adapter/` (`model/` for full fine-tuning), `merged/`, and
`checkpoints/checkpoint-<step>/`, a checkpoint counting only once its `COMPLETE` marker is there. The
adapter and merged model are the folders the job's SUCCEEDED output names (the fence in
services.jobs.manager already checked they lie under the job's prefix); they are listed only then, as is
`evaluation/` (evaluation.json) once stored. `logs/` (training.log, the attempts' log lines one after
another) is listed in any state once an attempt stored it.

Checksums are computed here, once: the first listing of an artifact reads it and keeps the result in
`jobs/<organization>/<job id>/manifests/<artifact name>.json`, each file's SHA-256 beside the size and the
store's version of the object (S3 ETag, local mtime and inode) it was computed from. A later listing uses a
file's entry only while size and version still match, so a rewritten file is hashed again, never served
with a stale checksum. Manifests of checkpoints that are gone (pruned while the job ran) are dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from tuneforge.v1 import artifact_pb2, job_pb2

from services.jobs.downloads import DownloadSigner, download_url, safe_filename
from tuneforge_core.errors import FailedPrecondition, InvalidArgument, Unavailable, invalid
from tuneforge_core.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

K = artifact_pb2.ArtifactKind
COMPLETE = "COMPLETE"  # trainer_worker.checkpointing.COMPLETE: the worker's marker of a whole checkpoint
CHECKPOINTS = "checkpoints"
LOGS = "logs"  # the training log (trainer_worker.story: logs/training.log), stored when an attempt ends
EVALUATION = "evaluation"  # evaluation/evaluation.json (trainer_worker.evaluation_report)
TENSORBOARD = "tensorboard"  # TensorBoard event files (trainer_worker.trackers), stored when an attempt ends
MANIFESTS = "manifests"
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 4 * 1024 * 1024
# A running job's checkpoints come and go (the trainer prunes the oldest as it saves the next): a file gone
# between the listing and its hashing sends the whole listing round again, at most this many times.
LIST_ATTEMPTS = 3


class _Vanished(Exception):
    """A listed file was gone when read: the artifacts changed during the listing."""


def job_prefix(job: job_pb2.Job) -> str:
    return f"jobs/{job.organization}/{job.id}/"


@dataclass
class _Found:
    kind: int
    name: str
    key: str  # the artifact folder's key, no trailing "/"
    step: int = 0
    objects: list[ObjectInfo] = field(default_factory=list)


def _checkpoint_step(name: str) -> int | None:
    head, _, digits = name.partition("-")
    return int(digits) if head == "checkpoint" and digits.isdigit() else None


class ArtifactCatalog:
    """Lists artifacts and mints their download URLs: presigned by the store where it can (S3), else
    signed by `signer` for the jobs service's own download server at `base_url`."""

    def __init__(self, store: ObjectStore, *, default_ttl_s: int, signer: DownloadSigner | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.default_ttl_s = default_ttl_s
        self.signer = signer
        # Set once the download server listens (services.jobs.component); empty: no local downloads.
        self.base_url = ""
        self.clock = clock

    def check_request(self, kinds: Sequence[int], ttl_seconds: int, ttl_nanos: int) -> int:
        """The URL lifetime to use, in whole seconds; INVALID_ARGUMENT naming the field otherwise."""
        for i, kind in enumerate(kinds):
            if kind not in K.values() or kind == K.ARTIFACT_KIND_UNSPECIFIED:
                raise invalid(f"kinds[{i}]", "is not an artifact kind")
        if ttl_seconds == 0 and ttl_nanos == 0:
            return self.default_ttl_s
        if not -999_999_999 <= ttl_nanos <= 999_999_999:
            raise invalid("url_ttl.nanos", f"must be between -999999999 and 999999999, got {ttl_nanos}")
        ttl = ttl_seconds + (1 if ttl_nanos > 0 else 0)
        if ttl_seconds < 0 or ttl_nanos < 0 or ttl < 1:
            raise invalid("url_ttl", "must be positive")
        if ttl > self.default_ttl_s:
            raise invalid("url_ttl", f"must be at most {self.default_ttl_s} s "
                                      "(the platform's TUNEFORGE_DOWNLOAD_URL_TTL_S)")
        return ttl

    async def list_artifacts(self, job: job_pb2.Job, kinds: Sequence[int],
                             ttl_s: int) -> list[artifact_pb2.JobArtifact]:
        """The job's artifacts of these kinds (all when empty); hashing happens on a worker thread."""
        return await asyncio.to_thread(self._list, job, set(kinds), ttl_s)

    def _list(self, job: job_pb2.Job, kinds: set[int], ttl_s: int) -> list[artifact_pb2.JobArtifact]:
        """One consistent listing: a checkpoint pruned while it was being hashed is simply not in the
        next round's listing. UNAVAILABLE (retryable) only if every round saw something vanish."""
        prefix = job_prefix(job)
        for _ in range(LIST_ATTEMPTS):
            objects = self.store.list_objects(prefix)
            found = [a for a in self._locate(job, prefix, objects) if not kinds or a.kind in kinds]
            self._drop_stale_manifests(prefix, objects)
            expires_at = int(self.clock()) + ttl_s
            try:
                return [self._artifact(prefix, a, ttl_s, expires_at) for a in found]
            except _Vanished as gone:
                log.info("artifact %s changed while it was listed; listing again", gone)
        raise Unavailable(f"job {job.id}'s artifacts kept changing while they were listed "
                          f"({LIST_ATTEMPTS} tries); try again")

    def _locate(self, job: job_pb2.Job, prefix: str, objects: list[ObjectInfo]) -> list[_Found]:
        found: list[_Found] = []
        if job.state == job_pb2.JOB_STATE_SUCCEEDED:
            for kind, uri in ((K.ARTIFACT_KIND_ADAPTER, job.output.adapter_uri),
                              (K.ARTIFACT_KIND_MERGED_MODEL, job.output.merged_model_uri)):
                key = self._own_key(prefix, uri)
                if key:
                    name = key.rsplit("/", 1)[-1]
                    files = [o for o in objects if o.key.startswith(key + "/")]
                    found.append(_Found(kind, name, key, objects=files))
        checkpoints: dict[int, _Found] = {}
        root = f"{prefix}{CHECKPOINTS}/"
        for obj in objects:
            if not obj.key.startswith(root):
                continue
            folder, _, rest = obj.key[len(root):].partition("/")
            step = _checkpoint_step(folder)
            if step is None or not rest:
                continue
            entry = checkpoints.setdefault(
                step, _Found(K.ARTIFACT_KIND_CHECKPOINT, folder, root + folder, step))
            entry.objects.append(obj)
        for step in sorted(checkpoints):
            entry = checkpoints[step]
            marker = f"{entry.key}/{COMPLETE}"
            if any(o.key == marker for o in entry.objects):
                entry.objects = [o for o in entry.objects if o.key != marker]
                found.append(entry)
        folders = [(K.ARTIFACT_KIND_TRAINING_LOG, LOGS), (K.ARTIFACT_KIND_TENSORBOARD, TENSORBOARD)]
        if job.state == job_pb2.JOB_STATE_SUCCEEDED:
            folders.append((K.ARTIFACT_KIND_EVALUATION_REPORT, EVALUATION))
        for kind, name in folders:
            files = [o for o in objects if o.key.startswith(f"{prefix}{name}/")]
            if files:
                found.append(_Found(kind, name, f"{prefix}{name}", objects=files))
        return found

    def _own_key(self, prefix: str, uri: str) -> str:
        """The key of an output URI when it lies under the job's prefix, else "" (and a warning: the fence
        should have refused it)."""
        if not uri:
            return ""
        try:
            key = self.store.key_of(uri).rstrip("/")
        except InvalidArgument:
            key = ""
        if not key.startswith(prefix) or key == prefix.rstrip("/"):
            log.warning("job output %r is not under %s; not listed", uri, prefix)
            return ""
        return key

    def _drop_stale_manifests(self, prefix: str, objects: list[ObjectInfo]) -> None:
        """Drops the manifests of checkpoints that are no longer complete (pruned, or being rewritten)."""
        root = f"{prefix}{MANIFESTS}/"
        complete = {o.key[len(prefix) + len(CHECKPOINTS) + 1:].split("/")[0] for o in objects
                    if o.key.startswith(f"{prefix}{CHECKPOINTS}/") and o.key.endswith(f"/{COMPLETE}")}
        for obj in objects:
            name = obj.key[len(root):].removesuffix(".json") if obj.key.startswith(root) else ""
            if _checkpoint_step(name) is not None and name not in complete:
                try:
                    self.store.delete_prefix(obj.key)
                except Exception:  # only tidiness is lost
                    log.warning("could not drop the stale manifest %s", obj.key, exc_info=True)

    # -- checksums and URLs ------------------------------------------------------------------------

    def _manifest_key(self, prefix: str, name: str) -> str:
        return f"{prefix}{MANIFESTS}/{name}.json"

    def _read_manifest(self, key: str) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.store.get_bytes(key))
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            log.warning("ignoring the unreadable manifest %s", key)
            return {}
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def _sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.store.open_object(key) as stream:
            for block in iter(lambda: stream.read(HASH_CHUNK_BYTES), b""):
                digest.update(block)
        return digest.hexdigest()

    def _checksums(self, prefix: str, found: _Found) -> dict[str, str]:
        """Each file's SHA-256, from the manifest where it still matches, else computed (and kept)."""
        manifest_key = self._manifest_key(prefix, found.name)
        cached = self._read_manifest(manifest_key)
        out: dict[str, str] = {}
        entries: dict[str, dict[str, object]] = {}
        changed = False
        for obj in found.objects:
            path = obj.key[len(found.key) + 1:]
            entry = cached.get(path)
            if (isinstance(entry, dict) and entry.get("size") == obj.size
                    and entry.get("version") == obj.version and isinstance(entry.get("sha256"), str)):
                sha = str(entry["sha256"])
            else:
                try:
                    sha = self._sha256(obj.key)
                except FileNotFoundError:
                    raise _Vanished(found.name) from None
                changed = True
            out[path] = sha
            entries[path] = {"size": obj.size, "version": obj.version, "sha256": sha}
        if changed or set(cached) != set(entries):
            body = json.dumps({"version": MANIFEST_VERSION, "files": entries}, sort_keys=True).encode()
            try:
                self.store.put_bytes(manifest_key, body)
            except Exception:  # the checksums are right; they are only computed again next time
                log.warning("could not store the manifest %s", manifest_key, exc_info=True)
        return out

    def _url(self, key: str, ttl_s: int, expires_at: int) -> str:
        presigned = self.store.presigned_get_url(key, ttl_s, safe_filename(key))
        if presigned is not None:
            return presigned
        if self.signer is None or not self.base_url:
            raise FailedPrecondition("this jobs service does not serve downloads (no download server)")
        return download_url(self.base_url, self.signer.sign(key, expires_at))

    def _artifact(self, prefix: str, found: _Found, ttl_s: int, expires_at: int) -> artifact_pb2.JobArtifact:
        checksums = self._checksums(prefix, found)
        expire_time = Timestamp(seconds=expires_at)
        artifact = artifact_pb2.JobArtifact(kind=found.kind, name=found.name, step=found.step)  # type: ignore[arg-type]
        for obj in sorted(found.objects, key=lambda o: o.key):
            path = obj.key[len(found.key) + 1:]
            artifact.files.append(artifact_pb2.ArtifactFile(
                path=path, size_bytes=obj.size, sha256=checksums[path],
                download_url=self._url(obj.key, ttl_s, expires_at), expire_time=expire_time))
            artifact.size_bytes += obj.size
        return artifact
