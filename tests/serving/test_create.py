"""CreateDeployment's rules on a real SQLite database with the serving service's real migrations (and on
PostgreSQL where one is reachable): request_id replays, and the limit on an organization's live
deployments. The jobs service is a stand-in that knows one SUCCEEDED job per organization, and no model
process is started (the launches are recorded instead)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuneforge.v1 import deployment_service_pb2 as pb
from tuneforge.v1 import job_pb2

from services.kit.db import Database
from services.serving.component import MIGRATIONS
from services.serving.manager import DeploymentManager
from services.serving.models import DeploymentRow
from services.serving.settings import ServingSettings
from tuneforge_core.errors import AlreadyExists, NotFound
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
    settings = ServingSettings(data_dir=tmp_path / "data")
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
