"""Estimates answered from work done once are the estimates worked out from scratch.

The reference below is the search as it was before any caching: `evaluate` on every GPU count of every
hardware option, on fresh copies of the architectures (so no figure computed for an earlier answer is
reused) with fresh priors. It is compared with the manager's answers, first and second time (the second
comes from its memo), over every catalog model, several methods and adapters, and three hardware choices;
then with calibrations, which are part of every key. Nothing here is timed."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.orm import Session
from tuneforge.v1 import dataset_pb2, estimation_service_pb2, job_pb2

from services.estimation.advice import suggestions
from services.estimation.cache import Expiring, Memo
from services.estimation.calibration import CalibrationStore, Measurement
from services.estimation.catalog import Catalog, Hardware
from services.estimation.component import MIGRATIONS_DIR
from services.estimation.estimator import (
    SHARDED_WEIGHTS,
    Architecture,
    Calibration,
    Fit,
    FitSearch,
    Priors,
    Setup,
    cost_key,
    evaluate,
    smallest_fit,
    training_tokens,
)
from services.estimation.manager import EstimationManager
from services.estimation.servicer import EstimationServicer
from services.estimation.spec import ADAPTERS, ResolvedSetup, resolve_setup
from services.kit.db import Database
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.models import ModelPolicy

CATALOG = Catalog.load()
ORG = "acme"
TOKENS_PER_EPOCH = 3_000_000
A = job_pb2.AdapterType
M = job_pb2.TrainingMethod


class NoDatasets:
    async def get_dataset(self, organization: str, dataset: str) -> dataset_pb2.Dataset:
        raise AssertionError("every request here carries tokens_per_epoch")


class FixedCalibrations:
    """A CalibrationSource whose answer the test changes."""

    def __init__(self) -> None:
        self.by_gpu: dict[str, Calibration] = {}

    async def for_family(self, family: str) -> dict[str, Calibration]:
        return dict(self.by_gpu)


def manager(calibrations: FixedCalibrations | None = None, models: ModelPolicy | None = None
            ) -> EstimationManager:
    return EstimationManager(CATALOG, NoDatasets(), calibrations=calibrations, models=models)


# ---- the reference: the search as it was, from scratch ------------------------------------------------


def fresh(arch: Architecture) -> Architecture:
    """An equal Architecture with none of its figures computed yet."""
    return replace(arch)


def reference_smallest_fit(arch: Architecture, setup: Setup, hw: Hardware, tokens: int | None,
                           calibration: Calibration | None) -> Fit:
    fit: Fit | None = None
    for count in sorted(hw.allowed_gpu_counts):
        strategy = setup.strategy
        if count > 1 and strategy not in SHARDED_WEIGHTS:
            strategy = "ddp" if setup.adapter == "qlora" else "zero3"
        candidate = replace(setup, gpu_count=count, strategy=strategy if count > 1 else setup.strategy)
        fit = evaluate(fresh(arch), candidate, hw, tokens, None, Priors(), calibration)
        if fit.fits:
            return fit
    assert fit is not None
    return fit


def reference_cheapest(arch: Architecture, setup: Setup, tokens: int | None,
                       calibrations: dict[str, Calibration]) -> Fit | None:
    single = replace(setup, gpu_count=1)
    fits = [reference_smallest_fit(arch, single, hw, tokens, calibrations.get(hw.gpu_type))
            for hw in CATALOG.gpus()]
    fitting = [f for f in fits if f.fits]
    return min(fitting, key=cost_key) if fitting else None


def reference_estimate(resolved: ResolvedSetup, calibrations: dict[str, Calibration]
                       ) -> tuple[Fit, list[str]]:
    """EstimateJob's fit and notes with tokens_per_epoch given, as the manager computed them before."""
    arch, setup = resolved.model.architecture, resolved.setup
    total = training_tokens(setup, TOKENS_PER_EPOCH, None)
    notes = list(resolved.notes)
    if resolved.hardware is not None:
        hw = resolved.hardware
        return evaluate(fresh(arch), setup, hw, total, None, Priors(), calibrations.get(hw.gpu_type)), notes
    cheapest = reference_cheapest(arch, setup, total, calibrations)
    if cheapest is not None:
        notes.append("spec.hardware.gpu_type is empty: estimated on the cheapest configuration that fits, "
                     f"{cheapest.gpu_count} x {cheapest.hardware.display_name}")
        return cheapest, notes
    largest = max(CATALOG.gpus(), key=lambda h: h.memory_bytes)
    notes.append(f"no hardware option fits this spec; estimated on {largest.display_name}")
    calibration = calibrations.get(largest.gpu_type)
    return evaluate(fresh(arch), setup, largest, total, None, Priors(), calibration), notes


# ---- the specs compared --------------------------------------------------------------------------------


def spec(model: str, adapter: int, method: int, gpu_type: str, checkpointing: bool) -> job_pb2.JobSpec:
    out = job_pb2.JobSpec(base_model=model, adapter=adapter, method=method)  # type: ignore[arg-type]
    out.hyperparameters.gradient_checkpointing = checkpointing
    if gpu_type:
        out.hardware.gpu_type = gpu_type
    if method == M.TRAINING_METHOD_DISTILLATION:
        out.distillation.teacher_model = "meta-llama/Llama-3.1-8B-Instruct"
    return out


# (adapter, method, gradient checkpointing): a frozen base, quantised, every weight trained, a soft prompt;
# a preference method (two sequences and a reference), distillation (a teacher).
SETUPS = [
    (A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_SFT, False),
    (A.ADAPTER_TYPE_QLORA, M.TRAINING_METHOD_DPO, True),
    (A.ADAPTER_TYPE_FULL, M.TRAINING_METHOD_SFT, True),
    (A.ADAPTER_TYPE_PROMPT_TUNING, M.TRAINING_METHOD_SFT, False),
    (A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_DISTILLATION, True),
]
# The cheapest that fits (the search), a card without bf16, the largest card.
HARDWARE = ["", "nvidia-t4", "nvidia-h200"]


async def test_cached_estimates_equal_uncached_ones_over_the_whole_catalog() -> None:
    estimates = manager()
    compared = refused = 0
    for model in CATALOG.models():
        for adapter, method, checkpointing in SETUPS:
            for gpu_type in HARDWARE:
                request = spec(model.id, adapter, method, gpu_type, checkpointing)
                try:
                    resolved = resolve_setup(request, CATALOG, organization=ORG)
                except InvalidArgument as exc:
                    with pytest.raises(InvalidArgument) as caught:
                        await estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH)
                    assert caught.value.violations == exc.violations
                    refused += 1
                    continue
                expected_fit, expected_notes = reference_estimate(resolved, {})
                first = await estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH)
                again = await estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH)
                assert first.fit == expected_fit, (model.id, adapter, method, gpu_type)
                assert first.notes == expected_notes
                assert again.fit is first.fit and again.notes == expected_notes  # from the memo
                compared += 1
    assert compared >= len(CATALOG.models()) * len(HARDWARE) * 4  # the catalog really was walked
    assert refused < compared


async def test_cheapest_fit_search_equals_the_plain_search_for_every_architecture() -> None:
    """FitSearch (each memory figure once per kind of GPU, one time estimate per option) against the
    count-by-count search, with and without a token count, for every distinct catalog architecture."""
    architectures = {id(m.architecture): m.architecture for m in CATALOG.models()}.values()
    setups = [(Setup(), None), (Setup(adapter="qlora", method="dpo", gradient_checkpointing=True), 10**7),
              (Setup(adapter="full", strategy="zero2", optimizer="adamw_8bit", max_seq_length=4096), 10**7)]
    cpu, t4 = CATALOG.hardware("cpu"), CATALOG.hardware("nvidia-t4")
    assert cpu is not None and t4 is not None
    for arch in architectures:
        for setup, tokens in setups:
            expected = reference_cheapest(arch, setup, tokens, {})
            assert FitSearch(arch, setup, tokens).cheapest(CATALOG.gpus(), {}) == expected
            for hw in (cpu, t4):
                expected = reference_smallest_fit(arch, setup, hw, tokens, None)
                assert smallest_fit(arch, setup, hw, tokens) == expected


async def test_calibrations_are_part_of_every_key() -> None:
    """A new measurement changes the answer at once: the memo never answers with another calibration's."""
    calibrations = FixedCalibrations()
    estimates = manager(calibrations)
    request = spec("meta-llama/Llama-3.1-8B-Instruct", A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_SFT, "", True)
    resolved = resolve_setup(request, CATALOG, organization=ORG)
    prior = await estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH)
    assert prior.fit.calibration is None
    for by_gpu in ({"nvidia-l4": Calibration(jobs=3, throughput=2.0, memory=1.1)},
                   {"nvidia-l4": Calibration(jobs=4, throughput=0.5, memory=1.3),
                    "nvidia-a10g": Calibration(jobs=1, throughput=3.0)},
                   {}):
        calibrations.by_gpu = by_gpu
        answer = await estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH)
        expected, notes = reference_estimate(resolved, by_gpu)
        assert (answer.fit, answer.notes) == (expected, notes)
    assert answer.fit == prior.fit


async def test_requirements_validation_and_plans_equal_the_reference() -> None:
    estimates = manager()
    for model_id in ("Qwen/Qwen2.5-0.5B", "mistralai/Mixtral-8x7B-Instruct-v0.1", "google/gemma-2-9b"):
        model = CATALOG.model(model_id)
        assert model is not None
        for _ in range(2):  # computed, then from the memo
            needs = await estimates.model_requirements(model_id, 0, 0, 4096, 2, True)
            for need in needs.adapters:
                setup = Setup(adapter=ADAPTERS[need.adapter], max_seq_length=4096, batch_size=2,
                              gradient_checkpointing=True)
                assert need.cheapest == reference_cheapest(model.architecture, setup, None, {})

    request = spec("meta-llama/Llama-3.1-8B-Instruct", A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_SFT,
                   "nvidia-t4", True)
    resolved = resolve_setup(request, CATALOG, organization=ORG)
    arch, setup, t4 = resolved.model.architecture, resolved.setup, resolved.hardware
    assert t4 is not None
    total = training_tokens(setup, TOKENS_PER_EPOCH, None)
    for _ in range(2):
        check = await estimates.validate_hardware(ORG, request, TOKENS_PER_EPOCH)
        assert not check.requested.fits and check.suggestions == suggestions(fresh(arch), setup, t4)
        assert check.cheapest == reference_cheapest(arch, setup, total, {}) and check.cheapest is not None


async def test_concurrent_misses_give_one_answer() -> None:
    """Searches the memo does not hold run on the manager's threads; many at once agree."""
    estimates = manager()
    request = spec("Qwen/Qwen2.5-7B-Instruct", A.ADAPTER_TYPE_QLORA, M.TRAINING_METHOD_SFT, "", True)
    answers = await asyncio.gather(
        *(estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH) for _ in range(12)))
    resolved = resolve_setup(request, CATALOG, organization=ORG)
    expected, _ = reference_estimate(resolved, {})
    assert all(a.fit == expected for a in answers)
    estimates.close()


LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
                "vocab_size": 128256, "tie_word_embeddings": True}


async def test_a_model_read_from_a_file_is_read_again_on_each_request(tmp_path: Path) -> None:
    """A config.json may change on disk: specs naming a path are never answered from the memo."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    estimates = manager(models=ModelPolicy(str(tmp_path)))
    request = spec(str(folder), A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_SFT, "nvidia-h100", True)
    before = await estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH)
    (folder / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "num_hidden_layers": 32}))
    after = await estimates.estimate_job(ORG, request, TOKENS_PER_EPOCH)
    assert after.fit.memory.weights > before.fit.memory.weights
    # A catalog id is resolved once and then remembered.
    catalog_spec = spec("Qwen/Qwen2.5-0.5B", A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_SFT, "nvidia-h100", True)
    first = await estimates.estimate_job(ORG, catalog_spec, TOKENS_PER_EPOCH)
    assert (await estimates.estimate_job(ORG, catalog_spec, TOKENS_PER_EPOCH)).fit is first.fit


async def test_bad_requests_are_refused_the_same_way_each_time() -> None:
    estimates = manager()
    bad = spec("Qwen/Qwen2.5-0.5B", A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_SFT, "nvidia-b300", False)
    for _ in range(2):
        with pytest.raises(InvalidArgument) as caught:
            await estimates.estimate_job(ORG, bad, TOKENS_PER_EPOCH)
        assert [v.field for v in caught.value.violations] == ["spec.hardware.gpu_type"]
    for organization in ("", "Not An Org!"):
        with pytest.raises(InvalidArgument) as caught:
            await estimates.estimate_job(organization, bad, TOKENS_PER_EPOCH)
        assert [v.field for v in caught.value.violations] == ["organization"]


# ---- the catalog's answers -----------------------------------------------------------------------------


def built_page(family: str, model_type: int, size: int, token: str
               ) -> estimation_service_pb2.ListBaseModelsResponse:
    """The page as ListBaseModels built it before its answers were kept."""
    from services.estimation.converters import model_to_proto

    models, next_token = manager().list_models(family, model_type, size, token)
    return estimation_service_pb2.ListBaseModelsResponse(models=[model_to_proto(m) for m in models],
                                                         next_page_token=next_token)


async def test_list_base_models_pages_equal_freshly_built_ones() -> None:
    servicer = EstimationServicer(manager())
    for family in ("", "llama", "QWEN", "gemma", "nope"):
        for model_type in (0, 1, 2):
            for size in (0, 1, 7, 50):
                for _ in range(2):  # built, then kept
                    token, seen = "", 0
                    while True:
                        request = estimation_service_pb2.ListBaseModelsRequest(
                            family=family, type=model_type, page_size=size, page_token=token)  # type: ignore[arg-type]
                        page = await servicer.ListBaseModels(request, None)
                        assert page == built_page(family, model_type, size, token)
                        seen += len(page.models)
                        token = page.next_page_token
                        if not token:
                            break
                    expected = [m for m in CATALOG.models() if (not family or m.family == family.lower())
                                and (not model_type or m.model_type == ("llm" if model_type == 1 else "vlm"))]
                    assert seen == len(expected)


async def test_list_base_models_still_checks_tokens_and_filters() -> None:
    servicer = EstimationServicer(manager())
    first = await servicer.ListBaseModels(
        estimation_service_pb2.ListBaseModelsRequest(family="qwen", page_size=5), None)
    token = first.next_page_token
    await servicer.ListBaseModels(estimation_service_pb2.ListBaseModelsRequest(
        family="qwen", page_size=5, page_token=token), None)
    for request in (  # another query's token, an edited token, an unknown type, a negative size
        estimation_service_pb2.ListBaseModelsRequest(family="llama", page_size=5, page_token=token),
        estimation_service_pb2.ListBaseModelsRequest(family="qwen", page_size=5,
                                                     page_token=token[:-2] + "AA"),
        estimation_service_pb2.ListBaseModelsRequest(type=7),  # type: ignore[arg-type]
        estimation_service_pb2.ListBaseModelsRequest(page_size=-1),
    ):
        for _ in range(2):
            with pytest.raises(InvalidArgument) as caught:
                await servicer.ListBaseModels(request, None)
            assert [v.field for v in caught.value.violations] in (["page_token"], ["type"], ["page_size"])


async def test_list_hardware_options_is_built_once() -> None:
    servicer = EstimationServicer(manager())
    request = estimation_service_pb2.ListHardwareOptionsRequest()
    first = await servicer.ListHardwareOptions(request, None)
    assert [o.gpu_type for o in first.options] == [h.gpu_type for h in CATALOG.hardware_options()]
    assert await servicer.ListHardwareOptions(request, None) is first


async def test_estimate_job_answers_equal_freshly_built_ones_and_are_kept_per_fit() -> None:
    """EstimateJob keeps the answer built of the manager's (memoized) Fit: the same answer as building it,
    the same object for the same question, another for another question or other notes."""
    from services.estimation.converters import fit_to_proto
    from services.estimation.servicer import _source

    estimates = manager()
    servicer = EstimationServicer(estimates)
    answers = {}
    for gpu_type in HARDWARE:
        for tokens in (TOKENS_PER_EPOCH, 2 * TOKENS_PER_EPOCH):
            job = spec(CATALOG.models()[0].id, A.ADAPTER_TYPE_LORA, M.TRAINING_METHOD_SFT, gpu_type, False)
            request = estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=job,
                                                                tokens_per_epoch=tokens)
            first = await servicer.EstimateJob(request, None)
            estimate = await estimates.estimate_job(ORG, request.spec, tokens)
            built = estimation_service_pb2.EstimateJobResponse(
                estimate=fit_to_proto(estimate.fit), source=_source(estimate.fit), notes=estimate.notes)
            assert first == built
            assert await servicer.EstimateJob(request, None) is first
            answers[(gpu_type, tokens)] = first
    assert len({id(a) for a in answers.values()}) == len(answers)


# ---- what the database holds -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def measurement(job_id: str, gpu_type: str, tokens_per_second: float) -> Measurement:
    return Measurement(job_id=job_id, family="llama", gpu_type=gpu_type, base_model="m", adapter="lora",
                       method="sft", gpu_count=1, predicted_tokens_per_second=1000.0,
                       measured_tokens_per_second=tokens_per_second, predicted_peak_bytes=0,
                       measured_peak_bytes=None)


async def test_calibrations_are_read_once_and_a_recorded_one_is_seen_at_once(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'estimation.db'}", "estimation")
    db.migrate(MIGRATIONS_DIR)
    clock = Clock()
    try:
        store = CalibrationStore(db, clock=clock)
        other = CalibrationStore(db, clock=clock)  # another replica of the service, same database
        assert await store.for_family("llama") == {}
        assert await store.record(measurement("job_1", "nvidia-l4", 1500.0))
        seen = await store.for_family("llama")  # this process' own write: at once
        assert seen["nvidia-l4"].throughput == pytest.approx(1.5)
        assert (await other.for_family("llama"))["nvidia-l4"].throughput == pytest.approx(1.5)

        assert await store.record(measurement("job_2", "nvidia-l4", 500.0))
        # The other replica answers from what it read until its few seconds are over, then reads again.
        assert (await other.for_family("llama"))["nvidia-l4"].throughput == pytest.approx(1.5)
        clock.now += store._families.ttl_s
        assert (await other.for_family("llama"))["nvidia-l4"].throughput == pytest.approx(1.0)

        def rows(session: Session) -> int:
            from services.estimation.models import CalibrationRow

            return len(session.query(CalibrationRow).all())

        assert await db.run(rows) == 2
    finally:
        db.dispose()


def test_memo_keeps_the_most_recently_used() -> None:
    memo: Memo[str, int] = Memo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # a is now the most recent
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)
    assert memo.get_or_compute("d", lambda: 4) == 4 and len(memo) == 2


def test_expiring_drops_a_value_read_before_a_write() -> None:
    clock = Clock()
    values: Expiring[str, int] = Expiring(5.0, clock=clock)
    generation = values.generation()
    values.forget()  # a write happened while the value was being read
    values.put("k", 1, generation)
    assert values.get("k") is None
    values.put("k", 2, values.generation())
    assert values.get("k") == 2
    clock.now += 5.0
    assert values.get("k") is None
