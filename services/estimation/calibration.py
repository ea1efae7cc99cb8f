"""Calibration: what finished jobs measured, turned into factors on later estimates of the same model family
on the same GPU type.

A job's SUCCEEDED JobChanged event carries its spec and `output.final_metrics`; the worker reports
`train_tokens_per_second` (else `num_input_tokens_seen` / `train_runtime`), `peak_gpu_memory_bytes` (peak of
torch.cuda.max_memory_allocated) and `peak_rss_bytes` (the training process on a CPU worker). Each is stored
beside what the prior predicted for that very spec, and an estimate uses

- throughput: the median of measured / predicted over the most recent jobs (a best guess of time), and
- memory: the largest measured / predicted seen, never below `MIN_MEMORY_FACTOR` (admission must not let a
  job through that then runs out of memory, so one bad surprise outweighs many comfortable runs).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tuneforge.v1 import job_pb2

from services.estimation.cache import Expiring
from services.estimation.catalog import Catalog
from services.estimation.estimator import Calibration, memory_per_gpu, tokens_per_second
from services.estimation.models import CalibrationRow, DeletedJobRow, record_deleted
from services.estimation.spec import resolve_setup
from services.kit.db import Database
from tuneforge_core.errors import TuneForgeError
from tuneforge_core.ids import new_id
from tuneforge_core.models import ModelPolicy

log = logging.getLogger(__name__)

# Most recent jobs a factor is computed from: old hardware drivers and library versions age out.
WINDOW = 20
MIN_MEMORY_FACTOR = 0.9
# Ratios outside these bounds are measurement errors (a job that barely ran), not calibration.
RATIO_BOUNDS = (0.05, 20.0)
CPU = "cpu"
# Seconds `CalibrationStore.for_family` answers from memory (see the class).
CALIBRATION_TTL_S = 5.0


@dataclass(frozen=True)
class Measurement:
    """What one finished job measured, and what the prior had predicted for it."""

    job_id: str
    family: str
    gpu_type: str
    gpu_count: int
    adapter: str
    method: str
    base_model: str
    measured_tokens_per_second: float | None
    predicted_tokens_per_second: float
    measured_peak_bytes: int | None
    predicted_peak_bytes: int
    # When the job finished (its end time); None: when it is recorded.
    recorded_at: datetime | None = None


def measure(job: job_pb2.Job, catalog: Catalog, models: ModelPolicy | None = None) -> Measurement | None:
    """The measurement of a SUCCEEDED job, or None when it measured nothing usable or its model or
    hardware is unknown here (the reason is logged: such a job simply does not calibrate). A local or
    stored model's config.json is read only as `models` allows it for the job's organization."""
    metrics = job.output.final_metrics
    try:
        resolved = resolve_setup(job.spec, catalog, models=models, organization=job.organization)
    except TuneForgeError as exc:
        log.info("job %s does not calibrate: its spec does not resolve here (%s)", job.id, exc)
        return None
    gpu_type = job.spec.hardware.gpu_type or (CPU if "peak_gpu_memory_bytes" not in metrics else "")
    hardware = catalog.hardware(gpu_type) if gpu_type else None
    if hardware is None:
        log.info("job %s does not calibrate: its GPU type is not known", job.id)
        return None
    setup = resolved.setup
    arch = resolved.model.architecture

    measured_tps = metrics.get("train_tokens_per_second")
    seen, runtime = metrics.get("num_input_tokens_seen"), metrics.get("train_runtime")
    if not measured_tps and seen and runtime:
        measured_tps = seen / runtime
    context = setup.sequence_length
    global_batch = setup.batch_size * setup.gradient_accumulation_steps * setup.world_size
    if seen and job.progress.total_steps:
        context = max(1, min(context, round(seen / (job.progress.total_steps * global_batch))))
    predicted_tps = tokens_per_second(arch, setup, hardware, context)

    memory = memory_per_gpu(arch, setup, hardware)
    if hardware.is_cpu:
        # The process' resident set: interpreter, libraries and all, which the framework overhead stands for.
        measured_peak, predicted_peak = metrics.get("peak_rss_bytes"), memory.total
    else:
        measured_peak, predicted_peak = metrics.get("peak_gpu_memory_bytes"), memory.measured_part
    if not measured_tps and not measured_peak:
        log.info("job %s does not calibrate: its final metrics hold no throughput or peak memory", job.id)
        return None
    return Measurement(
        job_id=job.id,
        family=resolved.model.family,
        gpu_type=hardware.gpu_type,
        gpu_count=setup.world_size,
        adapter=setup.adapter,
        method=setup.method,
        base_model=job.spec.base_model[:255],
        measured_tokens_per_second=float(measured_tps) if measured_tps else None,
        predicted_tokens_per_second=predicted_tps,
        measured_peak_bytes=int(measured_peak) if measured_peak else None,
        predicted_peak_bytes=predicted_peak,
        recorded_at=job.end_time.ToDatetime(tzinfo=UTC) if job.HasField("end_time") else None,
    )


def _ratio(measured: float | None, predicted: float | None) -> float | None:
    if not measured or not predicted:
        return None
    ratio = measured / predicted
    return ratio if RATIO_BOUNDS[0] <= ratio <= RATIO_BOUNDS[1] else None


def factors(rows: list[CalibrationRow]) -> Calibration | None:
    """The calibration the rows support; None without a usable ratio."""
    throughput = [
        r
        for r in (_ratio(x.measured_tokens_per_second, x.predicted_tokens_per_second) for x in rows)
        if r is not None
    ]
    memory = [
        r for r in (_ratio(x.measured_peak_bytes, x.predicted_peak_bytes) for x in rows) if r is not None
    ]
    if not throughput and not memory:
        return None
    return Calibration(
        jobs=len(rows),
        throughput=statistics.median(throughput) if throughput else None,
        memory=max(MIN_MEMORY_FACTOR, max(memory)) if memory else None,
    )


class CalibrationStore:
    """The measurements, in the estimation service's own tables.

    `for_family` answers from memory for `ttl_s` seconds (every estimate reads it, and it changes only when
    a job succeeds): a measurement this process records is seen at once, one another replica of the
    service records within `ttl_s`."""

    def __init__(self, db: Database, ttl_s: float = CALIBRATION_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self._families: Expiring[str, dict[str, Calibration]] = Expiring(ttl_s, clock=clock)

    async def record(self, measurement: Measurement) -> bool:
        """Stores a job's measurement once; False when the job was already recorded."""

        def _record(session: Session) -> bool:
            if session.get(CalibrationRow, measurement.job_id) is not None:
                return False
            if session.get(DeletedJobRow, measurement.job_id) is not None:
                return False  # an older event of a job DeleteJob deleted
            fields = {k: v for k, v in measurement.__dict__.items() if v is not None or k != "recorded_at"}
            session.add(CalibrationRow(**fields))
            return True

        try:
            return await self.db.run(_record)
        finally:
            self._families.forget()

    async def detach(self, job_id: str) -> bool:
        """A job was deleted (DeleteJob): its measurement stays, for it tells nothing of the job's data or
        organization and later estimates of its family still need it, but no longer under the job's id
        (an anonymous `cal_…` id instead) nor naming its base model (which may be the organization's own
        output). Records the job as deleted, so that a late event of it is not measured again. Returns
        whether a measurement was detached; idempotent, and safe beside the job copy's `forget` recording the
        same deletion at the same time (models.record_deleted)."""

        def _detach(session: Session) -> bool:
            record_deleted(session, job_id)
            moved = session.execute(update(CalibrationRow).where(CalibrationRow.job_id == job_id)
                                    .values(job_id=new_id("cal"), base_model="")
                                    .execution_options(synchronize_session=False))
            return bool(moved.rowcount)  # type: ignore[attr-defined]

        try:
            return await self.db.run(_detach)
        finally:
            self._families.forget()

    async def for_family(self, family: str) -> dict[str, Calibration]:
        """Calibration per GPU type for one model family, from its most recent jobs on each."""
        known = self._families.get(family)
        if known is not None:
            return dict(known)
        generation = self._families.generation()

        def _load(session: Session) -> dict[str, list[CalibrationRow]]:
            rows = session.scalars(
                select(CalibrationRow)
                .where(CalibrationRow.family == family)
                .order_by(CalibrationRow.recorded_at.desc())
            ).all()
            by_gpu: dict[str, list[CalibrationRow]] = {}
            for row in rows:
                if len(by_gpu.setdefault(row.gpu_type, [])) < WINDOW:
                    by_gpu[row.gpu_type].append(row)
            return by_gpu

        out: dict[str, Calibration] = {}
        for gpu_type, rows in (await self.db.run(_load)).items():
            calibration = factors(rows)
            if calibration is not None:
                out[gpu_type] = calibration
        self._families.put(family, out, generation)
        return dict(out)
