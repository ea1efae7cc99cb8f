"""CreateDeployment's rules on a real SQLite database with the serving service's real migrations (and on
PostgreSQL where one is reachable): request_id replays (after a deletion too), and the limits on an
organization's live deployments (3 here) and on the platform's model processes, at create and at restart.
The jobs service is a stand-in that knows one SUCCEEDED job per organization, and no model process is
started (the launches are recorded instead)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from tuneforge.v1 import deployment_service_pb2 as pb
from tuneforge.v1 import job_pb2

from services.kit.db import Database
from services.serving.component import MIGRATIONS
from services.serving.converters import deployment_to_proto
from services.serving.manager import DeploymentManager
from services.serving.models import DeploymentRow
from services.serving.settings import ServingSettings
from tuneforge_core.errors import AlreadyExists, NotFound, ResourceExhausted
from tuneforge_core.models import ModelPolicy
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import LocalObjectStore


class Jobs:
    """GetJob of the jobs service: one SUCCEEDED job, "tiny", in every organization."""

    def __init__(self, store: LocalObjectStore) -> None:
        self.store = store

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        if job not in ("tiny", f"job_{organization}"):
            raise NotFound(f"job '{job}' not found")
        found = job_pb2.Job(id=f"job_{organization}", name="tiny", organization=organization,
                            state=job_pb2.JOB_STATE_SUCCEEDED,
                            spec=job_pb2.JobSpec(base_model="org/base"))
        found.output.adapter_uri = self.store.uri(f"jobs/{organization}/job_{organization}/adapter")
        return found


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeploymentManager]:
    url = (f"sqlite:///{tmp_path / 'serving.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url, "serving")
    db.migrate(MIGRATIONS)
    store = LocalObjectStore(tmp_path / "objects")
    settings = ServingSettings(data_dir=tmp_path / "data", serving_max_deployments_per_org=3)
    manager = DeploymentManager(db, Jobs(store), store, settings,  # type: ignore[arg-type]
                                ModelPolicy((), store, tmp_path / "data"))
    launched: list[str] = []
    manager.launched = launched  # type: ignore[attr-defined]
    manager._launch = lambda deployment_id, *_args: launched.append(deployment_id)  # type: ignore[method-assign]
    yield manager
    db.dispose()


async def create(manager: DeploymentManager, org: str = "acme", **fields: Any) -> pb.Deployment:
    return await manager.create(org, pb.CreateDeploymentRequest(**{"organization": org, "job": "tiny",
                                                                   **fields}))


async def test_a_retry_under_a_request_id_returns_the_first_deployment(manager: DeploymentManager) -> None:
    first = await create(manager, name="d-98a3", request_id="R")
    assert (await create(manager, name="d-98a3", request_id="R")).id == first.id
    # The default target spelled out, or the organization left empty, is still the same request.
    same = await manager.create("acme", pb.CreateDeploymentRequest(
        job="tiny", name="d-98a3", request_id="R", target=pb.DEPLOYMENT_TARGET_EMBEDDED))
    assert same.id == first.id
    assert manager.launched == [first.id]  # type: ignore[attr-defined]


@pytest.mark.parametrize("other", [{"name": "e-98a3"}, {"name": "d-98a3", "merged": True},
                                   {"name": "d-98a3", "target": pb.DEPLOYMENT_TARGET_VLLM},
                                   {"name": "d-98a3", "job": "job_acme"}])
async def test_another_request_under_a_used_request_id_is_refused(manager: DeploymentManager,
                                                                  other: dict[str, Any]) -> None:
    first = await create(manager, name="d-98a3", request_id="R")
    with pytest.raises(AlreadyExists) as refused:
        await create(manager, **{"request_id": "R", **other})
    assert refused.value.reason == Reason.REQUEST_ID_REUSED
    assert refused.value.metadata["request_id"] == "R"
    assert [(v.field, v.description) for v in refused.value.violations] == \
        [("request_id", "was already used for a different request")]
    assert [d.name for d in (await manager.list_page("acme", 10, "", ""))[0]] == [first.name]
    # Another organization's request_id is its own.
    assert (await create(manager, "globex", name="e-98a3", request_id="R")).name == "e-98a3"


async def test_a_deployment_from_before_request_hashes_matches_any_retry(manager: DeploymentManager) -> None:
    first = await create(manager, name="d-98a3", request_id="R")
    with manager.db.session() as s:
        s.get(DeploymentRow, first.id).request_hash = ""  # type: ignore[union-attr]
    assert (await create(manager, name="e-98a3", request_id="R")).id == first.id


async def test_concurrent_retries_under_one_request_id_make_one_deployment(
        manager: DeploymentManager) -> None:
    made = await asyncio.gather(*(create(manager, name="d-98a3", request_id="R") for _ in range(4)))
    assert len({d.id for d in made}) == 1


def set_state(manager: DeploymentManager, deployment_id: str, state: int) -> None:
    """What the model process's outcome does to the row (DeploymentManager._finish)."""
    with manager.db.session() as s:
        s.get(DeploymentRow, deployment_id).state = state  # type: ignore[union-attr]


async def test_an_organization_has_at_most_its_limit_of_live_deployments(manager: DeploymentManager) -> None:
    made = [await create(manager, name=f"d{i}", request_id=f"r{i}") for i in range(3)]
    with pytest.raises(ResourceExhausted) as refused:
        await create(manager, name="d3")
    assert refused.value.reason == Reason.QUOTA_EXCEEDED
    assert refused.value.metadata == {"limit": "serving_max_deployments_per_org", "value": "3", "live": "3"}
    assert "TUNEFORGE_SERVING_MAX_DEPLOYMENTS_PER_ORG = 3" in refused.value.message
    assert "delete one" in refused.value.message
    assert manager.launched == [d.id for d in made]  # type: ignore[attr-defined]
    # A retry of a create that was admitted is still answered with its deployment.
    assert (await create(manager, name="d0", request_id="r0")).id == made[0].id
    # READY ones count; FAILED and deleted ones do not.
    set_state(manager, made[0].id, pb.DEPLOYMENT_STATE_READY)
    set_state(manager, made[1].id, pb.DEPLOYMENT_STATE_FAILED)
    d3 = await create(manager, name="d3")
    with pytest.raises(ResourceExhausted):
        await create(manager, name="d4")
    await manager.delete("acme", d3.id)
    assert (await create(manager, name="d4")).name == "d4"
    # 0: no limit.
    manager.settings = manager.settings.model_copy(update={"serving_max_deployments_per_org": 0})
    assert (await create(manager, name="d5")).name == "d5"


async def test_one_organizations_deployments_do_not_block_another(manager: DeploymentManager) -> None:
    for i in range(3):
        await create(manager, "acme", name=f"d{i}")
    with pytest.raises(ResourceExhausted):
        await create(manager, "acme", name="d3")
    made = [await create(manager, "globex", name=f"d{i}") for i in range(3)]
    assert [d.name for d in made] == ["d0", "d1", "d2"]
    with pytest.raises(ResourceExhausted) as refused:
        await create(manager, "globex", name="d3")
    assert refused.value.metadata["live"] == "3"


async def test_concurrent_creates_never_both_take_the_last_place(manager: DeploymentManager) -> None:
    await create(manager, name="d0")
    outcomes = await asyncio.gather(*(create(manager, name=f"c{i}") for i in range(6)),
                                    return_exceptions=True)
    made = [o for o in outcomes if isinstance(o, pb.Deployment)]
    assert len(made) == 2, outcomes
    assert all(isinstance(o, ResourceExhausted) for o in outcomes if o not in made), outcomes
    assert len((await manager.list_page("acme", 100, "", ""))[0]) == 3


async def test_the_platform_runs_at_most_its_limit_of_model_processes(manager: DeploymentManager) -> None:
    manager.settings = manager.settings.model_copy(update={"serving_max_model_processes": 4})
    made = [await create(manager, "acme", name=f"d{i}") for i in range(3)]
    await create(manager, "globex", name="g0")
    with pytest.raises(ResourceExhausted) as refused:
        await create(manager, "globex", name="g1")
    assert refused.value.metadata == {"limit": "serving_max_model_processes", "value": "4", "live": "4"}
    # A READY VLLM deployment holds no model process here (its check ran and stopped).
    set_state(manager, made[0].id, pb.DEPLOYMENT_STATE_FAILED)
    vllm = await create(manager, "globex", name="g1", target=pb.DEPLOYMENT_TARGET_VLLM)
    set_state(manager, vllm.id, pb.DEPLOYMENT_STATE_READY)
    assert (await create(manager, "globex", name="g2")).name == "g2"


async def test_a_create_retried_after_its_deployment_was_deleted_does_not_make_it_again(
        manager: DeploymentManager) -> None:
    """As CreateJob after its job was deleted: the retry is ALREADY_EXISTS (REQUEST_ID_REUSED) naming the
    deleted deployment, instead of a second deployment."""
    first = await create(manager, name="d-98a3", request_id="R")
    assert (await create(manager, name="d-98a3", request_id="R")).id == first.id
    await manager.delete("acme", first.id)

    with pytest.raises(AlreadyExists) as info:
        await create(manager, name="d-98a3", request_id="R")
    error = info.value
    assert error.reason == Reason.REQUEST_ID_REUSED
    assert error.metadata == {"request_id": "R", "deployment": first.id, "deleted": "true"}
    assert f"request_id 'R' already created deployment {first.id}, which was deleted at" in error.message
    assert [(v.field, v.description) for v in error.violations] == [
        ("request_id", f"already created deployment {first.id}, since deleted")]
    assert manager.launched == [first.id]  # type: ignore[attr-defined]
    assert (await manager.list_page("acme", 10, "", ""))[0] == []
    # Another request under that request_id is refused as before.
    with pytest.raises(AlreadyExists) as reused:
        await create(manager, name="e-98a3", request_id="R")
    assert reused.value.reason == Reason.REQUEST_ID_REUSED
    assert reused.value.metadata == {"request_id": "R", "deployment": first.id}
    assert [(v.field, v.description) for v in reused.value.violations] == \
        [("request_id", "was already used for a different request")]
    # The name is free again, under a new request_id.
    again = await create(manager, name="d-98a3", request_id="R2")
    assert again.id != first.id and again.name == "d-98a3"
    # Another organization's request_ids are its own: acme's deleted "R" neither blocks nor shows there.
    theirs = await create(manager, "globex", name="d-98a3", request_id="R")
    assert theirs.organization == "globex" and theirs.id != first.id
    assert (await create(manager, "globex", name="d-98a3", request_id="R")).id == theirs.id
    await manager.delete("globex", theirs.id)
    with pytest.raises(AlreadyExists) as their_retry:
        await create(manager, "globex", name="d-98a3", request_id="R")
    assert their_retry.value.metadata["deployment"] == theirs.id  # its own deleted deployment, not acme's


async def test_the_request_id_of_a_deployment_deleted_with_its_job_stays_used(
        manager: DeploymentManager) -> None:
    made = await create(manager, name="d-98a3", request_id="R")
    other = await create(manager, "globex", name="d-98a3", request_id="R")
    assert await manager.delete_job("job_acme") == 1
    with pytest.raises(AlreadyExists) as info:
        await create(manager, name="d-98a3", request_id="R")
    assert info.value.metadata == {"request_id": "R", "deployment": made.id, "deleted": "true"}
    assert (await create(manager, "globex", name="d-98a3", request_id="R")).id == other.id


async def test_a_deleted_deployment_from_before_request_hashes_matches_any_retry(
        manager: DeploymentManager) -> None:
    first = await create(manager, name="d-98a3", request_id="R")
    with manager.db.session() as s:
        s.get(DeploymentRow, first.id).request_hash = ""  # type: ignore[union-attr]
    await manager.delete("acme", first.id)
    with pytest.raises(AlreadyExists) as info:
        await create(manager, name="e-98a3", request_id="R")
    assert info.value.metadata["deleted"] == "true"


def state_of(manager: DeploymentManager, deployment_id: str) -> pb.Deployment:
    with manager.db.session() as s:
        return deployment_to_proto(s.get(DeploymentRow, deployment_id))  # type: ignore[arg-type]


async def test_a_restart_loads_live_deployments_again_oldest_first_up_to_the_process_limit(
        manager: DeploymentManager) -> None:
    """TUNEFORGE_SERVING_MAX_MODEL_PROCESSES holds at a restart too (the oldest load, the rest FAIL naming
    it); TUNEFORGE_SERVING_MAX_DEPLOYMENTS_PER_ORG does not take back what it admitted."""
    a0 = await create(manager, "acme", name="a0")
    g0 = await create(manager, "globex", name="g0")
    a1 = await create(manager, "acme", name="a1")
    g1 = await create(manager, "globex", name="g1", target=pb.DEPLOYMENT_TARGET_VLLM)
    a2 = await create(manager, "acme", name="a2")
    g2 = await create(manager, "globex", name="g2")
    set_state(manager, a0.id, pb.DEPLOYMENT_STATE_READY)
    set_state(manager, a1.id, pb.DEPLOYMENT_STATE_FAILED)
    set_state(manager, g1.id, pb.DEPLOYMENT_STATE_READY)  # a READY VLLM deployment holds no process
    set_state(manager, g2.id, pb.DEPLOYMENT_STATE_READY)
    holders = [a0.id, g0.id, a2.id, g2.id]

    # A lowered limit per organization (acme has 2 live, globex 3): both keep theirs.
    manager.settings = manager.settings.model_copy(update={"serving_max_deployments_per_org": 1})
    manager.launched.clear()  # type: ignore[attr-defined]
    await manager.resume()
    assert manager.launched == holders  # type: ignore[attr-defined]
    assert [state_of(manager, d).state for d in holders] == [pb.DEPLOYMENT_STATE_PENDING] * 4
    assert state_of(manager, g1.id).state == pb.DEPLOYMENT_STATE_READY

    # A process limit below what was live: the two oldest load again, the two newest FAIL saying why.
    manager.settings = manager.settings.model_copy(update={"serving_max_model_processes": 2})
    manager.launched.clear()  # type: ignore[attr-defined]
    await manager.resume()
    assert manager.launched == [a0.id, g0.id]  # type: ignore[attr-defined]
    for kept in (a0, g0):
        assert state_of(manager, kept.id).state == pb.DEPLOYMENT_STATE_PENDING
    for refused in (a2, g2):
        deployment = state_of(manager, refused.id)
        assert deployment.state == pb.DEPLOYMENT_STATE_FAILED
        assert deployment.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "TUNEFORGE_SERVING_MAX_MODEL_PROCESSES = 2" in deployment.error.message
        info = error_details_pb2.ErrorInfo()
        assert deployment.error.details[0].Unpack(info)
        assert info.reason == Reason.QUOTA_EXCEEDED
        assert info.metadata["limit"] == "serving_max_model_processes" and info.metadata["value"] == "2"
    assert state_of(manager, a1.id).state == pb.DEPLOYMENT_STATE_FAILED and \
        not state_of(manager, a1.id).error.message  # FAILED before: untouched
    assert state_of(manager, g1.id).state == pb.DEPLOYMENT_STATE_READY
    # The platform is at its limit: a new create is refused.
    with pytest.raises(ResourceExhausted) as full:
        await create(manager, "umbrella", name="u0")
    assert full.value.metadata["limit"] == "serving_max_model_processes"
