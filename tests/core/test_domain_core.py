"""The domain core is the one copy: reasons are the proto's, states and specs resolve one way everywhere, and
the package graph stays a tree (the worker depends on tuneforge_core, never on services/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from tuneforge.v1 import errors_pb2, job_pb2

from tuneforge_core import errors, states
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import ensure_resolved, resolve_spec

REPO = Path(__file__).resolve().parents[2]
CODE = ("services", "trainer_worker", "tuneforge_core")
SERVICES = ("datasets", "jobs", "estimation", "metrics", "identity")


def _python_files(*roots: str) -> list[Path]:
    return [p for root in roots for p in sorted((REPO / root).rglob("*.py")) if "migrations" not in p.parts]


def test_reason_is_exactly_the_proto_enum() -> None:
    proto = set(errors_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
    assert {r.value for r in Reason} == proto
    # The value's name is the ErrorInfo.reason string itself, in every language (no prefix to add).
    assert all(errors_pb2.ErrorReason.Name(r.proto_value) == r.value for r in Reason)
    assert errors_pb2.ErrorReason.Name(errors_pb2.DATASET_INVALID) == Reason.DATASET_INVALID


def _reasons_in(path: Path) -> list[tuple[int, str]]:
    """Every reason the file can emit: `Reason.X`, and any string literal in a reason position."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Reason":
            if not node.attr.startswith("_") and node.attr not in ("proto_value", "value", "name"):
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.keyword) and node.arg == "reason":
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.append((node.lineno, f"literal {node.value.value!r}"))
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "default_reason" for t in node.targets
        ):
            if isinstance(node.value, ast.Constant):
                found.append((node.lineno, f"literal {node.value.value!r}"))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "error_status", "failure_status", "TrainingError", "_fail"
        ):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.isupper():
                    found.append((node.lineno, f"literal {arg.value!r}"))
    return found


def test_every_reason_the_code_can_emit_is_in_the_enum() -> None:
    members = {r.name for r in Reason}
    seen: set[str] = set()
    bad = []
    for path in _python_files(*CODE):
        for line, reason in _reasons_in(path):
            if reason.startswith("literal "):
                bad.append(f"{path.relative_to(REPO)}:{line}: {reason} (use tuneforge_core.reasons.Reason)")
            elif reason not in members:
                bad.append(f"{path.relative_to(REPO)}:{line}: Reason.{reason} is not in ErrorReason")
            else:
                seen.add(reason)
    assert not bad, "\n".join(bad)
    assert {"WORKER_LOST", "OUT_OF_MEMORY", "DATASET_IN_USE", "INVALID_PAGE_TOKEN"} <= seen  # the scan works
    for cls in errors.ERROR_CLASSES.values():
        assert isinstance(cls.default_reason, Reason), cls


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_package_graph_is_a_tree() -> None:
    """trainer_worker and tuneforge_core import nothing from services/; a service imports only itself, the
    kit and the core; the kit and the core import no service."""
    problems = []
    for path in _python_files(*CODE):
        rel = path.relative_to(REPO)
        owner = rel.parts[1] if rel.parts[0] == "services" and len(rel.parts) > 2 else None
        for name in _imports(path):
            parts = name.split(".")
            if rel.parts[0] in ("trainer_worker", "tuneforge_core") and parts[0] == "services":
                problems.append(f"{rel} imports {name}")
            if rel.parts[0] == "tuneforge_core" and parts[0] == "trainer_worker":
                problems.append(f"{rel} imports {name}")
            if parts[0] == "services" and len(parts) > 1 and parts[1] in SERVICES:
                if owner == "kit" or (owner in SERVICES and parts[1] != owner):
                    problems.append(f"{rel} imports {name}")
    assert not problems, "\n".join(problems)


# Which service may call which over gRPC: jobs asks datasets and estimation, metrics asks jobs, and nothing
# calls back (datasets and estimation learn about jobs from JobChanged events).
ALLOWED_CALLS = {
    "jobs": {"DatasetService", "EstimationService"},
    "metrics": {"JobService"},
    "estimation": {"DatasetService"},
    "datasets": set(),
    "identity": set(),
}


def test_the_service_call_graph_has_no_cycle() -> None:
    calls: dict[str, set[str]] = {service: set() for service in SERVICES}
    for service in SERVICES:
        for path in _python_files(f"services/{service}"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr.endswith("ServiceStub"):
                    calls[service].add(node.attr.removesuffix("Stub"))
    for service, callees in calls.items():
        assert callees <= ALLOWED_CALLS[service], (service, callees)
    owner = {"DatasetService": "datasets", "EstimationService": "estimation", "JobService": "jobs"}
    edges = {s: {owner[c] for c in cs} for s, cs in calls.items()}

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    assert not [s for s in SERVICES if reaches(s, s)]


def _int8_qlora() -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(base_model="meta-llama/Llama-3.2-1B-Instruct", dataset="ds_1",
                           adapter=job_pb2.ADAPTER_TYPE_QLORA)
    spec.quantization.type = job_pb2.QUANTIZATION_TYPE_INT8  # bits left unset
    return spec


def test_an_int8_qlora_spec_resolves_to_8_bits_in_jobs_estimation_and_worker(tmp_path: Path) -> None:
    from services.estimation.catalog import Catalog
    from services.estimation.spec import resolve_setup
    from trainer_worker.events import EventSink
    from trainer_worker.recipes.sft import SFTRecipe
    from trainer_worker.run_config import RunConfig
    from trainer_worker.stop import StopSignal

    resolved = resolve_spec(_int8_qlora())  # what CreateJob stores and queues
    assert (resolved.quantization.bits, resolved.quantization.type) == (8, job_pb2.QUANTIZATION_TYPE_INT8)

    estimate = resolve_setup(_int8_qlora(), Catalog.load())  # the estimator, given the unresolved draft
    assert estimate.setup.quantization_bits == 8
    assert resolve_setup(resolved, Catalog.load()).setup == estimate.setup

    cfg = RunConfig(job_id="job_1", spec=RunConfig.spec_to_dict(resolved), model_path="/models/x",
                    train_file=tmp_path / "train.jsonl", output_dir=tmp_path / "out",
                    events_file=tmp_path / "events.jsonl")
    recipe = SFTRecipe(cfg, cfg.job_spec(), EventSink(cfg.events_file), StopSignal())
    quantization = recipe._quantization_config()  # what the worker hands transformers
    assert quantization.load_in_8bit and not quantization.load_in_4bit


def test_resolving_twice_changes_nothing_and_the_worker_accepts_only_resolved_specs() -> None:
    for method in job_pb2.TrainingMethod.values():
        if method == job_pb2.TRAINING_METHOD_UNSPECIFIED:
            continue
        spec = job_pb2.JobSpec(base_model="org/model", dataset="ds_1", method=method)
        if method == job_pb2.TRAINING_METHOD_DISTILLATION:  # another method's model is refused
            spec.distillation.teacher_model = "org/teacher"
        spec.grpo.reward_functions.append(job_pb2.REWARD_FUNCTION_JSON_VALID)
        once = resolve_spec(spec)
        assert resolve_spec(once) == once
        ensure_resolved(once)
        with pytest.raises(errors.InvalidArgument, match="not resolved"):
            ensure_resolved(spec)


def test_states_final_active_and_moves() -> None:
    S = job_pb2.JobState
    assert states.FINAL | states.ACTIVE == set(S.values()) - {S.JOB_STATE_UNSPECIFIED}
    assert not states.FINAL & states.ACTIVE
    for final in states.FINAL:
        assert not any(states.can_move(final, target) for target in S.values())
    assert states.can_move(S.JOB_STATE_QUEUED, S.JOB_STATE_CANCELLED)
    assert not states.can_move(S.JOB_STATE_QUEUED, S.JOB_STATE_SUCCEEDED)
    assert not states.can_move(S.JOB_STATE_CANCELLING, S.JOB_STATE_RUNNING)
    assert states.name(S.JOB_STATE_RUNNING) == "RUNNING" and states.name(99) == "99"
