"""Where a job's models may come from: hub ids, folders under the model roots (after resolving '..' and
links), and the organization's own outputs in object storage; nothing else, whatever the spelling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from tuneforge.v1 import job_pb2

from tuneforge_core.errors import InvalidArgument
from tuneforge_core.models import S3_OUTSIDE, ModelKind, ModelPolicy, parse_roots, ref_problem
from tuneforge_core.reasons import Reason
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import LocalObjectStore, S3ObjectStore

ORG = "acme"
FIELD = "spec.base_model"


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0")
    return path


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    return model_folder(tmp_path / "models" / "tiny").parent


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def policy(roots: Path, store: LocalObjectStore, tmp_path: Path) -> ModelPolicy:
    return ModelPolicy(str(roots), store, tmp_path / "data")


def refusal(policy: ModelPolicy, ref: str, organization: str = ORG, field: str = FIELD) -> str:
    with pytest.raises(InvalidArgument) as info:
        policy.source(ref, organization, field)
    (violation,) = info.value.violations
    assert violation.field == field
    return violation.description


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("", "is required"),
        ("./models/x", "must be absolute"),
        ("../../etc", "must be absolute"),
        ("~/models", "must be absolute"),
        ("file://otherhost/etc", "file:///absolute/folder"),
        ("file:relative", "file:///absolute/folder"),
        ("s3://bucket", "bucket and a folder"),
        ("/models/x\n", "control characters"),
        ("gpt2", "is not a hub id"),
        ("http://example.com/model", "is not a hub id"),
    ],
)
def test_malformed_references_are_refused_by_form(ref: str, why: str) -> None:
    problem = ref_problem(ref)
    assert problem is not None and why in problem, problem


@pytest.mark.parametrize("ref", ["org/name", "/abs/folder", "file:///abs/folder", "s3://bucket/models/x"])
def test_well_formed_references_pass_the_form_check(ref: str) -> None:
    assert ref_problem(ref) is None


def test_a_hub_id_is_left_to_the_hub(policy: ModelPolicy) -> None:
    source = policy.source("meta-llama/Llama-3.2-1B", ORG, FIELD)
    assert source.kind is ModelKind.HUB and source.path is None


def test_a_folder_under_a_root_is_accepted_as_a_path_or_a_file_uri(policy: ModelPolicy, roots: Path) -> None:
    for ref in (str(roots / "tiny"), (roots / "tiny").as_uri(), f"{roots}/other/../tiny"):
        source = policy.source(ref, ORG, FIELD)
        assert (source.kind, source.path) == (ModelKind.LOCAL, (roots / "tiny").resolve())
    assert policy.missing(policy.source(str(roots / "tiny"), ORG, FIELD)) is None


def test_nothing_outside_the_roots_is_read(policy: ModelPolicy, roots: Path, tmp_path: Path) -> None:
    assert "model roots" in refusal(policy, "/etc")
    assert "model roots" in refusal(policy, "file:///etc")
    assert "model roots" in refusal(policy, f"{roots}/../../..{tmp_path}")  # '..' out of the root
    assert "model roots" in refusal(policy, f"{roots}/tiny/../../outside")
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", roots / "link")  # a link inside the root that leads out of it
    assert "model roots" in refusal(policy, str(roots / "link"))
    assert "model roots" in refusal(policy, str(roots) + "-sibling")  # a prefix is not a parent
    assert "allows none" in refusal(ModelPolicy(), str(roots / "tiny"))  # no roots: no local paths


def test_another_organizations_outputs_are_never_a_model(
    policy: ModelPolicy, store: LocalObjectStore, tmp_path: Path
) -> None:
    theirs = model_folder(store.root / "jobs" / "other" / "job_1" / "merged")
    ours = model_folder(store.root / "jobs" / ORG / "job_2" / "merged")
    for ref in (str(theirs), theirs.as_uri(), f"{store.root}/jobs/{ORG}/../other/job_1/merged"):
        assert "another organization" in refusal(policy, ref)
    assert "another organization" in refusal(policy, str(store.root / "datasets" / ORG))
    assert "another organization" in refusal(policy, str(store.root / "jobs" / ORG))
    # Even where an operator's root contains the store, the store is judged by its own rule.
    everything = ModelPolicy(str(tmp_path), store)
    assert "another organization" in refusal(everything, str(theirs))
    source = policy.source(ours.as_uri(), ORG, FIELD)
    assert (source.kind, source.key) == (ModelKind.STORED, f"jobs/{ORG}/job_2/merged")
    assert policy.missing(source) is None
    assert "another organization" in refusal(policy, ours.as_uri(), organization="other")


def test_s3_models_are_only_the_organizations_own_outputs_in_this_deployments_bucket(
    policy: ModelPolicy,
) -> None:
    assert refusal(policy, "s3://private-bucket/models/llama") == S3_OUTSIDE
    s3 = ModelPolicy((), S3ObjectStore("platform", "tf", client=object()))
    assert refusal(s3, "s3://private-bucket/models/llama") == S3_OUTSIDE
    assert refusal(s3, "s3://platform/other-prefix/jobs/acme/job_1/merged") == S3_OUTSIDE
    assert "another organization" in refusal(s3, "s3://platform/tf/jobs/other/job_1/merged")
    assert "another organization" in refusal(s3, "s3://platform/tf/jobs/acme/../other/job_1/merged")
    source = s3.source("s3://platform/tf/jobs/acme/job_1/merged/", ORG, FIELD)
    assert (source.kind, source.key) == (ModelKind.STORED, "jobs/acme/job_1/merged")


def test_the_data_dir_is_not_reachable_through_a_root_around_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    model_folder(data_dir / "models" / "tiny")
    (data_dir / "secrets").mkdir()
    around = ModelPolicy(str(tmp_path), None, data_dir)
    assert "model roots" in refusal(around, str(data_dir / "secrets"))
    inside = ModelPolicy(f"{tmp_path},{data_dir / 'models'}", None, data_dir)
    assert inside.source(str(data_dir / "models" / "tiny"), ORG, FIELD).kind is ModelKind.LOCAL
    assert "model roots" in refusal(inside, str(data_dir / "secrets"))


def test_a_folder_that_is_not_a_model_says_what_it_lacks(policy: ModelPolicy, roots: Path) -> None:
    def missing(folder: Path) -> str | None:
        return policy.missing(policy.source(str(folder), ORG, FIELD))

    assert missing(roots / "nothing-here") == "no model folder exists there"
    empty = roots / "empty"
    empty.mkdir()
    assert missing(empty) == (
        "the folder is not a model: it has no config.json and no *.safetensors weights (safetensors only)"
    )
    pickled = roots / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    assert "no *.safetensors" in (missing(pickled) or "")


def test_check_spec_names_each_field_and_says_model_not_found_only_when_missing(
    policy: ModelPolicy, roots: Path
) -> None:
    spec = job_pb2.JobSpec(base_model=str(roots / "gone"), method=job_pb2.TRAINING_METHOD_DISTILLATION)
    spec.distillation.teacher_model = str(roots / "tiny")
    with pytest.raises(InvalidArgument) as info:
        policy.check_spec(spec, ORG)
    assert [v.field for v in info.value.violations] == ["spec.base_model"]
    assert info.value.reason == Reason.MODEL_NOT_FOUND

    spec.base_model = "/etc"
    spec.distillation.teacher_model = "s3://someone-else/teacher"
    with pytest.raises(InvalidArgument) as info:
        policy.check_spec(spec, ORG)
    assert [v.field for v in info.value.violations] == ["spec.base_model", "spec.distillation.teacher_model"]
    assert info.value.reason == Reason.INVALID_ARGUMENT

    spec.base_model, spec.distillation.teacher_model = str(roots / "tiny"), "org/teacher"
    assert [s.kind for s in policy.check_spec(spec, ORG)] == [ModelKind.LOCAL, ModelKind.HUB]


def test_model_roots_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="not an absolute folder"):
        parse_roots("/models, relative/models")
    with pytest.raises(ValidationError):
        KitSettings(model_roots="models")
    assert KitSettings(model_roots=" /a , /b ").model_roots == " /a , /b "
    assert parse_roots("") == ()
