"""Checkpoints as resources: ListCheckpoints, and their retention after the job ends.

Listing (`CheckpointCatalog`): each complete checkpoint under `jobs/<organization>/<job id>/checkpoints/`
(the worker's layout, trainer_worker/checkpointing.py: `checkpoint-<step>/`, counted once its `COMPLETE`
marker is there) with what its own `trainer_state.json` (written by the HF Trainer) says: the epoch, the last
training loss logged at or before its step, the evaluation at its step (every `eval_*` metric), and, from the
newest checkpoint's state, the Trainer's `best_model_checkpoint` (set when the job tracks a best model:
early stopping, by eval_loss). Without one, the best is the checkpoint with the lowest eval_loss; none is
marked when no checkpoint has an evaluation. Everything is read from object storage: the jobs service never
asks the metrics service (which calls this one).

Retention (`CheckpointRetention`): once a job has ended, the state that only serves resuming (optimizer,
scheduler, gradient scaler, RNG state; `is_resume_only`) is dropped from every complete checkpoint but the
last, which stays whole so that a job continuing from it resumes exactly, unless the spec's
`output.keep_optimizer_state` is set. The cached checksum manifests of the pruned checkpoints
(services.jobs.artifacts) are rewritten without the dropped files. A job's retention runs right after the
commit that ended it and from a sweep at start and every minute until it is done (`JobRow.retention_time`);
every step is idempotent, so one cut short simply runs again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tuneforge.v1 import artifact_pb2, job_pb2

from services.jobs.artifacts import CHECKPOINTS, COMPLETE, MANIFEST_VERSION, MANIFESTS
from services.jobs.models import JobRow
from services.kit.db import Database
from services.kit.outbox import utcnow
from tuneforge_core.states import FINAL
from tuneforge_core.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
BEST_METRIC = "eval_loss"  # what the worker's Trainer tracks (trainer_worker/recipes/base.py)
# How often the retention sweep looks for ended jobs whose retention is not done.
SWEEP_INTERVAL_S = 60.0

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\Z")
_RNG_STATE = re.compile(r"^rng_state(_\d+)?\.pth\Z")
_FSDP_OPTIMIZER_DIR = re.compile(r"^optimizer_\d+\Z")
_OPTIMIZER_FILES = frozenset({"optimizer.pt", "optimizer.bin"})
_RESUME_FILES = _OPTIMIZER_FILES | {"scheduler.pt", "scaler.pt"}


def is_optimizer_state(path: str) -> bool:
    """Whether a checkpoint file (path relative to its folder) is optimizer state: the Trainer's
    optimizer.pt, DeepSpeed's *optim_states.pt, or an FSDP optimizer_<n>/ folder."""
    parts = path.split("/")
    return (parts[-1] in _OPTIMIZER_FILES or parts[-1].endswith("optim_states.pt")
            or (len(parts) > 1 and bool(_FSDP_OPTIMIZER_DIR.match(parts[0]))))


def is_resume_only(path: str) -> bool:
    """Whether a checkpoint file serves only to resume training exactly: the optimizer state, the
    scheduler, the gradient scaler and the RNG states. The weights and trainer_state.json are kept."""
    name = path.rsplit("/", 1)[-1]
    return is_optimizer_state(path) or name in _RESUME_FILES or bool(_RNG_STATE.match(name))


@dataclass
class _Stored:
    """One complete checkpoint as found in storage."""

    name: str
    step: int
    key: str  # the folder's key, no trailing "/"
    objects: list[ObjectInfo] = field(default_factory=list)

    def path(self, obj: ObjectInfo) -> str:
        return obj.key[len(self.key) + 1:]


def complete_checkpoints(prefix: str, objects: Iterable[ObjectInfo]) -> list[_Stored]:
    """The complete checkpoints under `prefix` (a job's folder, ending in "/"), by step, each with its
    files but the marker."""
    root = f"{prefix}{CHECKPOINTS}/"
    found: dict[int, _Stored] = {}
    marked: set[int] = set()
    for obj in objects:
        if not obj.key.startswith(root):
            continue
        folder, _, rest = obj.key[len(root):].partition("/")
        match = _CHECKPOINT_NAME.match(folder)
        if match is None or not rest:
            continue
        step = int(match.group(1))
        entry = found.setdefault(step, _Stored(folder, step, root + folder))
        if rest == COMPLETE:
            marked.add(step)
        else:
            entry.objects.append(obj)
    return [found[s] for s in sorted(marked)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _step(entry: dict[str, Any]) -> int | None:
    step = entry.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def describe(name: str, step: int, state: dict[str, Any]) -> artifact_pb2.Checkpoint:
    """A checkpoint as its trainer_state.json describes it (no size, best or optimizer flags yet)."""
    checkpoint = artifact_pb2.Checkpoint(name=name, step=step)
    epoch = _number(state.get("epoch"))
    history = state.get("log_history")
    entries = [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []
    for entry in entries:
        at = _step(entry)
        if at is None or at > step:
            continue
        loss = _number(entry.get("loss"))
        if loss is not None:
            checkpoint.train_loss = loss  # the last one logged at or before the step wins
        if at == step and any(k.startswith("eval_") for k in entry):
            checkpoint.eval_metrics.clear()
            for key, value in entry.items():
                number = _number(value)
                if key.startswith("eval_") and number is not None:
                    checkpoint.eval_metrics[key] = number
        if epoch is None and at == step:
            epoch = _number(entry.get("epoch"))
    if BEST_METRIC in checkpoint.eval_metrics:
        checkpoint.eval_loss = checkpoint.eval_metrics[BEST_METRIC]
    checkpoint.epoch = epoch or 0.0
    return checkpoint


class CheckpointCatalog:
    """ListCheckpoints: a job's complete checkpoints, read from object storage (blocking reads run on a
    worker thread)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def list_checkpoints(self, job: job_pb2.Job) -> tuple[list[artifact_pb2.Checkpoint], str]:
        """(the checkpoints by step, the metric that picked the best one or "" when none is marked)."""
        return await asyncio.to_thread(self._list, job)

    def _state(self, key: str) -> dict[str, Any] | None:
        """The checkpoint's trainer_state.json; None when it is not there (any longer)."""
        try:
            data = json.loads(self.store.get_bytes(f"{key}/{TRAINER_STATE}"))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            log.warning("ignoring the unreadable %s/%s", key, TRAINER_STATE)
            return {}
        return data if isinstance(data, dict) else {}

    def _list(self, job: job_pb2.Job) -> tuple[list[artifact_pb2.Checkpoint], str]:
        prefix = f"jobs/{job.organization}/{job.id}/"
        stored = complete_checkpoints(prefix, self.store.list_objects(prefix))
        checkpoints: list[artifact_pb2.Checkpoint] = []
        newest_state: dict[str, Any] = {}
        for entry in stored:
            state = self._state(entry.key)
            if state is None:
                if not self.store.exists(f"{entry.key}/{COMPLETE}"):
                    continue  # pruned by the trainer (it saved a newer one) while this listing read it
                state = {}
            newest_state = state
            checkpoint = describe(entry.name, entry.step, state)
            checkpoint.size_bytes = sum(o.size for o in entry.objects)
            checkpoint.optimizer_state_kept = any(is_optimizer_state(entry.path(o)) for o in entry.objects)
            checkpoints.append(checkpoint)
        best = self._best(checkpoints, newest_state)
        if best is None:
            return checkpoints, ""
        best.best = True
        return checkpoints, BEST_METRIC

    @staticmethod
    def _best(checkpoints: list[artifact_pb2.Checkpoint],
              newest_state: dict[str, Any]) -> artifact_pb2.Checkpoint | None:
        tracked = newest_state.get("best_model_checkpoint")
        if isinstance(tracked, str) and tracked:
            name = tracked.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
            for checkpoint in checkpoints:
                if checkpoint.name == name:
                    return checkpoint
        evaluated = [c for c in checkpoints if c.HasField("eval_loss") and not math.isnan(c.eval_loss)]
        return min(evaluated, key=lambda c: (c.eval_loss, c.step)) if evaluated else None


# -- retention ---------------------------------------------------------------------------------------


def prune_resume_state(store: ObjectStore, prefix: str) -> int:
    """Drops the resume-only files of every complete checkpoint under `prefix` (a job's folder, ending in
    "/") but the last, and rewrites their checksum manifests without them; returns how many files went.
    Idempotent."""
    stored = complete_checkpoints(prefix, store.list_objects(prefix))
    removed = 0
    for entry in stored[:-1]:
        doomed = [o for o in entry.objects if is_resume_only(entry.path(o))]
        for obj in doomed:
            store.delete_prefix(obj.key)
        if doomed:
            removed += len(doomed)
            _forget(store, f"{prefix}{MANIFESTS}/{entry.name}.json", {entry.path(o) for o in doomed})
    return removed


def _forget(store: ObjectStore, key: str, paths: set[str]) -> None:
    """Rewrites the cached manifest `key` without `paths`; a manifest that is not there stays absent."""
    try:
        data = json.loads(store.get_bytes(key))
    except FileNotFoundError:
        return
    except (ValueError, OSError):
        store.delete_prefix(key)  # unreadable: the next listing computes it afresh
        return
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("version") != MANIFEST_VERSION:
        store.delete_prefix(key)
        return
    kept = {path: entry for path, entry in files.items() if path not in paths}
    if kept != files:
        body = json.dumps({"version": MANIFEST_VERSION, "files": kept}, sort_keys=True)
        store.put_bytes(key, body.encode())


@dataclass(frozen=True)
class _Pending:
    job_id: str
    organization: str
    keep_optimizer_state: bool


class CheckpointRetention:
    """Applies checkpoint retention to every job that has ended (see the module docstring)."""

    def __init__(self, db: Database, store: ObjectStore) -> None:
        self.db = db
        self.store = store
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Asks for a sweep now (a job ended); callable from any thread, a no-op before `run_forever`."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    @staticmethod
    def _pending(session: Session) -> list[_Pending]:
        rows = session.execute(select(JobRow.id, JobRow.organization, JobRow.spec).where(
            JobRow.state.in_(sorted(FINAL)), JobRow.retention_time.is_(None)).order_by(JobRow.end_time))
        out = []
        for job_id, organization, spec in rows:
            keep = job_pb2.JobSpec.FromString(spec).output.keep_optimizer_state
            out.append(_Pending(job_id, organization, keep))
        return out

    @staticmethod
    def _done(session: Session, job_id: str) -> bool:
        """Marks the job's retention done; False when the job is gone (deleted meanwhile)."""
        result = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.retention_time.is_(None))
                                 .values(retention_time=utcnow()))
        return bool(getattr(result, "rowcount", 0)) or session.get(JobRow, job_id) is not None

    async def apply(self, job_id: str, organization: str, keep_optimizer_state: bool) -> None:
        """One ended job's retention, then marks it done."""
        prefix = f"jobs/{organization}/{job_id}/"
        if not keep_optimizer_state:
            removed = await asyncio.to_thread(prune_resume_state, self.store, prefix)
            if removed:
                log.info("job %s: %d resume-only checkpoint files pruned", job_id, removed)
        if not await self.db.run(lambda s: self._done(s, job_id)):
            # DeleteJob removed the job while this ran: what a rewritten manifest put back goes again.
            await asyncio.to_thread(self.store.delete_prefix, prefix)

    async def sweep(self) -> int:
        """Applies retention to every ended job still waiting for it; returns how many were done."""
        done = 0
        for job in await self.db.run(self._pending):
            try:
                await self.apply(job.job_id, job.organization, job.keep_optimizer_state)
                done += 1
            except Exception:
                log.exception("job %s: checkpoint retention failed; will retry", job.job_id)
        return done

    async def run_forever(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Sweeps at start, then whenever a job ends (`wake`) and at least every `interval_s`."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while True:
            self._wake.clear()
            try:
                await self.sweep()
            except Exception:
                log.exception("the checkpoint retention sweep failed; will retry")
            try:
                await asyncio.wait_for(self._wake.wait(), interval_s)
            except TimeoutError:
                pass
