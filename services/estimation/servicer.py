"""EstimationService over gRPC: unpacks requests, calls the manager, packs responses. Every estimate says
whether it is a PRIOR or CALIBRATED (the response's `source`, and each fit's own)."""

from __future__ import annotations

import grpc.aio
from tuneforge.v1 import estimation_pb2, estimation_service_pb2, estimation_service_pb2_grpc

from services.estimation.cache import Memo
from services.estimation.converters import (
    fit_to_proto,
    hardware_to_proto,
    int64,
    memory_to_proto,
    model_to_proto,
    source_of,
)
from services.estimation.estimator import Fit
from services.estimation.manager import AdapterNeeds, EstimationManager
from services.kit.pipeline import freeze

# ListBaseModels' family (lower case), type, page size and page token, and the next page's token.
PageKey = tuple[str, int, int, str, str]
AskedKey = tuple[str, int, int, str]  # ListBaseModelsRequest's family, type, page_size, page_token


def _source(*fits: Fit | None) -> estimation_pb2.EstimateSource.ValueType:
    """CALIBRATED when the answer's main figures rest on measurements, else PRIOR."""
    known = [source_of(f) for f in fits if f is not None]
    calibrated = estimation_pb2.ESTIMATE_SOURCE_CALIBRATED
    return calibrated if known and known[0] == calibrated else estimation_pb2.ESTIMATE_SOURCE_PRIOR


def _dataset_size(
    request: estimation_service_pb2.EstimateJobRequest | estimation_service_pb2.ValidateHardwareRequest
    | estimation_service_pb2.PlanJobRequest,
) -> estimation_pb2.DatasetSize | None:
    return request.dataset_size if request.HasField("dataset_size") else None


def _requirement(needs: AdapterNeeds) -> estimation_service_pb2.AdapterRequirement:
    out = estimation_service_pb2.AdapterRequirement(
        adapter=needs.adapter,  # type: ignore[arg-type]
        memory_per_gpu=memory_to_proto(needs.fit.memory),
    )
    if needs.cheapest is not None:
        out.recommended.CopyFrom(fit_to_proto(needs.cheapest))
    return out


class EstimationServicer(estimation_service_pb2_grpc.EstimationServiceServicer):
    def __init__(self, manager: EstimationManager) -> None:
        self.manager = manager
        # The catalog is fixed for the life of the process, so its answers are built once: each page of
        # ListBaseModels and the one ListHardwareOptions answer. The same message goes to every caller;
        # nothing modifies it, and its bytes are kept too (services.kit.pipeline.freeze).
        self._model_pages: Memo[PageKey, estimation_service_pb2.ListBaseModelsResponse] = Memo(1024)
        # The same pages by the request's own fields (see ListBaseModels).
        self._answers: Memo[AskedKey, estimation_service_pb2.ListBaseModelsResponse] = Memo(1024)
        self._hardware: estimation_service_pb2.ListHardwareOptionsResponse | None = None
        # EstimateJob's answers by (id of the manager's Fit, notes); the Fit is kept with its answer, so the
        # id names that object while the entry lives.
        self._estimates: Memo[tuple[int, tuple[str, ...]],
                              tuple[Fit, estimation_service_pb2.EstimateJobResponse]] = Memo(1024)

    async def ListBaseModels(
        self, request: estimation_service_pb2.ListBaseModelsRequest, context: grpc.aio.ServicerContext
    ) -> estimation_service_pb2.ListBaseModelsResponse:
        # A request with these very fields was answered before: the same answer (the catalog is fixed, and a
        # page token that passed its check once always does). Otherwise the filters and the page token are
        # checked (a bad one is INVALID_ARGUMENT) and the page is built once.
        asked = (request.family, request.type, request.page_size, request.page_token)
        response = self._answers.get(asked)
        if response is not None:
            return response
        models, token = self.manager.model_page(
            request.family, request.type, request.page_size, request.page_token
        )
        # A token that passed the check names one position of this query, so these fields name one page.
        key = (request.family.lower(), request.type, request.page_size, request.page_token, token)
        response = self._model_pages.get(key)
        if response is None:
            response = self._model_pages.put(
                key,
                freeze(estimation_service_pb2.ListBaseModelsResponse(
                    models=[model_to_proto(m) for m in models], next_page_token=token
                )),
            )
        return self._answers.put(asked, response)

    async def ListHardwareOptions(
        self, request: estimation_service_pb2.ListHardwareOptionsRequest, context: grpc.aio.ServicerContext
    ) -> estimation_service_pb2.ListHardwareOptionsResponse:
        if self._hardware is None:
            self._hardware = freeze(estimation_service_pb2.ListHardwareOptionsResponse(
                options=[hardware_to_proto(h) for h in self.manager.list_hardware()]
            ))
        return self._hardware

    async def GetModelRequirements(
        self, request: estimation_service_pb2.GetModelRequirementsRequest, context: grpc.aio.ServicerContext
    ) -> estimation_service_pb2.GetModelRequirementsResponse:
        needs = await self.manager.model_requirements(
            request.model_id,
            request.adapter,
            request.method,
            request.max_seq_length,
            request.batch_size,
            request.gradient_checkpointing,
        )
        response = estimation_service_pb2.GetModelRequirementsResponse(
            model=model_to_proto(needs.model),
            memory_per_gpu=memory_to_proto(needs.requested.fit.memory),
            adapters=[_requirement(n) for n in needs.adapters],
        )
        if needs.requested.cheapest is not None:
            response.recommended.CopyFrom(fit_to_proto(needs.requested.cheapest))
        return response

    async def EstimateJob(
        self, request: estimation_service_pb2.EstimateJobRequest, context: grpc.aio.ServicerContext
    ) -> estimation_service_pb2.EstimateJobResponse:
        estimate = await self.manager.estimate_job(
            request.organization, request.spec, request.tokens_per_epoch, _dataset_size(request)
        )
        # The manager answers the same question with the same Fit object (its memo): the answer built of
        # it, and its bytes, are kept for the next caller who gets that object and those notes.
        key = (id(estimate.fit), tuple(estimate.notes))
        kept = self._estimates.get(key)
        if kept is None or kept[0] is not estimate.fit:
            kept = self._estimates.put(key, (estimate.fit, freeze(estimation_service_pb2.EstimateJobResponse(
                estimate=fit_to_proto(estimate.fit), source=_source(estimate.fit), notes=estimate.notes
            ))))
        return kept[1]

    async def ValidateHardware(
        self, request: estimation_service_pb2.ValidateHardwareRequest, context: grpc.aio.ServicerContext
    ) -> estimation_service_pb2.ValidateHardwareResponse:
        check = await self.manager.validate_hardware(
            request.organization, request.spec, request.tokens_per_epoch, _dataset_size(request)
        )
        response = estimation_service_pb2.ValidateHardwareResponse(
            requested=fit_to_proto(check.requested),
            suggestions=check.suggestions,
            source=_source(check.requested),
            notes=check.notes,
        )
        if check.cheapest is not None:
            response.cheapest_fit.CopyFrom(fit_to_proto(check.cheapest))
        return response

    async def EstimateCost(
        self, request: estimation_service_pb2.EstimateCostRequest, context: grpc.aio.ServicerContext
    ) -> estimation_service_pb2.EstimateCostResponse:
        report = await self.manager.estimate_cost(
            request.organization,
            request.spec,
            request.tokens_per_epoch,
            request.elapsed_seconds,
            request.job_id,
        )
        fit = fit_to_proto(report.fit)
        projected = estimation_pb2.CostEstimate(
            hourly_usd=fit.cost.hourly_usd, gpu_count=fit.cost.gpu_count, total_usd=report.projected_usd
        )
        return estimation_service_pb2.EstimateCostResponse(
            projected_total=projected,
            current_usd=report.current_usd,
            time=fit.time,
            source=_source(report.fit),
            notes=report.notes,
            elapsed_seconds=report.elapsed_seconds,
            fraction_complete=report.fraction_complete,
        )

    async def PlanJob(
        self, request: estimation_service_pb2.PlanJobRequest, context: grpc.aio.ServicerContext
    ) -> estimation_service_pb2.PlanJobResponse:
        plan = await self.manager.plan_job(request.organization, request.spec, _dataset_size(request))
        response = estimation_service_pb2.PlanJobResponse(
            tokens_per_epoch=int64(plan.tokens_per_epoch),
            training_tokens=int64(plan.training_tokens),
            fits=[fit_to_proto(f) for f in plan.fits],
            source=_source(plan.requested or plan.cheapest),
            notes=plan.notes,
            train_examples=plan.train_examples,
            suggestions=plan.suggestions,
        )
        if plan.cheapest is not None:
            response.cheapest_fit.CopyFrom(fit_to_proto(plan.cheapest))
        if plan.requested is not None:
            response.requested.CopyFrom(fit_to_proto(plan.requested))
        if plan.validation is not None:
            response.dataset_validation.CopyFrom(plan.validation)
        return response
