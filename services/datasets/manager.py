"""The rules of the datasets service, what DatasetServicer calls. Knows nothing of gRPC: takes domain values,
raises kit errors.

`DatasetManager` reads, updates, deletes and re-splits datasets itself; new datasets come from its
`uploads` (uploads.py: UploadDataset, ValidateDataset) and its `imports` (imports.py: CreateDataset).
Blocking work runs on the pools those own (the database's, uploads', imports', storage's), never on the
event loop's default executor that the process' other services share.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from services.datasets.cleanup import delete_objects, succeeded, to_the_end
from services.datasets.converters import report_to_proto
from services.datasets.domain import DatasetRecord, DatasetState, SplitConfig, SplitPlan, ValidationReport
from services.datasets.imports import ImportManager
from services.datasets.job_usage import JobUsageRepository
from services.datasets.processing import dataset_prefix, resplit, resplit_prefix
from services.datasets.repository import DatasetRepository, ListCursor
from services.datasets.settings import DatasetSettings
from services.datasets.splitting import resolve_split
from services.datasets.uploads import MAX_DATASET_REF, MAX_DESCRIPTION, UploadManager
from services.kit.db import Database
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.pools import Slot
from services.kit.validation import check_organization, check_text
from tuneforge_core.errors import FailedPrecondition, Violations, not_found
from tuneforge_core.ids import new_id
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import ObjectStore

UPDATABLE_FIELDS = ("description",)
# Job ids named in a DATASET_IN_USE error: in its message, and in its "jobs" metadata.
IN_USE_LISTED = 5
IN_USE_METADATA = 20


def _check_ref(organization: str, ref: str) -> None:
    v = Violations()
    check_organization(v, organization)
    v.check(bool(ref), "dataset", "is required (a dataset id or name)")
    v.check(len(ref) <= MAX_DATASET_REF, "dataset",
            f"must be a dataset id or name (at most {MAX_DATASET_REF} characters)")
    v.raise_if_any("invalid request")


def _in_use(record: DatasetRecord, jobs: list[str]) -> FailedPrecondition:
    more = len(jobs) - IN_USE_LISTED
    listed = ", ".join(jobs[:IN_USE_LISTED]) + (f" and {more} more" if more > 0 else "")
    return FailedPrecondition(
        f"dataset '{record.name}' is used by jobs that have not ended ({listed}); cancel them "
        "or wait for them to end, then delete it",
        reason=Reason.DATASET_IN_USE, metadata={"jobs": ",".join(jobs[:IN_USE_METADATA])})


async def _never_caught_up() -> bool:
    return False


class DatasetManager:
    def __init__(self, db: Database, store: ObjectStore, settings: DatasetSettings,
                 notify: Callable[[], None] = lambda: None,
                 job_events_applied: Callable[[], Awaitable[bool]] = _never_caught_up) -> None:
        self.db = db
        self.store = store
        self.settings = settings
        # Called after a commit that added events, so the outbox relay sends them now.
        self.notify = notify
        # Waits until the JobChanged events already published are applied to the job usage table; False
        # when that cannot be known in time (job_usage.JobUsageConsumer.caught_up).
        self.job_events_applied = job_events_applied
        self.uploads = UploadManager(db, store, settings, notify)
        self.imports = ImportManager(self.uploads)
        self.tmp_dir = self.uploads.tmp_dir

    # -- reads -----------------------------------------------------------------------------------------

    async def get(self, organization: str, ref: str) -> DatasetRecord:
        _check_ref(organization, ref)
        record = await self.db.run(lambda s: DatasetRepository(s).find(organization, ref))
        if record is None:
            raise not_found("dataset", ref, organization)
        return record

    async def list(self, organization: str, requested_page_size: int, page_token: str,
                   state: DatasetState | None) -> tuple[list[DatasetRecord], str]:
        """Newest first; the token is bound to the organization and the state filter."""
        v = Violations()
        check_organization(v, organization)
        v.raise_if_any("invalid request")
        size = page_size(requested_page_size)
        query = {"organization": organization, "state": state.value if state else ""}
        # [create_time, id] of the last dataset returned, as the repository takes it.
        after: ListCursor | None = decode_token(page_token, query, cursor_type=tuple[datetime, str])
        records = await self.db.run(lambda s: DatasetRepository(s).list(
            organization, state=state, after=after, limit=size + 1))
        if len(records) <= size:
            return records, ""
        records = records[:size]
        last = records[-1]
        return records, encode_token([last.create_time.isoformat(), last.id], query)

    async def validation_report(self, organization: str, ref: str) -> tuple[DatasetRecord, ValidationReport]:
        record = await self.get(organization, ref)
        return record, await self.uploads.stored_report(record)

    # -- changes ---------------------------------------------------------------------------------------

    async def update(self, organization: str, ref: str, description: str,
                     paths: Sequence[str]) -> DatasetRecord:
        """Only the description changes; an empty mask means every updatable field (AIP-134)."""
        _check_ref(organization, ref)
        v = Violations()
        for path in paths:
            v.check(path in UPDATABLE_FIELDS, "update_mask",
                    f"'{path}' cannot be updated; only {', '.join(UPDATABLE_FIELDS)} can")
        check_text(v, description, "description", max_chars=MAX_DESCRIPTION)
        v.raise_if_any("invalid update")

        def apply(session: Session) -> DatasetRecord:
            repo = DatasetRepository(session)
            current = repo.find(organization, ref)
            if current is None:
                raise not_found("dataset", ref, organization)
            updated = repo.update_description(organization, current.id, description)
            assert updated is not None
            repo.add_changed(updated, self.store.uri)
            return updated

        record = await self.db.run(apply)
        self.notify()
        return record

    async def delete(self, organization: str, ref: str) -> DatasetRecord:
        """Deletes the row and announces it in one transaction, then the objects (best effort: orphaned
        objects are harmless, a row pointing at deleted objects would not be).

        Refused (FAILED_PRECONDITION, DATASET_IN_USE, metadata "jobs") while jobs that have not ended train
        or validate on the dataset. This service knows that from the JobChanged events (job_usage.py), not
        by asking the jobs service, which calls this one. Before refusing, it waits until the events already
        in the stream are applied, so a job the caller just saw end does not block the delete. The window
        left: a delete right after CreateJob, before that job's first JobChanged reached the stream, is not
        refused, and the job then fails when its worker finds the split files gone.
        """
        _check_ref(organization, ref)

        def apply(session: Session) -> DatasetRecord:
            repo = DatasetRepository(session)
            current = repo.find(organization, ref)
            if current is None:
                raise not_found("dataset", ref, organization)
            users = JobUsageRepository(session).active_jobs_using(organization, current.id)
            if users:
                raise _in_use(current, users)
            repo.delete(organization, current.id)
            repo.add_changed(current, self.store.uri, deleted=True)
            return current

        try:
            record = await self.db.run(apply)
        except FailedPrecondition as exc:
            if exc.reason != Reason.DATASET_IN_USE or not await self.job_events_applied():
                raise
            record = await self.db.run(apply)  # refused again if the jobs still have not ended
        self.notify()
        await self.uploads.storage.run(delete_objects, self.store, dataset_prefix(organization, record.id))
        return record

    async def split(self, organization: str, ref: str, config: SplitConfig) -> DatasetRecord:
        """Re-splits a READY dataset from its stored source into new, never-overwritten split files, on the
        uploads' pool: RESOURCE_EXHAUSTED at once when TUNEFORGE_PROCESSING_WORKERS of them already run."""
        _check_ref(organization, ref)
        v = Violations()
        plan = resolve_split(config, v, "split")
        v.raise_if_any("invalid split")
        record = await self.get(organization, ref)
        if record.state is not DatasetState.READY:
            raise FailedPrecondition(f"Dataset '{record.name}' is {record.state.value}, not READY.",
                                     reason=Reason.DATASET_NOT_READY,
                                     metadata={"dataset_id": record.id, "state": record.state.value})
        prefix = resplit_prefix(organization, record.id, new_id("v"))
        with self.uploads.processing.reserve() as slot:
            return await self._split(organization, ref, record, plan, prefix, slot)

    async def _split(self, organization: str, ref: str, record: DatasetRecord, plan: SplitPlan, prefix: str,
                     slot: Slot) -> DatasetRecord:
        commit: asyncio.Future[DatasetRecord | None] | None = None
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            stored = await self.uploads.stored_report(record)
            with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="resplit-") as work:
                processed = await to_the_end(slot.run(
                    resplit, stored, work_dir=Path(work), store=self.store,
                    prefix=dataset_prefix(organization, record.id), split_prefix=prefix, plan=plan,
                    source_key=record.source_key))
            report_bytes = report_to_proto(processed.report, record.id).SerializeToString()

            def apply(session: Session) -> DatasetRecord | None:
                repo = DatasetRepository(session)
                updated = repo.replace_splits(organization, record.id, plan, processed.splits,
                                              processed.report.statistics, report_bytes)
                if updated is not None:
                    repo.add_changed(updated, self.store.uri)
                return updated

            commit = asyncio.ensure_future(self.db.run(apply))
            updated = await to_the_end(commit)
            if updated is None:
                raise not_found("dataset", ref, organization)  # deleted meanwhile
        finally:
            if not (succeeded(commit) and commit is not None and commit.result() is not None):
                await to_the_end(slot.run(delete_objects, self.store, prefix))
        self.notify()
        return updated

    async def close(self) -> None:
        """Stops the running imports (see ImportManager.close), then lets the pools' threads end."""
        await self.imports.close()
        for pool in (self.imports.pool, self.uploads.processing, self.uploads.storage):
            pool.shutdown()
