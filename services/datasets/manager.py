"""The rules of the datasets service. Knows nothing of gRPC: takes domain values, raises kit errors.

An upload is all or nothing: the bytes go to a temp file, are validated and split in a worker thread,
the objects are stored, and only then one transaction inserts the READY dataset, its splits and its
DatasetChanged event. Any failure on the way (bad data, checksum, size, a lost race for the name, the
client going away) removes the temp file and every object stored so far, and leaves no row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import string
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import IO, Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import dataset_pb2, dataset_service_pb2

from services.datasets.converters import dataset_to_proto, report_from_proto, report_to_proto
from services.datasets.credentials import CredentialCipher, CredentialsKeyError
from services.datasets.domain import (
    DatasetFormat,
    DatasetRecord,
    DatasetState,
    Issue,
    SplitConfig,
    SplitPlan,
    Statistics,
    UploadSpec,
    ValidationReport,
)
from services.datasets.formats import TEMPLATE_FIELDS, same_family
from services.datasets.processing import (
    NORMALIZED,
    Processed,
    ProcessOptions,
    dataset_prefix,
    resplit,
    resplit_prefix,
    source_key,
    validate_and_split,
    validate_only,
)
from services.datasets.repository import DatasetRepository, ListCursor
from services.datasets.settings import DatasetSettings
from services.datasets.sources import (
    FetchSettings,
    ImportRequest,
    Source,
    SourceReader,
    UnreadableSource,
    import_request_from_proto,
    open_reader,
    parse_source,
)
from services.datasets.splitting import DEFAULT_FRACTIONS, EXTERNAL_VALIDATION_FRACTIONS, resolve_split
from services.datasets.tokens import DEFAULT_MAX_LENGTH, load_tokenizer
from services.datasets.validation import CHECKERS, DEFAULT_MIN_EXAMPLES, ISSUE_LIMIT, MAX_ISSUE_LIMIT
from services.kit.db import Database
from services.kit.jobs_client import JobsClient
from services.kit.outbox import utcnow
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.protos import to_timestamp
from services.kit.validation import check_name, check_organization, check_request_id
from tuneforge_core import subjects
from tuneforge_core.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    TuneForgeError,
    Violations,
    not_found,
)
from tuneforge_core.ids import new_id
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_DESCRIPTION = 1024
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
UPDATABLE_FIELDS = ("description",)
# Bytes of BadRequest field violations in a DATASET_INVALID status; see bounded_violations.
VIOLATIONS_BUDGET_BYTES = 5000


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    size_bytes: int
    sha256: str


async def _to_the_end(work: Awaitable[T]) -> T:
    """Awaits `work` even when the caller is cancelled meanwhile (then re-raises the cancellation).

    Threads cannot be stopped: a thread still storing objects or committing after a cancelled RPC gave
    up would escape the cleanup that follows. Waiting for it keeps cleanup after the last write.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


def _succeeded(task: asyncio.Future[Any] | None) -> bool:
    return task is not None and task.done() and not task.cancelled() and task.exception() is None


def _write_chunk(f: IO[bytes], digest: Any, chunk: bytes) -> None:
    f.write(chunk)
    digest.update(chunk)


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _too_large(limit: int, declared: bool) -> ResourceExhausted:
    what = "metadata.size_bytes is" if declared else "The upload is"
    return ResourceExhausted(
        f"{what} larger than this server's upload limit of {_human_bytes(limit)}; "
        "split the file or ask an operator to raise TUNEFORGE_MAX_UPLOAD_BYTES.",
        reason=Reason.UPLOAD_TOO_LARGE, metadata={"limit_bytes": str(limit)},
        violations=[FieldViolation("metadata.size_bytes", f"must be at most {limit}")] if declared else None)


def bounded_violations(errors: Sequence[Issue],
                       budget: int = VIOLATIONS_BUDGET_BYTES) -> list[FieldViolation]:
    """One violation per error, in order, within `budget` bytes: the full sentence while the rest still fit
    with their code alone, else the code alone; errors that do not fit even so are left out.

    The status travels in a trailer, and gRPC clients reject trailers over 8 KiB by default (the call
    then fails with RESOURCE_EXHAUSTED and the caller learns nothing), so the size is bounded here.
    """
    def size(field: str, description: str) -> int:
        return len(field.encode()) + len(description.encode()) + 8  # tags and lengths

    minimal = [size(i.location(), i.code) for i in errors]
    rest = [0] * (len(errors) + 1)
    for k in range(len(errors) - 1, -1, -1):
        rest[k] = rest[k + 1] + minimal[k]
    out: list[FieldViolation] = []
    used = 0
    for k, issue in enumerate(errors):
        full = f"{issue.code}: {issue.message}"
        if used + size(issue.location(), full) + rest[k + 1] <= budget:
            description = full
        elif used + minimal[k] <= budget:
            description = issue.code
        else:
            break
        out.append(FieldViolation(issue.location(), description))
        used += size(issue.location(), description)
    return out


def _invalid_dataset(name: str, report: ValidationReport) -> InvalidArgument:
    violations = bounded_violations(report.errors)
    noun = "error" if report.error_count == 1 else "errors"
    listed = (f"; the first {len(violations)} are listed (ValidateDataset returns the full report)"
              if report.error_count > len(violations) else "")
    first = report.errors[0] if report.errors else None
    first_text = f" First: {first.location()}: {first.message}" if first else ""
    return InvalidArgument(
        f"Dataset '{name}' is invalid: {report.error_count} {noun}{listed}.{first_text}",
        reason=Reason.DATASET_INVALID, violations=violations,
        metadata={"error_count": str(report.error_count), "warning_count": str(report.warning_count),
                  "format": report.format.value})


def _check_options(v: Violations, spec: UploadSpec) -> None:
    """The dataset options, issue limit and column mapping of the upload metadata."""
    options = spec.options
    v.check(options.max_samples is None or options.max_samples >= 1, "metadata.options.max_samples",
            "must be at least 1 (leave it unset to keep every example)")
    v.check(options.max_prompt_length >= 0, "metadata.options.max_prompt_length", "must not be negative")
    if options.prompt_template:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(options.prompt_template)
                     if name is not None}
        except ValueError as exc:
            v.add("metadata.options.prompt_template",
                  f"is not a valid template ({exc}); write literal braces as {{{{ and }}}}")
        else:
            unknown = sorted(names - TEMPLATE_FIELDS)
            v.check(not unknown, "metadata.options.prompt_template",
                    f"uses unknown placeholders {', '.join('{' + n + '}' for n in unknown)}; "
                    "use {prompt} and {system_prompt}")
            v.check("prompt" in names, "metadata.options.prompt_template",
                    "must contain {prompt}, where each prompt goes")
    v.check(spec.issue_limit is None or 1 <= spec.issue_limit <= MAX_ISSUE_LIMIT, "metadata.issue_limit",
            f"must be between 1 and {MAX_ISSUE_LIMIT}")
    for target, column in spec.column_mapping.items():
        v.check(bool(target.strip()) and bool(column.strip()), f"metadata.column_mapping.columns[{target}]",
                "field and column names must not be empty")


def _check_ref(organization: str, ref: str) -> None:
    v = Violations()
    check_organization(v, organization)
    v.check(bool(ref), "dataset", "is required (a dataset id or name)")
    v.raise_if_any("invalid request")


class DatasetManager:
    def __init__(self, db: Database, store: ObjectStore, settings: DatasetSettings,
                 notify: Callable[[], None] = lambda: None, jobs: JobsClient | None = None) -> None:
        self.db = db
        self.store = store
        self.settings = settings
        # Asked before a delete whether jobs that have not ended still need the dataset.
        self.jobs = jobs
        # Called after a commit that added events, so the outbox relay sends them now.
        self.notify = notify
        self.tmp_dir = settings.data_dir.resolve() / "tmp"

    # -- upload and validation -------------------------------------------------------------------------

    def check_upload(self, spec: UploadSpec, *, upload: bool) -> SplitPlan:
        """Every problem of the metadata at once; then the declared size against the limit."""
        v = Violations()
        check_organization(v, spec.organization, "metadata.organization")
        if upload:
            check_name(v, spec.name, "metadata.name")
            check_request_id(v, spec.request_id, "metadata.request_id")
            v.check(len(spec.description) <= MAX_DESCRIPTION, "metadata.description",
                    f"must be at most {MAX_DESCRIPTION} characters")
        if spec.format is not None and spec.format not in CHECKERS:
            v.add("metadata.format", f"{spec.format.value} is not accepted yet; accepted: "
                  f"{', '.join(f.value for f in CHECKERS)} (or leave it unset to detect it)")
        v.check(spec.size_bytes >= 0, "metadata.size_bytes", "must not be negative")
        v.check(not spec.sha256 or bool(SHA256_RE.match(spec.sha256)), "metadata.sha256",
                "must be 64 hexadecimal characters (the SHA-256 of the whole file)")
        v.check(spec.min_examples is None or spec.min_examples >= 1, "metadata.min_examples",
                "must be at least 1")
        v.check(spec.max_length >= 0, "metadata.max_length", "must not be negative")
        _check_options(v, spec)
        if spec.validation_dataset:
            v.check(upload, "metadata.validation_dataset", "is only used by UploadDataset")
            v.check(not spec.split.validation_fraction, "metadata.split.validation_fraction",
                    "must be 0 when metadata.validation_dataset gives the validation examples")
        plan = resolve_split(spec.split, v, "metadata.split", defaults=EXTERNAL_VALIDATION_FRACTIONS
                             if spec.validation_dataset else DEFAULT_FRACTIONS)
        v.raise_if_any("invalid upload metadata")
        if spec.size_bytes > self.settings.max_upload_bytes:
            raise _too_large(self.settings.max_upload_bytes, declared=True)
        return plan

    async def receive(self, spec: UploadSpec, chunks: AsyncIterator[bytes]) -> ReceivedFile:
        """Streams the chunks to a temp file, hashing and counting; the caller deletes the file."""
        limit = self.settings.max_upload_bytes
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = self.tmp_dir / f"upload-{new_id('up')}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with path.open("wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit, declared=False)
                    await _to_the_end(asyncio.to_thread(_write_chunk, f, digest, chunk))
            actual = digest.hexdigest()
            if spec.size_bytes and size != spec.size_bytes:
                raise DataLoss(f"Received {size} bytes, but metadata.size_bytes is {spec.size_bytes}: the "
                               "upload was cut short or the size is wrong; upload it again.",
                               reason=Reason.CHECKSUM_MISMATCH,
                               metadata={"expected_size_bytes": str(spec.size_bytes),
                                         "received_size_bytes": str(size)})
            if spec.sha256 and actual != spec.sha256.lower():
                raise DataLoss(f"The SHA-256 of the {size} bytes received is {actual}, but metadata.sha256 "
                               f"is {spec.sha256.lower()}: the file changed or was corrupted in transit; "
                               "upload it again.", reason=Reason.CHECKSUM_MISMATCH,
                               metadata={"expected_sha256": spec.sha256.lower(), "actual_sha256": actual})
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return ReceivedFile(path, size, actual)

    async def upload(self, spec: UploadSpec,
                     chunks: AsyncIterator[bytes]) -> tuple[DatasetRecord, ValidationReport]:
        """Creates a READY dataset from the stream, or returns the one an earlier call with the same
        request_id created (without reading the stream again)."""
        plan = self.check_upload(spec, upload=True)
        existing = await self.db.run(lambda s: self._precheck(s, spec))
        if existing is not None:
            return existing, await self._stored_report(existing)
        await self.check_tokenizer(spec)
        received = await self.receive(spec, chunks)
        try:
            return await self._create(spec, plan, received)
        finally:
            received.path.unlink(missing_ok=True)

    async def validate(self, spec: UploadSpec, chunks: AsyncIterator[bytes]) -> ValidationReport:
        """Validates the stream and forgets it: the report is the only result."""
        self.check_upload(spec, upload=False)
        await self.check_tokenizer(spec)
        received = await self.receive(spec, chunks)
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="validate-") as work:
                return await _to_the_end(asyncio.to_thread(
                    validate_only, received.path, work_dir=Path(work), opts=self.process_options(spec)))
        finally:
            received.path.unlink(missing_ok=True)

    @staticmethod
    async def check_tokenizer(spec: UploadSpec) -> None:
        """Loads metadata.tokenizer before any byte is read, so a bad one fails the call at once rather
        than after a long upload (processing then finds it in load_tokenizer's cache)."""
        if spec.tokenizer:
            await _to_the_end(asyncio.to_thread(load_tokenizer, spec.tokenizer))

    def process_options(self, spec: UploadSpec) -> ProcessOptions:
        """How the upload's file becomes examples: its metadata, with this server's limits."""
        return ProcessOptions(
            format=spec.format, options=spec.options, column_mapping=dict(spec.column_mapping),
            min_examples=spec.min_examples or DEFAULT_MIN_EXAMPLES,
            issue_limit=spec.issue_limit or ISSUE_LIMIT, max_line_bytes=self.settings.max_line_bytes,
            max_extracted_bytes=self.settings.max_extracted_bytes,
            tokenizer=spec.tokenizer, max_length=spec.max_length or DEFAULT_MAX_LENGTH)

    def _precheck(self, session: Session, spec: UploadSpec) -> DatasetRecord | None:
        repo = DatasetRepository(session)
        existing = repo.find_by_request_id(spec.organization, spec.request_id)
        if existing is not None:
            if existing.name != spec.name or (spec.sha256 and spec.sha256.lower() != existing.sha256):
                raise AlreadyExists(
                    f"request_id '{spec.request_id}' was already used to upload dataset '{existing.name}' "
                    "with different content; use a new request_id for a new upload.",
                    reason=Reason.REQUEST_ID_REUSED,
                    metadata={"request_id": spec.request_id, "dataset_id": existing.id},
                    violations=[FieldViolation("metadata.request_id", "already used for another upload")])
            return existing
        if repo.name_taken(spec.organization, spec.name):
            raise self._name_taken(spec)
        return None

    @staticmethod
    def _name_taken(spec: UploadSpec) -> AlreadyExists:
        return AlreadyExists(
            f"A dataset named '{spec.name}' already exists in organization '{spec.organization}'.",
            metadata={"resource_type": "dataset", "resource": spec.name, "organization": spec.organization},
            violations=[FieldViolation("metadata.name", "already used in this organization")])

    async def _create(self, spec: UploadSpec, plan: SplitPlan,
                      received: ReceivedFile) -> tuple[DatasetRecord, ValidationReport]:
        dataset_id = new_id("ds")
        prefix = dataset_prefix(spec.organization, dataset_id)
        insert: asyncio.Future[DatasetRecord] | None = None
        validation = await self._validation_dataset(spec) if spec.validation_dataset else None
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="process-") as work:
                processed = await _to_the_end(asyncio.to_thread(
                    self._process_upload, received.path, Path(work), spec, plan, prefix, validation))
            report = processed.report
            if not report.valid:
                raise _invalid_dataset(spec.name, report)
            if validation is not None and not same_family(report.format, validation.format):
                raise InvalidArgument(
                    f"The validation dataset '{validation.name}' is {validation.format.value}, which does "
                    f"not normalize to the same shape as this {report.format.value} data.",
                    violations=[FieldViolation("metadata.validation_dataset", "is of another format family")])
            now = utcnow()
            record = DatasetRecord(
                id=dataset_id, organization=spec.organization, name=spec.name,
                description=spec.description, state=DatasetState.READY, format=report.format,
                source_filename=spec.filename,
                source_key=source_key(spec.organization, dataset_id, processed.kind),
                size_bytes=received.size_bytes, sha256=received.sha256, statistics=report.statistics,
                splits=processed.splits, error_count=report.error_count, warning_count=report.warning_count,
                split_plan=plan, create_time=now, update_time=now, request_id=spec.request_id,
                options=spec.options, validation_dataset_id=validation.id if validation else "")
            report_bytes = report_to_proto(report, dataset_id).SerializeToString()
            insert = asyncio.ensure_future(self.db.run(lambda s: self._insert(s, record, report_bytes)))
            try:
                created = await _to_the_end(insert)
            except IntegrityError:
                # Lost a race: the same request_id (return the winner) or the same name.
                winner = await self.db.run(lambda s: DatasetRepository(s).find_by_request_id(
                    spec.organization, spec.request_id))
                if winner is not None:
                    return winner, await self._stored_report(winner)
                raise self._name_taken(spec) from None
            self.notify()
            return created, report
        finally:
            if not _succeeded(insert):
                await _to_the_end(asyncio.to_thread(self._delete_objects, prefix))

    def _process_upload(self, source: Path, work: Path, spec: UploadSpec, plan: SplitPlan, prefix: str,
                        validation: DatasetRecord | None = None) -> Processed:
        """The one pipeline every new dataset goes through, whatever brought its file here: detect the
        container and format, validate, normalize, count tokens, split, and store everything under
        `prefix` (the dataset's). Runs in a worker thread; `work` is a scratch folder it may fill."""
        work.mkdir(parents=True, exist_ok=True)
        validation_file = None
        if validation is not None:
            validation_file = self.store.get_file(
                dataset_prefix(validation.organization, validation.id) + NORMALIZED,
                work / "external-validation.jsonl")
        return validate_and_split(source, work_dir=work, store=self.store, prefix=prefix, split_prefix=prefix,
                                  plan=plan, opts=self.process_options(spec), validation_file=validation_file)

    async def _validation_dataset(self, spec: UploadSpec) -> DatasetRecord:
        """The READY dataset metadata.validation_dataset names."""
        record = await self.db.run(lambda s: DatasetRepository(s).find(spec.organization,
                                                                       spec.validation_dataset))
        if record is None or record.state is not DatasetState.READY:
            why = "was not found" if record is None else f"is {record.state.value}, not READY"
            raise InvalidArgument(
                f"The validation dataset '{spec.validation_dataset}' {why} in organization "
                f"'{spec.organization}'.", violations=[FieldViolation("metadata.validation_dataset", why)])
        return record

    def _insert(self, session: Session, record: DatasetRecord, report: bytes) -> DatasetRecord:
        repo = DatasetRepository(session)
        created = repo.insert(record, report)
        self._add_event(repo, created)
        return created

    def _delete_objects(self, prefix: str) -> None:
        try:
            self.store.delete_prefix(prefix)
        except Exception:
            log.exception("could not delete objects under %s; they are orphaned", prefix)

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
        after = self._cursor(decode_token(page_token, query))
        records = await self.db.run(lambda s: DatasetRepository(s).list(
            organization, state=state, after=after, limit=size + 1))
        if len(records) <= size:
            return records, ""
        records = records[:size]
        last = records[-1]
        return records, encode_token([last.create_time.isoformat(), last.id], query)

    @staticmethod
    def _cursor(raw: Any) -> ListCursor | None:
        if raw is None:
            return None
        try:
            time, last_id = raw
            return datetime.fromisoformat(time), str(last_id)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                "page_token is invalid or belongs to a different query", reason=Reason.INVALID_PAGE_TOKEN,
                violations=[FieldViolation("page_token", "not a token this query returned")]) from exc

    async def validation_report(self, organization: str, ref: str) -> tuple[DatasetRecord, ValidationReport]:
        record = await self.get(organization, ref)
        return record, await self._stored_report(record)

    async def _stored_report(self, record: DatasetRecord) -> ValidationReport:
        data = await self.db.run(lambda s: DatasetRepository(s).validation_report(record.organization,
                                                                                 record.id))
        return report_from_proto(dataset_pb2.ValidationReport.FromString(data))

    # -- changes ---------------------------------------------------------------------------------------

    async def update(self, organization: str, ref: str, description: str,
                     paths: list[str]) -> DatasetRecord:
        """Only the description changes; an empty mask means every updatable field (AIP-134)."""
        _check_ref(organization, ref)
        v = Violations()
        for path in paths:
            v.check(path in UPDATABLE_FIELDS, "update_mask",
                    f"'{path}' cannot be updated; only {', '.join(UPDATABLE_FIELDS)} can")
        v.check(len(description) <= MAX_DESCRIPTION, "description",
                f"must be at most {MAX_DESCRIPTION} characters")
        v.raise_if_any("invalid update")

        def apply(session: Session) -> DatasetRecord:
            repo = DatasetRepository(session)
            current = repo.find(organization, ref)
            if current is None:
                raise not_found("dataset", ref, organization)
            updated = repo.update_description(organization, current.id, description)
            assert updated is not None
            self._add_event(repo, updated)
            return updated

        record = await self.db.run(apply)
        self.notify()
        return record

    async def delete(self, organization: str, ref: str) -> DatasetRecord:
        """Deletes the row and announces it in one transaction, then the objects (best effort: orphaned
        objects are harmless, a row pointing at deleted objects would not be)."""
        _check_ref(organization, ref)
        if self.jobs is not None:
            record = await self.get(organization, ref)
            users = await self.jobs.active_jobs_using(organization, record.id)
            if users:
                listed = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
                raise FailedPrecondition(
                    f"dataset '{record.name}' is used by jobs that have not ended ({listed}); cancel them "
                    "or wait for them to end, then delete it",
                    reason=Reason.DATASET_IN_USE, metadata={"jobs": ",".join(users[:20])})

        def apply(session: Session) -> DatasetRecord:
            repo = DatasetRepository(session)
            current = repo.find(organization, ref)
            if current is None:
                raise not_found("dataset", ref, organization)
            repo.delete(organization, current.id)
            self._add_event(repo, current, deleted=True)
            return current

        record = await self.db.run(apply)
        self.notify()
        await asyncio.to_thread(self._delete_objects, dataset_prefix(organization, record.id))
        return record

    async def split(self, organization: str, ref: str, config: SplitConfig) -> DatasetRecord:
        """Re-splits a READY dataset from its stored source into new, never-overwritten split files."""
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
        commit: asyncio.Future[DatasetRecord | None] | None = None
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            stored = await self._stored_report(record)
            with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="resplit-") as work:
                processed = await _to_the_end(asyncio.to_thread(
                    resplit, stored, work_dir=Path(work), store=self.store,
                    prefix=dataset_prefix(organization, record.id), split_prefix=prefix, plan=plan,
                    source_key=record.source_key))
            report_bytes = report_to_proto(processed.report, record.id).SerializeToString()

            def apply(session: Session) -> DatasetRecord | None:
                repo = DatasetRepository(session)
                updated = repo.replace_splits(organization, record.id, plan, processed.splits,
                                              processed.report.statistics, report_bytes)
                if updated is not None:
                    self._add_event(repo, updated)
                return updated

            commit = asyncio.ensure_future(self.db.run(apply))
            updated = await _to_the_end(commit)
            if updated is None:
                raise not_found("dataset", ref, organization)  # deleted meanwhile
        finally:
            if not (_succeeded(commit) and commit is not None and commit.result() is not None):
                await _to_the_end(asyncio.to_thread(self._delete_objects, prefix))
        self.notify()
        return updated

    def _add_event(self, repo: DatasetRepository, record: DatasetRecord, *, deleted: bool = False) -> None:
        event = events_pb2.DatasetChanged(event_id=new_id("evt"), time=to_timestamp(utcnow()),
                                          dataset=dataset_to_proto(record, self.store.uri), deleted=deleted)
        repo.add_event(subjects.dataset_events(record.id), event, event.event_id)

    # -- imports (CreateDataset) -----------------------------------------------------------------------
    # An import records a PROCESSING dataset at once and fills it in the background: the source is read
    # to a temp file and goes through the same validation and splitting as an upload; one transaction then
    # turns the row READY or FAILED. The request, credentials included, waits sealed under the dataset's
    # prefix until then (IMPORT_MANIFEST), so a restarted service resumes the import; whatever the way an
    # import ends, its temp files and the objects it stored are removed, and so is the sealed request.

    IMPORT_MANIFEST = "import-request.sealed"

    @cached_property
    def _imports(self) -> dict[str, tuple[asyncio.Task[None], threading.Event]]:
        """Running imports by dataset id, each with the event that stops its fetch thread."""
        return {}

    @cached_property
    def _cipher(self) -> CredentialCipher:
        return CredentialCipher.from_settings(self.settings.credentials_key.get_secret_value(),
                                              self.settings.data_dir)

    def _fetch_settings(self) -> FetchSettings:
        return FetchSettings(limit=self.settings.max_upload_bytes,
                             multipart_threshold=self.settings.import_multipart_threshold_bytes,
                             multipart_chunk=self.settings.import_multipart_chunk_bytes)

    @staticmethod
    def _as_create_fields(exc: TuneForgeError) -> TuneForgeError:
        """The error with UploadDatasetMetadata's field paths ("metadata.name") renamed to the paths of
        CreateDatasetRequest ("name"), whose fields carry the same names at the top level."""
        exc.message = exc.message.replace("metadata.", "")
        exc.violations = [FieldViolation(v.field.removeprefix("metadata."), v.description)
                          for v in exc.violations]
        return exc

    def check_import(self, request: ImportRequest) -> tuple[SplitPlan, Source]:
        """Every problem of a CreateDataset request at once: the upload rules, then the source's."""
        v = Violations()
        plan: SplitPlan | None = None
        try:
            plan = self.check_upload(request.spec, upload=True)
        except InvalidArgument as exc:
            v.items.extend(self._as_create_fields(exc).violations)
        source = parse_source(v, request.source, request.credentials, self.settings.hf_local_root)
        v.raise_if_any("invalid CreateDataset request")
        assert plan is not None and source is not None
        return plan, source

    async def create_import(self, request: ImportRequest, manifest: bytes) -> DatasetRecord:
        """Checks the request and that the source can be read, records a PROCESSING dataset and starts
        the import; or returns the dataset an earlier call with the same request_id created.

        `manifest` is the request as the caller sent it (secrets included); it is stored sealed only.
        """
        plan, source = self.check_import(request)
        spec = replace(request.spec, filename=source.uri)
        try:
            existing = await self.db.run(lambda s: self._precheck(s, spec))
        except AlreadyExists as exc:
            raise self._as_create_fields(exc) from None
        if existing is not None:
            return existing
        reader = open_reader(source, request.credentials, self._fetch_settings())
        await _to_the_end(asyncio.to_thread(reader.check))
        now = utcnow()
        dataset_id = new_id("ds")
        record = DatasetRecord(
            id=dataset_id, organization=spec.organization, name=spec.name, description=spec.description,
            state=DatasetState.PROCESSING,
            # A placeholder until the content is read; Dataset.format shows UNSPECIFIED while PROCESSING.
            format=spec.format or DatasetFormat.OPENAI_CHAT,
            source_filename=source.uri, source_key=source_key(spec.organization, dataset_id), size_bytes=0,
            sha256="", statistics=Statistics(), splits=(), error_count=0, warning_count=0, split_plan=plan,
            create_time=now, update_time=now, request_id=spec.request_id, options=spec.options)
        prefix = dataset_prefix(spec.organization, dataset_id)
        insert: asyncio.Future[DatasetRecord] | None = None
        try:
            sealed = self._cipher.seal(manifest)
            await _to_the_end(asyncio.to_thread(self.store.put_bytes, prefix + self.IMPORT_MANIFEST, sealed))
            insert = asyncio.ensure_future(self.db.run(lambda s: self._insert(s, record, b"")))
            try:
                created = await _to_the_end(insert)
            except IntegrityError:
                winner = await self.db.run(lambda s: DatasetRepository(s).find_by_request_id(
                    spec.organization, spec.request_id))
                if winner is not None:
                    return winner
                raise self._as_create_fields(self._name_taken(spec)) from None
        finally:
            if not _succeeded(insert):
                await _to_the_end(asyncio.to_thread(self._delete_objects, prefix))
        self.notify()
        log.info("dataset %s: importing from %s", created.id, source.uri)
        self._start_import(created, spec, plan, reader)
        return created

    def _start_import(self, record: DatasetRecord, spec: UploadSpec, plan: SplitPlan,
                      reader: SourceReader) -> None:
        stop = threading.Event()
        task = asyncio.create_task(self._run_import(record, spec, plan, reader, stop),
                                   name=f"import-{record.id}")
        self._imports[record.id] = (task, stop)
        task.add_done_callback(lambda _: self._imports.pop(record.id, None))

    @staticmethod
    async def _until_done(work: Awaitable[T], stop: threading.Event) -> T:
        """_to_the_end for a fetch: on cancellation it first tells the thread to stop (the fetch checks
        `stop` on every chunk), so a cancelled import ends within a chunk rather than a whole download."""
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(BaseException):
                await task
            raise

    async def _run_import(self, record: DatasetRecord, spec: UploadSpec, plan: SplitPlan,
                          reader: SourceReader, stop: threading.Event) -> None:
        prefix = dataset_prefix(record.organization, record.id)
        report_bytes = b""
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="import-") as work_name:
                work = Path(work_name)
                (work / "process").mkdir()
                size, digest = await self._until_done(asyncio.to_thread(
                    reader.fetch, work / "source.jsonl", work, stop), stop)
                processed = await _to_the_end(asyncio.to_thread(
                    self._process_upload, work / "source.jsonl", work / "process", spec, plan, prefix))
            report = processed.report
            report_bytes = report_to_proto(report, record.id).SerializeToString()
            failure = "" if report.valid else _invalid_dataset(spec.name, report).message
            done = replace(record, state=DatasetState.READY if report.valid else DatasetState.FAILED,
                           format=report.format, size_bytes=size, sha256=digest, statistics=report.statistics,
                           splits=processed.splits, error_count=report.error_count,
                           warning_count=report.warning_count, failure_message=failure,
                           source_key=source_key(record.organization, record.id, processed.kind))
        except asyncio.CancelledError:
            # Shutdown: nothing of this run is kept but the sealed request, from which a restart resumes.
            keep = prefix + self.IMPORT_MANIFEST
            await _to_the_end(asyncio.to_thread(self._delete_import_objects, prefix, keep))
            raise
        except TuneForgeError as exc:
            done = replace(record, state=DatasetState.FAILED, failure_message=exc.message)
        except Exception:
            incident = new_id("err")
            log.exception("dataset %s: import failed (incident %s)", record.id, incident)
            done = replace(record, state=DatasetState.FAILED,
                           failure_message=f"The import failed on an internal error; the server logged it as "
                                           f"incident {incident}.")
        done = replace(done, update_time=utcnow())
        try:
            kept = await _to_the_end(self.db.run(lambda s: self._finish_import(s, done, report_bytes)))
        except Exception:
            # The row stays PROCESSING beside its sealed request, so the next start imports it again.
            log.exception("dataset %s: could not record the end of its import", record.id)
            keep = prefix + self.IMPORT_MANIFEST
            await _to_the_end(asyncio.to_thread(self._delete_import_objects, prefix, keep))
            return
        ready = kept and done.state is DatasetState.READY
        # A READY dataset keeps its objects but the sealed request; any other end keeps nothing.
        await _to_the_end(asyncio.to_thread(self._delete_objects, prefix + self.IMPORT_MANIFEST if ready
                                            else prefix))
        if kept:
            self.notify()
        log.info("dataset %s: import ended %s", record.id, done.state.value if kept else "(dataset deleted)")

    def _delete_import_objects(self, prefix: str, keep: str) -> None:
        """Deletes the objects under `prefix` except `keep` (best effort, like _delete_objects)."""
        try:
            for key in self.store.list_keys(prefix):
                if key != keep:
                    self.store.delete_prefix(key)
        except Exception:
            log.exception("could not delete objects under %s; they are orphaned", prefix)

    def _finish_import(self, session: Session, done: DatasetRecord, report: bytes) -> bool:
        """Replaces the PROCESSING row by the final one and announces it; False if the dataset was deleted
        (or finished) meanwhile. Delete-and-insert reuses the repository's full mapping of a record."""
        repo = DatasetRepository(session)
        current = repo.find(done.organization, done.id)
        if current is None or current.state is not DatasetState.PROCESSING:
            return False
        repo.delete(done.organization, done.id)
        # The description may have been updated while the import ran.
        created = repo.insert(replace(done, description=current.description), report)
        self._add_event(repo, created)
        return True

    async def resume_imports(self) -> int:
        """Restarts the imports an earlier run of the service left PROCESSING (it stopped or crashed
        mid-import), from their sealed requests; returns how many. Call once when the service starts.

        An import that cannot be resumed (its request no longer opens with this server's key, or no
        longer passes the checks) ends FAILED; a sealed request whose dataset is gone or finished is
        deleted.
        """
        keys = await asyncio.to_thread(self.store.list_keys, "datasets/")
        resumed = 0
        for key in keys:
            org, _, rest = key.removeprefix("datasets/").partition("/")
            dataset_id, _, name = rest.partition("/")
            if name != self.IMPORT_MANIFEST or dataset_id in self._imports:
                continue
            record = await self.db.run(lambda s, o=org, d=dataset_id: DatasetRepository(s).find(o, d))
            if record is None or record.state is not DatasetState.PROCESSING:
                await asyncio.to_thread(self._delete_objects, key)
                continue
            try:
                sealed = await asyncio.to_thread(self.store.get_bytes, key)
                request = import_request_from_proto(
                    dataset_service_pb2.CreateDatasetRequest.FromString(self._cipher.open(sealed)))
                plan, source = self.check_import(request)
            except (CredentialsKeyError, TuneForgeError) as exc:
                message = exc.message if isinstance(exc, TuneForgeError) else str(exc)
                log.warning("dataset %s: import cannot resume: %s", dataset_id, message)
                reader = UnreadableSource(f"The import was interrupted and cannot resume: {message}")
                self._start_import(record, UploadSpec(record.organization), record.split_plan, reader)
                continue
            spec = replace(request.spec, filename=source.uri)
            log.info("dataset %s: resuming the import from %s", dataset_id, source.uri)
            self._start_import(record, spec, plan, open_reader(source, request.credentials,
                                                               self._fetch_settings()))
            resumed += 1
        return resumed

    async def close_imports(self) -> None:
        """Stops the running imports (at shutdown): each removes what it stored but its sealed request."""
        tasks = [task for task, _ in self._imports.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
