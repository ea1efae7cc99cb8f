"""EstimationService through real gRPC stubs, with a fake DatasetService for token statistics and jobs
arriving as JobChanged events on a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tuneforge.v1 import dataset_pb2, estimation_pb2, estimation_service_pb2, job_pb2, model_pb2

from services.estimation.estimator import GIB
from services.jobs.estimation_client import HardwareCheck
from tests.estimation.conftest import ORG, EstimationStack, publish_job
from tuneforge_core.errors import InvalidArgument

PRIOR = estimation_pb2.ESTIMATE_SOURCE_PRIOR


def error_details(exc: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    status = rpc_status.from_call(exc)
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return reason, fields


def spec(
    base_model: str = "meta-llama/Llama-3.2-1B-Instruct", gpu_type: str = "nvidia-a100-40gb", **hardware: int
) -> job_pb2.JobSpec:
    """A LoRA spec with gradient checkpointing (4 x 2048 tokens a step do not fit a 40 GB card without)."""
    out = job_pb2.JobSpec(base_model=base_model, dataset="support-chats")
    out.hyperparameters.gradient_checkpointing = True
    if gpu_type:
        out.hardware.gpu_type = gpu_type
    for name, value in hardware.items():
        setattr(out.hardware, name, value)
    return out


async def test_list_hardware_options(estimation_stack: EstimationStack) -> None:
    response = await estimation_stack.estimation.ListHardwareOptions(
        estimation_service_pb2.ListHardwareOptionsRequest()
    )
    options = {o.gpu_type: o for o in response.options}
    assert len(options) == 9 and "cpu" in options
    h200 = options["nvidia-h200"]
    assert h200.memory_bytes // GIB == 140 and h200.peak_tflops == 989 and h200.supports_bf16
    assert list(h200.allowed_gpu_counts) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert (h200.min_storage_gb, h200.max_storage_gb) == (50, 1000)
    assert options["nvidia-l4"].hourly_usd == 0.8  # the deployment's override


async def test_list_base_models_filters_and_pages(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    qwen = await stub.ListBaseModels(estimation_service_pb2.ListBaseModelsRequest(family="Qwen"))
    ids = [m.id for m in qwen.models]
    assert ids[:3] == ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B"]
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in ids and len(ids) == 18
    small = qwen.models[0]
    assert (
        small.parameter_count,
        small.num_layers,
        small.hidden_size,
        small.num_key_value_heads,
        small.tied_embeddings,
        small.head_dim,
        small.gated_mlp,
    ) == (494_032_768, 24, 896, 2, True, 64, True)
    assert small.type == model_pb2.MODEL_TYPE_LLM and small.license == "apache-2.0"

    ids, token = [], ""
    while True:
        page = await stub.ListBaseModels(
            estimation_service_pb2.ListBaseModelsRequest(page_size=20, page_token=token)
        )
        ids += [m.id for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert len(ids) == len(set(ids)) == 74 and ids == sorted(ids, key=str.lower)
    vlm = await stub.ListBaseModels(
        estimation_service_pb2.ListBaseModelsRequest(type=model_pb2.MODEL_TYPE_VLM)
    )
    assert {m.id for m in vlm.models} == {
        "meta-llama/Llama-3.2-11B-Vision",
        "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "meta-llama/Llama-3.2-90B-Vision",
        "meta-llama/Llama-3.2-90B-Vision-Instruct",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    }
    assert all(m.vision_parameter_count > 0 for m in vlm.models)
    gemma = await stub.ListBaseModels(estimation_service_pb2.ListBaseModelsRequest(family="gemma"))
    assert {m.head_dim for m in gemma.models} == {128, 256}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListBaseModels(estimation_service_pb2.ListBaseModelsRequest(family="qwen", page_token="x"))
    assert error_details(caught.value)[0] == "INVALID_PAGE_TOKEN"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListBaseModels(estimation_service_pb2.ListBaseModelsRequest(type=7))  # type: ignore[arg-type]
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["type"])


async def test_get_model_requirements(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    response = await stub.GetModelRequirements(
        estimation_service_pb2.GetModelRequirementsRequest(
            model_id="meta-llama/Llama-3.1-8B", adapter=job_pb2.ADAPTER_TYPE_QLORA
        )
    )
    assert response.model.parameter_count == 8_030_261_248
    # 1 x 2048 tokens without checkpointing: ~28 GiB of activations beside ~7 GiB of 4-bit weights (and the
    # fp32 embeddings) pass the 24 GB cards, so the cheapest with room is the L40S (one, not two A100s).
    assert 40 * GIB < response.memory_per_gpu.total < 46 * GIB
    recommended = response.recommended
    assert recommended.fits and recommended.gpu_count == 1 and recommended.gpu_type == "nvidia-l40s"
    assert recommended.memory_per_gpu == response.memory_per_gpu
    assert recommended.source == PRIOR and recommended.memory_per_gpu.quantization_constants > 0

    # The table per adapter type: QLoRA needs least, full fine-tuning most (and more than one GPU).
    table = {a.adapter: a for a in response.adapters}
    assert list(table) == [
        job_pb2.ADAPTER_TYPE_LORA,
        job_pb2.ADAPTER_TYPE_QLORA,
        job_pb2.ADAPTER_TYPE_FULL,
        job_pb2.ADAPTER_TYPE_PROMPT_TUNING,
    ]
    totals = {k: v.memory_per_gpu.total for k, v in table.items()}
    assert totals[job_pb2.ADAPTER_TYPE_QLORA] < totals[job_pb2.ADAPTER_TYPE_LORA]
    full = table[job_pb2.ADAPTER_TYPE_FULL].recommended
    assert full.fits and full.gpu_count > 1 and full.strategy == job_pb2.DISTRIBUTED_STRATEGY_ZERO3

    # A shorter sequence fits the L4, at the deployment's overridden price, and so does checkpointing.
    response = await stub.GetModelRequirements(
        estimation_service_pb2.GetModelRequirementsRequest(
            model_id="meta-llama/Llama-3.1-8B", adapter=job_pb2.ADAPTER_TYPE_QLORA, max_seq_length=512
        )
    )
    assert response.recommended.gpu_type == "nvidia-l4" and response.recommended.cost.hourly_usd == 0.8
    response = await stub.GetModelRequirements(
        estimation_service_pb2.GetModelRequirementsRequest(
            model_id="meta-llama/Llama-3.1-8B",
            adapter=job_pb2.ADAPTER_TYPE_QLORA,
            gradient_checkpointing=True,
        )
    )
    assert response.recommended.gpu_type == "nvidia-l4"  # checkpointing: ~13 GiB, the cheapest card here
    dpo = await stub.GetModelRequirements(
        estimation_service_pb2.GetModelRequirementsRequest(
            model_id="meta-llama/Llama-3.1-8B",
            adapter=job_pb2.ADAPTER_TYPE_QLORA,
            gradient_checkpointing=True,
            method=job_pb2.TRAINING_METHOD_DPO,
        )
    )
    assert dpo.memory_per_gpu.activations == 2 * response.memory_per_gpu.activations  # chosen + rejected

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModelRequirements(
            estimation_service_pb2.GetModelRequirementsRequest(model_id="acme/x-7B")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModelRequirements(
            estimation_service_pb2.GetModelRequirementsRequest(
                model_id="meta-llama/Llama-3.1-8B", max_seq_length=8, method=99
            )
        )  # type: ignore[arg-type]
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["method", "max_seq_length"])


async def test_estimate_job_from_tokens_or_from_the_dataset(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec(), tokens_per_epoch=1_000_000)
    )
    estimate = response.estimate
    assert response.source == PRIOR
    assert estimate.fits and estimate.gpu_type == "nvidia-a100-40gb" and estimate.gpu_count == 1
    assert estimate.time.training_tokens == 3_000_000  # three epochs by default
    assert estimate.time.total_seconds == pytest.approx(
        estimate.time.training_seconds + estimate.time.overhead_seconds
    )
    assert estimate.cost.total_usd == pytest.approx(estimate.time.total_seconds / 3600 * 3.30)
    m = estimate.memory_per_gpu
    assert m.total == (
        m.weights
        + m.trainable_parameters
        + m.gradients
        + m.optimizer_states
        + m.activations
        + m.logits
        + m.framework_overhead
    )

    # From the dataset: its train split's share of the token count (800 of 1000 examples).
    estimation_stack.datasets.add("support-chats", examples=1000, train=800, tokens=500_000, longest=900)
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec())
    )
    assert response.estimate.time.training_tokens == 3 * 400_000
    assert any("longest example (900 tokens)" in note for note in response.notes)
    assert any("no train_tokens" in note for note in response.notes)

    # train_tokens, when the datasets service counted them, is the train split's own count (no scaling).
    estimation_stack.datasets.add(
        "support-chats", examples=1000, train=800, tokens=500_000, train_tokens=350_000
    )
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec())
    )
    assert response.estimate.time.training_tokens == 3 * 350_000
    assert not any("train_tokens" in note for note in response.notes)
    assert response.estimate.time.tokens_per_second == pytest.approx(
        response.estimate.time.training_tokens / response.estimate.time.training_seconds
    )

    # No token statistics: characters / 4, said in a note.
    estimation_stack.datasets.add("support-chats", examples=1000, train=1000, characters=4_000_000)
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec())
    )
    assert response.estimate.time.training_tokens == 3 * 1_000_000
    assert any("4 characters per token" in note for note in response.notes)
    # Memory at max_seq_length (no longest example is known), and the note says how to get a tighter one.
    assert any("memory as if an example filled max_seq_length" in note and "tokenizer" in note
               for note in response.notes)
    assert not any("longest example" in note and "peaks" in note for note in response.notes)
    at_max_length = response.estimate.memory_per_gpu

    # The bytes of its longest example's line known: memory at most a token per byte plus a template's own
    # (300 + 256 tokens), below what max_seq_length (2048) gives; time and cost from characters / 4.
    estimation_stack.datasets.add("support-chats", examples=1000, train=1000, characters=200_000,
                                  longest_bytes=300)
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec())
    )
    assert response.estimate.time.training_tokens == 3 * 50_000
    assert any("one token per byte of its longest example (300 bytes)" in note for note in response.notes)
    assert any("memory peaks at most at 556 tokens" in note for note in response.notes)
    bounded = response.estimate.memory_per_gpu
    assert bounded.activations < at_max_length.activations and bounded.total < at_max_length.total
    assert bounded.weights == at_max_length.weights

    # Token statistics win over the bytes: the longest example in tokens is exact.
    estimation_stack.datasets.add("support-chats", examples=1000, train=1000, tokens=900_000, longest=120,
                                  longest_bytes=300)
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec())
    )
    assert any("longest example (120 tokens)" in note for note in response.notes)
    assert not any("bounded from" in note for note in response.notes)

    # No GPU type: the cheapest configuration that fits, said in a note.
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(
            organization=ORG, spec=spec(gpu_type=""), tokens_per_epoch=1_000_000
        )
    )
    assert response.estimate.fits and any("cheapest" in note for note in response.notes)


async def test_estimate_job_rejects_bad_specs_naming_the_field(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    for count in (0, 9):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EstimateJob(
                estimation_service_pb2.EstimateJobRequest(
                    organization=ORG, spec=spec(gpu_count=count), tokens_per_epoch=1000
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.hardware.gpu_count"])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(
            estimation_service_pb2.EstimateJobRequest(
                organization=ORG, spec=spec(base_model="gpt2"), tokens_per_epoch=1000
            )
        )
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.base_model"])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(spec=spec(), tokens_per_epoch=-1))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["organization", "tokens_per_epoch"])

    # The datasets service's NOT_FOUND comes through as it is; a dataset still processing cannot be sized.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and error_details(caught.value)[0] == "NOT_FOUND"
    estimation_stack.datasets.add(
        "support-chats", examples=0, train=0, state=dataset_pb2.DATASET_STATE_PROCESSING
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec()))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value)[0] == "DATASET_NOT_READY"


async def test_validate_hardware(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    too_small = await stub.ValidateHardware(
        estimation_service_pb2.ValidateHardwareRequest(
            organization=ORG, spec=spec("meta-llama/Llama-3.1-8B", "nvidia-t4"), tokens_per_epoch=1_000_000
        )
    )
    assert not too_small.requested.fits and "T4" in too_small.requested.reason
    assert too_small.cheapest_fit.fits and too_small.cheapest_fit.cost.total_usd > 0
    assert any("QLoRA" in s for s in too_small.suggestions)

    fits = await stub.ValidateHardware(
        estimation_service_pb2.ValidateHardwareRequest(
            organization=ORG, spec=spec(), tokens_per_epoch=1_000_000
        )
    )
    assert fits.requested.fits and not fits.HasField("cheapest_fit") and list(fits.suggestions) == []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ValidateHardware(
            estimation_service_pb2.ValidateHardwareRequest(organization=ORG, spec=spec(gpu_type=""))
        )
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.hardware.gpu_type"])


async def test_a_dataset_size_sent_with_the_request_spares_reading_the_dataset(
    estimation_stack: EstimationStack,
) -> None:
    """EstimateJob and ValidateHardware count tokens from the request's dataset_size when it is there, with
    the same arithmetic as from the dataset, and never ask the datasets service."""
    stack = estimation_stack
    dataset = stack.datasets.add("support-chats", examples=1000, train=800, tokens=500_000, longest=900)
    read = await stack.estimation.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec())
    )
    assert stack.datasets.calls == 1
    size = estimation_pb2.DatasetSize(
        dataset="support-chats", statistics=dataset.statistics, train_examples=800
    )
    sent = await stack.estimation.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec(), dataset_size=size)
    )
    assert sent.estimate == read.estimate and list(sent.notes) == list(read.notes)
    assert sent.estimate.time.training_tokens == 3 * 400_000
    checked = await stack.estimation.ValidateHardware(
        estimation_service_pb2.ValidateHardwareRequest(organization=ORG, spec=spec(), dataset_size=size)
    )
    assert checked.requested == sent.estimate
    assert stack.datasets.calls == 1  # neither call read the dataset

    # A spec naming a dataset the datasets service does not know is sized from the request alone.
    other = spec()
    other.dataset = "not-there"
    await stack.estimation.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=other, dataset_size=size)
    )
    bad = estimation_pb2.DatasetSize(dataset="support-chats", train_examples=-1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.estimation.EstimateJob(
            estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec(), dataset_size=bad)
        )
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["dataset_size.train_examples"])
    bad = estimation_pb2.DatasetSize(dataset="support-chats",
                                     statistics=dataset_pb2.DatasetStatistics(longest_example_bytes=-1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.estimation.EstimateJob(
            estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec(), dataset_size=bad)
        )
    assert error_details(caught.value) == ("INVALID_ARGUMENT",
                                           ["dataset_size.statistics.longest_example_bytes"])
    # The bytes of the longest example, sent with the request, bound memory as when read from the dataset.
    sized = estimation_pb2.DatasetSize(dataset="support-chats", train_examples=800,
                                       statistics=dataset_pb2.DatasetStatistics(
                                           example_count=1000, total_characters=200_000,
                                           longest_example_bytes=300))
    answer = await stack.estimation.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec(), dataset_size=sized)
    )
    assert any("memory peaks at most at 556 tokens" in note for note in answer.notes)
    assert stack.datasets.calls == 1


async def test_plan_job_sizes_a_dataset_sent_with_the_request_without_reading_one(
    estimation_stack: EstimationStack,
) -> None:
    """PlanJob's dataset_size (a dry run of a local file): the plan is the one the stored dataset would
    get, the datasets service is not asked, the spec need name no dataset, and a bad size is refused by
    field."""
    stack = estimation_stack
    dataset = stack.datasets.add("support-chats", examples=1000, train=800, tokens=500_000, longest=900)
    read = await stack.estimation.PlanJob(
        estimation_service_pb2.PlanJobRequest(organization=ORG, spec=spec()))
    assert stack.datasets.calls == 1
    size = estimation_pb2.DatasetSize(dataset="support-chats", statistics=dataset.statistics,
                                      train_examples=800)
    unnamed = spec()
    unnamed.ClearField("dataset")
    sent = await stack.estimation.PlanJob(
        estimation_service_pb2.PlanJobRequest(organization=ORG, spec=unnamed, dataset_size=size))
    assert stack.datasets.calls == 1
    assert (sent.tokens_per_epoch, sent.training_tokens, sent.train_examples) == (
        read.tokens_per_epoch, read.training_tokens, 800)
    assert list(sent.fits) == list(read.fits) and sent.cheapest_fit == read.cheapest_fit
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.estimation.PlanJob(estimation_service_pb2.PlanJobRequest(organization=ORG, spec=unnamed))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.dataset"])
    assert "(or set dataset_size)" in (caught.value.details() or "")
    bad = estimation_pb2.DatasetSize(dataset="support-chats", train_examples=-1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.estimation.PlanJob(
            estimation_service_pb2.PlanJobRequest(organization=ORG, spec=unnamed, dataset_size=bad))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["dataset_size.train_examples"])


async def test_the_hardware_check_of_create_job_sends_its_dataset(estimation_stack: EstimationStack) -> None:
    """The jobs service's client of ValidateHardware against the real service: the dataset CreateJob read
    travels with the request (the datasets service is not asked again), the fit that admits the job comes
    back for its assignment, and a job that does not fit is INSUFFICIENT_HARDWARE."""
    stack = estimation_stack
    dataset = stack.datasets.add("support-chats", examples=1000, train=800, tokens=500_000)
    check = HardwareCheck(stack.channel)
    admitted = await check.check(ORG, spec(), dataset)
    assert admitted is not None and admitted.fits and admitted.gpu_type == "nvidia-a100-40gb"
    assert admitted.memory_per_gpu.total > 0 and admitted.time.training_tokens == 3 * 400_000
    assert await check.check(ORG, spec(gpu_type=""), dataset) is None  # no GPU named: nothing to check
    with pytest.raises(InvalidArgument) as caught:
        await check.check(ORG, spec("meta-llama/Llama-3.1-8B", "nvidia-t4"), dataset)
    assert caught.value.reason == "INSUFFICIENT_HARDWARE"
    assert [v.field for v in caught.value.violations] == ["spec.hardware.gpu_type"]
    assert stack.datasets.calls == 0


async def test_estimate_cost_projects_and_reports_the_cost_so_far(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    response = await stub.EstimateCost(
        estimation_service_pb2.EstimateCostRequest(
            organization=ORG, spec=spec(gpu_count=2), tokens_per_epoch=5_000_000, elapsed_seconds=1800
        )
    )
    assert response.source == PRIOR
    assert response.projected_total.gpu_count == 2 and response.projected_total.hourly_usd == 3.30
    assert response.projected_total.total_usd == pytest.approx(response.time.total_seconds / 3600 * 3.30 * 2)
    assert response.current_usd == pytest.approx(0.5 * 3.30 * 2)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateCost(
            estimation_service_pb2.EstimateCostRequest(
                organization=ORG, spec=job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B"), elapsed_seconds=-1
            )
        )
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["elapsed_seconds"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateCost(
            estimation_service_pb2.EstimateCostRequest(
                organization=ORG, spec=job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B")
            )
        )
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.dataset"])


async def test_estimate_cost_of_a_running_job_follows_its_pace(estimation_stack: EstimationStack) -> None:
    """Given a job id, the spec, the time run and the progress are those of the job's latest JobChanged
    event: the cost so far is the time run at the rate, and the rest is priced at the job's own pace."""
    stack = estimation_stack
    stub = stack.estimation
    stack.datasets.add("support-chats", examples=1000, train=800, tokens=500_000)
    job = job_pb2.Job(
        id="job_1",
        organization=ORG,
        name="nightly",
        spec=spec(gpu_count=2),
        state=job_pb2.JOB_STATE_RUNNING,
        progress=job_pb2.JobProgress(step=25, total_steps=100),
        revision=3,
    )
    job.start_time.FromSeconds(int(time.time()) - 3600)

    # Right after CreateJob, before the job's first event: NOT_FOUND, naming the job.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateCost(estimation_service_pb2.EstimateCostRequest(organization=ORG, job_id="job_1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "job_1" in (caught.value.details() or "")

    await publish_job(stack, job, "evt_1")
    response = await wait_for_cost(stack, "job_1", lambda r: r.fraction_complete == 0.25)
    rate = 3.30 * 2
    assert response.elapsed_seconds == pytest.approx(3600, abs=5)
    assert response.current_usd == pytest.approx(rate, rel=0.01)
    # A quarter done in an hour: three more hours at the same pace.
    assert response.projected_total.total_usd == pytest.approx(4 * rate, rel=0.01)
    assert any("pace" in note for note in response.notes)
    # By name too; a job of another organization is not found.
    by_name = await stub.EstimateCost(
        estimation_service_pb2.EstimateCostRequest(organization=ORG, job_id="nightly")
    )
    assert by_name.fraction_complete == 0.25
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateCost(
            estimation_service_pb2.EstimateCostRequest(organization="other-org", job_id="job_1")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # With an ETA reported, the rest is the ETA.
    job.progress.eta_seconds = 1800
    job.revision = 4
    await publish_job(stack, job, "evt_2")
    response = await wait_for_cost(
        stack, "job_1", lambda r: r.projected_total.total_usd == pytest.approx(1.5 * rate, rel=0.01)
    )

    # A finished job cost what it ran.
    job.state = job_pb2.JOB_STATE_SUCCEEDED
    job.end_time.FromSeconds(job.start_time.seconds + 7200)
    job.revision = 6
    await publish_job(stack, job, "evt_3")
    response = await wait_for_cost(stack, "job_1", lambda r: r.fraction_complete == 1.0)
    assert response.current_usd == response.projected_total.total_usd == pytest.approx(2 * rate)

    # An older revision arriving late (a redelivery, another replica's relay) changes nothing.
    stale = job_pb2.Job()
    stale.CopyFrom(job)
    stale.state = job_pb2.JOB_STATE_RUNNING
    stale.ClearField("end_time")
    stale.revision = 5
    await publish_job(stack, stale, "evt_stale")
    # A later event of another job, consumed after the stale one, shows the stale one was handled.
    marker = job_pb2.Job(id="job_marker", organization=ORG, spec=spec(), state=job_pb2.JOB_STATE_QUEUED)
    await publish_job(stack, marker, "evt_marker")
    await wait_for_cost(stack, "job_marker", lambda r: True)
    response = await stub.EstimateCost(
        estimation_service_pb2.EstimateCostRequest(organization=ORG, job_id="job_1")
    )
    assert response.fraction_complete == 1.0 and response.current_usd == pytest.approx(2 * rate)

    # Not started: the estimate.
    queued = job_pb2.Job(
        id="job_2", organization=ORG, spec=spec(), state=job_pb2.JOB_STATE_QUEUED, revision=1
    )
    await publish_job(stack, queued, "evt_4")
    response = await wait_for_cost(stack, "job_2", lambda r: True)
    assert response.current_usd == 0 and response.projected_total.total_usd == pytest.approx(
        response.time.total_seconds / 3600 * 3.30
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateCost(estimation_service_pb2.EstimateCostRequest(organization=ORG, job_id="job_9"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def wait_for_cost(
    stack: EstimationStack,
    job_id: str,
    ready: Callable[[estimation_service_pb2.EstimateCostResponse], bool],
) -> estimation_service_pb2.EstimateCostResponse:
    """EstimateCost of a job once the service has consumed the events that make `ready` true."""
    request = estimation_service_pb2.EstimateCostRequest(organization=ORG, job_id=job_id)
    for _ in range(200):
        try:
            response = await stack.estimation.EstimateCost(request)
            if ready(response):
                return response
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"the estimation service never caught up with job {job_id}'s events")


async def test_plan_job(estimation_stack: EstimationStack) -> None:
    estimation_stack.datasets.add("support-chats", examples=2000, train=1600, tokens=1_000_000)
    response = await estimation_stack.estimation.PlanJob(
        estimation_service_pb2.PlanJobRequest(
            organization=ORG, spec=spec("mistralai/Mistral-7B-Instruct-v0.3", gpu_type="")
        )
    )
    assert response.source == PRIOR
    assert response.tokens_per_epoch == 800_000 and response.training_tokens == 2_400_000
    fits = {f.gpu_type: f for f in response.fits}
    assert len(fits) == 9
    # One T4 is too small for a 7B LoRA; the fewest that fit shard it with ZeRO-3.
    t4 = fits["nvidia-t4"]
    assert t4.fits and t4.gpu_count > 1 and t4.strategy == job_pb2.DISTRIBUTED_STRATEGY_ZERO3
    assert fits["nvidia-h100"].fits and fits["nvidia-h100"].time.total_seconds > 0
    cheapest = response.cheapest_fit
    assert cheapest.fits and cheapest.gpu_type != "cpu"
    gpu_costs = [f.cost.total_usd for f in response.fits if f.fits and f.gpu_type != "cpu"]
    assert cheapest.cost.total_usd == min(gpu_costs)


async def test_plan_job_on_the_spec_hardware(estimation_stack: EstimationStack) -> None:
    """The plan also judges the spec's own GPU type, says what to change when it does not fit, and carries
    the dataset's validation summary."""
    estimation_stack.datasets.add("support-chats", examples=2000, train=1600, tokens=1_000_000, warnings=3)
    response = await estimation_stack.estimation.PlanJob(
        estimation_service_pb2.PlanJobRequest(
            organization=ORG, spec=spec("meta-llama/Llama-3.1-8B", gpu_type="nvidia-t4")
        )
    )
    assert response.train_examples == 1600 and response.dataset_validation.warning_count == 3
    assert not response.requested.fits and response.requested.gpu_type == "nvidia-t4"
    assert "largest terms are" in response.requested.reason and response.suggestions
    assert response.cheapest_fit.fits


async def test_notes_say_what_the_estimate_assumed(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    mixtral = spec("mistralai/Mixtral-8x7B-Instruct-v0.1", gpu_type="nvidia-h100", gpu_count=8)
    mixtral.hardware.strategy = job_pb2.DISTRIBUTED_STRATEGY_ZERO3
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=mixtral, tokens_per_epoch=10_000)
    )
    assert any("spec.lora.dropout = 0" in note for note in response.notes)
    assert (
        response.estimate.strategy == job_pb2.DISTRIBUTED_STRATEGY_ZERO3 and response.estimate.gpu_count == 8
    )
    guessed = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(
            organization=ORG, spec=spec("acme/support-13B"), tokens_per_epoch=10_000
        )
    )
    assert any("guessed from its name" in note for note in guessed.notes)
