"""DeploymentService over gRPC: unpacks requests, calls the manager, packs responses. Errors are mapped by
the kit's interceptor; the organization is the caller's (the kit's auth interceptor fills it in)."""

from __future__ import annotations

import grpc.aio
from tuneforge.v1 import deployment_service_pb2 as pb
from tuneforge.v1 import deployment_service_pb2_grpc

from services.serving.manager import DeploymentManager


class DeploymentServicer(deployment_service_pb2_grpc.DeploymentServiceServicer):
    def __init__(self, manager: DeploymentManager) -> None:
        self.manager = manager

    async def CreateDeployment(self, request: pb.CreateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> pb.CreateDeploymentResponse:
        deployment = await self.manager.create(request.organization, request)
        return pb.CreateDeploymentResponse(deployment=deployment)

    async def GetDeployment(self, request: pb.GetDeploymentRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetDeploymentResponse:
        return pb.GetDeploymentResponse(
            deployment=await self.manager.get(request.organization, request.deployment))

    async def ListDeployments(self, request: pb.ListDeploymentsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ListDeploymentsResponse:
        deployments, token = await self.manager.list_page(request.organization, request.page_size,
                                                     request.page_token, request.job)
        return pb.ListDeploymentsResponse(deployments=deployments, next_page_token=token)

    async def DeleteDeployment(self, request: pb.DeleteDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> pb.DeleteDeploymentResponse:
        deployment, already = await self.manager.delete(request.organization, request.deployment)
        return pb.DeleteDeploymentResponse(deployment=deployment, already_deleted=already)
