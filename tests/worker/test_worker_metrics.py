"""A worker's /metrics (trainer_worker.telemetry), fed by the metric points the agent forwards from the
training process's events file, scraped over HTTP from prometheus_client's own server."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from trainer_worker.events import MetricEvent
from trainer_worker.reporting import metric_point
from trainer_worker.telemetry import WORKER_METRICS, WorkerGauges, WorkerTelemetry, serve


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("worker") == "w1"}


def test_training_points_become_gauges_on_the_metrics_port() -> None:
    registry = CollectorRegistry()
    telemetry = WorkerTelemetry("w1", WorkerGauges(registry))
    served = serve("127.0.0.1", 0, registry)
    assert served is not None
    server, thread = served
    try:
        port = int(server.server_address[1])
        idle = scrape(port)
        assert idle["tuneforge_worker_busy"] == 0 and idle["tuneforge_worker_tokens_per_second"] == 0
        telemetry.job_started()
        # Logging steps 10 and 20, 5 s apart: 0.5 s a step; a system point carries the GPU's numbers.
        for event in (MetricEvent(kind="train", step=10, time=1000.0, loss=2.0, tokens_per_second=900.0),
                      MetricEvent(kind="system", step=10, time=1000.0, gpu_utilization=87.0,
                                  gpu_memory_bytes=5e9, cpu_percent=100.0),
                      MetricEvent(kind="train", step=20, time=1005.0, loss=1.5, tokens_per_second=1200.0)):
            telemetry.observe(metric_point(event, "job_1", 1))
        busy = scrape(port)
        assert busy["tuneforge_worker_busy"] == 1
        assert busy["tuneforge_worker_training_step"] == 20
        assert busy["tuneforge_worker_step_seconds"] == 0.5
        assert busy["tuneforge_worker_tokens_per_second"] == 1200
        assert busy["tuneforge_worker_gpu_utilization_percent"] == 87
        assert busy["tuneforge_worker_gpu_memory_bytes"] == 5e9
        assert set(busy) == set(WORKER_METRICS)
        telemetry.job_ended()
        done = scrape(port)
        assert done["tuneforge_worker_busy"] == 0 and done["tuneforge_worker_tokens_per_second"] == 0
        # The next job's first step time is measured from its own points, not the last job's.
        telemetry.job_started()
        telemetry.observe(metric_point(MetricEvent(kind="train", step=1, time=2000.0), "job_2", 1))
        assert scrape(port)["tuneforge_worker_step_seconds"] == 0.5
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_taken_port_leaves_the_worker_without_metrics_but_running() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve("127.0.0.1", taken.getsockname()[1], CollectorRegistry()) is None
