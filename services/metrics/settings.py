"""Settings of the metrics service, from TUNEFORGE_METRICS_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_METRICS_", env_file=None, extra="ignore")

    # After a followed job reaches a final state, keep forwarding what arrives for this long: the last
    # points travel on another subject than the state change and may land a little later.
    follow_grace_s: float = Field(default=1.0, ge=0.0)
    # While following, ask the jobs service for the job's state this often, in case a JobChanged was lost
    # (core NATS delivers at most once, e.g. not across a reconnect).
    job_poll_interval_s: float = Field(default=15.0, gt=0.0)
    # Rows read from the database per query while replaying stored points or entries.
    replay_batch: int = Field(default=500, ge=1, le=10_000)
    # Deadline of each call to the jobs service.
    jobs_timeout_s: float = Field(default=10.0, gt=0.0)
