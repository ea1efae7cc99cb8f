"""Settings of the jobs service: the kit's TUNEFORGE_* settings plus what CreateJob admits, how many jobs
each organization may have waiting and running (services.jobs.quotas), and how it watches workers
(services.jobs.workers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator

from services.jobs.scheduler import parse_org_weights, parse_worker_pools
from tuneforge_core.settings import KitSettings


class JobSettings(KitSettings):
    # TUNEFORGE_ALLOW_USER_REWARD_CODE: admit GRPO jobs whose reward function is code written by the user.
    # Off by default; workers have their own switch (TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE) and refuse
    # such jobs unless it is on too.
    allow_user_reward_code: bool = False
    # Seconds between passes over the workers' heartbeats: jobs whose worker went quiet go back to the
    # queue, and each queued job's reason (Job.status_message) is brought up to date.
    worker_check_interval_s: float = 5.0
    # "Recently" in a queued job's reason: "none seen in the last 5 minutes".
    worker_seen_window_s: float = 300.0
    # Workers not heard from for this long leave ListWorkers.
    worker_forget_after_s: float = 24 * 3600.0
    # TUNEFORGE_MAX_QUEUED_JOBS_PER_ORG: QUEUED jobs an organization may have; CreateJob beyond it answers
    # RESOURCE_EXHAUSTED (reason QUOTA_EXCEEDED). 0: no limit.
    max_queued_jobs_per_org: int = Field(default=20, ge=0)
    # TUNEFORGE_MAX_RUNNING_JOBS_PER_ORG: jobs of an organization handed to the work queue at once (running,
    # or queued for a worker); the next ones wait, QUEUED, until one of them ends. 0: no limit.
    max_running_jobs_per_org: int = Field(default=4, ge=0)
    # TUNEFORGE_SCHEDULER (services.jobs.scheduler): "fair" holds each job until a worker that would take
    # it is free and then shares the workers among organizations by weight (priorities within one); "fifo"
    # publishes every job at CreateJob and the work queue hands them out in arrival order (for deployments
    # that scale workers on the queue's depth).
    scheduler: Literal["fair", "fifo"] = "fair"
    # TUNEFORGE_ORG_WEIGHTS: the organizations' shares of the workers under the fair scheduler,
    # "org-a=2,org-b=1"; an organization not named weighs 1.
    org_weights: str = ""
    # TUNEFORGE_WORKER_POOLS: the deployment's worker pools and their largest workers,
    # "default:cpu,gpu-a:nvidia-h100x8,gpu-b:nvidia-t4x1". When set, CreateJob refuses a job that none of
    # them could ever run, naming spec.hardware.pool, gpu_type or gpu_count. Empty: any job waits for a
    # worker that would take it.
    worker_pools: str = ""
    # TUNEFORGE_CPU_HOURLY_USD: the hourly price of a CPU worker in Job.usage and GetUsage (GPU workers are
    # priced by the estimation service's hardware catalog). Default: the catalog's nominal CPU price.
    cpu_hourly_usd: float = Field(default=0.10, ge=0.0)
    # -- downloads of job artifacts (GetJobArtifacts; services.jobs.artifacts, services.jobs.downloads) --
    # TUNEFORGE_DOWNLOAD_URL_TTL_S: how long download URLs stay valid, and the longest a caller may ask for
    # (7 days at most: S3's limit for presigned URLs).
    download_url_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    # TUNEFORGE_DOWNLOAD_HOST, TUNEFORGE_DOWNLOAD_PORT: where the jobs service serves downloads itself when
    # object storage is a local folder (on S3, URLs are presigned and no server runs). Empty host: the
    # gRPC host. No port: the gRPC port + 1 (a free port when that one is taken or the gRPC port is 0);
    # 0: a free port.
    download_host: str = ""
    download_port: int | None = Field(default=None, ge=0, le=65535)
    # TUNEFORGE_DOWNLOAD_BASE_URL: the download server's URL as callers reach it (behind a proxy, or on a
    # wildcard host), e.g. https://tuneforge.example.com; empty: http(s)://<host>:<port>.
    download_base_url: str = ""
    # TUNEFORGE_DOWNLOAD_KEY: HMAC key(s) signing local download URLs (comma-separated: the first signs,
    # any verifies). Empty: one generated once in <data_dir>/secrets/download.key.
    download_key: str = Field(default="", repr=False)
    # TUNEFORGE_CREDENTIALS_KEY: the Fernet key(s) that seal the tracker secrets of jobs
    # (JobSpec.integrations; services.jobs.tracker_secrets), the same setting and generated key file as the
    # datasets service's import credentials. Workers never get it
    # (services.platform.supervisor.WORKER_WITHHELD).
    credentials_key: SecretStr = SecretStr("")

    @field_validator("org_weights")
    @classmethod
    def _check_org_weights(cls, value: str) -> str:
        parse_org_weights(value)
        return value

    @field_validator("worker_pools")
    @classmethod
    def _check_worker_pools(cls, value: str) -> str:
        parse_worker_pools(value)
        return value
