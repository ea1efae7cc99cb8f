"""The jobs service as a runnable component: servicer, outbox relay, worker-update consumer (fenced: see
services.jobs.manager), the watch for jobs that ran out of deliveries, and the workers' heartbeats with the
periodic check that reads them (services.jobs.workers) and dispatches held jobs: by the fair scheduler
(services.jobs.scheduler), or those held by their organization's running limit (services.jobs.quotas)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_service_pb2_grpc

from services.jobs.artifacts import ArtifactCatalog
from services.jobs.checkpoints import CheckpointRetention
from services.jobs.datasets_client import DatasetLookup
from services.jobs.deletion import JobDeletions
from services.jobs.downloads import DownloadServer, DownloadSigner, advertised_host, server_ssl_context
from services.jobs.estimation_client import HardwareCheck
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from services.jobs.quotas import JobQuotas
from services.jobs.scheduler import SchedulerConfig
from services.jobs.servicer import JobServicer
from services.jobs.settings import JobSettings
from services.jobs.telemetry import fleet_snapshot
from services.jobs.tracker_secrets import TrackerSecretKeeper
from services.jobs.usage import PriceBook
from services.jobs.workers import WorkerRules
from services.kit.consumer import PermanentError, consume

# The deployment's one cipher of sealed credentials (TUNEFORGE_CREDENTIALS_KEY), with the datasets service,
# which sealed first; both services run from the same settings and data dir. Only this wiring imports it.
from services.kit.credentials import CredentialCipher
from services.kit.db import Database
from services.kit.identity import AuditRecord
from services.kit.outbox import OutboxRelay, utcnow
from services.kit.runtime import Component, Registration, Runtime
from services.kit.telemetry import FleetCollector, register
from tuneforge_core import subjects
from tuneforge_core.models import ModelPolicy
from tuneforge_core.nats import ensure_trainers_consumer, reroute_legacy_work
from tuneforge_core.storage import LocalObjectStore

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class JobsComponent(Component):
    def __init__(self, runtime: Runtime, settings: JobSettings | None = None) -> None:
        super().__init__(runtime)
        settings = settings or JobSettings.from_kit(runtime.settings)
        self.settings = settings
        self.db = Database(settings.database_url_for("jobs"), "jobs", settings.db_workers)
        self.db.migrate(MIGRATIONS)
        self.relay = OutboxRelay(self.db, runtime.js, JobOutbox)
        self.manager = JobManager(self.db, self.relay,
                                  DatasetLookup(runtime.channel(settings.datasets_address)),
                                  runtime.store, runtime.nc,
                                  hardware=HardwareCheck(runtime.channel(settings.estimation_address)),
                                  allow_user_reward_code=settings.allow_user_reward_code,
                                  models=ModelPolicy.from_settings(settings, runtime.store),
                                  workers=WorkerRules(ack_wait_s=settings.work_ack_wait_s,
                                                      max_deliver=settings.work_max_deliver,
                                                      seen_window_s=settings.worker_seen_window_s,
                                                      forget_after_s=settings.worker_forget_after_s),
                                  quotas=JobQuotas(max_queued_jobs_per_org=settings.max_queued_jobs_per_org,
                                                   max_running_jobs_per_org=settings.max_running_jobs_per_org),
                                  scheduler=SchedulerConfig.from_settings(
                                      settings.scheduler, settings.org_weights, settings.worker_pools))
        self.manager.on_rejected_update = self._audit_refused_update
        # Job.usage prices (services.jobs.usage): the catalog's GPU prices and the CPU worker price.
        self.manager.prices = PriceBook(cpu_hourly_usd=settings.cpu_hourly_usd)
        # DeleteJob, and the sweep that finishes a deletion a crash interrupted (services.jobs.deletion).
        self.deletions = JobDeletions(self.db, self.relay, runtime.store, runtime.js)
        # Once a job ends, its non-final checkpoints lose their optimizer state (services.jobs.checkpoints).
        self.retention = CheckpointRetention(self.db, runtime.store)
        self.manager.on_job_ended = self.retention.wake
        # Tracker secrets (JobSpec.integrations): sealed at CreateJob, handed to the holding worker only.
        self.manager.tracker_secrets = TrackerSecretKeeper(self.db, lambda: CredentialCipher.from_settings(
            settings.credentials_key.get_secret_value(), settings.data_dir))
        self._secrets: Any = None
        self._heartbeats: Any = None
        self._changes: Any = None
        # GetJobArtifacts: S3 presigns its own download URLs; a local store's are served by this process.
        local = isinstance(runtime.store, LocalObjectStore)
        self.artifacts = ArtifactCatalog(
            runtime.store, default_ttl_s=settings.download_url_ttl_s,
            signer=DownloadSigner.from_setting(settings.download_key, settings.data_dir) if local else None)
        self.downloads: DownloadServer | None = None
        self._unregister_metrics: Any = None

    def _audit_refused_update(self, job_id: str, organization: str, worker_id: str, reason: str) -> None:
        """A worker update the fence refused goes to the organization's audit log (read by an admin with
        ListAuditEvents / `tuneforge audit --failures`)."""
        self.runtime.identity.record([AuditRecord(
            method=f"nats:{subjects.worker_status(job_id)}", code="PERMISSION_DENIED",
            organization=organization, principal=f"worker:{worker_id}", resource=job_id, message=reason)])

    def _serve_downloads(self) -> None:
        """Starts the download server of a local store (services.jobs.downloads): on the download host
        and port, else the gRPC host and the port after the gRPC port."""
        store, s = self.runtime.store, self.settings
        if not isinstance(store, LocalObjectStore) or self.artifacts.signer is None:
            return
        host = s.download_host or s.grpc_host
        port = s.download_port if s.download_port is not None else (s.grpc_port + 1 if s.grpc_port else 0)
        self.downloads = DownloadServer(store, self.artifacts.signer, host, port,
                                        ssl_context=server_ssl_context(s.tls_cert_file, s.tls_key_file),
                                        fallback_to_free_port=s.download_port is None)
        self.downloads.start()
        self.artifacts.base_url = (s.download_base_url
                                   or f"{self.downloads.scheme}://{advertised_host(host)}:{self.downloads.port}")
        log.info("serving artifact downloads on %s", self.artifacts.base_url)

    def _servicer(self) -> JobServicer:
        servicer = JobServicer(self.manager, self.deletions)
        servicer.artifacts = self.artifacts
        return servicer

    def registrations(self) -> Sequence[Registration]:
        return [Registration("tuneforge.v1.JobService", self._servicer(),
                             job_service_pb2_grpc.add_JobServiceServicer_to_server)]

    async def start(self) -> None:
        settings = self.runtime.settings
        # Jobs that name no GPU type; each GPU type's consumer is ensured by the workers that have it.
        await ensure_trainers_consumer(self.runtime.js, subjects.ANY_ROUTE, settings.work_ack_wait_s,
                                       settings.work_max_deliver)
        await reroute_legacy_work(self.runtime.js)
        self._heartbeats = await self.runtime.nc.subscribe(
            subjects.WORKER_HEARTBEATS, queue=subjects.JOBS_HEARTBEATS_QUEUE, cb=self._on_heartbeat)
        # Every replica's job changes, so that GetJob answers kept here never outlive them.
        self._changes = await self.runtime.nc.subscribe(subjects.ALL_JOB_EVENTS, cb=self._on_job_changed)
        self._secrets = await self.runtime.nc.subscribe(
            subjects.ALL_TRACKER_SECRETS, queue=subjects.JOBS_HEARTBEATS_QUEUE, cb=self._on_secrets_request)
        self.manager.listening_since = utcnow()
        self._serve_downloads()
        # /metrics (services.kit.telemetry): jobs by state, queues and workers, counted at each scrape.
        self._unregister_metrics = register(FleetCollector(
            lambda: fleet_snapshot(self.db, self.runtime.js, self.manager.listening_since),
            asyncio.get_running_loop()))
        self.spawn(self._watch_workers(), "jobs-worker-watch")
        self.spawn(self.relay.run(), "jobs-outbox-relay")
        self.spawn(self.deletions.sweep_forever(), "jobs-deletion-sweep")
        self.spawn(self.retention.run_forever(), "jobs-checkpoint-retention")
        self.spawn(self.manager.prices.keep_fresh(self.runtime.channel(settings.estimation_address)),
                   "jobs-hardware-prices")
        self.spawn(consume(self.runtime.js, stream=subjects.STREAM_WORKER,
                           durable=subjects.JOBS_STATUS_CONSUMER, subject=subjects.ALL_WORKER_STATUS,
                           handler=self._on_worker_update), "jobs-worker-updates")
        self.spawn(consume(self.runtime.js, stream=subjects.STREAM_ADVISORIES,
                           durable=subjects.JOBS_LOST_CONSUMER, subject=subjects.WORK_MAX_DELIVERIES,
                           handler=self._on_max_deliveries), "jobs-lost-work")

    async def stop(self) -> None:
        if self._unregister_metrics is not None:
            self._unregister_metrics()
        for subscription in (self._heartbeats, self._changes, self._secrets):
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        if self.downloads is not None:
            await asyncio.to_thread(self.downloads.stop)
        await super().stop()
        self.db.dispose()

    async def _on_job_changed(self, msg: Msg) -> None:
        try:
            changed = events_pb2.JobChanged.FromString(msg.data)
        except Exception:
            # Nothing of it can be read, not even which job: every kept GetJob answer could be stale.
            log.warning("an undecodable JobChanged on %s; forgetting every kept GetJob answer", msg.subject)
            self.manager.read_cache.forget_all()
            return
        self.manager.read_cache.observe(changed.job.id)

    async def _on_secrets_request(self, msg: Msg) -> None:
        """A worker asks for its job's tracker secrets (services.jobs.tracker_secrets)."""
        assert self.manager.tracker_secrets is not None
        try:
            await msg.respond(await self.manager.tracker_secrets.answer(msg.data))
        except Exception:  # the worker asks again, then fails the job saying so
            log.exception("could not answer a tracker secrets request on %s", msg.subject)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            heartbeat = events_pb2.WorkerHeartbeat.FromString(msg.data)
        except Exception:
            log.warning("dropping an undecodable worker heartbeat")
            return
        if not 0 < len(heartbeat.worker_id) <= 255:  # the id column's size (and Job.worker_id's)
            log.warning("dropping a worker heartbeat without a usable worker id")
            return
        try:
            await self.manager.record_heartbeat(heartbeat)
        except Exception:  # the next heartbeat comes in a few seconds
            log.exception("could not record the heartbeat of worker %s", heartbeat.worker_id)

    async def _watch_workers(self) -> None:
        """Runs the workers check every few seconds, while connected: heartbeats missed while this
        service was cut off from NATS are no sign of a lost worker, so the silence counts again from the
        reconnect."""
        nc = self.runtime.nc
        reconnects = nc.stats["reconnects"]
        while True:
            await asyncio.sleep(self.settings.worker_check_interval_s)
            if not nc.is_connected:
                continue
            if nc.stats["reconnects"] != reconnects:
                reconnects = nc.stats["reconnects"]
                self.manager.listening_since = utcnow()
                log.info("reconnected to NATS: workers' silence counts from now")
                continue
            try:
                await self.manager.check_workers()
            except Exception:
                log.exception("the workers check failed; will retry")

    async def _on_worker_update(self, msg: Msg) -> None:
        try:
            update = events_pb2.WorkerJobUpdate.FromString(msg.data)
        except Exception as exc:
            raise PermanentError(f"undecodable WorkerJobUpdate: {exc}") from exc
        if not update.event_id or not update.job_id:
            raise PermanentError("WorkerJobUpdate without event_id or job_id")
        await self.manager.apply_worker_update(update, subject=msg.subject)

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """Fails the job whose assignment no worker finished, then drops the assignment from the queue.

        Redelivery of the advisory is harmless: failing a final job is a no-op, and an assignment that is
        already gone means an earlier delivery did the work.
        """
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"undecodable max-deliveries advisory: {exc}") from exc
        try:
            raw = await self.runtime.js.get_msg(subjects.STREAM_WORK, seq)
        except NotFoundError:
            return
        assignment = events_pb2.JobAssignment.FromString(raw.data or b"")
        if await self.manager.fail_lost(assignment.job_id, int(advisory.get("deliveries", 0))):
            log.warning("job %s failed: no worker finished it", assignment.job_id)
        await self.runtime.js.delete_msg(subjects.STREAM_WORK, seq)
