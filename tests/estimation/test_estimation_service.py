"""EstimationService through real gRPC stubs, with a fake DatasetService for token statistics."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tuneforge.v1 import dataset_pb2, estimation_pb2, estimation_service_pb2, job_pb2

from services.estimation.estimator import GIB
from tests.estimation.conftest import ORG, EstimationStack

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


def spec(base_model: str = "meta-llama/Llama-3.2-1B-Instruct", gpu_type: str = "nvidia-a100-40gb",
         **hardware: int) -> job_pb2.JobSpec:
    out = job_pb2.JobSpec(base_model=base_model, dataset="support-chats")
    if gpu_type:
        out.hardware.gpu_type = gpu_type
    for name, value in hardware.items():
        setattr(out.hardware, name, value)
    return out


async def test_list_hardware_options(estimation_stack: EstimationStack) -> None:
    response = await estimation_stack.estimation.ListHardwareOptions(
        estimation_service_pb2.ListHardwareOptionsRequest())
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
    assert [m.id for m in qwen.models] == ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct",
                                           "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"]
    small = qwen.models[0]
    assert (small.parameter_count, small.num_layers, small.hidden_size, small.num_key_value_heads,
            small.tied_embeddings) == (494_032_768, 24, 896, 2, True)
    assert small.type == estimation_pb2.MODEL_TYPE_LLM

    ids, token = [], ""
    while True:
        page = await stub.ListBaseModels(estimation_service_pb2.ListBaseModelsRequest(page_size=6,
                                                                                      page_token=token))
        ids += [m.id for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert len(ids) == len(set(ids)) == 15
    vlm = await stub.ListBaseModels(
        estimation_service_pb2.ListBaseModelsRequest(type=estimation_pb2.MODEL_TYPE_VLM))
    assert list(vlm.models) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListBaseModels(estimation_service_pb2.ListBaseModelsRequest(family="qwen", page_token="x"))
    assert error_details(caught.value)[0] == "INVALID_PAGE_TOKEN"


async def test_get_model_requirements(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    response = await stub.GetModelRequirements(estimation_service_pb2.GetModelRequirementsRequest(
        model_id="meta-llama/Llama-3.1-8B", adapter=job_pb2.ADAPTER_TYPE_QLORA))
    assert response.model.parameter_count == 8_030_261_248
    # 1 x 2048 tokens without checkpointing: ~15 GiB of activations beside ~5 GiB of 4-bit weights pass
    # the 24 GB cards, so the cheapest with room is the L40S.
    assert 22.5 * GIB < response.memory_per_gpu.total < 40 * GIB
    recommended = response.recommended
    assert recommended.fits and recommended.gpu_count == 1 and recommended.gpu_type == "nvidia-l40s"
    assert recommended.memory_per_gpu == response.memory_per_gpu

    # A shorter sequence fits the L4, at the deployment's overridden price.
    response = await stub.GetModelRequirements(estimation_service_pb2.GetModelRequirementsRequest(
        model_id="meta-llama/Llama-3.1-8B", adapter=job_pb2.ADAPTER_TYPE_QLORA, max_seq_length=512))
    assert response.recommended.gpu_type == "nvidia-l4" and response.recommended.cost.hourly_usd == 0.8

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetModelRequirements(
            estimation_service_pb2.GetModelRequirementsRequest(model_id="acme/x-7B"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_estimate_job_from_tokens_or_from_the_dataset(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    response = await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(
        organization=ORG, spec=spec(), tokens_per_epoch=1_000_000))
    estimate = response.estimate
    assert response.source == PRIOR
    assert estimate.fits and estimate.gpu_type == "nvidia-a100-40gb" and estimate.gpu_count == 1
    assert estimate.time.training_tokens == 3_000_000  # three epochs by default
    assert estimate.time.total_seconds == pytest.approx(estimate.time.training_seconds
                                                        + estimate.time.overhead_seconds)
    assert estimate.cost.total_usd == pytest.approx(estimate.time.total_seconds / 3600 * 3.30)
    m = estimate.memory_per_gpu
    assert m.total == (m.weights + m.trainable_parameters + m.gradients + m.optimizer_states + m.activations
                       + m.logits + m.framework_overhead)

    # From the dataset: its train split's share of the token count (800 of 1000 examples).
    estimation_stack.datasets.add("support-chats", examples=1000, train=800, tokens=500_000, longest=900)
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec()))
    assert response.estimate.time.training_tokens == 3 * 400_000
    assert any("longest example (900 tokens)" in note for note in response.notes)

    # No token statistics: characters / 4, said in a note.
    estimation_stack.datasets.add("support-chats", examples=1000, train=1000, characters=4_000_000)
    response = await stub.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec()))
    assert response.estimate.time.training_tokens == 3 * 1_000_000
    assert any("4 characters per token" in note for note in response.notes)

    # No GPU type: the cheapest configuration that fits, said in a note.
    response = await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(
        organization=ORG, spec=spec(gpu_type=""), tokens_per_epoch=1_000_000))
    assert response.estimate.fits and any("cheapest" in note for note in response.notes)


async def test_estimate_job_rejects_bad_specs_naming_the_field(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    for count in (0, 9):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(
                organization=ORG, spec=spec(gpu_count=count), tokens_per_epoch=1000))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.hardware.gpu_count"])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(
            organization=ORG, spec=spec(base_model="gpt2"), tokens_per_epoch=1000))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.base_model"])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(spec=spec(), tokens_per_epoch=-1))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["organization", "tokens_per_epoch"])

    # The datasets service's NOT_FOUND comes through as it is; a dataset still processing cannot be sized.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and error_details(caught.value)[0] == "NOT_FOUND"
    estimation_stack.datasets.add("support-chats", examples=0, train=0,
                                  state=dataset_pb2.DATASET_STATE_PROCESSING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec()))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value)[0] == "DATASET_NOT_READY"


async def test_validate_hardware(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    too_small = await stub.ValidateHardware(estimation_service_pb2.ValidateHardwareRequest(
        organization=ORG, spec=spec("meta-llama/Llama-3.1-8B", "nvidia-t4"), tokens_per_epoch=1_000_000))
    assert not too_small.requested.fits and "T4" in too_small.requested.reason
    assert too_small.cheapest_fit.fits and too_small.cheapest_fit.cost.total_usd > 0
    assert any("QLoRA" in s for s in too_small.suggestions)

    fits = await stub.ValidateHardware(estimation_service_pb2.ValidateHardwareRequest(
        organization=ORG, spec=spec(), tokens_per_epoch=1_000_000))
    assert fits.requested.fits and not fits.HasField("cheapest_fit") and list(fits.suggestions) == []

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ValidateHardware(estimation_service_pb2.ValidateHardwareRequest(
            organization=ORG, spec=spec(gpu_type="")))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.hardware.gpu_type"])


async def test_estimate_cost_projects_and_reports_the_cost_so_far(estimation_stack: EstimationStack) -> None:
    stub = estimation_stack.estimation
    response = await stub.EstimateCost(estimation_service_pb2.EstimateCostRequest(
        organization=ORG, spec=spec(gpu_count=2), tokens_per_epoch=5_000_000, elapsed_seconds=1800))
    assert response.source == PRIOR
    assert response.projected_total.gpu_count == 2 and response.projected_total.hourly_usd == 3.30
    assert response.projected_total.total_usd == pytest.approx(response.time.total_seconds / 3600 * 3.30 * 2)
    assert response.current_usd == pytest.approx(0.5 * 3.30 * 2)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateCost(estimation_service_pb2.EstimateCostRequest(
            organization=ORG, spec=job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B"), elapsed_seconds=-1))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["elapsed_seconds"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateCost(estimation_service_pb2.EstimateCostRequest(
            organization=ORG, spec=job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B")))
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["spec.dataset"])


async def test_plan_job(estimation_stack: EstimationStack) -> None:
    estimation_stack.datasets.add("support-chats", examples=2000, train=1600, tokens=1_000_000)
    response = await estimation_stack.estimation.PlanJob(estimation_service_pb2.PlanJobRequest(
        organization=ORG, spec=spec("mistralai/Mistral-7B-Instruct-v0.3", gpu_type="")))
    assert response.source == PRIOR
    assert response.tokens_per_epoch == 800_000 and response.training_tokens == 2_400_000
    fits = {f.gpu_type: f for f in response.fits}
    assert len(fits) == 9
    assert not fits["nvidia-t4"].fits and fits["nvidia-t4"].reason
    assert fits["nvidia-h100"].fits and fits["nvidia-h100"].time.total_seconds > 0
    cheapest = response.cheapest_fit
    assert cheapest.fits and cheapest.gpu_type != "cpu"
    gpu_costs = [f.cost.total_usd for f in response.fits if f.fits and f.gpu_type != "cpu"]
    assert cheapest.cost.total_usd == min(gpu_costs)
