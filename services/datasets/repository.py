"""Persistence of datasets over one SQLAlchemy session; returns domain records, never rows.

Every lookup takes the organization: a dataset of another organization is indistinguishable from one that
does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import dataset_pb2

from services.datasets.converters import (
    UriFor,
    dataset_to_proto,
    options_from_proto,
    options_to_proto,
    report_from_proto,
    tokens_from_proto,
    tokens_to_proto,
)
from services.datasets.domain import (
    SPLIT_KINDS,
    DatasetFormat,
    DatasetRecord,
    DatasetState,
    SplitFile,
    SplitKind,
    SplitPlan,
    Statistics,
    ValidationReport,
)
from services.datasets.models import DatasetOutbox, DatasetRow, SplitRow
from services.kit.outbox import add_event, utcnow
from services.kit.protos import as_utc, to_timestamp
from tuneforge_core import subjects
from tuneforge_core.ids import new_id

ListCursor = tuple[datetime, str]


def _record(row: DatasetRow) -> DatasetRecord:
    order = {kind.value: i for i, kind in enumerate(SPLIT_KINDS)}
    splits = tuple(SplitFile(SplitKind(s.kind), s.example_count, s.object_key)
                   for s in sorted(row.splits, key=lambda s: order.get(s.kind, len(order))))
    return DatasetRecord(
        id=row.id, organization=row.organization, name=row.name, description=row.description,
        state=DatasetState(row.state), format=DatasetFormat(row.format),
        source_filename=row.source_filename, source_key=row.source_key, size_bytes=row.size_bytes,
        sha256=row.sha256,
        statistics=Statistics(
            example_count=row.example_count, mean_messages_per_example=row.mean_messages_per_example,
            total_characters=row.total_characters, duplicate_count=row.duplicate_count,
            tokens=tokens_from_proto(dataset_pb2.TokenStatistics.FromString(row.token_statistics))
            if row.token_statistics else None,
            dropped_by_max_samples=row.dropped_by_max_samples,
            longest_example_bytes=row.longest_example_bytes),
        splits=splits, error_count=row.error_count, warning_count=row.warning_count,
        split_plan=SplitPlan((row.train_fraction, row.validation_fraction, row.test_fraction),
                             int(row.split_seed)),
        create_time=as_utc(row.create_time), update_time=as_utc(row.update_time),
        failure_message=row.failure_message, request_id=row.request_id or "",
        options=options_from_proto(dataset_pb2.DatasetOptions.FromString(row.options or b"")),
        validation_dataset_id=row.validation_dataset_id or "",
        request_fingerprint=row.request_fingerprint or "",
    )


def _tokens_bytes(stats: Statistics) -> bytes | None:
    return tokens_to_proto(stats.tokens).SerializeToString() if stats.tokens else None


def _split_rows(splits: Sequence[SplitFile]) -> list[SplitRow]:
    return [SplitRow(kind=s.kind.value, example_count=s.example_count, object_key=s.key) for s in splits]


class DatasetRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def _row(self, organization: str, ref: str) -> DatasetRow | None:
        """By id first, then by name: names may look like ids, ids never collide with another org's."""
        row = self.session.scalar(select(DatasetRow).where(DatasetRow.organization == organization,
                                                           DatasetRow.id == ref))
        if row is None:
            row = self.session.scalar(select(DatasetRow).where(DatasetRow.organization == organization,
                                                               DatasetRow.name == ref))
        return row

    def find(self, organization: str, ref: str) -> DatasetRecord | None:
        row = self._row(organization, ref)
        return _record(row) if row else None

    def find_by_request_id(self, organization: str, request_id: str) -> DatasetRecord | None:
        if not request_id:
            return None
        row = self.session.scalar(select(DatasetRow).where(DatasetRow.organization == organization,
                                                           DatasetRow.request_id == request_id))
        return _record(row) if row else None

    def stored_bytes(self, organization: str) -> int:
        """The bytes of the organization's dataset files (every state: a PROCESSING import counts what it
        has received so far, which is 0 until it finishes)."""
        return int(self.session.scalar(select(func.coalesce(func.sum(DatasetRow.size_bytes), 0)).where(
            DatasetRow.organization == organization)) or 0)

    def name_taken(self, organization: str, name: str) -> bool:
        return self.session.scalar(select(DatasetRow.id).where(DatasetRow.organization == organization,
                                                               DatasetRow.name == name)) is not None

    def validation_report(self, organization: str, dataset_id: str) -> ValidationReport:
        """The report stored with the dataset (an empty one for a dataset that has none yet)."""
        data = self.session.scalar(select(DatasetRow.validation_report).where(
            DatasetRow.organization == organization, DatasetRow.id == dataset_id)) or b""
        return report_from_proto(dataset_pb2.ValidationReport.FromString(data))

    def insert(self, record: DatasetRecord, report: bytes) -> DatasetRecord:
        plan = record.split_plan
        row = DatasetRow(
            id=record.id, organization=record.organization, name=record.name,
            description=record.description, state=record.state.value, format=record.format.value,
            source_filename=record.source_filename, source_key=record.source_key,
            size_bytes=record.size_bytes, sha256=record.sha256,
            example_count=record.statistics.example_count,
            mean_messages_per_example=record.statistics.mean_messages_per_example,
            total_characters=record.statistics.total_characters,
            duplicate_count=record.statistics.duplicate_count,
            dropped_by_max_samples=record.statistics.dropped_by_max_samples,
            longest_example_bytes=record.statistics.longest_example_bytes,
            token_statistics=_tokens_bytes(record.statistics),
            options=options_to_proto(record.options).SerializeToString(),
            validation_dataset_id=record.validation_dataset_id,
            error_count=record.error_count, warning_count=record.warning_count, validation_report=report,
            train_fraction=plan.fractions[0], validation_fraction=plan.fractions[1],
            test_fraction=plan.fractions[2], split_seed=str(plan.seed),
            failure_message=record.failure_message, request_id=record.request_id or None,
            request_fingerprint=record.request_fingerprint,
            create_time=record.create_time, update_time=record.update_time,
            splits=_split_rows(record.splits),
        )
        self.session.add(row)
        self.session.flush()
        return _record(row)

    def list(self, organization: str, *, state: DatasetState | None, after: ListCursor | None,
             limit: int) -> list[DatasetRecord]:
        """Newest first; `after` is the (create_time, id) of the last item of the previous page."""
        query = select(DatasetRow).where(DatasetRow.organization == organization)
        if state is not None:
            query = query.where(DatasetRow.state == state.value)
        if after is not None:
            time, last_id = after
            query = query.where(or_(DatasetRow.create_time < time,
                                    and_(DatasetRow.create_time == time, DatasetRow.id < last_id)))
        query = query.order_by(DatasetRow.create_time.desc(), DatasetRow.id.desc()).limit(limit)
        return [_record(row) for row in self.session.scalars(query)]

    def update_description(self, organization: str, dataset_id: str,
                           description: str) -> DatasetRecord | None:
        row = self._row(organization, dataset_id)
        if row is None:
            return None
        row.description = description
        row.update_time = utcnow()
        self.session.flush()
        return _record(row)

    def replace_splits(self, organization: str, dataset_id: str, plan: SplitPlan,
                       splits: Sequence[SplitFile], statistics: Statistics | None = None,
                       report: bytes = b"") -> DatasetRecord | None:
        """New splits; with `statistics` and `report`, the token statistics and the stored report too
        (train_tokens follows the train split)."""
        row = self._row(organization, dataset_id)
        if row is None:
            return None
        if statistics is not None:
            row.token_statistics = _tokens_bytes(statistics)
        if report:
            row.validation_report = report
        row.splits.clear()
        self.session.flush()
        row.splits.extend(_split_rows(splits))
        row.train_fraction, row.validation_fraction, row.test_fraction = plan.fractions
        row.split_seed = str(plan.seed)
        row.update_time = utcnow()
        self.session.flush()
        return _record(row)

    def delete(self, organization: str, dataset_id: str) -> bool:
        result = self.session.execute(delete(DatasetRow).where(DatasetRow.organization == organization,
                                                               DatasetRow.id == dataset_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def add_changed(self, record: DatasetRecord, uri_for: UriFor, *, deleted: bool = False) -> None:
        """The DatasetChanged event announcing `record` as it is now, in this transaction's outbox."""
        event = events_pb2.DatasetChanged(event_id=new_id("evt"), time=to_timestamp(utcnow()),
                                          dataset=dataset_to_proto(record, uri_for), deleted=deleted)
        add_event(self.session, DatasetOutbox, subjects.dataset_events(record.id), event, event.event_id)
