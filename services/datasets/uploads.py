"""UploadDataset and ValidateDataset: a streamed file becomes a READY dataset, or a report.

An upload is all or nothing: the bytes go to a temp file, are validated and split in a worker thread,
the objects are stored, and only then one transaction inserts the READY dataset, its splits and its
DatasetChanged event. Any failure on the way (bad data, checksum, size, a lost race for the name, the
client going away) removes the temp file and every object stored so far, and leaves no row.

`UploadManager.process` is the one pipeline every new dataset goes through, imports (imports.py) too.

Uploads, validations and re-splits run on a pool of their own (`UploadManager.processing`,
TUNEFORGE_PROCESSING_WORKERS places), never on the threads the database or other services use: each holds
one place from its first byte received to its end, and one more is refused at once with RESOURCE_EXHAUSTED
(QUOTA_EXCEEDED) naming the setting. A disk that fills up mid-way (ENOSPC) fails the call like any other
failure, so nothing is left behind; the kit answers it RESOURCE_EXHAUSTED (tuneforge_core.errors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.datasets.checkers import CHECKERS
from services.datasets.cleanup import delete_objects, succeeded, to_the_end
from services.datasets.converters import report_to_proto
from services.datasets.domain import (
    DatasetRecord,
    DatasetState,
    Issue,
    SplitPlan,
    UploadSpec,
    ValidationReport,
)
from services.datasets.options import template_problems
from services.datasets.processing import (
    NORMALIZED,
    Processed,
    ProcessOptions,
    dataset_prefix,
    source_key,
    validate_and_split,
    validate_only,
)
from services.datasets.repository import DatasetRepository
from services.datasets.settings import DatasetSettings
from services.datasets.splitting import DEFAULT_FRACTIONS, EXTERNAL_VALIDATION_FRACTIONS, resolve_split
from services.datasets.tokens import DEFAULT_MAX_LENGTH, load_tokenizer
from services.datasets.validation import DEFAULT_MIN_EXAMPLES, ISSUE_LIMIT, MAX_ISSUE_LIMIT
from services.kit.db import Database
from services.kit.outbox import utcnow
from services.kit.pools import BoundedPool, Slot
from services.kit.validation import check_name, check_organization, check_request_id, check_text
from tuneforge_core.compat import same_family
from tuneforge_core.errors import (
    AlreadyExists,
    DataLoss,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    Violations,
)
from tuneforge_core.ids import new_id
from tuneforge_core.models import ModelKind, ModelPolicy
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import UNHONOURED_DATASET_OPTIONS
from tuneforge_core.storage import ObjectStore

MAX_DESCRIPTION = 1024
# What a dataset carries into every Dataset message, and so into its DatasetChanged events, whose payload
# NATS caps (1 MiB by default; one over it would block the outbox behind it): the file name and the text
# options are bounded, each far above any real one.
MAX_FILENAME = 1024
MAX_OPTION_TEXT = 32 * 1024
# metadata.column_mapping: fields a dataset has (a few), and column names; an unknown one is named in the
# report's MISSING_COLUMN issue, so each is bounded as well as their number.
MAX_COLUMN_MAPPINGS = 64
MAX_COLUMN_NAME = 256
# metadata.validation_dataset, and the `dataset` of every request that names one: an id or a name, neither
# of which is longer (kit.validation.NAME_RE; ids are shorter).
MAX_DATASET_REF = 63
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}\Z")
# Bytes of BadRequest field violations in a DATASET_INVALID status; see bounded_violations.
VIOLATIONS_BUDGET_BYTES = 5000
# Threads for the service's own object store (deleting a dataset's objects, reading sealed import
# requests at start); calls beyond them wait. No caller's input makes this work slow.
STORAGE_WORKERS = 4


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    size_bytes: int
    sha256: str


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


def invalid_dataset(name: str, report: ValidationReport) -> InvalidArgument:
    """DATASET_INVALID for a report with errors: the counts, and the first errors as field violations."""
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


def request_fingerprint(spec: UploadSpec) -> str:
    """SHA-256 of the metadata a request_id is used with, less what describes the content (size_bytes and
    sha256: the content's own checksum is compared instead). A retry sends the same metadata, so another
    fingerprint means the request_id is being reused for another request."""
    fields = dataclasses.asdict(dataclasses.replace(spec, size_bytes=0, sha256=""))
    canonical = json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_id_reused(spec: UploadSpec, existing: DatasetRecord) -> AlreadyExists:
    return AlreadyExists(
        f"request_id '{spec.request_id}' was already used to create dataset '{existing.name}' with other "
        "metadata or content; use a new request_id for a new dataset.",
        reason=Reason.REQUEST_ID_REUSED,
        metadata={"request_id": spec.request_id, "dataset_id": existing.id},
        violations=[FieldViolation("metadata.request_id", "already used for another upload")])


def same_request(existing: DatasetRecord, spec: UploadSpec, sha256: str = "") -> bool:
    """Whether `spec` (and content of checksum `sha256`, when known) is a retry of what created `existing`:
    the same metadata fingerprint (the same name, for rows from before fingerprints were kept) and, where
    both are known, the same content checksum (metadata.sha256, or the checksum of the bytes received)."""
    if existing.request_fingerprint:
        if existing.request_fingerprint != request_fingerprint(spec):
            return False
    elif existing.name != spec.name:
        return False
    return all(not given or not existing.sha256 or given.lower() == existing.sha256
               for given in (spec.sha256, sha256))


def _check_options(v: Violations, spec: UploadSpec) -> None:
    """The dataset options, issue limit and column mapping of the upload metadata."""
    options = spec.options
    v.check(options.max_samples is None or options.max_samples >= 1, "metadata.options.max_samples",
            "must be at least 1 (leave it unset to keep every example)")
    v.check(options.max_prompt_length >= 0, "metadata.options.max_prompt_length", "must not be negative")
    for name, why in UNHONOURED_DATASET_OPTIONS.items():  # stored and never used: refused, not ignored
        v.check(not getattr(options, name), f"metadata.options.{name}",
                f"training {why}; leave it unset")
    for name in ("system_prompt", "prompt_template"):
        v.check(len(getattr(options, name)) <= MAX_OPTION_TEXT, f"metadata.options.{name}",
                f"must be at most {MAX_OPTION_TEXT} characters")
    if options.prompt_template and len(options.prompt_template) <= MAX_OPTION_TEXT:
        for problem in template_problems(options.prompt_template):
            v.add("metadata.options.prompt_template", problem)
    v.check(spec.issue_limit is None or 1 <= spec.issue_limit <= MAX_ISSUE_LIMIT, "metadata.issue_limit",
            f"must be between 1 and {MAX_ISSUE_LIMIT}")
    mapping = spec.column_mapping
    v.check(len(mapping) <= MAX_COLUMN_MAPPINGS, "metadata.column_mapping.columns",
            f"must map at most {MAX_COLUMN_MAPPINGS} fields (it maps {len(mapping)})")
    fields_of: dict[str, list[str]] = {}
    for target, column in list(mapping.items())[:MAX_COLUMN_MAPPINGS]:
        where = f"metadata.column_mapping.columns[{target[:MAX_COLUMN_NAME]}]"
        if not v.check(bool(target.strip()) and bool(column.strip()), where,
                       "field and column names must not be empty"):
            continue
        if v.check(len(target) <= MAX_COLUMN_NAME and len(column) <= MAX_COLUMN_NAME, where,
                   f"field and column names must be at most {MAX_COLUMN_NAME} characters"):
            fields_of.setdefault(column, []).append(target)
    for column, targets in fields_of.items():
        # Renaming is by column, so only one of the fields would get it and the others would be dropped.
        v.check(len(targets) == 1, f"metadata.column_mapping.columns[{sorted(targets)[-1]}]",
                f"column '{column}' is mapped to {len(targets)} fields ({', '.join(sorted(targets))}); "
                "a column gives one field, and all but one would be dropped")


class UploadManager:
    """The rules of an upload, from its metadata to the committed READY dataset. Knows nothing of gRPC."""

    def __init__(self, db: Database, store: ObjectStore, settings: DatasetSettings,
                 notify: Callable[[], None] = lambda: None) -> None:
        self.db = db
        self.store = store
        self.settings = settings
        # Called after a commit that added events, so the outbox relay sends them now.
        self.notify = notify
        self.tmp_dir = settings.data_dir.resolve() / "tmp"
        # One place per upload, validation or re-split; their blocking calls run on these threads.
        self.processing = BoundedPool("dataset uploads and validations", settings.processing_workers, 0,
                                      setting="TUNEFORGE_PROCESSING_WORKERS")
        self.storage = BoundedPool("dataset storage calls", STORAGE_WORKERS, None)

    def check_upload(self, spec: UploadSpec, *, upload: bool) -> SplitPlan:
        """Every problem of the metadata at once; then the declared size against the limit."""
        v = Violations()
        check_organization(v, spec.organization, "metadata.organization")
        if upload:
            check_name(v, spec.name, "metadata.name")
            check_request_id(v, spec.request_id, "metadata.request_id")
            check_text(v, spec.description, "metadata.description", max_chars=MAX_DESCRIPTION)
        check_text(v, spec.filename, "metadata.filename", max_chars=MAX_FILENAME, one_line=True)
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
            v.check(len(spec.validation_dataset) <= MAX_DATASET_REF, "metadata.validation_dataset",
                    f"must be a dataset id or name (at most {MAX_DATASET_REF} characters)")
            v.check(not spec.split.validation_fraction, "metadata.split.validation_fraction",
                    "must be 0 when metadata.validation_dataset gives the validation examples")
        plan = resolve_split(spec.split, v, "metadata.split", defaults=EXTERNAL_VALIDATION_FRACTIONS
                             if spec.validation_dataset else DEFAULT_FRACTIONS)
        v.raise_if_any("invalid upload metadata")
        if spec.size_bytes > self.settings.max_upload_bytes:
            raise _too_large(self.settings.max_upload_bytes, declared=True)
        return plan

    async def receive(self, spec: UploadSpec, chunks: AsyncIterator[bytes], slot: Slot) -> ReceivedFile:
        """Streams the chunks to a temp file, hashing and counting, in `slot`; the caller deletes the file.
        On any failure (a full disk included) the partial file is deleted."""
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
                    await to_the_end(slot.run(_write_chunk, f, digest, chunk))
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
        request_id created: REQUEST_ID_REUSED unless the metadata and the content are the same (the
        content's checksum is metadata.sha256, else that of the bytes received, which are then read and
        hashed but not processed again).

        RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) before any byte is read when TUNEFORGE_PROCESSING_WORKERS
        uploads and validations already run."""
        plan = self.check_upload(spec, upload=True)
        existing = await self.db.run(lambda s: self.precheck(s, spec))
        if existing is not None:
            if not spec.sha256:
                with self.processing.reserve() as slot:
                    received = await self.receive(spec, chunks, slot)
                received.path.unlink(missing_ok=True)
                if not same_request(existing, spec, received.sha256):
                    raise request_id_reused(spec, existing)
            return existing, await self.stored_report(existing)
        with self.processing.reserve() as slot:
            await self.check_tokenizer(spec, slot)
            received = await self.receive(spec, chunks, slot)
            try:
                return await self._create(spec, plan, received, slot)
            finally:
                received.path.unlink(missing_ok=True)

    async def validate(self, spec: UploadSpec, chunks: AsyncIterator[bytes]) -> ValidationReport:
        """Validates the stream and forgets it: the report is the only result. RESOURCE_EXHAUSTED at once
        when TUNEFORGE_PROCESSING_WORKERS uploads and validations already run."""
        self.check_upload(spec, upload=False)
        with self.processing.reserve() as slot:
            await self.check_tokenizer(spec, slot)
            received = await self.receive(spec, chunks, slot)
            try:
                self.tmp_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="validate-") as work:
                    return await to_the_end(slot.run(
                        validate_only, received.path, work_dir=Path(work), opts=self.process_options(spec)))
            finally:
                received.path.unlink(missing_ok=True)

    async def check_tokenizer(self, spec: UploadSpec, slot: Slot) -> None:
        """Loads metadata.tokenizer (in `slot`) before any byte is read, so a bad one fails the call at
        once rather than after a long upload (processing then finds it in load_tokenizer's cache).

        A tokenizer is a model reference like any other (tuneforge_core.models): a hub id in this server's
        Hugging Face cache or an absolute folder under a model root; never any other server path (/proc,
        /etc, the data dir, another organization's outputs)."""
        if not spec.tokenizer:
            return
        field = "metadata.tokenizer"
        source = ModelPolicy.from_settings(self.settings, self.store).source(
            spec.tokenizer, spec.organization, field)
        if source.kind is ModelKind.STORED or spec.tokenizer.startswith("file:"):
            why = "must be a hub id or an absolute folder under a model root (TUNEFORGE_MODEL_ROOTS)"
            raise InvalidArgument(f"{field}: {why}", violations=[FieldViolation(field, why)])
        name = spec.tokenizer
        await to_the_end(slot.run(load_tokenizer, name))

    def process_options(self, spec: UploadSpec) -> ProcessOptions:
        """How the upload's file becomes examples: its metadata, with this server's limits."""
        return ProcessOptions(
            format=spec.format, options=spec.options, column_mapping=dict(spec.column_mapping),
            min_examples=spec.min_examples or DEFAULT_MIN_EXAMPLES,
            issue_limit=spec.issue_limit or ISSUE_LIMIT, max_line_bytes=self.settings.max_line_bytes,
            max_extracted_bytes=self.settings.max_extracted_bytes,
            max_decoded_bytes=self.settings.max_upload_bytes,
            tokenizer=spec.tokenizer, max_length=spec.max_length or DEFAULT_MAX_LENGTH)

    def precheck(self, session: Session, spec: UploadSpec) -> DatasetRecord | None:
        """The dataset an earlier call with this request_id created, or None for a new one; ALREADY_EXISTS
        when the request_id was used for other metadata (or content of another metadata.sha256), or the
        name is taken."""
        repo = DatasetRepository(session)
        existing = repo.find_by_request_id(spec.organization, spec.request_id)
        if existing is not None:
            if not same_request(existing, spec):
                raise request_id_reused(spec, existing)
            return existing
        if repo.name_taken(spec.organization, spec.name):
            raise self.name_taken(spec)
        self.check_quota(session, spec.organization, spec.size_bytes)
        return None

    def check_quota(self, session: Session, organization: str, adding: int) -> None:
        """RESOURCE_EXHAUSTED when `adding` more bytes would take the organization past
        TUNEFORGE_MAX_DATASET_BYTES_PER_ORG."""
        limit = self.settings.max_dataset_bytes_per_org
        if not limit:
            return
        used = DatasetRepository(session).stored_bytes(organization)
        if used + adding > limit:
            raise ResourceExhausted(
                f"organization '{organization}' keeps {_human_bytes(used)} of datasets; "
                f"{_human_bytes(adding)} more would pass its limit of {_human_bytes(limit)} "
                "(TUNEFORGE_MAX_DATASET_BYTES_PER_ORG). "
                "Delete datasets it no longer needs, or ask for a larger limit.",
                reason=Reason.QUOTA_EXCEEDED,
                metadata={"limit": "max_dataset_bytes_per_org", "value": str(limit), "used": str(used)})

    @staticmethod
    def name_taken(spec: UploadSpec) -> AlreadyExists:
        return AlreadyExists(
            f"A dataset named '{spec.name}' already exists in organization '{spec.organization}'.",
            metadata={"resource_type": "dataset", "resource": spec.name, "organization": spec.organization},
            violations=[FieldViolation("metadata.name", "already used in this organization")])

    async def _create(self, spec: UploadSpec, plan: SplitPlan, received: ReceivedFile,
                      slot: Slot) -> tuple[DatasetRecord, ValidationReport]:
        dataset_id = new_id("ds")
        prefix = dataset_prefix(spec.organization, dataset_id)
        insert: asyncio.Future[DatasetRecord] | None = None
        validation = await self._validation_dataset(spec) if spec.validation_dataset else None
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="process-") as work:
                processed = await to_the_end(slot.run(
                    self.process, received.path, Path(work), spec, plan, prefix, validation))
            report = processed.report
            if not report.valid:
                raise invalid_dataset(spec.name, report)
            if validation is not None and not same_family(report.format.value, validation.format.value):
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
                options=spec.options, validation_dataset_id=validation.id if validation else "",
                request_fingerprint=request_fingerprint(spec) if spec.request_id else "")
            report_bytes = report_to_proto(report, dataset_id).SerializeToString()
            insert = asyncio.ensure_future(self.db.run(lambda s: self.insert(s, record, report_bytes)))
            created, new = await self.inserted(spec, insert, received.sha256)
            if not new:
                return created, await self.stored_report(created)
            self.notify()
            return created, report
        finally:
            if not succeeded(insert):
                await to_the_end(slot.run(delete_objects, self.store, prefix))

    def process(self, source: Path, work: Path, spec: UploadSpec, plan: SplitPlan, prefix: str,
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

    def insert(self, session: Session, record: DatasetRecord, report: bytes) -> DatasetRecord:
        """Inserts the dataset and its DatasetChanged event (IntegrityError on a taken name or request_id;
        RESOURCE_EXHAUSTED past the organization's dataset bytes)."""
        self.check_quota(session, record.organization, record.size_bytes)
        repo = DatasetRepository(session)
        created = repo.insert(record, report)
        repo.add_changed(created, self.store.uri)
        return created

    async def inserted(self, spec: UploadSpec, insert: asyncio.Future[DatasetRecord],
                       sha256: str = "") -> tuple[DatasetRecord, bool]:
        """The dataset `insert` (a run of `insert`) created, and True; or, when it lost a race with an
        earlier call of the same request_id (same metadata, and content of checksum `sha256` when given),
        the dataset that call created, and False. ALREADY_EXISTS when it lost the race for the name, or
        the request_id to another request."""
        try:
            return await to_the_end(insert), True
        except IntegrityError:
            winner = await self.db.run(lambda s: DatasetRepository(s).find_by_request_id(
                spec.organization, spec.request_id))
            if winner is None:
                raise self.name_taken(spec) from None
            if not same_request(winner, spec, sha256):
                raise request_id_reused(spec, winner) from None
            return winner, False

    async def stored_report(self, record: DatasetRecord) -> ValidationReport:
        return await self.db.run(lambda s: DatasetRepository(s).validation_report(record.organization,
                                                                                  record.id))
