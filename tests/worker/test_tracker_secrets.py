"""Tracker integrations without training: the spec's rules (each violation names its field), and the
secrets' way from CreateJob to the worker (taken out of the spec, sealed, handed only to the holder of the
job's current delivery, encrypted to that request's key)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.models import JobRow
from services.jobs.tracker_secrets import TrackerSecretKeeper
from services.kit.credentials import CredentialCipher
from services.kit.db import Database
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.spec import ADDED_SINCE_FIRST_RELEASE, resolve_spec
from tuneforge_core.tracker_secrets import OneTimeKey, has_secrets, take_secrets

KEY = "0123456789abcdef0123456789abcdef01234567"


def _spec(*integrations: job_pb2.Integration) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(base_model="org/model", dataset="d", integrations=list(integrations))


def _violations(spec: job_pb2.JobSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(spec)
    return {v.field: v.description for v in caught.value.violations}


def test_a_valid_spec_keeps_its_integrations_unchanged() -> None:
    spec = _spec(job_pb2.Integration(wandb=job_pb2.WandbIntegration(project="p", entity="team", tags=["x"],
                                                                     api_key=KEY)),
                 job_pb2.Integration(mlflow=job_pb2.MlflowIntegration(tracking_uri="https://ml.example.com")),
                 job_pb2.Integration(tensorboard=job_pb2.TensorboardIntegration()))
    resolved = resolve_spec(spec)
    assert list(resolved.integrations) == list(spec.integrations)
    assert "integrations" in ADDED_SINCE_FIRST_RELEASE


@pytest.mark.parametrize(("integration", "field", "words"), [
    (job_pb2.Integration(), "spec.integrations[0]", "set one of wandb, mlflow or tensorboard"),
    (job_pb2.Integration(wandb=job_pb2.WandbIntegration()), "spec.integrations[0].wandb.project", "required"),
    (job_pb2.Integration(wandb=job_pb2.WandbIntegration(project="a/b")), "spec.integrations[0].wandb.project",
     "not a W&B project name"),
    (job_pb2.Integration(wandb=job_pb2.WandbIntegration(project="p", entity="a:b")),
     "spec.integrations[0].wandb.entity", "not a W&B entity"),
    (job_pb2.Integration(wandb=job_pb2.WandbIntegration(project="p", tags=[""])),
     "spec.integrations[0].wandb.tags[0]", "1-64"),
    (job_pb2.Integration(wandb=job_pb2.WandbIntegration(project="p", tags=["t"] * 21)),
     "spec.integrations[0].wandb.tags", "at most 20"),
    (job_pb2.Integration(wandb=job_pb2.WandbIntegration(project="p", base_url="ftp://x")),
     "spec.integrations[0].wandb.base_url", "http"),
    (job_pb2.Integration(mlflow=job_pb2.MlflowIntegration(tracking_uri="file:///etc")),
     "spec.integrations[0].mlflow.tracking_uri", "http"),
    (job_pb2.Integration(mlflow=job_pb2.MlflowIntegration(tracking_uri="https://u:p@ml.example.com")),
     "spec.integrations[0].mlflow.tracking_uri", "no user info"),
    (job_pb2.Integration(mlflow=job_pb2.MlflowIntegration(run_name="r" * 251)),
     "spec.integrations[0].mlflow.run_name", "250"),
])
def test_each_problem_names_its_field(integration: job_pb2.Integration, field: str, words: str) -> None:
    problems = _violations(_spec(integration))
    assert field in problems, problems
    assert words in problems[field]


def test_a_second_tracker_of_a_kind_is_refused() -> None:
    problems = _violations(_spec(job_pb2.Integration(tensorboard=job_pb2.TensorboardIntegration()),
                                 job_pb2.Integration(mlflow=job_pb2.MlflowIntegration()),
                                 job_pb2.Integration(tensorboard=job_pb2.TensorboardIntegration())))
    assert problems == {"spec.integrations[2]": "tensorboard is already spec.integrations[0]; at most one "
                                                "tensorboard integration"}


def test_a_malformed_secret_is_refused_without_being_echoed() -> None:
    bad = "has a space " + KEY
    problems = _violations(_spec(job_pb2.Integration(
        wandb=job_pb2.WandbIntegration(project="p", api_key=bad))))
    assert "spec.integrations[0].wandb.api_key" in problems
    assert bad not in json.dumps(problems) and KEY not in json.dumps(problems)


def test_take_secrets_clears_them_from_the_spec() -> None:
    spec = _spec(job_pb2.Integration(wandb=job_pb2.WandbIntegration(project="p", api_key=KEY)),
                 job_pb2.Integration(mlflow=job_pb2.MlflowIntegration(token="tok")))
    assert has_secrets(spec) and spec.integrations[0].wandb.api_key == KEY  # has_secrets changes nothing
    assert take_secrets(spec) == {"WANDB_API_KEY": KEY, "MLFLOW_TRACKING_TOKEN": "tok"}
    assert KEY.encode() not in spec.SerializeToString() and b"tok" not in spec.SerializeToString()
    assert spec.integrations[0].wandb.project == "p" and not has_secrets(spec)


def test_a_boxed_reply_opens_only_with_the_requests_key() -> None:
    worker, service, other = OneTimeKey(), OneTimeKey(), OneTimeKey()
    boxed = service.box(worker.public, b"secret")
    assert worker.unbox(service.public, boxed) == b"secret"
    assert b"secret" not in boxed
    with pytest.raises(InvalidTag):
        other.unbox(service.public, boxed)


@pytest.fixture
def keeper(tmp_path: Path) -> tuple[TrackerSecretKeeper, Database]:
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    key = Fernet.generate_key().decode()
    return TrackerSecretKeeper(db, lambda: CredentialCipher(key)), db


def _add_job(db: Database, job_id: str, state: int, worker: str, attempt: int) -> None:
    def add(session):  # type: ignore[no-untyped-def]
        session.add(JobRow(id=job_id, organization="org", name=job_id, spec=b"", state=state, attempt=attempt,
                           worker_id=worker, revision=1))
    asyncio.run(db.run(add))


def _ask(keeper: TrackerSecretKeeper, job_id: str, worker: str, attempt: int, sealed: bytes,
         key: OneTimeKey) -> events_pb2.TrackerSecretsReply:
    request = events_pb2.TrackerSecretsRequest(job_id=job_id, worker_id=worker, attempt=attempt,
                                               sealed=sealed, public_key=key.public)
    return events_pb2.TrackerSecretsReply.FromString(asyncio.run(keeper.answer(request.SerializeToString())))


def test_only_the_holder_of_the_current_delivery_gets_the_secrets(
        keeper: tuple[TrackerSecretKeeper, Database]) -> None:
    keep, db = keeper
    sealed = keep.seal("job_a", {"WANDB_API_KEY": KEY})
    assert KEY.encode() not in sealed and keep.seal("job_a", {}) == b""
    _add_job(db, "job_a", job_pb2.JOB_STATE_RUNNING, "w1", 2)
    _add_job(db, "job_b", job_pb2.JOB_STATE_RUNNING, "w2", 1)
    _add_job(db, "job_done", job_pb2.JOB_STATE_SUCCEEDED, "w1", 1)
    key = OneTimeKey()

    reply = _ask(keep, "job_a", "w1", 2, sealed, key)
    assert not reply.HasField("error")
    assert json.loads(key.unbox(reply.public_key, reply.encrypted)) == {"WANDB_API_KEY": KEY}
    assert KEY.encode() not in reply.SerializeToString()

    refusals = [
        _ask(keep, "job_a", "w2", 2, sealed, key),  # another worker
        _ask(keep, "job_a", "w1", 1, sealed, key),  # an earlier delivery
        _ask(keep, "job_b", "w2", 1, sealed, key),  # job_b's holder, with job_a's blob
        _ask(keep, "job_done", "w1", 1, keep.seal("job_done", {"WANDB_API_KEY": KEY}), key),  # ended
        _ask(keep, "job_nope", "w1", 1, sealed, key),
    ]
    for refused in refusals:
        assert refused.HasField("error") and not refused.encrypted, refused
        assert KEY not in refused.error.message
    assert "does not hold the job" in refusals[0].error.message
    assert "belong to another job" in refusals[2].error.message
    assert "not preparing or running" in refusals[3].error.message
