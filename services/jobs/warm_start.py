"""Warm start: a job that starts from another job's weights (JobSpec.warm_start), resolved at CreateJob.

The source is a job of the same organization, by id or name (another organization's job, or a deleted one,
is "not found" like any job that does not exist). What is loaded:

- checkpoint_step unset: the source's final adapter (for full fine-tuning, its model), JobOutput.adapter_uri,
  which needs the source to have SUCCEEDED;
- checkpoint_step set: that complete checkpoint of the source (ListCheckpoints lists them; the worker's
  layout is jobs/<organization>/<job id>/checkpoints/checkpoint-<step>/), whatever the source's state;
  with restore_optimizer_state, its optimizer state must still be stored (Checkpoint.optimizer_state_kept)
  and the new job must use the same optimizer.

The weights must fit the new job: the same base model, the same adapter type, and the same adapter shape
(LoRA rank, target modules and DoRA; prompt tuning's virtual tokens; QLoRA's bits). Every mismatch is an
INVALID_ARGUMENT naming the field and both values. The resolved source travels to the worker in
JobAssignment.warm_start (a storage URI the worker downloads before training, so the source may be deleted
afterwards without harm), and spec.warm_start.job is stored as the source's id.
"""

from __future__ import annotations

from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.checkpoints import CheckpointCatalog
from services.jobs.converters import job_to_proto
from services.jobs.repository import JobRepository
from services.kit.db import Database
from tuneforge_core import states
from tuneforge_core.errors import Violations
from tuneforge_core.storage import ObjectStore

S = job_pb2.JobState
A = job_pb2.AdapterType
F = "spec.warm_start."


def _name(enum: object, value: int) -> str:
    return enum.Name(value) if value in enum.values() else str(value)  # type: ignore[attr-defined]


def _adapter(spec: job_pb2.JobSpec) -> int:
    return spec.adapter or A.ADAPTER_TYPE_LORA


def check_compatible(v: Violations, spec: job_pb2.JobSpec, source: job_pb2.JobSpec, source_name: str) -> None:
    """The new job's (resolved) spec can start from weights trained under `source` (resolved too)."""
    def differs(field: str, ours: object, theirs: object) -> None:
        v.check(ours == theirs, f"spec.{field}",
                f"is {ours!r} but warm-start job '{source_name}' has {theirs!r}; they must match")

    differs("base_model", spec.base_model, source.base_model)
    adapter, theirs = _adapter(spec), _adapter(source)
    if adapter != theirs:
        differs("adapter", _name(A, adapter), _name(A, theirs))
        return
    if adapter in (A.ADAPTER_TYPE_LORA, A.ADAPTER_TYPE_QLORA):
        differs("lora.rank", spec.lora.rank, source.lora.rank)
        differs("lora.target_modules", sorted(spec.lora.target_modules), sorted(source.lora.target_modules))
        differs("lora.use_dora", spec.lora.use_dora, source.lora.use_dora)
    if adapter == A.ADAPTER_TYPE_QLORA:
        differs("quantization.bits", spec.quantization.bits, source.quantization.bits)
    if adapter == A.ADAPTER_TYPE_PROMPT_TUNING:
        differs("prompt_tuning.num_virtual_tokens", spec.prompt_tuning.num_virtual_tokens,
                source.prompt_tuning.num_virtual_tokens)


async def resolve(db: Database, store: ObjectStore, organization: str, spec: job_pb2.JobSpec
                  ) -> events_pb2.WarmStartSource | None:
    """The weights `spec` starts from, or None when it names no warm start. Sets spec.warm_start.job to the
    source's id. Raises INVALID_ARGUMENT naming the field for every reason it cannot."""
    warm = spec.warm_start
    if not warm.job:
        return None
    ref = warm.job

    source = await db.run(lambda s: _find(s, organization, ref))
    v = Violations()
    if source is None:
        v.add(F + "job", f"job '{ref}' was not found in organization '{organization}'")
        v.raise_if_any("the warm start cannot be resolved")
    assert source is not None
    check_compatible(v, spec, source.spec, source.name)
    v.raise_if_any("the job cannot start from the weights of job " + repr(source.name))

    out = events_pb2.WarmStartSource(job_id=source.id, restore_optimizer_state=warm.restore_optimizer_state)
    if not warm.HasField("checkpoint_step"):
        state = states.name(source.state)
        if source.state != S.JOB_STATE_SUCCEEDED:
            v.add(F + "job", f"job '{source.name}' is {state}: only a SUCCEEDED job's final adapter can be "
                             "started from; set spec.warm_start.checkpoint_step to start from one of its "
                             "checkpoints")
        elif not source.output.adapter_uri:
            v.add(F + "job", f"job '{source.name}' stored no adapter or model to start from")
        v.raise_if_any("the warm start cannot be resolved")
        out.uri = source.output.adapter_uri
    else:
        checkpoints, _ = await CheckpointCatalog(store).list_checkpoints(source)
        found = next((c for c in checkpoints if c.step == warm.checkpoint_step), None)
        if found is None:
            steps = ", ".join(str(c.step) for c in checkpoints) or "none"
            v.add(F + "checkpoint_step", f"job '{source.name}' has no checkpoint at step "
                                         f"{warm.checkpoint_step}; its checkpoints are at steps: {steps}")
            v.raise_if_any("the warm start cannot be resolved")
        assert found is not None
        if warm.restore_optimizer_state:
            if not found.optimizer_state_kept:
                v.add(F + "restore_optimizer_state",
                      f"checkpoint {found.name} of job '{source.name}' no longer stores its optimizer state "
                      "(only the last checkpoint keeps it after a job ends, unless "
                      "spec.output.keep_optimizer_state was set)")
            ours, theirs = spec.hyperparameters.optimizer, source.spec.hyperparameters.optimizer
            if ours != theirs:
                v.add(F + "restore_optimizer_state",
                      f"needs the same optimizer: spec.hyperparameters.optimizer is "
                      f"{_name(job_pb2.Optimizer, ours)} but job '{source.name}' used "
                      f"{_name(job_pb2.Optimizer, theirs)}")
            v.raise_if_any("the warm start cannot be resolved")
        out.step = found.step
        out.uri = store.uri(f"jobs/{source.organization}/{source.id}/checkpoints/{found.name}")
    warm.job = source.id
    return out


def _find(session: Session, organization: str, ref: str) -> job_pb2.Job | None:
    row = JobRepository(session).find(organization, ref)
    return job_to_proto(row) if row is not None else None
