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
    # Followers get a worker's points and log lines from its report as it is published, before they are
    # stored (services.metrics.fanout, "early delivery"): what a stream shows live is stored moments
    # later, unless its job is deleted first, and ListMetrics may not list it yet. False: streams get
    # items only once they are stored.
    live_from_reports: bool = True
    # Rows read from the database per query while replaying stored points or entries.
    replay_batch: int = Field(default=500, ge=1, le=10_000)
    # Deadline of each call to the jobs service.
    jobs_timeout_s: float = Field(default=10.0, gt=0.0)
    # Live points or log entries held for one stream whose client reads more slowly than they arrive;
    # past this the stream stops taking the live feed, catches up from the database, and takes it again.
    follower_buffer: int = Field(default=2000, ge=1, le=1_000_000)
    # Ingest of worker reports (TF_WORKER): at most this many messages are fetched, decoded and written in
    # one transaction, then acked together (a fetch takes whatever is pending, so batches grow only under
    # load). At most 1000, the consumer's max_ack_pending.
    ingest_batch: int = Field(default=256, ge=1, le=1000)
    # Batches handled at once: the next batch is decoded and turned into rows while the last one is written
    # (writes keep their order). 1: one batch at a time.
    ingest_in_flight: int = Field(default=2, ge=1, le=4)
    # How long one fetch waits for a first message when none is pending.
    ingest_fetch_wait_s: float = Field(default=1.0, gt=0.0, le=60.0)
    # Processes of its own in which the service prepares large ingest batches (decoding, checks, rows:
    # services.metrics.prepare), beside the thread that writes them. Unset: one when the service may run on
    # two CPUs or more, else none; 0: always on a thread. Set it to 0 where a container is limited to one CPU.
    ingest_processes: int | None = Field(default=None, ge=0, le=16)
    # A batch goes to those processes when its messages hold this many bytes or more (about 600 points of a
    # worker's usual report), in chunks of about this size: a smaller batch is prepared sooner on a thread
    # than sent there and back.
    ingest_process_min_bytes: int = Field(default=32 * 1024, ge=1)
    # Run the ingest of worker reports in a process of its own (services.metrics.ingester), beside the one
    # that serves the API and the streams, so that neither holds up the other's event loop and GIL. Unset:
    # where the metrics database is PostgreSQL (its round trips contend with the streams for the GIL; with
    # SQLite a second process measured no better); true or false: always, never.
    ingest_process: bool | None = None
    # One replica at a time ingests: the one holding a lease (services.metrics.ingest), renewed every third
    # of this; when its holder dies, another replica takes over within about this long.
    ingest_lease_s: float = Field(default=10.0, ge=2.0, le=300.0)
    # Redelivery of a batch whose write failed (the database) waits this long.
    ingest_retry_delay_s: float = Field(default=1.0, ge=0.0)

    def ingest_in_own_process(self, dialect: str) -> bool:
        """Whether the ingest runs in a process of its own, for a metrics database of `dialect`."""
        return self.ingest_process if self.ingest_process is not None else dialect == "postgresql"
