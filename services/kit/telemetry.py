"""What a services process tells Prometheus, and the organization on its log lines.

Each services process serves `/metrics` with prometheus_client's own HTTP server when
TUNEFORGE_METRICS_PORT is set (`serve_metrics`, started by services.kit.runtime.serve). Metric names:

- `tuneforge_rpc_requests_total{service,method,code}` and `tuneforge_rpc_duration_seconds{service,method,
  code}` (a histogram): every RPC the kit server answers, with its final gRPC code, counted by
  the call pipeline every handler is built in (services.kit.pipeline: outermost, so the codes the error
  mapping chose, refused credentials included).
- `tuneforge_metric_points_ingested_total`: metric points the metrics service stored (`INGESTED_POINTS`).
- `tuneforge_dead_letters_total{consumer,cause}`: messages a consumer gave up on (services.kit.consumer).
- The jobs service's fleet, counted from its database and JetStream at each scrape
  (services.jobs.telemetry, through `FleetCollector`): `tuneforge_jobs{state}`,
  `tuneforge_jobs_oldest_update_age_seconds{state}`, `tuneforge_work_queue_pending{pool}`,
  `tuneforge_work_queue_in_progress{pool}`, `tuneforge_pool_workers{pool}`,
  `tuneforge_workers{gpu_type,state,alive}`, `tuneforge_worker_last_heartbeat_age_seconds{worker,gpu_type}`.

The worker's own metrics (training step time, tokens/s, GPU) are trainer_worker.telemetry's.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from threading import Thread
from typing import Any

from prometheus_client import REGISTRY, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# Seconds: from a cached lookup to a slow upload.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               300.0)
RPC_LABELS = ("service", "method", "code")



class RpcStats(Collector):
    """`tuneforge_rpc_requests_total` and the histogram `tuneforge_rpc_duration_seconds`, by service, method
    and code: each call counted in plain Python on the event loop's thread (`observe`: a dictionary look-up
    and two additions, no lock), the Prometheus series made at each scrape (`collect`). prometheus_client's
    Counter and Histogram take a lock for every addition (three a call): six times the time, on the thread
    every call waits for. The request count is the histogram's count, so the two always agree."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], _RpcSeries] = {}

    def observe(self, service: str, method: str, code: str, seconds: float) -> None:
        """One call (from the event loop's thread: two threads adding at once could lose one)."""
        series = self._series.get((service, method, code))
        if series is None:
            series = self._series[(service, method, code)] = _RpcSeries()
        series.buckets[bisect.bisect_left(RPC_BUCKETS, seconds)] += 1
        series.seconds += seconds

    def count(self, service: str, method: str, code: str) -> int:
        series = self._series.get((service, method, code))
        return 0 if series is None else sum(series.buckets)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("tuneforge_rpc_requests", "RPCs answered, by service, method and gRPC "
                                       "code.", labels=RPC_LABELS)
        duration = HistogramMetricFamily(
            "tuneforge_rpc_duration_seconds", "Time from the call reaching the server to its last response, "
            "by service, method and gRPC code.", labels=RPC_LABELS)
        for labels, series in list(self._series.items()):
            counts, seconds = list(series.buckets), series.seconds
            cumulative = list(itertools.accumulate(counts))
            bounds = [floatToGoString(bound) for bound in RPC_BUCKETS] + ["+Inf"]
            requests.add_metric(labels, cumulative[-1])
            duration.add_metric(labels, list(zip(bounds, cumulative, strict=True)), seconds)
        yield requests
        yield duration


class _RpcSeries:
    __slots__ = ("buckets", "seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(RPC_BUCKETS) + 1)  # calls of at most each bound, then of more
        self.seconds = 0.0


RPC_STATS = RpcStats()
REGISTRY.register(RPC_STATS)
# The metrics service adds each stored point: INGESTED_POINTS.inc(len(points)).
INGESTED_POINTS = Counter("tuneforge_metric_points_ingested",
                          "Training metric points the metrics service stored.")

# services.kit.consumer counts each message it gives up on and keeps in TF_DEAD_LETTERS.
DEAD_LETTERS = Counter("tuneforge_dead_letters",
                       "Messages a service's consumer gave up on and kept in the TF_DEAD_LETTERS stream, by "
                       "consumer and cause (permanent, refused_value, deliveries).", ("consumer", "cause"))

# Every metric name this module (and the fleet collector) exports, as Prometheus shows them; the dashboard
# and alert rules may use these only (tests/deploy/test_observability.py checks).
FLEET_METRICS = ("tuneforge_jobs", "tuneforge_jobs_oldest_update_age_seconds", "tuneforge_work_queue_pending",
                 "tuneforge_work_queue_in_progress", "tuneforge_pool_workers", "tuneforge_workers",
                 "tuneforge_worker_last_heartbeat_age_seconds")
SERVICE_METRICS = ("tuneforge_rpc_requests_total", "tuneforge_rpc_duration_seconds_bucket",
                   "tuneforge_rpc_duration_seconds_sum", "tuneforge_rpc_duration_seconds_count",
                   "tuneforge_metric_points_ingested_total", "tuneforge_dead_letters_total", *FLEET_METRICS)


def split_method(full_method: str) -> tuple[str, str]:
    """("tuneforge.v1.JobService", "CreateJob") of "/tuneforge.v1.JobService/CreateJob"."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def observe_rpc(service: str, method: str, code: str, seconds: float) -> None:
    RPC_STATS.observe(service, method, code, seconds)


# -- the /metrics endpoint ------------------------------------------------------------------------------

@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server (prometheus_client's own) and its port."""

    server: Any
    thread: Thread
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> MetricsEndpoint:
    """Serves `registry` on http://host:port/metrics in a daemon thread; raises OSError when it cannot
    listen (EADDRINUSE: the port is taken)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread, int(server.server_address[1]))


# -- metrics counted at scrape time -----------------------------------------------------------------------

@dataclass
class FleetSnapshot:
    """What the jobs service counts at a scrape (services.jobs.telemetry fills it)."""

    jobs_by_state: dict[str, int] = field(default_factory=dict)
    oldest_update_age_s: dict[str, float] = field(default_factory=dict)
    # pool (work route) -> (not yet delivered, delivered and not yet acked)
    queue: dict[str, tuple[int, int]] = field(default_factory=dict)
    pool_workers: dict[str, int] = field(default_factory=dict)
    # (gpu_type, state, alive) -> count
    workers: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # (worker id, gpu_type) -> seconds since its last heartbeat
    heartbeat_age_s: dict[tuple[str, str], float] = field(default_factory=dict)


class FleetCollector(Collector):
    """Gauges of the jobs service's fleet, counted on each scrape by `snapshot`, a coroutine run on the
    service's event loop (the scrape's thread waits up to `timeout_s` for it). A failed count is logged and
    leaves these gauges out of that scrape, so an alert on them sees no data rather than a wrong zero."""

    def __init__(self, snapshot: Callable[[], Awaitable[FleetSnapshot]], loop: asyncio.AbstractEventLoop,
                 timeout_s: float = 5.0) -> None:
        self._snapshot = snapshot
        self._loop = loop
        self._timeout_s = timeout_s

    def describe(self) -> Iterable[Metric]:
        return []  # counted at scrape time: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        try:
            snap = asyncio.run_coroutine_threadsafe(self._wrap(), self._loop).result(self._timeout_s)
        except Exception as exc:
            log.warning("could not count the jobs and workers for /metrics: %s", exc)
            return
        jobs = GaugeMetricFamily("tuneforge_jobs", "Jobs by state.", labels=["state"])
        for state, count in sorted(snap.jobs_by_state.items()):
            jobs.add_metric([state], count)
        oldest = GaugeMetricFamily("tuneforge_jobs_oldest_update_age_seconds",
                                   "Seconds since the least recently changed job in each state changed "
                                   "(a RUNNING job changes with every progress report).", labels=["state"])
        for state, age in sorted(snap.oldest_update_age_s.items()):
            oldest.add_metric([state], age)
        pending = GaugeMetricFamily("tuneforge_work_queue_pending",
                                    "Jobs queued for a pool (work route) that no worker has taken yet "
                                    "(held by the scheduler or waiting in JetStream).",
                                    labels=["pool"])
        taken = GaugeMetricFamily("tuneforge_work_queue_in_progress",
                                  "Jobs of a pool a worker holds (delivered, not yet finished).",
                                  labels=["pool"])
        for pool, (waiting, held) in sorted(snap.queue.items()):
            pending.add_metric([pool], waiting)
            taken.add_metric([pool], held)
        pool_workers = GaugeMetricFamily("tuneforge_pool_workers",
                                         "Alive workers that take the jobs of each pool.", labels=["pool"])
        for pool, count in sorted(snap.pool_workers.items()):
            pool_workers.add_metric([pool], count)
        workers = GaugeMetricFamily("tuneforge_workers", "Workers heard from, by GPU type, state and alive.",
                                    labels=["gpu_type", "state", "alive"])
        for key, count in sorted(snap.workers.items()):
            workers.add_metric(list(key), count)
        ages = GaugeMetricFamily("tuneforge_worker_last_heartbeat_age_seconds",
                                 "Seconds since each worker's last heartbeat.", labels=["worker", "gpu_type"])
        for (worker, gpu_type), age in sorted(snap.heartbeat_age_s.items()):
            ages.add_metric([worker, gpu_type], age)
        yield from (jobs, oldest, pending, taken, pool_workers, workers, ages)

    async def _wrap(self) -> FleetSnapshot:
        return await self._snapshot()


def register(collector: Collector, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Registers `collector`; returns the function that unregisters it (a component's stop calls it)."""
    registry.register(collector)

    def unregister() -> None:
        try:
            registry.unregister(collector)
        except KeyError:
            pass

    return unregister


# -- log lines ------------------------------------------------------------------------------------------

class OrganizationFilter(logging.Filter):
    """Gives a log record `organization`: the organization of the caller whose RPC is being served (the
    principal services.kit.auth set for this call), unless the log call passed one with `extra=`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "organization", ""):
            return True
        from services.kit import auth  # auth imports the interceptors, which import this module

        try:
            principal = auth.current_principal()
        except Exception:  # no call is being served here
            return True
        if principal.organization:
            record.organization = principal.organization
        return True
