"""The metrics service: stores the metric points and log entries workers report, and streams them back.

Workers publish `MetricsReported` / `LogsReported` to TF_WORKER; durable consumers store them keyed by
(job_id, kind, step) / (job_id, attempt, sequence) and announce each committed batch on core NATS
(`tuneforge.live.*`), which every replica's `StreamMetrics` / `StreamLogs` calls follow live.
"""
