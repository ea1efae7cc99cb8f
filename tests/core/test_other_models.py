"""DPO's reference model and GRPO's reward model: validated at CreateJob like a distillation teacher.

Each is one more model reference under the base model's rule (tuneforge_core.models.other_models): its form
in `resolve_spec`, the model roots and the organization's storage in `ModelPolicy.check_spec`, and its size
in the estimator. Each is refused, naming its field, where its method or reward function does not read it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2

from services.estimation.catalog import Catalog
from services.estimation.estimator import memory_per_gpu
from services.estimation.spec import resolve_setup
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.models import ModelKind, ModelPolicy, other_models
from tuneforge_core.spec import resolve_spec

CATALOG = Catalog.load()
ORG = "acme"
REWARD_MODEL = job_pb2.REWARD_FUNCTION_REWARD_MODEL


def dpo(reference: str = "") -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(base_model="org/base", dataset="ds_1", method=job_pb2.TRAINING_METHOD_DPO)
    spec.dpo.reference_model = reference
    return spec


def grpo(*functions: int, reward_model: str = "") -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(base_model="org/base", dataset="ds_1", method=job_pb2.TRAINING_METHOD_GRPO)
    spec.grpo.reward_functions.extend(functions)
    spec.grpo.reward_model = reward_model
    return spec


def refused(spec: job_pb2.JobSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(spec)
    return {v.field: v.description for v in caught.value.violations}


def test_dpo_reference_model_resolves_and_is_optional() -> None:
    assert resolve_spec(dpo("org/reference")).dpo.reference_model == "org/reference"
    assert resolve_spec(dpo()).dpo.reference_model == ""  # unset: the base model is the reference
    assert other_models(resolve_spec(dpo())) == []
    assert other_models(resolve_spec(dpo("/models/ref"))) == [("spec.dpo.reference_model", "/models/ref")]


@pytest.mark.parametrize("reference", ["not a model", "./relative", "s3://bucket-only", "file://host/x"])
def test_a_malformed_reference_model_is_refused_naming_the_field(reference: str) -> None:
    assert list(refused(dpo(reference))) == ["spec.dpo.reference_model"]


@pytest.mark.parametrize("method", ["SFT", "ORPO", "KTO", "GRPO", "DISTILLATION"])
def test_a_reference_model_is_refused_for_other_methods(method: str) -> None:
    spec = grpo(job_pb2.REWARD_FUNCTION_JSON_VALID)
    spec.method = job_pb2.TrainingMethod.Value(f"TRAINING_METHOD_{method}")
    spec.distillation.teacher_model = "org/teacher"
    spec.dpo.reference_model = "org/reference"
    problems = refused(spec)
    teacher = [] if method == "DISTILLATION" else ["spec.distillation.teacher_model"]
    assert sorted(problems) == sorted(["spec.dpo.reference_model", *teacher])
    assert "only used by TRAINING_METHOD_DPO" in problems["spec.dpo.reference_model"]


@pytest.mark.parametrize("method", ["SFT", "DPO", "ORPO", "KTO", "GRPO"])
def test_a_teacher_model_is_refused_for_other_methods(method: str) -> None:
    """Not kept in the spec unread: a model reference is checked against the model roots only where its
    method loads it, so one another method would never load is refused, as DPO's reference model is."""
    spec = grpo(job_pb2.REWARD_FUNCTION_JSON_VALID)
    spec.method = job_pb2.TrainingMethod.Value(f"TRAINING_METHOD_{method}")
    for teacher in ("/etc/passwd", "file:///etc", "org/teacher"):
        spec.distillation.teacher_model = teacher
        problems = refused(spec)
        assert list(problems) == ["spec.distillation.teacher_model"], problems
        assert "only used by TRAINING_METHOD_DISTILLATION" in problems["spec.distillation.teacher_model"]


@pytest.mark.parametrize("method", ["SFT", "DPO", "DISTILLATION"])
def test_reward_code_is_refused_for_other_methods(method: str) -> None:
    spec = job_pb2.JobSpec(base_model="org/base", dataset="ds_1",
                           method=job_pb2.TrainingMethod.Value(f"TRAINING_METHOD_{method}"))
    if method == "DISTILLATION":
        spec.distillation.teacher_model = "org/teacher"
    spec.grpo.reward_code = "import os; os.system('id')"
    problems = refused(spec)
    assert list(problems) == ["spec.grpo.reward_code"]
    assert "only used by TRAINING_METHOD_GRPO" in problems["spec.grpo.reward_code"]


def test_the_reward_model_function_requires_a_reward_model() -> None:
    problems = refused(grpo(REWARD_MODEL))
    assert problems == {"spec.grpo.reward_model": "is required by REWARD_FUNCTION_REWARD_MODEL"}
    assert list(refused(grpo(REWARD_MODEL, reward_model="not a model"))) == ["spec.grpo.reward_model"]
    resolved = resolve_spec(grpo(REWARD_MODEL, job_pb2.REWARD_FUNCTION_JSON_VALID, reward_model="org/rm"))
    assert other_models(resolved) == [("spec.grpo.reward_model", "org/rm")]


def test_a_reward_model_without_its_function_or_method_is_refused() -> None:
    problems = refused(grpo(job_pb2.REWARD_FUNCTION_JSON_VALID, reward_model="org/rm"))
    assert problems == {"spec.grpo.reward_model": "is only used with REWARD_FUNCTION_REWARD_MODEL"}
    spec = dpo()
    spec.grpo.reward_model = "org/rm"
    assert list(refused(spec)) == ["spec.grpo.reward_model"]


def test_model_policy_checks_the_reference_and_reward_models(tmp_path: Path) -> None:
    roots = tmp_path / "models"
    model = roots / "ref"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0")
    policy = ModelPolicy(str(roots))

    spec = resolve_spec(dpo(str(model)))
    assert [s.kind for s in policy.check_spec(spec, ORG)] == [ModelKind.HUB, ModelKind.LOCAL]
    for outside in ("/etc", str(roots / "gone")):
        spec.dpo.reference_model = outside
        with pytest.raises(InvalidArgument) as caught:
            policy.check_spec(spec, ORG)
        assert [v.field for v in caught.value.violations] == ["spec.dpo.reference_model"]

    spec = resolve_spec(grpo(REWARD_MODEL, reward_model="/etc"))
    with pytest.raises(InvalidArgument) as caught:
        policy.check_spec(spec, ORG)
    assert [v.field for v in caught.value.violations] == ["spec.grpo.reward_model"]


def test_the_estimator_refuses_and_counts_the_other_models(tmp_path: Path) -> None:
    policy = ModelPolicy(str(tmp_path))
    spec = dpo("/etc")
    spec.base_model = "meta-llama/Llama-3.2-1B"
    with pytest.raises(InvalidArgument) as caught:  # refused, not "assumed the size of the student"
        resolve_setup(spec, CATALOG, models=policy)
    assert [v.field for v in caught.value.violations] == ["spec.dpo.reference_model"]

    hardware = CATALOG.hardware("nvidia-h100")
    assert hardware is not None
    unnamed = dpo()
    unnamed.base_model = spec.base_model
    base = resolve_setup(unnamed, CATALOG).setup
    spec.dpo.reference_model = "meta-llama/Llama-3.1-8B"
    named = resolve_setup(spec, CATALOG, models=policy)
    assert named.setup.reference is not None
    arch = named.model.architecture
    # With LoRA, TRL's own reference is the base with the adapter off; a named one is a second model.
    assert memory_per_gpu(arch, base, hardware).reference_weights == 0
    weights = memory_per_gpu(arch, named.setup, hardware).reference_weights
    assert weights == named.setup.reference.parameter_count * 2  # 16-bit, like the trained model

    spec = grpo(REWARD_MODEL, reward_model="org/unknown-reward-model")
    spec.base_model = "meta-llama/Llama-3.2-1B"
    resolved = resolve_setup(spec, CATALOG, models=policy)
    assert resolved.setup.reward_model == resolved.model.architecture
    assert any("reward model 'org/unknown-reward-model' is unknown" in n for n in resolved.notes)
