"""The rules of deployments: what may be deployed, their states, and the model process behind each.

CreateDeployment looks the job up through the jobs service (in the caller's organization) and refuses a
job that has not SUCCEEDED, then records the deployment PENDING and starts its model process in the
background (services.serving.processes). The deployment turns READY once the model loaded and passed its
self-check, or FAILED with the reason. EMBEDDED deployments are then served by this process's HTTP endpoint
(services.serving.http); a VLLM deployment carries the Kubernetes manifest to apply
(services.serving.manifest), and its model process stops after the check.

An organization may have TUNEFORGE_SERVING_MAX_DEPLOYMENTS_PER_ORG live deployments (PENDING or READY), and
the platform TUNEFORGE_SERVING_MAX_MODEL_PROCESSES model processes when set: CreateDeployment beyond either
is RESOURCE_EXHAUSTED (QUOTA_EXCEEDED). It counts them after locking the organization's row in
`serving_org_locks` (and then "#platform"), in the transaction that inserts, so two concurrent creates never
both take the last place.

A request_id stays used once its deployment is deleted (as a deleted job's does): the same create again is
ALREADY_EXISTS (REQUEST_ID_REUSED) naming the deleted deployment, not a new deployment.

A model process belongs to the services process that started it. When the platform restarts, the
deployments that held one (PENDING, or READY EMBEDDED) start loading again (PENDING), oldest first, so the
endpoint serves them as before; beyond TUNEFORGE_SERVING_MAX_MODEL_PROCESSES the rest turn FAILED
(RESOURCE_EXHAUSTED, naming the setting). The limit per organization is not applied again to deployments it
already admitted: a lowered one only refuses new deployments.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuneforge.v1 import deployment_service_pb2 as pb
from tuneforge.v1 import job_pb2

from services.kit import paging
from services.kit.outbox import utcnow
from services.kit.protos import as_utc
from services.kit.tasks import cancel_and_wait
from services.kit.validation import check_name, check_request_id
from services.serving.converters import deployment_to_proto
from services.serving.jobs_client import JobsClient
from services.serving.manifest import VllmSource, render
from services.serving.models import DeletedDeploymentRow, DeploymentRow, OrganizationLock
from services.serving.processes import ModelProcess, RunnerFailed
from services.serving.settings import ServingSettings
from tuneforge_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    NotFound,
    ResourceExhausted,
    TuneForgeError,
    Violations,
    error_status,
    invalid,
    not_found,
)
from tuneforge_core.ids import new_id
from tuneforge_core.models import ModelKind, ModelPolicy
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import ObjectStore

log = logging.getLogger(__name__)

EMBEDDED, VLLM = pb.DEPLOYMENT_TARGET_EMBEDDED, pb.DEPLOYMENT_TARGET_VLLM
PENDING, READY, FAILED = pb.DEPLOYMENT_STATE_PENDING, pb.DEPLOYMENT_STATE_READY, pb.DEPLOYMENT_STATE_FAILED
TARGETS = {pb.DEPLOYMENT_TARGET_UNSPECIFIED: EMBEDDED, EMBEDDED: EMBEDDED, VLLM: VLLM}
S3_NEEDED = ("VLLM deployments copy the model from S3 (an init container runs `aws s3 cp`), but this "
             "platform keeps job outputs in a local folder ({uri}). Set TUNEFORGE_STORAGE_URL to an s3:// "
             "bucket that the cluster can read (and TUNEFORGE_S3_ENDPOINT_URL for a non-AWS S3), run the "
             "job again, and deploy that job; or copy the folder to S3 yourself and edit the manifest's "
             "init container.")


class DeploymentManager:
    def __init__(self, db: Any, jobs: JobsClient, store: ObjectStore, settings: ServingSettings,
                 models: ModelPolicy) -> None:
        self.db = db
        self.jobs = jobs
        self.store = store
        self.settings = settings
        self.models = models
        self.processes: dict[str, ModelProcess] = {}
        self._launches: dict[str, asyncio.Task[None]] = {}
        # The endpoint's base URL once the HTTP server listens ("http://127.0.0.1:8082/v1").
        self.endpoint = ""
        self.on_ready: Callable[[str], None] | None = None
        self.stopping = False

    # -- CreateDeployment -------------------------------------------------------------------------------

    async def create(self, org: str, request: pb.CreateDeploymentRequest) -> pb.Deployment:
        v = Violations()
        v.check(bool(request.job), "job", "is required: the id or name of a SUCCEEDED job")
        check_name(v, request.name, required=False)
        check_request_id(v, request.request_id)
        v.check(request.target in TARGETS, "target", "must be DEPLOYMENT_TARGET_EMBEDDED or "
                                                     "DEPLOYMENT_TARGET_VLLM")
        v.raise_if_any("the deployment is invalid")
        if request.request_id:
            replay = await self.db.run(lambda s: self._replay(s, org, request))
            if replay is not None:
                return replay
        job = await self.jobs.get_job(org, request.job)
        if job.state != job_pb2.JOB_STATE_SUCCEEDED:
            raise FailedPrecondition(
                f"job '{job.name}' is {job_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_')}; only a "
                "SUCCEEDED job's model can be deployed", reason=Reason.JOB_STATE_CONFLICT,
                metadata={"job": job.id, "state": job_pb2.JobState.Name(job.state)})
        if request.merged and not job.output.merged_model_uri:
            raise invalid("merged", f"job '{job.name}' has no merged model (its spec.output.merge_adapter "
                                    "was not set); deploy the adapter instead", "the deployment is invalid")
        if not job.output.adapter_uri:
            raise FailedPrecondition(f"job '{job.name}' has no stored model to serve",
                                     reason=Reason.JOB_STATE_CONFLICT)
        target = TARGETS[request.target]
        row = DeploymentRow(id=new_id("dep"), organization=org, job_id=job.id, target=target,
                            merged=request.merged, state=PENDING, request_id=request.request_id or None,
                            request_hash=request_hash(request))
        row.name = request.name or row.id.lower()
        source = self._source(org, job, request.merged)
        row.source = json.dumps(source)
        if target == VLLM:
            row.manifest = render(VllmSource(
                deployment_id=row.id, job_id=job.id, name=row.name, base_model=job.spec.base_model,
                uri=source["uri"], merged=request.merged,
                lora_rank=job.spec.lora.rank if job.spec.lora.HasField("rank") else 16,
                image=self.settings.serving_vllm_image, s3_region=self.settings.s3_region,
                s3_endpoint_url=self.settings.s3_endpoint_url))

        def insert(s: Session) -> tuple[pb.Deployment, bool]:
            _lock(s, org)  # first: the creates of one organization take turns from here
            # A retry that raced the first create (which made the deployment since the check above).
            replay = self._replay(s, org, request) if request.request_id else None
            if replay is not None:
                return replay, False
            if s.scalar(select(DeploymentRow.id).where(DeploymentRow.organization == org,
                                                       DeploymentRow.name == row.name)) is not None:
                raise AlreadyExists(f"a deployment named '{row.name}' already exists in organization '{org}'",
                                    metadata={"resource_type": "deployment", "resource": row.name})
            self._check_quotas(s, org)
            s.add(row)
            s.flush()
            return deployment_to_proto(row), True

        try:
            deployment, created = await self.db.run(insert)
        except IntegrityError:
            # A concurrent create with the same name or request_id won the race.
            replay = (await self.db.run(lambda s: self._replay(s, org, request))
                      if request.request_id else None)
            if replay is not None:
                return replay
            raise AlreadyExists(f"a deployment named '{row.name}' already exists in organization '{org}'",
                                metadata={"resource_type": "deployment", "resource": row.name}) from None
        if created:
            self._launch(row.id, row.target, source)
        return deployment

    def _check_quotas(self, s: Session, org: str) -> None:
        """RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) when one more deployment would take the organization past
        its limit of live deployments, or the platform past its limit of model processes. The caller
        holds the organization's lock; the platform's is taken here, after it."""
        limit = self.settings.serving_max_deployments_per_org
        if limit > 0:
            live = int(s.scalar(select(func.count()).select_from(DeploymentRow).where(
                DeploymentRow.organization == org, DeploymentRow.state.in_([PENDING, READY]))) or 0)
            _refuse_at(live, limit, "serving_max_deployments_per_org",
                       f"organization {org} has {live} live deployments (PENDING or READY)",
                       "delete one it no longer needs (FAILED ones do not count) to free a place")
        processes = self.settings.serving_max_model_processes
        if processes > 0:
            _lock(s, PLATFORM_LOCK)
            running = int(s.scalar(select(func.count()).select_from(DeploymentRow).where(
                _HOLDS_PROCESS)) or 0)
            _refuse_at(running, processes, "serving_max_model_processes",
                       f"the platform runs {running} model processes",
                       "deleting a deployment frees one, or ask the platform's operator for a larger limit")

    def _replay(self, s: Session, org: str, request: pb.CreateDeploymentRequest) -> pb.Deployment | None:
        """The deployment an earlier create under this request_id made (None if there is none); another
        request under it is ALREADY_EXISTS (REQUEST_ID_REUSED). A row from before request hashes were kept
        ("") is taken as the same request.

        The request_id of a deleted deployment stays used, as a deleted job's does (JobManager._replay): the
        same request again is ALREADY_EXISTS (REQUEST_ID_REUSED, metadata `deleted` "true") naming the
        deleted deployment, instead of making it anew; another request is refused as above. Only the
        organization's own deployments, live or deleted, are looked at."""
        row = s.scalar(select(DeploymentRow).where(DeploymentRow.organization == org,
                                                   DeploymentRow.request_id == request.request_id))
        if row is None:
            gone = s.scalars(select(DeletedDeploymentRow).where(
                DeletedDeploymentRow.organization == org,
                DeletedDeploymentRow.request_id == request.request_id)
                .order_by(DeletedDeploymentRow.deleted_at.desc()).limit(1)).first()
            if gone is None:
                return None
            if gone.request_hash and gone.request_hash != request_hash(request):
                raise _request_id_reused(request.request_id, gone.name, gone.id)
            raise AlreadyExists(
                f"request_id '{request.request_id}' already created deployment {gone.id}, which was deleted "
                f"at {as_utc(gone.deleted_at):%Y-%m-%d %H:%M:%S} UTC; send a new request_id to create "
                "another deployment",
                reason=Reason.REQUEST_ID_REUSED,
                metadata={"request_id": request.request_id, "deployment": gone.id, "deleted": "true"},
                violations=[FieldViolation("request_id",
                                           f"already created deployment {gone.id}, since deleted")])
        if row.request_hash and row.request_hash != request_hash(request):
            raise _request_id_reused(request.request_id, row.name, row.id)
        return deployment_to_proto(row)

    def _source(self, org: str, job: job_pb2.Job, merged: bool) -> dict[str, Any]:
        """What the model process loads, fixed now: the output's storage key and the base model as the
        worker resolved it (a hub id, a folder under a model root, or a stored output)."""
        uri = job.output.merged_model_uri if merged else job.output.adapter_uri
        base: dict[str, Any] = {"kind": "hub", "ref": job.spec.base_model, "path": "", "key": ""}
        try:
            resolved = self.models.source(job.spec.base_model, org, "spec.base_model")
            base["kind"] = str(resolved.kind)
            base["path"] = str(resolved.path) if resolved.kind is ModelKind.LOCAL and resolved.path else ""
            base["key"] = resolved.key or ""
        except TuneForgeError as exc:  # only an adapter needs it; the model process says so if it does
            base.update(kind="unavailable", error=exc.message)
        return {"uri": uri, "model_key": self.store.key_of(uri), "base_model": base}

    # -- the model process ------------------------------------------------------------------------------

    def _runner_config(self, deployment_id: str, target: int, source: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        return {
            "deployment": deployment_id,
            "work_dir": str(self._folder(deployment_id) / "work"),
            "storage": {"url": s.resolved_storage_url(), "s3_endpoint_url": s.s3_endpoint_url,
                        "s3_region": s.s3_region},
            "model_key": source["model_key"],
            "base_model": source["base_model"],
            "check": {"prompt": s.serving_check_prompt, "max_new_tokens": s.serving_check_max_new_tokens},
            "serve": target == EMBEDDED,
            "host": "127.0.0.1",
        }

    def _folder(self, deployment_id: str) -> Path:
        return (self.settings.data_dir / "serving" / deployment_id).resolve()

    def _launch(self, deployment_id: str, target: int, source: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(deployment_id, target, source),
                                                      name=f"serving-launch-{deployment_id}")
        self._launches[deployment_id] = task
        task.add_done_callback(lambda _t: self._launches.pop(deployment_id, None))

    async def _run(self, deployment_id: str, target: int, source: dict[str, Any]) -> None:
        process: ModelProcess | None = None
        try:
            base = source["base_model"]
            config = self._runner_config(deployment_id, target, source)
            process = await ModelProcess.start(deployment_id, config, self._folder(deployment_id))
            self.processes[deployment_id] = process
            check = await process.wait_ready(self.settings.serving_load_timeout_s, serve=target == EMBEDDED)
        except RunnerFailed as exc:
            message = str(exc)
            if base.get("kind") == "unavailable" and "MODEL_NOT_FOUND" == exc.reason:
                message += f" (the base model: {base.get('error')})"
            await self._finish(deployment_id, FAILED, exc.check, message, exc.reason)
            await self._forget_process(deployment_id)
            return
        except asyncio.CancelledError:
            await self._forget_process(deployment_id)
            raise
        except Exception as exc:
            log.exception("deployment %s: the model process could not start", deployment_id)
            await self._finish(deployment_id, FAILED, None, f"the model process could not start: {exc}",
                               Reason.INTERNAL)
            await self._forget_process(deployment_id)
            return
        if target == VLLM:
            await self._forget_process(deployment_id)
            uri = str(source.get("uri", ""))
            if not uri.startswith("s3://"):
                await self._finish(deployment_id, FAILED, check, S3_NEEDED.format(uri=uri),
                                   Reason.JOB_STATE_CONFLICT, code=grpc.StatusCode.FAILED_PRECONDITION)
                return
            await self._finish(deployment_id, READY, check)
            return
        if not await self._finish(deployment_id, READY, check, endpoint=self.endpoint):
            await self._forget_process(deployment_id)  # deleted while it loaded
            return
        # This task lives as long as the model process: one that dies unasked FAILS its deployment
        # (deleting the deployment or stopping the platform cancels the task first).
        code = await process.process.wait()
        self.processes.pop(deployment_id, None)
        await self._finish(deployment_id, FAILED, check, f"the model process exited with status {code} "
                           f"while serving (its log: {process.log_path})", Reason.INTERNAL,
                           code=grpc.StatusCode.UNAVAILABLE)

    async def _forget_process(self, deployment_id: str) -> None:
        process = self.processes.pop(deployment_id, None)
        if process is not None:
            await process.stop(self.settings.serving_stop_grace_s)

    async def _finish(self, deployment_id: str, state: int, check: dict[str, Any] | None, message: str = "",
                      reason: str = "", *, endpoint: str = "",
                      code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> bool:
        """Records the outcome of loading; False when the deployment is gone (deleted meanwhile)."""
        def update(s: Session) -> bool:
            row = s.get(DeploymentRow, deployment_id)
            if row is None:
                return False
            row.state, row.endpoint, row.update_time = state, endpoint, utcnow()
            row.check = check_proto(check).SerializeToString() if check else row.check
            row.error = (error_status(code, message, reason or Reason.INTERNAL,
                                      metadata={"deployment": deployment_id}).SerializeToString()
                         if state == FAILED else None)
            return True

        found: bool = await self.db.run(update)
        if found:
            log.info("deployment %s is %s%s", deployment_id, pb.DeploymentState.Name(state),  # type: ignore[arg-type]
                     f": {message}" if message else "")
        return found

    async def resume(self) -> None:
        """Loads again the deployments a previous run of the platform was serving or loading (PENDING, and
        READY EMBEDDED: those that hold a model process), oldest first.

        TUNEFORGE_SERVING_MAX_MODEL_PROCESSES is a cap on the serving host's resources, so it holds here too:
        the oldest deployments up to it load again (PENDING), and the rest turn FAILED with a
        RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) error naming the setting, rather than all loading past it (a
        lowered cap, or one set since). TUNEFORGE_SERVING_MAX_DEPLOYMENTS_PER_ORG is not checked again:
        deployments already admitted stay admitted, and a lowered limit only refuses new ones until the
        organization is back under it. The choice is made in one transaction holding the platform's lock,
        so a CreateDeployment meanwhile counts the same model processes."""
        cap = self.settings.serving_max_model_processes

        def choose(s: Session) -> list[tuple[str, int, str]]:
            if cap > 0:
                _lock(s, PLATFORM_LOCK)
            rows = list(s.scalars(select(DeploymentRow).where(_HOLDS_PROCESS)
                                  .order_by(DeploymentRow.create_time, DeploymentRow.id)))
            keep, refuse = (rows[:cap], rows[cap:]) if cap > 0 else (rows, [])
            now = utcnow()
            for row in keep:
                row.state, row.endpoint, row.error, row.update_time = PENDING, "", None, now
            for row in refuse:
                message = (f"the platform restarted with {len(rows)} deployments to load again, more than "
                           f"its limit of model processes (TUNEFORGE_SERVING_MAX_MODEL_PROCESSES = {cap}); "
                           f"the {cap} oldest were loaded again. Delete this deployment and create it "
                           "again once a model process is free, or ask the platform's operator for a "
                           "larger limit")
                row.state, row.endpoint, row.update_time = FAILED, "", now
                row.error = error_status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, message, Reason.QUOTA_EXCEEDED,
                    metadata={"deployment": row.id, "limit": "serving_max_model_processes",
                              "value": str(cap), "live": str(len(rows))}).SerializeToString()
                log.warning("deployment %s is FAILED: %s", row.id, message)
            return [(r.id, r.target, r.source) for r in keep]

        chosen: list[tuple[str, int, str]] = await self.db.run(choose)
        for deployment_id, target, source in chosen:
            self._launch(deployment_id, target, json.loads(source or "{}"))

    async def stop_all(self) -> None:
        self.stopping = True
        await cancel_and_wait(list(self._launches.values()))
        await asyncio.gather(*(self._forget_process(d) for d in list(self.processes)),
                             return_exceptions=True)

    # -- Get, List, Delete ------------------------------------------------------------------------------

    @staticmethod
    def _lookup(s: Session, org: str, ref: str) -> DeploymentRow | None:
        return s.scalar(select(DeploymentRow).where(DeploymentRow.organization == org,
                                                    or_(DeploymentRow.id == ref, DeploymentRow.name == ref)))

    async def get(self, org: str, ref: str) -> pb.Deployment:
        if not ref:
            raise invalid("deployment", "is required: a deployment id or name")

        def read(s: Session) -> pb.Deployment:
            row = self._lookup(s, org, ref)
            if row is None:
                raise not_found("deployment", ref)
            return deployment_to_proto(row)

        deployment: pb.Deployment = await self.db.run(read)
        return deployment

    async def list_page(self, org: str, size: int, token: str, job: str) -> tuple[list[pb.Deployment], str]:
        job_id = (await self.jobs.get_job(org, job)).id if job else ""
        size = paging.page_size(size)
        query = ("deployments", org, job_id)
        after = paging.decode_token(token, query, cursor_type=str)

        def read(s: Session) -> tuple[list[pb.Deployment], str]:
            q = select(DeploymentRow).where(DeploymentRow.organization == org)
            if job_id:
                q = q.where(DeploymentRow.job_id == job_id)
            if after:
                q = q.where(DeploymentRow.id < after)
            rows = list(s.scalars(q.order_by(DeploymentRow.id.desc()).limit(size + 1)))
            more = len(rows) > size
            rows = rows[:size]
            return ([deployment_to_proto(r) for r in rows],
                    paging.encode_token(rows[-1].id, query) if more else "")

        result: tuple[list[pb.Deployment], str] = await self.db.run(read)
        return result

    async def delete(self, org: str, ref: str) -> tuple[str, bool]:
        """(the deployment's id, whether it was already deleted)."""
        if not ref:
            raise invalid("deployment", "is required: a deployment id or name")

        def remove(s: Session) -> tuple[str, bool]:
            row = self._lookup(s, org, ref)
            if row is not None:
                s.add(_tombstone(row))
                s.delete(row)
                return row.id, False
            gone = s.scalar(select(DeletedDeploymentRow.id).where(
                DeletedDeploymentRow.organization == org,
                or_(DeletedDeploymentRow.id == ref, DeletedDeploymentRow.name == ref))
                .order_by(DeletedDeploymentRow.deleted_at.desc()).limit(1))
            if gone is None:
                raise not_found("deployment", ref)
            return gone, True

        deployment_id, already = await self.db.run(remove)
        if not already:
            await self._stop_serving(deployment_id)
        return deployment_id, already

    async def _stop_serving(self, deployment_id: str) -> None:
        task = self._launches.pop(deployment_id, None)
        if task is not None:
            await cancel_and_wait([task])
        await self._forget_process(deployment_id)
        await asyncio.to_thread(shutil.rmtree, self._folder(deployment_id), True)

    async def delete_job(self, job_id: str) -> int:
        """Deletes every deployment of a deleted job; returns how many."""
        def remove(s: Session) -> list[str]:
            rows = list(s.scalars(select(DeploymentRow).where(DeploymentRow.job_id == job_id)))
            for row in rows:
                s.add(_tombstone(row))
                s.delete(row)
            return [r.id for r in rows]

        ids: list[str] = await self.db.run(remove)
        for deployment_id in ids:
            await self._stop_serving(deployment_id)
        return len(ids)

    # -- what the HTTP endpoint serves ------------------------------------------------------------------

    async def ready(self, org: str) -> list[pb.Deployment]:
        """The organization's READY EMBEDDED deployments that this process serves."""
        rows = await self.db.run(lambda s: list(s.scalars(select(DeploymentRow).where(
            DeploymentRow.organization == org, DeploymentRow.state == READY,
            DeploymentRow.target == EMBEDDED).order_by(DeploymentRow.id.desc()))))
        return [deployment_to_proto(r) for r in rows if self._serving(r.id)]

    def _serving(self, deployment_id: str) -> bool:
        process = self.processes.get(deployment_id)
        return process is not None and process.alive and process.port > 0

    async def model_process(self, org: str, model: str) -> ModelProcess:
        """The model process serving `model` (a deployment name) for `org`; NotFound for an unknown model
        or another organization's, FailedPrecondition for one that is not READY."""
        row = await self.db.run(lambda s: s.scalar(select(DeploymentRow).where(
            DeploymentRow.organization == org, DeploymentRow.name == model)))
        if row is None or row.target != EMBEDDED:
            raise NotFound(f"The model '{model}' does not exist")
        process = self.processes.get(row.id)
        if row.state != READY or process is None or not process.alive or not process.port:
            state = pb.DeploymentState.Name(row.state).removeprefix("DEPLOYMENT_STATE_")
            raise FailedPrecondition(f"The model '{model}' is not ready (its deployment is {state})")
        return process


# The deployments that hold a model process: loading (PENDING, either target), or serving (READY EMBEDDED).
_HOLDS_PROCESS: ColumnElement[bool] = or_(
    DeploymentRow.state == PENDING, and_(DeploymentRow.state == READY, DeploymentRow.target == EMBEDDED))
# The row of `serving_org_locks` that the platform-wide limit locks (no organization's name has a "#").
PLATFORM_LOCK = "#platform"


def _request_id_reused(request_id: str, name: str, deployment_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"request_id '{request_id}' was already used to create deployment '{name}' with a different "
        "request; use a new request_id for a new deployment",
        reason=Reason.REQUEST_ID_REUSED, metadata={"request_id": request_id, "deployment": deployment_id},
        violations=[FieldViolation("request_id", "was already used for a different request")])


def _tombstone(row: DeploymentRow) -> DeletedDeploymentRow:
    """What is kept of a deleted deployment: enough to answer DeleteDeployment again, and a create retried
    under its request_id (in its organization)."""
    return DeletedDeploymentRow(id=row.id, organization=row.organization, name=row.name,
                                request_id=row.request_id, request_hash=row.request_hash)


def _refuse_at(live: int, limit: int, setting: str, what: str, remedy: str) -> None:
    """RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) naming the setting and its value when `live` has reached it."""
    if live >= limit:
        raise ResourceExhausted(f"{what}, its limit (TUNEFORGE_{setting.upper()} = {limit}); {remedy}",
                                reason=Reason.QUOTA_EXCEEDED,
                                metadata={"limit": setting, "value": str(limit), "live": str(live)})


def _lock(s: Session, key: str) -> None:
    """Locks `key`'s row of `serving_org_locks` (made on first use) until the transaction ends. Done first
    in a transaction, this is its first write too, so SQLite (which has no FOR UPDATE) serializes it."""
    dialect = s.get_bind().dialect.name
    values = {"organization": key}
    if dialect == "postgresql":
        s.execute(postgresql.insert(OrganizationLock).values(values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        s.execute(sqlite.insert(OrganizationLock).values(values).on_conflict_do_nothing())
    elif s.get(OrganizationLock, key) is None:
        s.add(OrganizationLock(organization=key))
        s.flush()
    s.scalars(select(OrganizationLock).where(OrganizationLock.organization == key).with_for_update()).first()


def request_hash(request: pb.CreateDeploymentRequest) -> str:
    """SHA-256 of what a CreateDeploymentRequest asks for: less its request_id and organization (the row
    is the organization's already), with the default target spelled out, so that a retry matches."""
    clean = pb.CreateDeploymentRequest()
    clean.CopyFrom(request)
    clean.request_id = ""
    clean.organization = ""
    clean.target = TARGETS.get(request.target, request.target)
    return hashlib.sha256(clean.SerializeToString(deterministic=True)).hexdigest()


def check_proto(check: dict[str, Any]) -> pb.DeploymentCheck:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=float(check.get("duration_s", 0.0))))
    return pb.DeploymentCheck(
        loaded=bool(check.get("loaded")), generated=bool(check.get("generated")),
        stopped_at_end_of_turn=bool(check.get("stopped_at_end_of_turn")),
        end_of_turn_token=str(check.get("end_of_turn_token", "")), prompt=str(check.get("prompt", "")),
        answer=str(check.get("answer", "")), duration=duration)
