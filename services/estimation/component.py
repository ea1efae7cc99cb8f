"""The estimation service as a kit Component: the catalog loaded once at start, and its servicer."""

from __future__ import annotations

from collections.abc import Sequence

from tuneforge.v1 import estimation_service_pb2_grpc

from services.estimation.catalog import Catalog
from services.estimation.datasets_client import GrpcDatasetLookup
from services.estimation.manager import EstimationManager
from services.estimation.servicer import EstimationServicer
from services.estimation.settings import EstimationSettings
from services.kit.runtime import Component, Registration, Runtime

SERVICE_NAME = "tuneforge.v1.EstimationService"


class EstimationComponent(Component):
    def __init__(self, runtime: Runtime, settings: EstimationSettings | None = None) -> None:
        super().__init__(runtime)
        self.settings = settings or EstimationSettings()
        # A malformed catalog stops the process at start, not at the first request.
        self.catalog = Catalog.load(self.settings.catalog_dir, self.settings.hourly_usd)
        address = runtime.settings.datasets_address
        datasets = GrpcDatasetLookup(lambda: runtime.channel(address),
                                     timeout_s=self.settings.datasets_timeout_s)
        self.manager = EstimationManager(self.catalog, datasets)

    def registrations(self) -> Sequence[Registration]:
        return [Registration(SERVICE_NAME, EstimationServicer(self.manager),
                             estimation_service_pb2_grpc.add_EstimationServiceServicer_to_server)]
