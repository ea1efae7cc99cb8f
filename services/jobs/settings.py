"""Settings of the jobs service: the kit's TUNEFORGE_* settings plus what CreateJob admits and how it
watches workers (services.jobs.workers)."""

from __future__ import annotations

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
