"""What a trainer worker tells Prometheus: its /metrics endpoint (TUNEFORGE_WORKER_METRICS_PORT) with the
training it runs now, read from the metric points the agent forwards anyway (trainer_worker.reporting):

- `tuneforge_worker_busy{worker}`: 1 while a job trains, else 0;
- `tuneforge_worker_training_step{worker}` and `tuneforge_worker_step_seconds{worker}` (seconds per optimizer
  step between the last two logging steps);
- `tuneforge_worker_tokens_per_second{worker}` (0 when idle);
- `tuneforge_worker_gpu_utilization_percent{worker}` and `tuneforge_worker_gpu_memory_bytes{worker}` (from
  NVML through trainer_worker.sysmetrics; absent on a CPU worker).

It imports no services code: the worker imports nothing of ours but tuneforge_core.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from threading import Thread
from typing import Any

from prometheus_client import REGISTRY, Gauge, start_http_server
from prometheus_client.registry import CollectorRegistry
from tuneforge.v1 import metrics_pb2

log = logging.getLogger(__name__)

WORKER_METRICS = ("tuneforge_worker_busy", "tuneforge_worker_training_step", "tuneforge_worker_step_seconds",
                  "tuneforge_worker_tokens_per_second", "tuneforge_worker_gpu_utilization_percent",
                  "tuneforge_worker_gpu_memory_bytes")


@dataclass
class WorkerGauges:
    """The worker's gauges in `registry` (one set per process; tests pass their own registry)."""

    registry: CollectorRegistry = field(default_factory=lambda: REGISTRY)

    def __post_init__(self) -> None:
        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, ["worker"], registry=self.registry)

        self.busy = gauge("tuneforge_worker_busy", "1 while this worker trains a job.")
        self.step = gauge("tuneforge_worker_training_step", "Optimizer step the current job reached.")
        self.step_seconds = gauge("tuneforge_worker_step_seconds",
                                  "Seconds per optimizer step between the last two logging steps.")
        self.tokens = gauge("tuneforge_worker_tokens_per_second", "Training throughput in tokens per second.")
        self.gpu_util = gauge("tuneforge_worker_gpu_utilization_percent", "GPU utilisation of the training.")
        self.gpu_memory = gauge("tuneforge_worker_gpu_memory_bytes", "GPU memory used by the training.")


class WorkerTelemetry:
    """Feeds the gauges from the points of the job this worker runs (`observe`), job by job."""

    def __init__(self, worker_id: str, gauges: WorkerGauges | None = None) -> None:
        self.worker_id = worker_id
        self.gauges = gauges or _default_gauges()
        self._last: tuple[int, float] | None = None  # (step, time in seconds) of the last train point
        self.gauges.busy.labels(worker_id).set(0)
        self.gauges.tokens.labels(worker_id).set(0)

    def job_started(self) -> None:
        self._last = None
        self.gauges.busy.labels(self.worker_id).set(1)

    def job_ended(self) -> None:
        self._last = None
        self.gauges.busy.labels(self.worker_id).set(0)
        self.gauges.tokens.labels(self.worker_id).set(0)

    def observe(self, point: metrics_pb2.MetricPoint) -> None:
        worker, g = self.worker_id, self.gauges
        if point.kind == metrics_pb2.METRIC_KIND_TRAIN:
            g.step.labels(worker).set(point.step)
            if point.HasField("tokens_per_second"):
                g.tokens.labels(worker).set(point.tokens_per_second)
            now = point.time.ToNanoseconds() / 1e9 if point.HasField("time") else None
            if now is not None:
                if self._last is not None and point.step > self._last[0] and now >= self._last[1]:
                    g.step_seconds.labels(worker).set((now - self._last[1]) / (point.step - self._last[0]))
                self._last = (point.step, now)
        if point.HasField("gpu_utilization"):
            g.gpu_util.labels(worker).set(point.gpu_utilization)
        if point.HasField("gpu_memory_bytes"):
            g.gpu_memory.labels(worker).set(point.gpu_memory_bytes)


_gauges: WorkerGauges | None = None


def _default_gauges() -> WorkerGauges:
    global _gauges
    if _gauges is None:
        _gauges = WorkerGauges()
    return _gauges


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> tuple[Any, Thread] | None:
    """prometheus_client's HTTP server for `registry` on host:port; None (and a warning: a worker trains
    just as well without it) when the port cannot be had, as when several workers share one setting."""
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("no /metrics for this worker: cannot listen on %s:%d (%s)", host, port, exc)
        return None
