"""The jobs service's view of the estimation service: does a job fit the GPU it asked for.

CreateJob admits no job that its own estimate says will run out of memory on the hardware it names. A job
that names no GPU type (or "cpu") goes to whichever worker takes it, so there is nothing to check; a model
the estimator cannot resolve (a private hub id, say) is admitted unchecked rather than refused.

The dataset CreateJob has just read travels with the request (its size: statistics and train examples), so
the estimation service does not read it again; the fit that admitted the job is returned, for the job's
assignment to carry to the worker.
"""

from __future__ import annotations

import logging

import grpc.aio
from tuneforge.v1 import (
    dataset_pb2,
    estimation_pb2,
    estimation_service_pb2,
    estimation_service_pb2_grpc,
    job_pb2,
)

from tuneforge_core.errors import FieldViolation, InvalidArgument, error_from_rpc_error
from tuneforge_core.reasons import Reason

log = logging.getLogger(__name__)

GIB = 2**30


class HardwareCheck:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = estimation_service_pb2_grpc.EstimationServiceStub(channel)

    async def check(
        self, organization: str, spec: job_pb2.JobSpec, dataset: dataset_pb2.Dataset
    ) -> estimation_pb2.HardwareFit | None:
        """The estimate the job is admitted with, on the GPU type it names; None when nothing was checked.

        `dataset` is spec.dataset as CreateJob read it (READY). Raises INVALID_ARGUMENT
        (INSUFFICIENT_HARDWARE) naming spec.hardware.gpu_type when the job does not fit; the estimation
        service being down is UNAVAILABLE, as for any dependency."""
        gpu_type = spec.hardware.gpu_type
        if not gpu_type or gpu_type == "cpu":
            return None
        request = estimation_service_pb2.ValidateHardwareRequest(
            organization=organization, spec=spec, dataset_size=dataset_size(dataset)
        )
        try:
            response = await self._stub.ValidateHardware(request, timeout=30)
        except grpc.aio.AioRpcError as err:
            error = error_from_rpc_error(err, service="estimation")
            if isinstance(error, InvalidArgument) and all(
                v.field.endswith("base_model") for v in error.violations
            ):
                log.info("admitting a job unchecked: the estimator does not know %s", spec.base_model)
                return None
            raise error from err
        fit = response.requested
        if fit.fits:
            return fit
        need = fit.memory_per_gpu.total / GIB
        sentence = fit.reason or f"needs about {need:.1f} GiB per GPU"
        sentence = f"on {fit.gpu_count} x {gpu_type} the job {sentence.removeprefix('the job ')}"
        best = response.cheapest_fit
        if best.gpu_type:
            sentence += f"; the cheapest configuration that fits is {best.gpu_count} x {best.gpu_type}"
        if response.suggestions:
            sentence += "; or: " + "; ".join(response.suggestions)
        raise InvalidArgument(
            f"The job does not fit {gpu_type}.",
            reason=Reason.INSUFFICIENT_HARDWARE,
            violations=[FieldViolation("spec.hardware.gpu_type", sentence)],
        )


def dataset_size(dataset: dataset_pb2.Dataset) -> estimation_pb2.DatasetSize:
    """What the estimation service reads of a dataset to count its training tokens."""
    train = sum(s.example_count for s in dataset.splits if s.kind == dataset_pb2.DATASET_SPLIT_KIND_TRAIN)
    return estimation_pb2.DatasetSize(
        dataset=dataset.name or dataset.id, statistics=dataset.statistics, train_examples=train
    )
