"""The per-item work of an ingest batch, before its write: decoding the reports, the checks, the rows in the
database's storage form, the announcements' bytes. Pure Python on bytes in, picklable values out, so it
runs on a thread of the service or, for large batches, in processes of its own (`PreparingProcesses`):
there it has a GIL of its own, and the service's event loop (its streams) and its database writes are not
held up by it.

A report is a worker's message as `(subject, payload)`, or a function returning `(job id, items)` (what the
service's own callers hand over; prepared on a thread only).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, cast

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import metrics_pb2

from services.kit.embedded import end_with_parent
from services.kit.protos import NUL, REPLACEMENT
from services.metrics.converters import POINT_COLUMNS, point_to_row
from services.metrics.fanout import FIELD_1, varint
from services.metrics.models import MetricPointRow
from services.metrics.repository import MetricsRepository, StorageForm, storable_time
from tuneforge_core import logs
from tuneforge_core.errors import InvalidArgument

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Message)

Report = Callable[[], tuple[str, Sequence[Any]]] | tuple[str, bytes]
Kind = Literal["metrics", "logs"]

METRIC_KINDS = frozenset(v for v in metrics_pb2.MetricKind.values() if v)

# The columns' limits on PostgreSQL (SQLite would store more): a job id's length, a log level's and
# source's range (SMALLINT). A report past them would fail its whole batch's write on every redelivery.
_MAX_JOB_ID = MetricPointRow.__table__.c.job_id.type.length  # type: ignore[attr-defined]
_SMALLINT_MIN, _SMALLINT_MAX = -(2**15), 2**15 - 1

# Bytes of items per live announcement: well under NATS' default 1 MiB max_payload, so a batch of large
# reports is announced in several messages instead of failing to publish (followers would miss it live).
ANNOUNCEMENT_BYTES = 256 * 1024


# -- decoding ---------------------------------------------------------------------------------------------

def job_id_of(subject: str, suffix: str) -> str:
    """`tuneforge.worker.jobs.<job_id>.<suffix>` -> job_id; InvalidArgument for any other subject."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:3] != ["tuneforge", "worker", "jobs"] or parts[4] != suffix or not parts[3]:
        raise InvalidArgument(f"unexpected subject {subject}")
    return parts[3]


def decode_metrics(subject: str, data: bytes) -> tuple[str, Sequence[metrics_pb2.MetricPoint]]:
    """(job id, points) of a MetricsReported message; InvalidArgument when it can never be stored."""
    job_id, event = _decode(subject, data, "metrics", events_pb2.MetricsReported)
    return job_id, event.points


def decode_logs(subject: str, data: bytes) -> tuple[str, Sequence[metrics_pb2.LogEntry]]:
    """(job id, entries) of a LogsReported message; InvalidArgument when it can never be stored."""
    job_id, event = _decode(subject, data, "logs", events_pb2.LogsReported)
    return job_id, event.entries


def _decode(subject: str, data: bytes, suffix: str, message_type: type[E]) -> tuple[str, E]:
    job_id = job_id_of(subject, suffix)
    try:
        return job_id, message_type.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"undecodable {message_type.DESCRIPTOR.name} on {subject}: {exc}") from exc


# -- what is stored ---------------------------------------------------------------------------------------

def _check_job_id(job_id: str) -> None:
    if len(job_id) > _MAX_JOB_ID:
        raise InvalidArgument(f"the job id of the subject has {len(job_id)} characters, at most "
                              f"{_MAX_JOB_ID} are stored")


def _bad_time(what: str, job_id: str, ts: Any) -> str:
    """Why a report with an item whose time cannot be stored is refused (the whole report: a worker that
    sends one such time is broken, and a time that cannot be stored would fail every batch it is in)."""
    return (f"a {what} of job '{job_id}' has the time {ts.seconds} s {ts.nanos} ns, outside years 1 to 9999 "
            "or with nanos outside 0 to 999,999,999")


# Where a point's row (converters.point_to_row) holds the fields the checks look at.
_JOB_ID, _STEP, _KIND, _TIME = (POINT_COLUMNS.index(name) for name in ("job_id", "step", "kind", "time"))


class Accepted(NamedTuple):
    """What is stored of a report: its items, their rows (in the database's storage form), and whether they
    are the report's items as they came (none stamped with the job id, skipped or rewritten: the report's
    own bytes of them can be announced)."""

    items: list[Any]
    rows: list[list[Any]]
    as_reported: bool


def accept_points(form: StorageForm, job_id: str, points: Sequence[metrics_pb2.MetricPoint]) -> Accepted:
    """The points to store, stamped with the job id (in place: a report's points are ours to change), and
    their rows in the storage form of `form`. The checks read the row, not the point again: each read of a
    field is a call into the protobuf runtime, and this runs once per stored point."""
    _check_job_id(job_id)
    accepted: list[metrics_pb2.MetricPoint] = []
    rows: list[list[Any]] = []
    stamped = False
    for point in points:
        row = point_to_row(point)
        named = row[_JOB_ID]
        if named != job_id:
            if named:
                raise InvalidArgument(f"a point of job '{named}' was reported on the subject of "
                                      f"job '{job_id}'")
            point.job_id = job_id
            stamped = True
        row[_JOB_ID] = job_id  # one string for the batch's rows: pickled once, not once a row
        time = row[_TIME]
        if time is not None and not storable_time(time):
            raise InvalidArgument(_bad_time("point", job_id, time))
        if row[_KIND] not in METRIC_KINDS or row[_STEP] < 0:
            log.warning("skipping a point of job %s with kind %s and step %s", job_id, row[_KIND],
                        row[_STEP])
            continue
        accepted.append(point)
        rows.append(row)
    MetricsRepository.convert_point_rows(form, rows)
    return Accepted(accepted, rows, not stamped and len(accepted) == len(points))


def accept_entries(form: StorageForm, job_id: str, entries: Sequence[metrics_pb2.LogEntry]) -> Accepted:
    """The entries to store, stamped with the job id, and their rows in the storage form of `form`; a NUL
    in a message (PostgreSQL's text cannot hold one) becomes U+FFFD, on both databases."""
    _check_job_id(job_id)
    accepted: list[metrics_pb2.LogEntry] = []
    changed = False
    for entry in entries:
        named = entry.job_id
        if named != job_id:
            if named:
                raise InvalidArgument(f"a log entry of job '{named}' was reported on the subject of "
                                      f"job '{job_id}'")
            entry.job_id = job_id
            changed = True
        if entry.HasField("time") and not storable_time(entry.time):
            raise InvalidArgument(_bad_time("log entry", job_id, entry.time))
        level, source = entry.level, entry.source
        if not (_SMALLINT_MIN <= level <= _SMALLINT_MAX and _SMALLINT_MIN <= source <= _SMALLINT_MAX):
            log.warning("skipping a log entry of job %s with level %s and source %s", job_id, level,
                        source)
            continue
        if NUL in entry.message:
            entry.message = entry.message.replace(NUL, REPLACEMENT)
            changed = True
        accepted.append(entry)
    return Accepted(accepted, MetricsRepository.entry_rows(form, accepted),
                    not changed and len(accepted) == len(entries))


# Views of the reports and announcements on the wire that leave their items as bytes: a message field and a
# bytes field are the same on the wire (length-delimited), and MetricsReported and LogsReported hold their
# items in one field number, MetricsStored and LogsStored in another. So a report whose items are stored as
# they came is announced with its own bytes of them, decoded and encoded in C (0.08 us a point where
# serializing each point again took 0.6), not each item serialized again.
_ITEM_FIELDS = {
    (reported.DESCRIPTOR.fields_by_name[name].number, stored.DESCRIPTOR.fields_by_name[name].number)
    for reported, stored, name in ((events_pb2.MetricsReported, events_pb2.MetricsStored, "points"),
                                   (events_pb2.LogsReported, events_pb2.LogsStored, "entries"))}
if len(_ITEM_FIELDS) != 1:
    raise RuntimeError(f"metrics and logs number their items apart: {_ITEM_FIELDS}")
((_REPORTED_NUMBER, _STORED_NUMBER),) = _ITEM_FIELDS
_WIRE = descriptor_pb2.FileDescriptorProto(name="tuneforge/metrics/internal/wire.proto",
                                           package="tuneforge.metrics.internal", syntax="proto3")
for _name, _number in (("ReportedItems", _REPORTED_NUMBER), ("StoredItems", _STORED_NUMBER)):
    _WIRE.message_type.add(name=_name).field.add(
        name="items", number=_number, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
_WIRE_POOL = descriptor_pool.DescriptorPool()
_WIRE_POOL.Add(_WIRE)
_REPORTED_ITEMS: Any = message_factory.GetMessageClass(
    _WIRE_POOL.FindMessageTypeByName("tuneforge.metrics.internal.ReportedItems"))
_STORED_ITEMS: Any = message_factory.GetMessageClass(
    _WIRE_POOL.FindMessageTypeByName("tuneforge.metrics.internal.StoredItems"))


def as_announced(payload: bytes) -> bytes:
    """A MetricsReported (LogsReported) message as the MetricsStored (LogsStored) of the same items, as the
    same bytes."""
    return bytes(_STORED_ITEMS(items=_REPORTED_ITEMS.FromString(payload).items).SerializeToString())


def framed(items: Sequence[Message]) -> list[bytes]:
    """Each item serialized, framed as field 1 of MetricsStored / LogsStored."""
    out: list[bytes] = []
    for item in items:
        data = item.SerializeToString()
        out.append(FIELD_1 + varint(len(data)) + data)
    return out


def announcements(pieces: Sequence[bytes]) -> list[bytes]:
    """Pieces of MetricsStored / LogsStored messages (an item framed, or a whole message: a message of
    repeated fields is the concatenation of its parts) joined into messages of at most ANNOUNCEMENT_BYTES,
    in order (an oversized piece alone)."""
    messages: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for piece in pieces:
        if parts and size + len(piece) > ANNOUNCEMENT_BYTES:
            messages.append(b"".join(parts))
            parts, size = [], 0
        parts.append(piece)
        size += len(piece)
    if parts:
        messages.append(b"".join(parts))
    return messages


# -- a batch ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """One job's share of an ingest batch, ready to write: how many items, their rows (in the database's
    storage form), the announcements."""

    count: int
    rows: list[list[Any]]
    payloads: list[bytes]


# {index of a report that can never be stored: why}, {job id: its share of the batch}
Batch = tuple[dict[int, str], dict[str, Prepared]]


@dataclass(frozen=True)
class _Kind:
    decode: Callable[[str, bytes], tuple[str, Sequence[Any]]]
    accept: Callable[[StorageForm, str, Sequence[Any]], Accepted]


KINDS: dict[Kind, _Kind] = {
    "metrics": _Kind(decode_metrics, accept_points),
    "logs": _Kind(decode_logs, accept_entries),
}


def stored_items(kind: Kind, form: StorageForm, subject: str, data: bytes) -> list[Any]:
    """The items the ingest would store of one worker report of `kind` on `subject`, as it would announce
    them (stamped with the job id, those it skips left out); InvalidArgument for a report it would refuse.
    What a stream following the job hands out before the report is stored (services.metrics.fanout)."""
    spec = KINDS[kind]
    job_id, items = spec.decode(subject, data)
    return spec.accept(form, job_id, items).items


# A piece of an announcement: bytes, or the index of a report (a worker message) whose own bytes, as
# announced (`as_announced`), are the piece.
Piece = bytes | int
# Of a batch before its announcements are made: {index of a refused report: why}, {job id: (its rows, the
# pieces of its announcements)}.
Pieces = tuple[dict[int, str], dict[str, tuple[list[list[Any]], list[Piece]]]]


def prepare(kind: Kind, form: StorageForm, reports: Sequence[Report]) -> Batch:
    """The batch of `kind` ("metrics" or "logs") ready to write to a database of `form`: each job's items
    in the order reported, a report that can never be stored refused alone (its index: why)."""
    return announced(prepare_pieces(kind, form, reports), reports)


def announced(pieces: Pieces, reports: Sequence[Report]) -> Batch:
    """The batch of `prepare_pieces`, its announcements made of its pieces (`reports`: the same)."""
    refused, by_job = pieces

    def piece(p: Piece) -> bytes:
        return p if isinstance(p, bytes) else as_announced(cast(tuple[str, bytes], reports[p])[1])

    return refused, {job_id: Prepared(len(rows), rows, announcements([piece(p) for p in job_pieces]))
                     for job_id, (rows, job_pieces) in by_job.items()}


def prepare_pieces(kind: Kind, form: StorageForm, reports: Sequence[Report]) -> Pieces:
    """`prepare`, but a report stored as it came is left as its index for its announcement: in a process of
    its own, its bytes need not travel back (the writing process holds them)."""
    spec = KINDS[kind]
    refused: dict[int, str] = {}
    by_job: dict[str, tuple[list[list[Any]], list[Piece]]] = {}  # job id: rows, announcement pieces
    for index, report in enumerate(reports):
        try:
            job_id, items = spec.decode(*report) if isinstance(report, tuple) else report()
            accepted = spec.accept(form, job_id, items)
        except InvalidArgument as exc:
            refused[index] = exc.message
            continue
        if accepted.items:
            rows, pieces = by_job.setdefault(job_id, ([], []))
            rows.extend(accepted.rows)
            if accepted.as_reported and isinstance(report, tuple) and len(report[1]) <= ANNOUNCEMENT_BYTES:
                pieces.append(index)
            else:
                pieces.extend(framed(accepted.items))
    return refused, by_job


# -- in processes of their own ----------------------------------------------------------------------------

def default_processes() -> int:
    """One preparing process when this process may run on two CPUs or more, else none (a second process on
    one CPU only adds the pickling)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return 1 if cpus >= 2 else 0


def _warm(form: StorageForm) -> None:
    """Run first in each new process: its imports done, and the form's statements built (or the error
    that says this form cannot be prepared there)."""
    MetricsRepository.point_rows(form, [metrics_pb2.MetricPoint(job_id="warm")])
    MetricsRepository.entry_rows(form, [metrics_pb2.LogEntry(job_id="warm")])


class PreparingProcesses:
    """Prepares large batches (`min_bytes` of messages or more) in `processes` processes of their own, in
    chunks of about `min_bytes`: the processes prepare a batch's chunks while a database thread writes the
    ones already prepared (`Submitted`), in one transaction.

    Started once the service holds the ingest lease (`start`); until they are ready (their imports take a
    second or two), and for small batches, whose round trip to a process would cost more than it saves,
    `submit` answers None and the batch is prepared on a thread. A process that dies (killed, out of
    memory) breaks the pool: the chunks it held are prepared on the writing thread, and the next large
    batch starts new processes."""

    def __init__(self, processes: int, min_bytes: int, *, log_level: str = "INFO",
                 log_format: str = "text") -> None:
        self.processes = processes
        self.min_bytes = max(1, min_bytes)
        self.log_level, self.log_format = log_level, log_format  # the processes log as the service does
        self._pool: ProcessPoolExecutor | None = None
        self._ready = False
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def started(self) -> bool:
        """Whether the processes run (or are starting)."""
        return self._pool is not None

    def submit(self, kind: Kind, form: StorageForm,
               messages: Sequence[tuple[str, bytes]]) -> Submitted | None:
        """The batch handed to the processes, or None when it is to be prepared here. For the event loop:
        it only queues the chunks."""
        if self.processes <= 0 or self._closed or sum(len(data) for _, data in messages) < self.min_bytes:
            return None
        pool = self._pool
        if pool is None:
            self.start(form)
            return None
        if not self._ready:
            return None
        chunks: list[_Chunk] = []
        try:
            start, size = 0, 0
            for index, (_, data) in enumerate(messages):
                size += len(data)
                if size >= self.min_bytes or index == len(messages) - 1:
                    part = list(messages[start:index + 1])
                    chunks.append(_Chunk(start, part, pool.submit(_prepare_packed, kind, form, part)))
                    start, size = index + 1, 0
        except BrokenProcessPool as exc:
            for chunk in chunks:
                chunk.future.cancel()
            self._broken(pool, exc)
            return None
        return Submitted(self, pool, kind, form, chunks)

    def _broken(self, pool: ProcessPoolExecutor, exc: BaseException) -> None:
        if self._pool is pool:
            log.warning("an ingest preparing process stopped (%s): its batches are prepared on a thread, the "
                        "next large one starts new processes", exc)
        self._discard(pool)

    def start(self, form: StorageForm) -> None:
        """Starts the processes (when there are to be some, and they are not running), in the background:
        `submit` uses them once each has imported what it needs."""
        if self.processes <= 0 or self._closed or self._pool is not None:
            return
        # spawn: the service runs grpc's and the database's threads, which a fork would copy mid-work.
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker,
                                   initargs=(self.log_level, self.log_format, os.getpid()))
        self._pool, self._ready = pool, False
        warming = [pool.submit(_warm, form) for _ in range(self.processes)]

        def warmed(future: Future[None]) -> None:
            if self._pool is not pool or not all(f.done() for f in warming):
                return
            failed = next((f.exception() for f in warming if f.exception() is not None), None)
            if failed is None:
                self._ready = True
                log.info("ingest prepares large batches in %d process(es) of its own", self.processes)
            elif isinstance(failed, BrokenProcessPool):
                self._broken(pool, failed)
            else:
                log.warning("ingest cannot prepare batches in processes of its own (%s: %s); it does on a "
                            "thread", type(failed).__name__, failed)
                self._closed = True
                pool.shutdown(wait=False, cancel_futures=True)

        for future in warming:
            future.add_done_callback(warmed)

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            self._pool, self._ready = None, False
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._closed = True
        pool, self._pool, self._ready = self._pool, None, False
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _start_worker(log_level: str, log_format: str, parent: int) -> None:
    """A preparing process logs as the service does, and ends when the service does (a pool's workers wait
    on its queue, which they hold both ends of: a service that was killed would leave them waiting)."""
    logs.configure(log_level, log_format)
    end_with_parent(parent)


def _prepare_packed(kind: Kind, form: StorageForm, reports: Sequence[tuple[str, bytes]]) -> tuple[
        dict[int, str], bytes]:
    """`prepare_pieces` in a process: its rows pickled there, into bytes, so that they are unpickled by the
    thread that writes them (`Submitted.parts`), not by the pool's result thread meanwhile: unpickling holds
    the GIL for as long as it takes, and the writing thread takes the GIL back after every row it stores.
    The reports stored as they came are announced in the writing process, of their bytes it holds: a
    chunk's result is then a third smaller (73 KB of rows and 37 KB of announcements for 400 points), and
    one larger than the pipe's 64 KB stops the process until the writing process, GIL and all, reads it."""
    refused, by_job = prepare_pieces(kind, form, reports)
    return refused, pickle.dumps(by_job, protocol=pickle.HIGHEST_PROTOCOL)


@dataclass(frozen=True)
class _Chunk:
    offset: int  # index of its first message in the batch
    messages: list[tuple[str, bytes]]
    future: Future[tuple[dict[int, str], bytes]]


class Submitted:
    """A batch being prepared in the processes, a chunk at a time."""

    def __init__(self, owner: PreparingProcesses, pool: ProcessPoolExecutor, kind: Kind, form: StorageForm,
                 chunks: list[_Chunk]) -> None:
        self._owner, self._pool, self._kind, self._form, self._chunks = owner, pool, kind, form, chunks

    def parts(self) -> Iterator[Batch]:
        """Each chunk once it is prepared, in order, its refused reports indexed in the whole batch (for a
        database thread: it waits for them). A chunk whose process died is prepared here."""
        for chunk in self._chunks:
            try:
                refused, packed = chunk.future.result()
                refused, prepared = announced((refused, pickle.loads(packed)), chunk.messages)
            except BrokenProcessPool as exc:
                self._owner._broken(self._pool, exc)
                refused, prepared = prepare(self._kind, self._form, chunk.messages)
            yield {chunk.offset + index: why for index, why in refused.items()}, prepared

    def cancel(self) -> None:
        """Drops what is not prepared yet (the batch failed, or was written)."""
        for chunk in self._chunks:
            chunk.future.cancel()
