"""Settings of the jobs service: the kit's TUNEFORGE_* settings plus what CreateJob admits, how many jobs
each organization may have waiting and running (services.jobs.quotas), and how it watches workers
(services.jobs.workers)."""

from __future__ import annotations

from pydantic import Field

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
