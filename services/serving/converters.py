"""Conversions between the serving service's rows and tuneforge.v1 messages (Deployment)."""

from __future__ import annotations

from google.rpc import status_pb2
from tuneforge.v1 import deployment_service_pb2 as pb

from services.kit.protos import to_timestamp
from services.serving.models import DeploymentRow


def deployment_to_proto(row: DeploymentRow) -> pb.Deployment:
    deployment = pb.Deployment(
        id=row.id, organization=row.organization, name=row.name, job=row.job_id,
        target=pb.DeploymentTarget.ValueType(row.target), merged=row.merged,
        state=pb.DeploymentState.ValueType(row.state), endpoint=row.endpoint, model=row.name,
        manifest=row.manifest,
    )
    if row.error:
        deployment.error.CopyFrom(status_pb2.Status.FromString(row.error))
    if row.check:
        deployment.check.ParseFromString(row.check)
    deployment.create_time.CopyFrom(to_timestamp(row.create_time))
    deployment.update_time.CopyFrom(to_timestamp(row.update_time))
    return deployment
