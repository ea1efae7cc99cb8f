"""The services, hosted together behind one gRPC address."""

from __future__ import annotations

from services.kit.runtime import ComponentFactory


def all_components() -> list[ComponentFactory]:
    from services.datasets.component import DatasetsComponent
    from services.estimation.component import EstimationComponent
    from services.identity.component import IdentityComponent
    from services.jobs.component import JobsComponent
    from services.metrics.component import MetricsComponent
    from services.serving.component import ServingComponent

    return [IdentityComponent, DatasetsComponent, JobsComponent, EstimationComponent, MetricsComponent,
            ServingComponent]
