"""Rules of the estimation service behind each RPC; no gRPC here (datasets come through `DatasetLookup`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from tuneforge.v1 import dataset_pb2, job_pb2

from services.estimation.advice import suggestions
from services.estimation.catalog import Catalog, CatalogModel, Hardware
from services.estimation.estimator import (
    Architecture,
    Fit,
    Memory,
    Setup,
    cost_key,
    evaluate,
    memory_per_gpu,
    smallest_fit,
    training_tokens,
)
from services.estimation.spec import ADAPTERS, ResolvedSpec, resolve_spec
from services.kit.errors import FailedPrecondition, FieldViolation, InvalidArgument, Violations, not_found
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.validation import check_organization

CHARS_PER_TOKEN = 4
MODEL_TYPES = {1: "llm", 2: "vlm"}


class DatasetLookup(Protocol):
    async def get_dataset(self, organization: str, dataset: str) -> dataset_pb2.Dataset:
        """The dataset by id or name; NotFound / InvalidArgument as the datasets service says."""


@dataclass(frozen=True)
class Tokens:
    """What one epoch trains on."""

    per_epoch: int
    # Examples in the train split, when known (a dataset, not a bare token count).
    examples: int | None
    # Tokens of the longest example, when the dataset was tokenized.
    longest: int | None = None
    notes: tuple[str, ...] = ()

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


@dataclass(frozen=True)
class CostReport:
    fit: Fit
    current_usd: float


@dataclass(frozen=True)
class Plan:
    tokens_per_epoch: int
    training_tokens: int
    fits: list[Fit]
    cheapest: Fit | None
    notes: list[str]


class EstimationManager:
    def __init__(self, catalog: Catalog, datasets: DatasetLookup) -> None:
        self.catalog = catalog
        self.datasets = datasets

    # ---- catalog ------------------------------------------------------------------------------------

    def list_hardware(self) -> list[Hardware]:
        return self.catalog.hardware_options()

    def list_models(self, family: str, model_type: int, size: int,
                    token: str) -> tuple[list[CatalogModel], str]:
        limit = page_size(size)
        query = {"family": family.lower(), "type": model_type}
        after = decode_token(token, query)
        wanted_type = MODEL_TYPES.get(model_type)
        if model_type and wanted_type is None:
            raise _invalid("type", "is not a ModelType")
        models = [m for m in self.catalog.models()
                  if (not family or m.family.lower() == family.lower())
                  and (not wanted_type or m.model_type == wanted_type)
                  and (after is None or m.id.lower() > str(after))]
        page = models[:limit]
        next_token = encode_token(page[-1].id.lower(), query) if len(models) > limit else ""
        return page, next_token

    def model_requirements(self, model_id: str, adapter: int, max_seq_length: int,
                           batch_size: int) -> tuple[CatalogModel, Memory, Fit | None]:
        """Memory of the model with the spec defaults on one GPU, and the cheapest GPU setup that fits."""
        v = Violations()
        v.check(bool(model_id), "model_id", "is required")
        v.check(adapter in ADAPTERS, "adapter", "is not an AdapterType")
        v.check(max_seq_length == 0 or 16 <= max_seq_length <= 131072, "max_seq_length",
                "must be between 16 and 131072")
        v.check(0 <= batch_size <= 256, "batch_size", "must be between 1 and 256")
        v.raise_if_any("Invalid GetModelRequirements request")
        model = self.catalog.model(model_id)
        if model is None:
            raise not_found("base model", model_id)
        setup = Setup(adapter=ADAPTERS[adapter], max_seq_length=max_seq_length or 2048,
                      batch_size=batch_size or 1)
        cheapest = self._cheapest(model.architecture, setup, None)
        reference = cheapest.hardware if cheapest else max(self.catalog.gpus(), key=lambda h: h.memory_bytes)
        return model, memory_per_gpu(model.architecture, setup, reference), cheapest

    # ---- estimates ----------------------------------------------------------------------------------

    async def estimate_job(self, organization: str, spec: job_pb2.JobSpec,
                           tokens_per_epoch: int) -> JobEstimate:
        resolved = self._resolve(organization, spec, tokens_per_epoch)
        tokens = await self._tokens(organization, spec, tokens_per_epoch, required=False)
        notes = [*resolved.notes, *(tokens.notes if tokens else ())]
        resolved = _at_longest_example(resolved, tokens, notes)
        if tokens is None:
            notes.append("no dataset and no tokens_per_epoch: time and cost are not estimated")
        fit = self._on_spec_hardware(resolved, tokens, notes)
        return JobEstimate(fit=fit, notes=notes)

    async def validate_hardware(self, organization: str, spec: job_pb2.JobSpec,
                                tokens_per_epoch: int) -> HardwareCheck:
        resolved = self._resolve(organization, spec, tokens_per_epoch)
        hardware = resolved.hardware
        if hardware is None:
            raise _invalid("spec.hardware.gpu_type", "is required to validate hardware")
        tokens = await self._tokens(organization, spec, tokens_per_epoch, required=False)
        resolved = _at_longest_example(resolved, tokens, [])
        arch, setup = resolved.model.architecture, resolved.setup
        requested = self._evaluate(resolved, hardware, tokens)
        if requested.fits:
            return HardwareCheck(requested=requested, cheapest=None, suggestions=[])
        cheapest = self._cheapest(arch, setup, tokens)
        return HardwareCheck(requested=requested, cheapest=cheapest,
                             suggestions=suggestions(arch, setup, hardware))

    async def estimate_cost(self, organization: str, spec: job_pb2.JobSpec, tokens_per_epoch: int,
                            elapsed_seconds: float) -> CostReport:
        v = Violations()
        v.check(math.isfinite(elapsed_seconds) and elapsed_seconds >= 0, "elapsed_seconds",
                "must be a non-negative number of seconds")
        v.raise_if_any("Invalid EstimateCost request")
        resolved = self._resolve(organization, spec, tokens_per_epoch)
        tokens = await self._tokens(organization, spec, tokens_per_epoch, required=True)
        resolved = _at_longest_example(resolved, tokens, [])
        fit = self._on_spec_hardware(resolved, tokens, [])
        current = elapsed_seconds / 3600 * fit.cost.hourly_usd * fit.gpu_count
        return CostReport(fit=fit, current_usd=current)

    async def plan_job(self, organization: str, spec: job_pb2.JobSpec) -> Plan:
        resolved = self._resolve(organization, spec, 0)
        tokens = await self._tokens(organization, spec, 0, required=True)
        assert tokens is not None
        notes = [*resolved.notes, *tokens.notes]
        resolved = _at_longest_example(resolved, tokens, notes)
        arch, setup = resolved.model.architecture, resolved.setup
        total = training_tokens(setup, tokens.per_epoch, tokens.examples)
        fits = [smallest_fit(arch, setup, hw, total, tokens.context)
                for hw in self.catalog.hardware_options()]
        gpu_fits = [f for f in fits if f.fits and not f.hardware.is_cpu]
        cheapest = min(gpu_fits, key=cost_key) if gpu_fits else None
        return Plan(tokens_per_epoch=tokens.per_epoch, training_tokens=total, fits=fits, cheapest=cheapest,
                    notes=notes)

    # ---- helpers ------------------------------------------------------------------------------------

    def _resolve(self, organization: str, spec: job_pb2.JobSpec, tokens_per_epoch: int) -> ResolvedSpec:
        v = Violations()
        check_organization(v, organization)
        v.check(tokens_per_epoch >= 0, "tokens_per_epoch", "must not be negative")
        v.raise_if_any("Invalid request")
        return resolve_spec(spec, self.catalog)

    def _evaluate(self, resolved: ResolvedSpec, hardware: Hardware, tokens: Tokens | None) -> Fit:
        setup = resolved.setup
        total = training_tokens(setup, tokens.per_epoch, tokens.examples) if tokens else None
        return evaluate(resolved.model.architecture, setup, hardware, total,
                        tokens.context if tokens else None)

    def _on_spec_hardware(self, resolved: ResolvedSpec, tokens: Tokens | None, notes: list[str]) -> Fit:
        """The estimate on the spec's GPU type, or on the cheapest that fits when the spec names none."""
        if resolved.hardware is not None:
            return self._evaluate(resolved, resolved.hardware, tokens)
        cheapest = self._cheapest(resolved.model.architecture, resolved.setup, tokens)
        if cheapest is not None:
            notes.append("spec.hardware.gpu_type is empty: estimated on the cheapest configuration that "
                         f"fits, {cheapest.gpu_count} x {cheapest.hardware.display_name}")
            return cheapest
        largest = max(self.catalog.gpus(), key=lambda h: h.memory_bytes)
        notes.append(f"no hardware option fits this spec; estimated on {largest.display_name}")
        return self._evaluate(resolved, largest, tokens)

    def _cheapest(self, arch: Architecture, setup: Setup, tokens: Tokens | None) -> Fit | None:
        """The cheapest GPU configuration that fits (the CPU option is for development, never advised)."""
        total = training_tokens(setup, tokens.per_epoch, tokens.examples) if tokens else None
        context = tokens.context if tokens else None
        fits = [smallest_fit(arch, replace(setup, gpu_count=1), hw, total, context)
                for hw in self.catalog.gpus()]
        fitting = [f for f in fits if f.fits]
        return min(fitting, key=cost_key) if fitting else None

    async def _tokens(self, organization: str, spec: job_pb2.JobSpec, tokens_per_epoch: int,
                      *, required: bool) -> Tokens | None:
        """Tokens per epoch: as given, else from the dataset's statistics (its train split's share)."""
        if tokens_per_epoch > 0:
            return Tokens(per_epoch=tokens_per_epoch, examples=None)
        if not spec.dataset:
            if required:
                raise _invalid("spec.dataset",
                               "is required to count training tokens (or set tokens_per_epoch)")
            return None
        dataset = await self.datasets.get_dataset(organization, spec.dataset)
        if dataset.state != dataset_pb2.DATASET_STATE_READY:
            raise FailedPrecondition(f"Dataset '{spec.dataset}' is not READY, so its size is not known yet.",
                                     reason="DATASET_NOT_READY",
                                     metadata={"dataset": dataset.id, "organization": organization})
        stats = dataset.statistics
        notes: list[str] = []
        total = stats.tokens.total
        if total <= 0:
            total = math.ceil(stats.total_characters / CHARS_PER_TOKEN)
            notes.append(f"dataset '{spec.dataset}' has no token statistics: assumed {CHARS_PER_TOKEN} "
                         "characters per token")
        train = sum(s.example_count for s in dataset.splits if s.kind == dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
        examples = stats.example_count or None
        if train and stats.example_count:
            total = round(total * train / stats.example_count)
            examples = train
        return Tokens(per_epoch=int(total), examples=examples, longest=stats.tokens.max or None,
                      notes=tuple(notes))


def _at_longest_example(resolved: ResolvedSpec, tokens: Tokens | None, notes: list[str]) -> ResolvedSpec:
    """Without packing a batch is padded to its longest example, so when the dataset's longest example is
    shorter than max_seq_length, memory peaks at that length instead."""
    setup = resolved.setup
    if tokens is None or not tokens.longest or setup.packing or tokens.longest >= setup.max_seq_length:
        return resolved
    notes.append(f"memory peaks at the dataset's longest example ({tokens.longest} tokens), below "
                 f"max_seq_length {setup.max_seq_length}")
    return replace(resolved, setup=replace(setup, max_seq_length=tokens.longest))


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"Invalid request: {field}: {description}",
                           violations=[FieldViolation(field, description)])
