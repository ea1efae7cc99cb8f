"""CreateJob hands the worker the dataset's test split (JobAssignment.test_uri) for the evaluation after
training, and an empty URI when the dataset has none; the queued spec carries the resolved
EvaluationConfig."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import dataset_pb2, job_service_pb2

from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from tests.jobs.test_create import ORG, K, manager, roots, spec, store  # noqa: F401 (fixtures)


async def _assignment(manager: JobManager, dataset: str, roots: Path) -> events_pb2.JobAssignment:  # noqa: F811
    job = await manager.create(
        job_service_pb2.CreateJobRequest(organization=ORG, spec=spec(roots / "tiny", dataset), name=dataset)
    )
    rows = await manager.db.run(lambda s: list(s.scalars(select(JobOutbox))))
    payloads = [events_pb2.JobAssignment.FromString(r.payload) for r in rows if ".work." in r.subject]
    return next(a for a in payloads if a.job_id == job.id)


async def test_the_assignment_names_the_test_split(manager: JobManager, roots: Path) -> None:  # noqa: F811
    with_test = manager.datasets.datasets["with-validation"]  # type: ignore[attr-defined]
    with_test.name = "with-test"
    with_test.splits.append(
        dataset_pb2.DatasetSplit(
            kind=K.DATASET_SPLIT_KIND_TEST,
            example_count=5,
            uri=f"file:///objects/datasets/{ORG}/with-test/test.jsonl",
        )
    )
    manager.datasets.datasets["with-test"] = with_test  # type: ignore[attr-defined]
    assignment = await _assignment(manager, "with-test", roots)
    assert assignment.test_uri == f"file:///objects/datasets/{ORG}/with-test/test.jsonl"
    evaluation = assignment.spec.evaluation
    assert (
        evaluation.enabled,
        evaluation.max_examples,
        evaluation.num_samples,
        evaluation.max_new_tokens,
    ) == (True, 200, 3, 128)


async def test_no_test_split_leaves_the_uri_empty(manager: JobManager, roots: Path) -> None:  # noqa: F811
    assert (await _assignment(manager, "train-only", roots)).test_uri == ""
