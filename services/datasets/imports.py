"""CreateDataset: a dataset imported in the background from S3, GCS or Hugging Face (sources.py).

An import records a PROCESSING dataset at once and fills it in the background: the source is read to a
temp file and goes through the same pipeline as an upload (`UploadManager.process`); one transaction then
turns the row READY or FAILED. The request, credentials included, waits sealed under the dataset's prefix
until then (IMPORT_MANIFEST), so a restarted service resumes the import; whatever the way an import ends,
its temp files and the objects it stored are removed, and so is the sealed request.

Imports run on a pool of their own (`ImportManager.pool`, TUNEFORGE_IMPORT_WORKERS places), never on the
threads the database or other services use: at most that many imports check, read or process their
sources at once, each holding one place from its check to its end, and one more CreateDataset is refused
at once with RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) naming the setting. Every S3/GCS read has connect and
read timeouts (TUNEFORGE_IMPORT_CONNECT_TIMEOUT_S / _READ_TIMEOUT_S), so a source that never answers fails
its import and gives its place back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
from collections.abc import Awaitable
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session
from tuneforge.v1 import dataset_service_pb2

from services.datasets.cleanup import delete_objects, succeeded, to_the_end
from services.datasets.converters import report_to_proto
from services.datasets.domain import (
    DatasetFormat,
    DatasetRecord,
    DatasetState,
    SplitPlan,
    Statistics,
    UploadSpec,
)
from services.datasets.processing import dataset_prefix, source_key
from services.datasets.repository import DatasetRepository
from services.datasets.sources import (
    EndpointAllowlist,
    FetchSettings,
    ImportRequest,
    Source,
    SourceReader,
    UnreadableSource,
    import_request_from_proto,
    open_reader,
    parse_source,
)
from services.datasets.uploads import UploadManager, invalid_dataset, request_fingerprint
from services.kit.credentials import CredentialCipher, CredentialsKeyError
from services.kit.outbox import utcnow
from services.kit.pools import BoundedPool, Slot
from services.kit.tasks import cancel_and_wait
from tuneforge_core.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    TuneForgeError,
    Violations,
    full_storage,
)
from tuneforge_core.ids import new_id

log = logging.getLogger(__name__)
T = TypeVar("T")

IMPORT_MANIFEST = "import-request.sealed"


def _as_create_fields(exc: TuneForgeError) -> TuneForgeError:
    """The error with UploadDatasetMetadata's field paths ("metadata.name") renamed to the paths of
    CreateDatasetRequest ("name"), whose fields carry the same names at the top level."""
    exc.message = exc.message.replace("metadata.", "")
    exc.violations = [FieldViolation(v.field.removeprefix("metadata."), v.description)
                      for v in exc.violations]
    return exc


async def _until_done(work: Awaitable[T], stop: threading.Event) -> T:
    """to_the_end for a fetch: on cancellation it first tells the thread to stop (the fetch checks `stop`
    on every chunk), so a cancelled import ends within a chunk rather than a whole download."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await task
        raise


class ImportManager:
    """Starts, runs, resumes and stops imports; the rules of their metadata are the upload's."""

    def __init__(self, uploads: UploadManager) -> None:
        self.uploads = uploads
        self.db = uploads.db
        self.store = uploads.store
        self.settings = uploads.settings
        # One place per import, from its check to its end; the import's blocking calls run on these threads.
        self.pool = BoundedPool("dataset imports", self.settings.import_workers, 0,
                                setting="TUNEFORGE_IMPORT_WORKERS")
        # Running imports by dataset id, each with the event that stops its fetch thread.
        self.running: dict[str, tuple[asyncio.Task[None], threading.Event]] = {}

    @cached_property
    def _cipher(self) -> CredentialCipher:
        return CredentialCipher.from_settings(self.settings.credentials_key.get_secret_value(),
                                              self.settings.data_dir)

    def _fetch_settings(self) -> FetchSettings:
        return FetchSettings(limit=self.settings.max_upload_bytes,
                             multipart_threshold=self.settings.import_multipart_threshold_bytes,
                             multipart_chunk=self.settings.import_multipart_chunk_bytes,
                             connect_timeout=self.settings.import_connect_timeout_s,
                             read_timeout=self.settings.import_read_timeout_s)

    def check(self, request: ImportRequest) -> tuple[SplitPlan, Source]:
        """Every problem of a CreateDataset request at once: the upload rules, then the source's."""
        v = Violations()
        plan: SplitPlan | None = None
        try:
            plan = self.uploads.check_upload(request.spec, upload=True)
        except InvalidArgument as exc:
            v.items.extend(_as_create_fields(exc).violations)
        source = parse_source(v, request.source, request.credentials, self.settings.hf_local_root,
                              EndpointAllowlist.parse(self.settings.import_endpoint_allowlist))
        v.raise_if_any("invalid CreateDataset request")
        assert plan is not None and source is not None
        return plan, source

    async def create(self, request: ImportRequest, manifest: bytes) -> DatasetRecord:
        """Checks the request and that the source can be read, records a PROCESSING dataset and starts
        the import; or returns the dataset an earlier call with the same request_id created.

        `manifest` is the request as the caller sent it (secrets included); it is stored sealed only.
        RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) at once when TUNEFORGE_IMPORT_WORKERS imports already run.
        """
        plan, source = self.check(request)
        spec = replace(request.spec, filename=source.uri)
        try:
            existing = await self.db.run(lambda s: self.uploads.precheck(s, spec))
        except AlreadyExists as exc:
            raise _as_create_fields(exc) from None
        if existing is not None:
            return existing
        slot = self.pool.reserve()
        started = False
        try:
            created, started = await self._create(request, source, spec, plan, manifest, slot)
            return created
        finally:
            if not started:
                slot.release()

    async def _create(self, request: ImportRequest, source: Source, spec: UploadSpec, plan: SplitPlan,
                      manifest: bytes, slot: Slot) -> tuple[DatasetRecord, bool]:
        """create() within its place in the pool; True when the import started, and took the place over."""
        # The tokenizer is checked as an upload checks it (a model reference this deployment allows, that
        # loads from a local folder or this machine's Hugging Face cache), before the source is read.
        try:
            await self.uploads.check_tokenizer(spec, slot)
        except InvalidArgument as exc:
            raise _as_create_fields(exc) from None
        reader = open_reader(source, request.credentials, self._fetch_settings())
        await to_the_end(slot.run(reader.check))
        now = utcnow()
        dataset_id = new_id("ds")
        record = DatasetRecord(
            id=dataset_id, organization=spec.organization, name=spec.name, description=spec.description,
            state=DatasetState.PROCESSING,
            # A placeholder until the content is read; Dataset.format shows UNSPECIFIED while PROCESSING.
            format=spec.format or DatasetFormat.OPENAI_CHAT,
            source_filename=source.uri, source_key=source_key(spec.organization, dataset_id), size_bytes=0,
            sha256="", statistics=Statistics(), splits=(), error_count=0, warning_count=0, split_plan=plan,
            create_time=now, update_time=now, request_id=spec.request_id, options=spec.options,
            request_fingerprint=request_fingerprint(spec) if spec.request_id else "")
        prefix = dataset_prefix(spec.organization, dataset_id)
        insert: asyncio.Future[DatasetRecord] | None = None
        try:
            sealed = self._cipher.seal(manifest)
            await to_the_end(slot.run(self.store.put_bytes, prefix + IMPORT_MANIFEST, sealed))
            insert = asyncio.ensure_future(self.db.run(lambda s: self.uploads.insert(s, record, b"")))
            try:
                created, new = await self.uploads.inserted(spec, insert)
            except AlreadyExists as exc:
                raise _as_create_fields(exc) from None
            if not new:
                return created, False
        finally:
            if not succeeded(insert):
                await to_the_end(slot.run(delete_objects, self.store, prefix))
        self.uploads.notify()
        log.info("dataset %s: importing from %s", created.id, source.uri)
        self._start(created, spec, plan, reader, slot)
        return created, True

    def _start(self, record: DatasetRecord, spec: UploadSpec, plan: SplitPlan, reader: SourceReader,
               slot: Slot) -> None:
        """Runs the import in the background; it gives `slot` back when it ends, however it ends."""
        stop = threading.Event()
        task = asyncio.create_task(self._run(record, spec, plan, reader, stop, slot),
                                   name=f"import-{record.id}")
        self.running[record.id] = (task, stop)

        def ended(_: asyncio.Task[None]) -> None:
            self.running.pop(record.id, None)
            slot.release()

        task.add_done_callback(ended)

    async def _run(self, record: DatasetRecord, spec: UploadSpec, plan: SplitPlan,
                   reader: SourceReader, stop: threading.Event, slot: Slot) -> None:
        prefix = dataset_prefix(record.organization, record.id)
        keep = prefix + IMPORT_MANIFEST
        report_bytes = b""
        try:
            tmp_dir = self.uploads.tmp_dir
            tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="import-") as work_name:
                work = Path(work_name)
                (work / "process").mkdir()
                size, digest = await _until_done(slot.run(
                    reader.fetch, work / "source.jsonl", work, stop), stop)
                await self.db.run(lambda s: self.uploads.check_quota(s, record.organization, size))
                processed = await to_the_end(slot.run(
                    self.uploads.process, work / "source.jsonl", work / "process", spec, plan, prefix))
            report = processed.report
            report_bytes = report_to_proto(report, record.id).SerializeToString()
            failure = "" if report.valid else invalid_dataset(spec.name, report).message
            done = replace(record, state=DatasetState.READY if report.valid else DatasetState.FAILED,
                           format=report.format, size_bytes=size, sha256=digest, statistics=report.statistics,
                           splits=processed.splits, error_count=report.error_count,
                           warning_count=report.warning_count, failure_message=failure,
                           source_key=source_key(record.organization, record.id, processed.kind))
        except asyncio.CancelledError:
            # Shutdown: nothing of this run is kept but the sealed request, from which a restart resumes.
            await to_the_end(slot.run(self._delete_objects_but, prefix, keep))
            raise
        except TuneForgeError as exc:
            done = replace(record, state=DatasetState.FAILED, failure_message=exc.message)
        except Exception as exc:
            incident = new_id("err")
            log.exception("dataset %s: import failed (incident %s)", record.id, incident)
            full = full_storage(exc)
            why = f"the server's {full} is full; import it again later" if full else "an internal error"
            done = replace(record, state=DatasetState.FAILED,
                           failure_message=f"The import failed on {why}; the server logged it as "
                                           f"incident {incident}.")
        done = replace(done, update_time=utcnow())
        try:
            kept = await to_the_end(self.db.run(lambda s: self._finish(s, done, report_bytes)))
        except Exception:
            # The row stays PROCESSING beside its sealed request, so the next start imports it again.
            log.exception("dataset %s: could not record the end of its import", record.id)
            await to_the_end(slot.run(self._delete_objects_but, prefix, keep))
            return
        ready = kept and done.state is DatasetState.READY
        # A READY dataset keeps its objects but the sealed request; any other end keeps nothing.
        await to_the_end(slot.run(delete_objects, self.store, keep if ready else prefix))
        if kept:
            self.uploads.notify()
        log.info("dataset %s: import ended %s", record.id, done.state.value if kept else "(dataset deleted)")

    def _delete_objects_but(self, prefix: str, keep: str) -> None:
        """Deletes the objects under `prefix` except `keep` (best effort, like delete_objects)."""
        try:
            for key in self.store.list_keys(prefix):
                if key != keep:
                    self.store.delete_prefix(key)
        except Exception:
            log.exception("could not delete objects under %s; they are orphaned", prefix)

    def _finish(self, session: Session, done: DatasetRecord, report: bytes) -> bool:
        """Replaces the PROCESSING row by the final one and announces it; False if the dataset was deleted
        (or finished) meanwhile. Delete-and-insert reuses the repository's full mapping of a record."""
        repo = DatasetRepository(session)
        current = repo.find(done.organization, done.id)
        if current is None or current.state is not DatasetState.PROCESSING:
            return False
        repo.delete(done.organization, done.id)
        # The description may have been updated while the import ran.
        created = repo.insert(replace(done, description=current.description), report)
        repo.add_changed(created, self.store.uri)
        return True

    async def resume(self) -> int:
        """Restarts the imports an earlier run of the service left PROCESSING (it stopped or crashed
        mid-import), from their sealed requests; returns how many. Call once when the service starts.

        A resumed import waits for a place in the pool rather than being refused (it was accepted before).
        An import that cannot be resumed (its request no longer opens with this server's key, or no
        longer passes the checks) ends FAILED; a sealed request whose dataset is gone or finished is
        deleted.
        """
        storage = self.uploads.storage
        keys = await storage.run(self.store.list_keys, "datasets/")
        resumed = 0
        for key in keys:
            org, _, rest = key.removeprefix("datasets/").partition("/")
            dataset_id, _, name = rest.partition("/")
            if name != IMPORT_MANIFEST or dataset_id in self.running:
                continue
            record = await self._find(org, dataset_id)
            if record is None or record.state is not DatasetState.PROCESSING:
                await storage.run(delete_objects, self.store, key)
                continue
            try:
                sealed = await storage.run(self.store.get_bytes, key)
                request = import_request_from_proto(
                    dataset_service_pb2.CreateDatasetRequest.FromString(self._cipher.open(sealed)))
                plan, source = self.check(request)
            except (CredentialsKeyError, TuneForgeError) as exc:
                message = exc.message if isinstance(exc, TuneForgeError) else str(exc)
                log.warning("dataset %s: import cannot resume: %s", dataset_id, message)
                reader = UnreadableSource(f"The import was interrupted and cannot resume: {message}")
                self._start(record, UploadSpec(record.organization), record.split_plan, reader,
                            await self.pool.reserve_waiting())
                continue
            spec = replace(request.spec, filename=source.uri)
            log.info("dataset %s: resuming the import from %s", dataset_id, source.uri)
            self._start(record, spec, plan, open_reader(source, request.credentials, self._fetch_settings()),
                        await self.pool.reserve_waiting())
            resumed += 1
        return resumed

    async def _find(self, organization: str, dataset_id: str) -> DatasetRecord | None:
        return await self.db.run(lambda s: DatasetRepository(s).find(organization, dataset_id))

    async def close(self) -> None:
        """Stops the running imports (at shutdown): each removes what it stored but its sealed request."""
        await cancel_and_wait([task for task, _ in self.running.values()])
