"""EstimationService over gRPC: unpacks requests, calls the manager, packs responses. Every answer is a
PRIOR until calibration lands."""

from __future__ import annotations

import grpc.aio
from tuneforge.v1 import estimation_pb2, estimation_service_pb2, estimation_service_pb2_grpc

from services.estimation.converters import fit_to_proto, hardware_to_proto, memory_to_proto, model_to_proto
from services.estimation.manager import EstimationManager

SOURCE = estimation_pb2.ESTIMATE_SOURCE_PRIOR


class EstimationServicer(estimation_service_pb2_grpc.EstimationServiceServicer):
    def __init__(self, manager: EstimationManager) -> None:
        self.manager = manager

    async def ListBaseModels(
            self, request: estimation_service_pb2.ListBaseModelsRequest,
            context: grpc.aio.ServicerContext) -> estimation_service_pb2.ListBaseModelsResponse:
        models, token = self.manager.list_models(request.family, request.type, request.page_size,
                                                 request.page_token)
        return estimation_service_pb2.ListBaseModelsResponse(models=[model_to_proto(m) for m in models],
                                                             next_page_token=token)

    async def ListHardwareOptions(
            self, request: estimation_service_pb2.ListHardwareOptionsRequest,
            context: grpc.aio.ServicerContext) -> estimation_service_pb2.ListHardwareOptionsResponse:
        return estimation_service_pb2.ListHardwareOptionsResponse(
            options=[hardware_to_proto(h) for h in self.manager.list_hardware()])

    async def GetModelRequirements(
            self, request: estimation_service_pb2.GetModelRequirementsRequest,
            context: grpc.aio.ServicerContext) -> estimation_service_pb2.GetModelRequirementsResponse:
        model, memory, cheapest = self.manager.model_requirements(request.model_id, request.adapter,
                                                                  request.max_seq_length, request.batch_size)
        response = estimation_service_pb2.GetModelRequirementsResponse(model=model_to_proto(model),
                                                                       memory_per_gpu=memory_to_proto(memory))
        if cheapest is not None:
            response.recommended.CopyFrom(fit_to_proto(cheapest))
        return response

    async def EstimateJob(self, request: estimation_service_pb2.EstimateJobRequest,
                          context: grpc.aio.ServicerContext) -> estimation_service_pb2.EstimateJobResponse:
        estimate = await self.manager.estimate_job(request.organization, request.spec,
                                                   request.tokens_per_epoch)
        return estimation_service_pb2.EstimateJobResponse(estimate=fit_to_proto(estimate.fit), source=SOURCE,
                                                          notes=estimate.notes)

    async def ValidateHardware(
            self, request: estimation_service_pb2.ValidateHardwareRequest,
            context: grpc.aio.ServicerContext) -> estimation_service_pb2.ValidateHardwareResponse:
        check = await self.manager.validate_hardware(request.organization, request.spec,
                                                     request.tokens_per_epoch)
        response = estimation_service_pb2.ValidateHardwareResponse(requested=fit_to_proto(check.requested),
                                                                   suggestions=check.suggestions)
        if check.cheapest is not None:
            response.cheapest_fit.CopyFrom(fit_to_proto(check.cheapest))
        return response

    async def EstimateCost(self, request: estimation_service_pb2.EstimateCostRequest,
                           context: grpc.aio.ServicerContext) -> estimation_service_pb2.EstimateCostResponse:
        report = await self.manager.estimate_cost(request.organization, request.spec,
                                                  request.tokens_per_epoch, request.elapsed_seconds)
        fit = fit_to_proto(report.fit)
        return estimation_service_pb2.EstimateCostResponse(projected_total=fit.cost,
                                                           current_usd=report.current_usd, time=fit.time,
                                                           source=SOURCE)

    async def PlanJob(self, request: estimation_service_pb2.PlanJobRequest,
                      context: grpc.aio.ServicerContext) -> estimation_service_pb2.PlanJobResponse:
        plan = await self.manager.plan_job(request.organization, request.spec)
        response = estimation_service_pb2.PlanJobResponse(
            tokens_per_epoch=plan.tokens_per_epoch, training_tokens=plan.training_tokens,
            fits=[fit_to_proto(f) for f in plan.fits], source=SOURCE, notes=plan.notes)
        if plan.cheapest is not None:
            response.cheapest_fit.CopyFrom(fit_to_proto(plan.cheapest))
        return response
