"""Rules of the estimation service behind each RPC; no gRPC here (datasets, jobs and calibration come
through small protocols, so tests and the servicer plug in what they have).

Jobs are read from this service's own copy (`services.estimation.jobs`, kept from JobChanged events), never
from the jobs service: the jobs service calls this one, so a call back would make each depend on the other.
A dataset's size comes with the request when the caller has read the dataset already (CreateJob's hardware
check), else from the datasets service.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from tuneforge.v1 import dataset_pb2, estimation_pb2, job_pb2

from services.estimation.advice import suggestions
from services.estimation.cache import MAX_KEY_BYTES, Memo
from services.estimation.catalog import Catalog, CatalogModel, Hardware
from services.estimation.estimator import (
    Architecture,
    Calibration,
    Fit,
    FitSearch,
    Setup,
    cost_key,
    evaluate,
    multi_node_note,
    training_tokens,
)
from services.estimation.jobs import JobRecord
from services.estimation.spec import ADAPTERS, METHODS, ResolvedSetup, resolve_setup
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.pools import BoundedPool
from services.kit.validation import check_organization
from tuneforge_core import states
from tuneforge_core.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
    not_found,
)
from tuneforge_core.models import ModelPolicy
from tuneforge_core.reasons import Reason

CHARS_PER_TOKEN = 4
# Tokens a chat template may add to an example beyond one per byte of its JSON line (a default system
# prompt, tool instructions, BOS): what the bound from DatasetStatistics.longest_example_bytes allows for.
TEMPLATE_TOKENS = 256
MODEL_TYPES = {1: "llm", 2: "vlm"}
# How many resolved specs, and how many computed fits (and searches for one), are remembered
# (services.estimation.cache): the most recently used; a few KiB each.
RESOLUTIONS_KEPT = 2048
FITS_KEPT = 8192
# Threads that search for fits the memo does not hold, off the event loop. The arithmetic is pure Python
# (it holds the GIL), so more threads would only queue: they keep the loop answering other calls meanwhile.
ESTIMATE_THREADS = 2


class DatasetLookup(Protocol):
    async def get_dataset(self, organization: str, dataset: str) -> dataset_pb2.Dataset:
        """The dataset by id or name; NotFound / InvalidArgument as the datasets service says."""


class JobLookup(Protocol):
    async def get(self, organization: str, job: str) -> JobRecord | None:
        """The organization's job by id or name as its latest JobChanged event said it; None when no event
        of it has arrived (see services.estimation.jobs for the window right after CreateJob)."""


class CalibrationSource(Protocol):
    async def for_family(self, family: str) -> dict[str, Calibration]:
        """Calibration per GPU type for a model family (empty: every estimate is a prior)."""


class NoCalibration:
    """A CalibrationSource with no measurements, for a deployment (or a test) without a database."""

    async def for_family(self, family: str) -> dict[str, Calibration]:
        return {}


@dataclass(frozen=True)
class Tokens:
    """What one epoch trains on."""

    per_epoch: int
    # Examples in the train split, when known (a dataset, not a bare token count).
    examples: int | None
    # Tokens of the longest example, when the dataset was tokenized; else at most this many, bounded from
    # the bytes of its line (`longest_bound`), when those are known.
    longest: int | None = None
    longest_bound: bool = False
    notes: tuple[str, ...] = ()
    validation: dataset_pb2.ValidationSummary | None = None

    @property
    def context(self) -> int | None:
        """Mean tokens per example: the attention context the time estimate uses."""
        return max(1, self.per_epoch // self.examples) if self.examples else None


@dataclass(frozen=True)
class JobEstimate:
    fit: Fit
    notes: list[str]


@dataclass(frozen=True)
class HardwareCheck:
    requested: Fit
    cheapest: Fit | None
    suggestions: list[str]
    notes: list[str]


@dataclass(frozen=True)
class CostReport:
    fit: Fit
    current_usd: float
    projected_usd: float
    elapsed_seconds: float
    fraction_complete: float
    notes: list[str]


@dataclass(frozen=True)
class AdapterNeeds:
    adapter: int
    fit: Fit
    cheapest: Fit | None


@dataclass(frozen=True)
class Requirements:
    model: CatalogModel
    requested: AdapterNeeds
    adapters: list[AdapterNeeds]


@dataclass(frozen=True)
class Plan:
    tokens_per_epoch: int
    training_tokens: int
    train_examples: int
    fits: list[Fit]
    cheapest: Fit | None
    requested: Fit | None
    suggestions: list[str]
    validation: dataset_pb2.ValidationSummary | None
    notes: list[str]


class EstimationManager:
    def __init__(
        self,
        catalog: Catalog,
        datasets: DatasetLookup,
        jobs: JobLookup | None = None,
        calibrations: CalibrationSource | None = None,
        models: ModelPolicy | None = None,
    ) -> None:
        self.catalog = catalog
        # Which local or stored models an organization's spec may name (config.json is read only there).
        self.models = models
        self.datasets = datasets
        self.jobs = jobs
        self.calibrations: CalibrationSource = calibrations or NoCalibration()
        # Answers worked out once: specs resolved against the catalog (by organization and the spec's
        # deterministic serialization), and fits by every figure they are computed from. The catalog does
        # not change while the process runs; calibrations are part of each fit's key.
        self._resolutions: Memo[tuple[str, bytes], ResolvedSetup] = Memo(RESOLUTIONS_KEPT)
        self._fits: Memo[Hashable, tuple[Any, ...]] = Memo(FITS_KEPT)
        self._model_pages: Memo[tuple[str, int, int, str | None], tuple[tuple[CatalogModel, ...], str]] = (
            Memo(RESOLUTIONS_KEPT)
        )
        self.pool = BoundedPool("estimates", ESTIMATE_THREADS, None)

    def close(self) -> None:
        """Lets the estimate threads end (a later call starts new ones)."""
        self.pool.shutdown()

    # ---- catalog ------------------------------------------------------------------------------------

    def list_hardware(self) -> list[Hardware]:
        return self.catalog.hardware_options()

    def list_models(
        self, family: str, model_type: int, size: int, token: str
    ) -> tuple[list[CatalogModel], str]:
        page, next_token = self.model_page(family, model_type, size, token)
        return list(page), next_token

    def model_page(
        self, family: str, model_type: int, size: int, token: str
    ) -> tuple[tuple[CatalogModel, ...], str]:
        """`list_models`, the page a tuple that is the same object for the same query and position (the
        catalog is fixed: each page is worked out once; the token is checked on every call)."""
        limit = page_size(size)
        query = {"family": family.lower(), "type": model_type}
        after = decode_token(token, query, cursor_type=str)
        wanted_type = MODEL_TYPES.get(model_type)
        if model_type and wanted_type is None:
            raise _invalid("type", "is not a ModelType")
        key = (family.lower(), model_type, limit, None if after is None else str(after))
        found = self._model_pages.get(key)
        if found is None:
            models = [
                m
                for m in self.catalog.models()
                if (not family or m.family.lower() == family.lower())
                and (not wanted_type or m.model_type == wanted_type)
                and (after is None or m.id.lower() > str(after))
            ]
            page = tuple(models[:limit])
            # The next page's token too: signing is deterministic, and costs more than the rest of a call.
            found = self._model_pages.put(
                key, (page, encode_token(page[-1].id.lower(), query) if len(models) > limit else ""))
        return found

    async def model_requirements(
        self,
        model_id: str,
        adapter: int,
        method: int,
        max_seq_length: int,
        batch_size: int,
        gradient_checkpointing: bool,
    ) -> Requirements:
        """Memory of the model for each adapter type on one GPU, and the cheapest GPU setup that fits it."""
        adapter = adapter or job_pb2.ADAPTER_TYPE_LORA
        method = method or job_pb2.TRAINING_METHOD_SFT
        v = Violations()
        v.check(bool(model_id), "model_id", "is required")
        v.check(adapter in ADAPTERS, "adapter", "is not an AdapterType")
        v.check(method in METHODS, "method", "is not a TrainingMethod")
        v.check(
            max_seq_length == 0 or 16 <= max_seq_length <= 131072,
            "max_seq_length",
            "must be between 16 and 131072",
        )
        v.check(0 <= batch_size <= 256, "batch_size", "must be between 1 and 256")
        v.raise_if_any("Invalid GetModelRequirements request")
        model = self.catalog.model(model_id)
        if model is None:
            raise not_found("base model", model_id)
        calibrations = await self.calibrations.for_family(model.family)
        base = Setup(
            method=METHODS[method],
            max_seq_length=max_seq_length or 2048,
            batch_size=batch_size or 1,
            gradient_checkpointing=gradient_checkpointing,
        )
        needs: list[AdapterNeeds] = []
        for kind in sorted(ADAPTERS):  # LoRA, QLoRA, full, prompt tuning, in job.proto's order
            setup = replace(base, adapter=ADAPTERS[kind])
            cheapest = await self._cheapest(model.architecture, setup, None, calibrations)
            if cheapest is not None:
                needs.append(AdapterNeeds(kind, cheapest, cheapest))
                continue
            largest = max(self.catalog.gpus(), key=lambda h: h.memory_bytes)
            fit = self._evaluate_setup(model.architecture, setup, largest, None, calibrations)
            needs.append(AdapterNeeds(kind, fit, None))
        chosen = next(n for n in needs if n.adapter == adapter)
        return Requirements(model=model, requested=chosen, adapters=needs)

    # ---- estimates ----------------------------------------------------------------------------------

    async def estimate_job(
        self,
        organization: str,
        spec: job_pb2.JobSpec,
        tokens_per_epoch: int,
        dataset_size: estimation_pb2.DatasetSize | None = None,
    ) -> JobEstimate:
        resolved = await self._resolve(organization, spec, tokens_per_epoch)
        tokens = await self._tokens(organization, spec, tokens_per_epoch, dataset_size, required=False)
        notes = [*resolved.notes, *(tokens.notes if tokens else ())]
        resolved = _at_longest_example(resolved, tokens, notes)
        if tokens is None:
            notes.append("no dataset and no tokens_per_epoch: time and cost are not estimated")
        calibrations = await self.calibrations.for_family(resolved.model.family)
        fit = await self._on_spec_hardware(resolved, tokens, notes, calibrations)
        _note_multi_node(resolved.setup, fit, notes)
        return JobEstimate(fit=fit, notes=notes)

    async def validate_hardware(
        self,
        organization: str,
        spec: job_pb2.JobSpec,
        tokens_per_epoch: int,
        dataset_size: estimation_pb2.DatasetSize | None = None,
    ) -> HardwareCheck:
        resolved = await self._resolve(organization, spec, tokens_per_epoch)
        hardware = resolved.hardware
        if hardware is None:
            raise _invalid("spec.hardware.gpu_type", "is required to validate hardware")
        tokens = await self._tokens(organization, spec, tokens_per_epoch, dataset_size, required=False)
        notes = [*resolved.notes, *(tokens.notes if tokens else ())]
        resolved = _at_longest_example(resolved, tokens, notes)
        arch, setup = resolved.model.architecture, resolved.setup
        calibrations = await self.calibrations.for_family(resolved.model.family)
        requested = self._evaluate(resolved, hardware, tokens, calibrations)
        _note_multi_node(setup, requested, notes)
        if requested.fits:
            return HardwareCheck(requested=requested, cheapest=None, suggestions=[], notes=notes)
        cheapest = await self._cheapest(arch, setup, tokens, calibrations)
        return HardwareCheck(
            requested=requested,
            cheapest=cheapest,
            notes=notes,
            suggestions=await self._suggestions(arch, setup, hardware),
        )

    async def estimate_cost(
        self,
        organization: str,
        spec: job_pb2.JobSpec,
        tokens_per_epoch: int,
        elapsed_seconds: float,
        job_id: str = "",
    ) -> CostReport:
        """The projected total and the cost so far: of a spec given the seconds it has run, or of a job,
        whose own spec, start time and progress are used as its latest JobChanged event said them."""
        v = Violations()
        v.check(
            math.isfinite(elapsed_seconds) and elapsed_seconds >= 0,
            "elapsed_seconds",
            "must be a non-negative number of seconds",
        )
        v.raise_if_any("Invalid EstimateCost request")
        job: JobRecord | None = None
        if job_id:
            check = Violations()
            check_organization(check, organization)
            check.raise_if_any("Invalid request")
            if self.jobs is None:
                raise _invalid("job_id", "cannot be looked up: this deployment keeps no record of jobs")
            job = await self.jobs.get(organization, job_id)
            if job is None:
                raise _job_not_found(organization, job_id)
            spec = job.spec
        resolved = await self._resolve(organization, spec, tokens_per_epoch)
        tokens = await self._tokens(organization, spec, tokens_per_epoch, None, required=job is None)
        notes = [*resolved.notes, *(tokens.notes if tokens else ())]
        resolved = _at_longest_example(resolved, tokens, notes)
        calibrations = await self.calibrations.for_family(resolved.model.family)
        fit = await self._on_spec_hardware(resolved, tokens, notes, calibrations)
        _note_multi_node(resolved.setup, fit, notes)
        rate = fit.cost.hourly_usd * fit.gpu_count / 3600
        estimated_seconds = fit.time.total_seconds if fit.time else None
        if job is None:
            projected = fit.cost.total_usd
            fraction = min(1.0, elapsed_seconds / estimated_seconds) if estimated_seconds else 0.0
            return CostReport(
                fit=fit,
                current_usd=elapsed_seconds * rate,
                projected_usd=projected,
                elapsed_seconds=elapsed_seconds,
                fraction_complete=fraction,
                notes=notes,
            )
        elapsed, fraction, remaining = _job_pace(job, estimated_seconds, notes)
        current = elapsed * rate
        projected = current + remaining * rate if remaining is not None else fit.cost.total_usd
        return CostReport(
            fit=fit,
            current_usd=current,
            projected_usd=projected,
            elapsed_seconds=elapsed,
            fraction_complete=fraction,
            notes=notes,
        )

    async def plan_job(self, organization: str, spec: job_pb2.JobSpec,
                       dataset_size: estimation_pb2.DatasetSize | None = None) -> Plan:
        resolved = await self._resolve(organization, spec, 0)
        tokens = await self._tokens(organization, spec, 0, dataset_size, required=True,
                                    instead="dataset_size")
        assert tokens is not None
        notes = [*resolved.notes, *tokens.notes]
        resolved = _at_longest_example(resolved, tokens, notes)
        arch, setup = resolved.model.architecture, resolved.setup
        calibrations = await self.calibrations.for_family(resolved.model.family)
        total = training_tokens(setup, tokens.per_epoch, tokens.examples)
        fits = await self._smallest_fits(arch, setup, total, tokens.context, calibrations)
        gpu_fits = [f for f in fits if f.fits and not f.hardware.is_cpu]
        cheapest = min(gpu_fits, key=cost_key) if gpu_fits else None
        requested, advice = None, []
        if resolved.hardware is not None:
            requested = self._evaluate(resolved, resolved.hardware, tokens, calibrations)
            _note_multi_node(setup, requested, notes)
            if not requested.fits:
                advice = await self._suggestions(arch, setup, resolved.hardware)
        return Plan(
            tokens_per_epoch=tokens.per_epoch,
            training_tokens=total,
            train_examples=tokens.examples or 0,
            fits=fits,
            cheapest=cheapest,
            requested=requested,
            suggestions=advice,
            validation=tokens.validation,
            notes=notes,
        )

    # ---- helpers ------------------------------------------------------------------------------------

    async def _resolve(
        self, organization: str, spec: job_pb2.JobSpec, tokens_per_epoch: int
    ) -> ResolvedSetup:
        """The spec resolved against the catalog: remembered by organization and the spec's bytes, unless
        a model's architecture came from a file; worked out off the event loop when not remembered."""
        v = Violations()
        check_organization(v, organization)
        v.check(tokens_per_epoch >= 0, "tokens_per_epoch", "must not be negative")
        v.raise_if_any("Invalid request")
        key = None
        if spec.ByteSize() <= MAX_KEY_BYTES:
            key = (organization, spec.SerializeToString(deterministic=True))
            found = self._resolutions.get(key)
            if found is not None:
                return found
        resolved = await self.pool.run(
            resolve_setup, spec, self.catalog, models=self.models, organization=organization
        )
        if key is not None and not resolved.from_files:
            self._resolutions.put(key, resolved)
        return resolved

    def _evaluate(
        self,
        resolved: ResolvedSetup,
        hardware: Hardware,
        tokens: Tokens | None,
        calibrations: dict[str, Calibration],
    ) -> Fit:
        arch, setup = resolved.model.architecture, resolved.setup
        return self._evaluate_setup(arch, setup, hardware, tokens, calibrations)

    def _evaluate_setup(
        self,
        arch: Architecture,
        setup: Setup,
        hardware: Hardware,
        tokens: Tokens | None,
        calibrations: dict[str, Calibration],
    ) -> Fit:
        """`evaluate` on one hardware option (one estimate: computed on the loop, then remembered)."""
        total = training_tokens(setup, tokens.per_epoch, tokens.examples) if tokens else None
        context = tokens.context if tokens else None
        calibration = calibrations.get(hardware.gpu_type)
        key = ("evaluate", arch, setup, hardware, total, context, calibration)
        found = self._fits.get(key)
        if found is None:
            fit = evaluate(arch, setup, hardware, total, context, calibration=calibration)
            found = self._fits.put(key, (fit,))
        result: Fit = found[0]
        return result

    async def _on_spec_hardware(
        self,
        resolved: ResolvedSetup,
        tokens: Tokens | None,
        notes: list[str],
        calibrations: dict[str, Calibration],
    ) -> Fit:
        """The estimate on the spec's GPU type, or on the cheapest that fits when the spec names none."""
        if resolved.hardware is not None:
            return self._evaluate(resolved, resolved.hardware, tokens, calibrations)
        cheapest = await self._cheapest(resolved.model.architecture, resolved.setup, tokens, calibrations)
        if cheapest is not None:
            notes.append(
                "spec.hardware.gpu_type is empty: estimated on the cheapest configuration that "
                f"fits, {cheapest.gpu_count} x {cheapest.hardware.display_name}"
            )
            return cheapest
        largest = max(self.catalog.gpus(), key=lambda h: h.memory_bytes)
        notes.append(f"no hardware option fits this spec; estimated on {largest.display_name}")
        return self._evaluate(resolved, largest, tokens, calibrations)

    async def _cheapest(
        self, arch: Architecture, setup: Setup, tokens: Tokens | None, calibrations: dict[str, Calibration]
    ) -> Fit | None:
        """The cheapest GPU configuration that fits (the CPU option is for development, never advised)."""
        total = training_tokens(setup, tokens.per_epoch, tokens.examples) if tokens else None
        context = tokens.context if tokens else None
        key = ("cheapest", arch, setup, total, context, _calibration_key(calibrations))
        found = self._fits.get(key)
        if found is None:
            search = FitSearch(arch, replace(setup, gpu_count=1), total, context)
            cheapest = await self.pool.run(search.cheapest, self.catalog.gpus(), calibrations)
            found = self._fits.put(key, (cheapest,))
        answer: Fit | None = found[0]
        return answer

    async def _smallest_fits(
        self,
        arch: Architecture,
        setup: Setup,
        total: int,
        context: int | None,
        calibrations: dict[str, Calibration],
    ) -> list[Fit]:
        """The smallest fit on every hardware option, CPU included (PlanJob's table)."""
        key = ("smallest", arch, setup, total, context, _calibration_key(calibrations))
        found = self._fits.get(key)
        if found is None:
            search = FitSearch(arch, replace(setup, gpu_count=1), total, context)
            options = self.catalog.hardware_options()

            def fits() -> tuple[Fit, ...]:
                return tuple(search.smallest_fit(hw, calibrations.get(hw.gpu_type)) for hw in options)

            found = self._fits.put(key, await self.pool.run(fits))
        return list(found)

    async def _suggestions(self, arch: Architecture, setup: Setup, hardware: Hardware) -> list[str]:
        """What to change so that the spec fits `hardware` (each change re-estimated: off the loop)."""
        key = ("advice", arch, setup, hardware)
        found = self._fits.get(key)
        if found is None:
            found = self._fits.put(key, tuple(await self.pool.run(suggestions, arch, setup, hardware)))
        return list(found)

    async def _tokens(
        self,
        organization: str,
        spec: job_pb2.JobSpec,
        tokens_per_epoch: int,
        dataset_size: estimation_pb2.DatasetSize | None,
        *,
        required: bool,
        instead: str = "tokens_per_epoch",
    ) -> Tokens | None:
        """Tokens per epoch: as given, else from the dataset's size (sent with the request, else read from
        the datasets service, which must say the dataset is READY). `instead`: the request's field that
        can stand in for a dataset, as an error names it."""
        if tokens_per_epoch > 0:
            return Tokens(per_epoch=tokens_per_epoch, examples=None)
        if dataset_size is not None:
            return tokens_of(dataset_size)
        if not spec.dataset:
            if required:
                raise _invalid("spec.dataset", f"is required to count training tokens (or set {instead})")
            return None
        dataset = await self.datasets.get_dataset(organization, spec.dataset)
        if dataset.state != dataset_pb2.DATASET_STATE_READY:
            raise FailedPrecondition(
                f"Dataset '{spec.dataset}' is not READY, so its size is not known yet.",
                reason=Reason.DATASET_NOT_READY,
                metadata={"dataset": dataset.id, "organization": organization},
            )
        return replace(tokens_of(size_of(dataset, spec.dataset)), validation=dataset.validation)


def size_of(dataset: dataset_pb2.Dataset, ref: str = "") -> estimation_pb2.DatasetSize:
    """What an estimate reads of a dataset."""
    train = sum(s.example_count for s in dataset.splits if s.kind == dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
    return estimation_pb2.DatasetSize(
        dataset=ref or dataset.id, statistics=dataset.statistics, train_examples=train
    )


def check_dataset_size(size: estimation_pb2.DatasetSize) -> None:
    """Raises InvalidArgument naming each negative count (a caller's bug: no dataset has one)."""
    v = Violations()
    stats = size.statistics
    for path, value in (
        ("dataset_size.train_examples", size.train_examples),
        ("dataset_size.statistics.example_count", stats.example_count),
        ("dataset_size.statistics.total_characters", stats.total_characters),
        ("dataset_size.statistics.tokens.train_tokens", stats.tokens.train_tokens),
        ("dataset_size.statistics.tokens.total", stats.tokens.total),
        ("dataset_size.statistics.tokens.max", stats.tokens.max),
        ("dataset_size.statistics.longest_example_bytes", stats.longest_example_bytes),
    ):
        v.check(value >= 0, path, f"must not be negative, got {value}")
    v.raise_if_any("Invalid request")


def tokens_of(size: estimation_pb2.DatasetSize) -> Tokens:
    """Tokens one epoch trains on: the dataset's train_tokens (its train split, each example cut at the
    tokenizer's max length), else its total scaled to the train split, else characters / 4."""
    check_dataset_size(size)
    stats, name = size.statistics, size.dataset
    notes: list[str] = []
    train = size.train_examples
    examples = train or stats.example_count or None
    share = min(1.0, train / stats.example_count) if train and stats.example_count else 1.0
    if stats.tokens.train_tokens > 0:
        total = stats.tokens.train_tokens
    elif stats.tokens.total > 0:
        total = round(stats.tokens.total * share)
        notes.append(
            f"dataset '{name}' has no train_tokens: its token total scaled to the train "
            f"split ({share:.0%} of the examples)"
        )
    else:
        total = round(math.ceil(stats.total_characters / CHARS_PER_TOKEN) * share)
        # Memory: at most a token per byte of the longest example's line, plus a template's own, when its
        # bytes are known; else as if an example filled max_seq_length. Either is above the real peak,
        # which a tokenizer at upload gives.
        if stats.longest_example_bytes > 0:
            memory = (f"for memory at most one token per byte of its longest example "
                      f"({stats.longest_example_bytes:,} bytes) plus {TEMPLATE_TOKENS} of a chat template")
        else:
            memory = "memory as if an example filled max_seq_length"
        notes.append(
            f"dataset '{name}' has no token statistics: assumed {CHARS_PER_TOKEN} characters per token for "
            f"time and cost, and {memory}; upload it with a tokenizer (UploadDatasetMetadata.tokenizer, "
            "`tuneforge datasets upload --tokenizer MODEL`) for memory at its longest example in tokens"
        )
    if stats.tokens.max > 0:
        return Tokens(per_epoch=int(total), examples=examples, longest=stats.tokens.max, notes=tuple(notes))
    bound = stats.longest_example_bytes + TEMPLATE_TOKENS if stats.longest_example_bytes > 0 else None
    return Tokens(per_epoch=int(total), examples=examples, longest=bound, longest_bound=bound is not None,
                  notes=tuple(notes))


def _calibration_key(calibrations: dict[str, Calibration]) -> tuple[tuple[str, Calibration], ...]:
    """Calibrations as part of a memo key: a new measurement makes a new key."""
    return tuple(sorted(calibrations.items()))


def _job_not_found(organization: str, job_id: str) -> NotFound:
    """NOT_FOUND for `job_id`, saying why a job created a moment ago may not be known yet."""
    return NotFound(
        f"job '{job_id}' (job_id) was not found in organization '{organization}'. A job is known to the "
        "estimation service once its first event has arrived, normally within a second of CreateJob: "
        "retry shortly if it was just created.",
        metadata={"resource_type": "job", "resource": job_id, "organization": organization},
    )


def _job_pace(
    job: JobRecord, estimated_seconds: float | None, notes: list[str]
) -> tuple[float, float, float | None]:
    """Seconds run, fraction of steps done, and seconds still to go (None: use the estimate), from the
    job's own record: a finished job's end time, else its progress (ETA, or steps done at its pace)."""
    if job.start_time is None:
        notes.append(f"job {job.id} has not started: the projection is the estimate")
        return 0.0, 0.0, None
    start = job.start_time.timestamp()
    final = states.is_final(job.state)
    end = job.end_time.timestamp() if final and job.end_time is not None else time.time()
    elapsed = max(0.0, end - start)
    progress = job.progress
    fraction = min(1.0, progress.step / progress.total_steps) if progress.total_steps > 0 else 0.0
    if final:
        notes.append(f"job {job.id} has finished: the projected total is what it cost")
        return elapsed, 1.0 if job.state == job_pb2.JOB_STATE_SUCCEEDED else fraction, 0.0
    if progress.HasField("eta_seconds"):
        notes.append(f"projected from the job's reported ETA ({progress.eta_seconds:.0f} s)")
        return elapsed, fraction, max(0.0, progress.eta_seconds)
    if fraction > 0:
        notes.append(f"projected from the job's pace: {fraction:.0%} of its steps in {elapsed:.0f} s")
        return elapsed, fraction, elapsed * (1 - fraction) / fraction
    notes.append("the job reports no progress yet: the rest is the estimate less the time run")
    return elapsed, fraction, max(0.0, (estimated_seconds or elapsed) - elapsed)


def _note_multi_node(setup: Setup, fit: Fit, notes: list[str]) -> None:
    """States what a multi-node estimate assumes (sharding over every node's GPUs, the inter-node
    bandwidth), so a caller can weigh the time it promises."""
    note = multi_node_note(setup, fit)
    if note:
        notes.append(note)


def _at_longest_example(resolved: ResolvedSetup, tokens: Tokens | None, notes: list[str]) -> ResolvedSetup:
    """Without packing a batch is padded to its longest example, so when the dataset's longest example is
    shorter than max_seq_length, memory peaks at that length instead."""
    setup = resolved.setup
    if tokens is None or not tokens.longest or setup.packing or tokens.longest >= setup.max_seq_length:
        return resolved
    if tokens.longest_bound:
        notes.append(
            f"memory peaks at most at {tokens.longest} tokens (the dataset's longest example, bounded from "
            f"its bytes), below max_seq_length {setup.max_seq_length}"
        )
    else:
        notes.append(
            f"memory peaks at the dataset's longest example ({tokens.longest} tokens), below "
            f"max_seq_length {setup.max_seq_length}"
        )
    return replace(resolved, setup=replace(setup, max_seq_length=tokens.longest))


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"Invalid request: {field}: {description}", violations=[FieldViolation(field, description)]
    )
