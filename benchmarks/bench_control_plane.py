"""The control plane against its ceilings, measured side by side in one run (issue 13).

    .venv/bin/python benchmarks/bench_control_plane.py            # full run, SQLite then PostgreSQL
    .venv/bin/python benchmarks/bench_control_plane.py --quick    # smoke run, about 2 minutes
    make bench-control-plane

The platform is started as `tuneforge up` starts it (a real nats-server, the services in their own
process, no workers) and treated as a black box: the benchmark only publishes to JetStream, as a worker
does, and calls the gRPC API with an API key, as a user does. Each measurement alternates the platform and
its ceiling --repeat times (3) and prints the median of each and their ratio:

  ingest     synthetic MetricsReported messages (1 and 100 points each) published to TF_WORKER; points/s
             until every point is a row of metrics_points (polled in the database), and the CPU time per
             point of the services process and its children (ingest's preparing processes). Ceilings: raw
             JetStream publish (here) + pull-consume-ack (in the ceiling server's process) of the same
             messages on the same nats-server, and plain executemany (sqlite3 / psycopg) of the same rows
             into the same table with the same ON CONFLICT upsert, --executemany-rows (1,000) rows a
             transaction (also printed: one transaction per message).
  fan-out    N followers (StreamMetrics follow=true) of one job, and J jobs x F followers, while points
             arrive at --fanout-rate points/s in total (one point a message); latency from publish to
             receipt (p50/p99), and whether every follower got every point exactly once and in order.
             Ceiling: a bare grpc.aio server fed the same messages over core NATS, writing each point's
             bytes to the same number of streams. The followers run in --client-procs processes of
             their own (grpc.aio, multiplexed on --channels channels each).
  unary      EstimateJob, GetJob and ListBaseModels at concurrency 1 and 16: requests/s, p50/p99.
             Ceiling: a bare grpc.aio server answering the same bytes (one real response captured) to
             the same requests, their authorization header included (it ignores it): the client's cost
             of sending it is the same on both sides.

The ceiling servers run in a process of their own, like the services. Targets (issue 13) are checked in the
final summary; the exit status is 0 unless the benchmark itself failed (--strict: 1 on a failed target).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import faulthandler
import json
import math
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import (
    estimation_service_pb2,
    identity_pb2,
    job_pb2,
    job_service_pb2,
    metrics_pb2,
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from services.client import TuneForgeClient  # noqa: E402
from services.kit.embedded import die_with_parent  # noqa: E402
from services.kit.keyfiles import secret_file  # noqa: E402
from services.kit.runtime import SERVICE_TOKEN_FILE  # noqa: E402
from services.platform.supervisor import Platform, PlatformConfig  # noqa: E402
from tuneforge_core import subjects  # noqa: E402
from tuneforge_core.nats import SERVICES_USER, connect  # noqa: E402

ORG = "bench"
BASE_MODEL = "Qwen/Qwen2.5-0.5B"
POSTGRES_URL = os.environ.get("TUNEFORGE_BENCH_POSTGRES_URL",
                              os.environ.get("TUNEFORGE_TEST_POSTGRES_URL",
                                             "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
RAW_STREAM, RAW_PREFIX = "BENCH_RAW", "bench.raw"
RAW_CONSUME = "bench.ctl.consume"  # asks the ceiling server's process to consume a raw ingest run
FANOUT_PREFIX = "bench.fanout"
TABLE, KEY = "metrics_points", ("job_id", "step", "kind")
# Steps of the fan-out runs: run r of a job streams from r * STEP_BASE (its "hello" point) on, so each run
# replays one stored point and follows only its own.
STEP_BASE = 10_000_000
METHODS = {
    "EstimateJob": "/tuneforge.v1.EstimationService/EstimateJob",
    "GetJob": "/tuneforge.v1.JobService/GetJob",
    "ListBaseModels": "/tuneforge.v1.EstimationService/ListBaseModels",
}
REQUEST_TYPES: dict[str, type[Message]] = {
    "EstimateJob": estimation_service_pb2.EstimateJobRequest,
    "GetJob": job_service_pb2.GetJobRequest,
    "ListBaseModels": estimation_service_pb2.ListBaseModelsRequest,
}
RESPONSE_TYPES: dict[str, type[Message]] = {
    "EstimateJob": estimation_service_pb2.EstimateJobResponse,
    "GetJob": job_service_pb2.GetJobResponse,
    "ListBaseModels": estimation_service_pb2.ListBaseModelsResponse,
}
# Must-show targets of issue 13: (minimum ratio to the ceiling) per unary method at concurrency 16.
UNARY_TARGETS = {"EstimateJob": 0.5, "GetJob": 0.5, "ListBaseModels": 0.8}
INGEST_RATIO_TARGET, INGEST_SQLITE_TARGET, FANOUT_P99_TARGET_MS = 0.5, 10_000.0, 100.0


# ---- small helpers -----------------------------------------------------------------------------------


def serialize(message: Message) -> bytes:
    return message.SerializeToString()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ratio(value: float, ceiling: float) -> float:
    return value / ceiling if ceiling and ceiling == ceiling else float("nan")


def say(line: str) -> None:
    print(line, flush=True)


def timestamp_now() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def point(job_id: str, step: int, *, stamped: bool = False) -> metrics_pb2.MetricPoint:
    """A training point as a worker reports one (loss, learning rate, grad norm, throughput, epoch)."""
    p = metrics_pb2.MetricPoint(job_id=job_id, kind=metrics_pb2.METRIC_KIND_TRAIN, step=step,
                                total_steps=step + 1000, epoch=step / 1000.0, attempt=1,
                                loss=2.0 / (1 + step % 1000), learning_rate=2e-4, grad_norm=0.9,
                                tokens_per_second=7500.0)
    p.time.CopyFrom(timestamp_now() if stamped else Timestamp(seconds=1_790_000_000 + step))
    return p


def report(points: Sequence[metrics_pb2.MetricPoint]) -> tuple[str, bytes]:
    event_id = f"evt_{uuid.uuid4().hex}"
    return event_id, events_pb2.MetricsReported(event_id=event_id, points=points).SerializeToString()


async def publish_all(nc: NATS, messages: Sequence[tuple[str, str, bytes]], window: int = 256) -> None:
    """Publishes (subject, event id as Nats-Msg-Id, payload) to JetStream, `window` acks awaited at once."""
    js = nc.jetstream()
    gate = asyncio.Semaphore(window)

    async def one(subject: str, event_id: str, payload: bytes) -> None:
        async with gate:
            await js.publish(subject, payload, headers={"Nats-Msg-Id": event_id}, timeout=60)

    await asyncio.gather(*(one(*m) for m in messages))


# ---- databases ---------------------------------------------------------------------------------------


@dataclass
class Backend:
    """Where the platform keeps its rows, and plain DB-API access to the same table."""

    name: str
    data_dir: Path
    sqlalchemy_url: str = ""  # empty: the platform's SQLite files
    schema: str = ""

    @property
    def platform_env(self) -> dict[str, str]:
        return {"TUNEFORGE_DATABASE_URL": self.sqlalchemy_url} if self.sqlalchemy_url else {}

    def connect(self) -> Any:
        if self.name == "sqlite":
            conn = sqlite3.connect(self.data_dir / "metrics.db", timeout=30, check_same_thread=False)
            # The pragmas services.kit.db sets on its connections.
            for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
                conn.execute(f"PRAGMA {pragma}")
            return conn
        import psycopg

        return psycopg.connect(_conninfo(POSTGRES_URL), options=f"-csearch_path={self.schema}")

    @property
    def placeholder(self) -> str:
        return "?" if self.name == "sqlite" else "%s"

    def columns(self, conn: Any) -> list[str]:
        if self.name == "sqlite":
            return [row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")]
        cur = conn.execute("select column_name from information_schema.columns where table_name = %s and "
                           "table_schema = current_schema() order by ordinal_position", (TABLE,))
        return [row[0] for row in cur.fetchall()]

    def has_step(self, conn: Any, job_id: str, step: int) -> bool:
        """Whether a point of the job at `step` is stored (a lookup in the primary key)."""
        sql = f"select 1 from {TABLE} where job_id = {self.placeholder} and step = {self.placeholder} limit 1"
        row = conn.execute(sql, (job_id, step)).fetchone()
        if self.name != "sqlite":
            conn.rollback()
        return row is not None

    def count(self, conn: Any, job_ids: Sequence[str], min_step: int = 0) -> int:
        marks = ",".join(self.placeholder for _ in job_ids)
        sql = f"select count(*) from {TABLE} where job_id in ({marks}) and step >= {self.placeholder}"
        row = conn.execute(sql, (*job_ids, min_step)).fetchone()
        if self.name != "sqlite":
            conn.rollback()  # a fresh snapshot on the next poll
        return int(row[0])


def _conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def backends(names: Sequence[str], root: Path) -> Iterator[list[Backend]]:
    """The backends asked for; PostgreSQL in a fresh schema (dropped afterwards), skipped with a printed
    reason where it is not reachable."""
    found: list[Backend] = []
    dropped: list[str] = []
    admin: Any = None
    for name in names:
        if name == "sqlite":
            found.append(Backend("sqlite", root / "sqlite" / "data"))
            continue
        try:
            import psycopg

            if admin is None:
                # A lock the schema's drop waits for (a connection left in a transaction) fails it after
                # 30 s, said, rather than hanging the run.
                admin = psycopg.connect(_conninfo(POSTGRES_URL), connect_timeout=3, autocommit=True,
                                        options="-c lock_timeout=30s")
        except Exception as exc:
            say(f"PostgreSQL skipped: not reachable at {POSTGRES_URL} ({type(exc).__name__}: {exc}); "
                "set TUNEFORGE_BENCH_POSTGRES_URL to measure it")
            continue
        schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
        admin.execute(f'create schema "{schema}"')
        dropped.append(schema)
        sep = "&" if "?" in POSTGRES_URL else "?"
        found.append(Backend("postgresql", root / "postgresql" / "data",
                             f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}", schema))
    try:
        yield found
    finally:
        for schema in dropped:
            try:
                admin.execute(f'drop schema "{schema}" cascade')
            except Exception as exc:
                say(f"PostgreSQL schema {schema} not dropped: {type(exc).__name__}: {exc}")
        if admin is not None:
            admin.close()


def row_of(p: metrics_pb2.MetricPoint, columns: Sequence[str], sqlite_style: bool) -> tuple[Any, ...]:
    """The row of a point, in `columns` order (a column this benchmark does not know is NULL)."""
    moment = datetime.fromtimestamp(p.time.ToNanoseconds() / 1e9, UTC)
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "job_id": p.job_id, "step": p.step, "kind": int(p.kind), "attempt": p.attempt,
        "total_steps": p.total_steps, "epoch": p.epoch, "values": json.dumps(dict(p.values)),
        "time": moment.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite_style else moment,
        "stored_at": now.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite_style else now,
    }
    values.update((f.name, v) for f, v in p.ListFields() if f.name not in values and f.name != "time")
    return tuple(values.get(c) for c in columns)


# ---- the platform ------------------------------------------------------------------------------------


@dataclass
class Running:
    platform: Platform
    backend: Backend
    api_key: str
    nats_password: str
    fanout_jobs: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.platform.address

    @property
    def services_pid(self) -> int:
        assert self.platform.services is not None
        return self.platform.services.pid

    async def nats(self, name: str) -> NATS:
        return await connect(self.platform.nats_url, name, user=SERVICES_USER, password=self.nats_password)


def start_platform(backend: Backend, fanout_jobs: int) -> Running:
    # No calls-per-second limit (the unary load), no limit on open streams (--followers may pass it), no
    # limit on queued jobs (the fan-out's jobs never run).
    platform = Platform(PlatformConfig(data_dir=backend.data_dir, grpc_port=0, workers=0, env={
        "TUNEFORGE_API_CALLS_PER_SECOND": "0", "TUNEFORGE_API_STREAMS_PER_ORGANIZATION": "0",
        "TUNEFORGE_MAX_QUEUED_JOBS_PER_ORG": "0",
        **backend.platform_env}))
    started = time.monotonic()
    platform.start()
    try:
        service_token = secret_file(platform.data_dir, SERVICE_TOKEN_FILE).read_text().strip()
        with TuneForgeClient(platform.address, ORG, api_key=service_token) as service:
            key = service.create_api_key(f"bench-{uuid.uuid4().hex[:8]}", identity_pb2.ROLE_ADMIN).secret
        jobs: list[str] = []
        with TuneForgeClient(platform.address, ORG, api_key=key) as client:
            chat = backend.data_dir.parent / "chat.jsonl"
            chat.write_text("".join(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{2 * i}"}]}) + "\n" for i in range(120)))
            dataset = client.upload_dataset(chat, "bench-chat").dataset
            for i in range(fanout_jobs):
                jobs.append(client.create_job(job_pb2.JobSpec(base_model=BASE_MODEL, dataset=dataset.id),
                                              name=f"bench-{i}").id)
        assert platform.nats_auth is not None
        running = Running(platform, backend, key, platform.nats_auth.passwords[SERVICES_USER], jobs)
    except BaseException:
        platform.stop()
        raise
    say(f"[{backend.name}] platform at {platform.address} (services pid {running.services_pid}), "
        f"{fanout_jobs} jobs created, in {time.monotonic() - started:.1f} s")
    return running


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and of the processes it started (the metrics service's preparing ones)."""
    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


# ---- 1. ingest ---------------------------------------------------------------------------------------


@dataclass
class IngestRun:
    points_per_s: float
    cpu_ms_per_point: float = float("nan")
    complete: bool = True


def ingest_messages(job_id: str, messages: int, size: int, subject: str) -> tuple[
        list[tuple[str, str, bytes]], list[list[metrics_pb2.MetricPoint]]]:
    batches = [[point(job_id, m * size + i) for i in range(size)] for m in range(messages)]
    return [(subject, *report(b)) for b in batches], batches


# How often ingest_platform looks for the last point published, and how often it counts before it is seen.
INGEST_POLL_S, INGEST_COUNT_S = 0.002, 0.2


async def ingest_platform(run: Running, nc: NATS, messages: int, size: int, stall_s: float) -> IngestRun:
    """Points/s until every point is stored, or until no new one was for `stall_s` (then incomplete).

    Every INGEST_POLL_S it looks the last point published up in the primary key, and counts the job's
    points once that one is stored (messages may be stored out of order); until then it counts every
    INGEST_COUNT_S, to see progress. A count of 20,000 rows takes about 0.8 ms of this process' CPU, on
    the cores the platform runs on: counted every 10 ms, as before 2026-12-06, the polling took about 8% of
    a core, and the end was seen up to 10 ms late. The end is the moment the count that finds every point
    returns, read on its thread: the hop back to this event loop took up to 8 ms more under load."""
    job_id = f"bench-ingest-{uuid.uuid4().hex[:12]}"
    payloads, _ = ingest_messages(job_id, messages, size, subjects.worker_metrics(job_id))
    total = messages * size
    backend = run.backend
    conn = backend.connect()

    def count() -> tuple[int, float]:
        return backend.count(conn, [job_id]), time.perf_counter()

    try:
        cpu0, t0 = cpu_seconds(run.services_pid), time.perf_counter()
        publishing = asyncio.ensure_future(publish_all(nc, payloads))
        stored, progress_at, counted_at, last_seen = 0, t0, t0, False
        while stored < total and time.perf_counter() - progress_at < stall_s:
            await asyncio.sleep(INGEST_POLL_S)
            if not last_seen:
                last_seen = await asyncio.to_thread(backend.has_step, conn, job_id, total - 1)
            if not last_seen and time.perf_counter() - counted_at < INGEST_COUNT_S:
                continue
            counted_at = time.perf_counter()
            now_stored, counted = await asyncio.to_thread(count)
            if now_stored > stored:
                stored, progress_at = now_stored, counted
        # Stalled: the rate up to now, as before (and never a division by zero when nothing was stored).
        t1, cpu1 = progress_at if stored == total else time.perf_counter(), cpu_seconds(run.services_pid)
        await publishing
    finally:
        conn.close()
    return IngestRun(stored / (t1 - t0), (cpu1 - cpu0) * 1000 / max(stored, 1), stored == total)


async def ingest_raw_jetstream(nc: NATS, messages: int, size: int) -> IngestRun:
    """The same messages published from here to a stream of the same kind on the same nats-server, and
    pulled, decoded and acked in the ceiling server's process as the metrics service's consumer does
    (fetch 64, ack each); until that process says it has acked the last one."""
    job_id = f"bench-raw-{uuid.uuid4().hex[:12]}"
    subject = f"{RAW_PREFIX}.{job_id}"
    payloads, _ = ingest_messages(job_id, messages, size, subject)
    done = asyncio.Event()

    async def on_done(_msg: Msg) -> None:
        done.set()

    done_subject = nc.new_inbox()
    sub = await nc.subscribe(done_subject, cb=on_done)
    try:
        await nc.request(RAW_CONSUME, json.dumps({"subject": subject, "durable": f"raw-{job_id}",
                                                  "messages": messages, "done": done_subject}).encode(),
                         timeout=60)
        t0 = time.perf_counter()
        await publish_all(nc, payloads)
        await asyncio.wait_for(done.wait(), timeout=max(60.0, messages * size / 20))
        elapsed = time.perf_counter() - t0
    finally:
        await sub.unsubscribe()
    return IngestRun(messages * size / elapsed)


async def raw_consume(nc: NATS, request: Msg) -> None:
    """The ceiling server's side of `ingest_raw_jetstream`."""
    order = json.loads(request.data)
    js = nc.jetstream()
    sub = await js.pull_subscribe(order["subject"], durable=order["durable"], stream=RAW_STREAM)
    await request.respond(b"ready")
    got = 0
    while got < order["messages"]:
        try:
            batch = await sub.fetch(64, timeout=1.0)
        except Exception:
            continue
        for msg in batch:
            events_pb2.MetricsReported.FromString(msg.data)
            await msg.ack()
            got += 1
    await nc.publish(order["done"], b"")
    await sub.unsubscribe()
    await js.delete_consumer(RAW_STREAM, order["durable"])


def ingest_executemany(backend: Backend, messages: int, size: int, batch_rows: int) -> tuple[float, float]:
    """Plain executemany of the same rows (built beforehand) into the same table with the same upsert:
    points/s in transactions of `batch_rows` rows (the ceiling: however ingest groups its work, these rows
    cost this much to store), and in one transaction per message."""
    conn = backend.connect()
    try:
        columns = backend.columns(conn)
        quoted = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join(backend.placeholder for _ in columns)
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c not in KEY)
        sql = (f"insert into {TABLE} ({quoted}) values ({marks}) on conflict ({', '.join(KEY)}) do update "
               f"set {updates} where {TABLE}.attempt <= excluded.attempt")
        rates: list[float] = []
        for per_transaction in (batch_rows, size):
            job_id = f"bench-plain-{uuid.uuid4().hex[:12]}"
            _, batches = ingest_messages(job_id, messages, size, "")
            rows = [row_of(p, columns, backend.name == "sqlite") for batch in batches for p in batch]
            t0 = time.perf_counter()
            for start in range(0, len(rows), per_transaction):
                conn.cursor().executemany(sql, rows[start:start + per_transaction])
                conn.commit()
            rates.append(len(rows) / (time.perf_counter() - t0))
    finally:
        conn.close()
    return rates[0], rates[1]


async def bench_ingest(run: Running, args: argparse.Namespace, rows: list[Row]) -> None:
    nc = await run.nats("bench-ingest")
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=RAW_STREAM, subjects=[f"{RAW_PREFIX}.>"],
                                         retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                                         duplicate_window=600.0))
        for size, messages in ((1, args.ingest_messages_1), (100, args.ingest_messages_100)):
            platform_runs: list[IngestRun] = []
            raw_runs: list[IngestRun] = []
            plain_runs: list[float] = []
            per_message_runs: list[float] = []
            for _ in range(args.repeat):
                platform_runs.append(await ingest_platform(run, nc, messages, size, args.stall_seconds))
                raw_runs.append(await ingest_raw_jetstream(nc, messages, size))
                batched, per_message = await asyncio.to_thread(
                    ingest_executemany, run.backend, messages, size, args.executemany_rows)
                plain_runs.append(batched)
                per_message_runs.append(per_message)
            got = median([r.points_per_s for r in platform_runs])
            raw = median([r.points_per_s for r in raw_runs])
            plain, plain_per_message = median(plain_runs), median(per_message_runs)
            cpu = median([r.cpu_ms_per_point for r in platform_runs])
            complete = all(r.complete for r in platform_runs)
            b = run.backend.name
            say(f"[{b}] ingest {size} point(s)/message, {messages} messages: platform {got:,.0f} points/s "
                f"(runs {', '.join(f'{r.points_per_s:,.0f}' for r in platform_runs)}), "
                f"{cpu:.3f} ms services CPU/point; raw JetStream {raw:,.0f}; plain executemany {plain:,.0f} "
                f"({args.executemany_rows} rows a transaction; {plain_per_message:,.0f} with one a message)"
                + ("" if complete else f"; NOT every point was stored (a run stalled for "
                                         f"{args.stall_seconds:g} s)"))
            what = f"ingest {size} pt/msg"
            figure = f"{got:,.0f} pts/s"
            rows.append(Row(b, f"{what} vs raw JetStream", figure, f"{raw:,.0f}", ratio(got, raw)))
            vs_plain = Row(b, f"{what} vs executemany", figure, f"{plain:,.0f}", ratio(got, plain))
            if size == 100:
                vs_plain.target = f">= {INGEST_RATIO_TARGET:.0%}"
                vs_plain.passed = vs_plain.ratio >= INGEST_RATIO_TARGET
            rows.append(vs_plain)
            rows.append(Row(b, f"{what} services CPU", f"{cpu:.3f} ms/pt"))
            if size == 100 and b == "sqlite":
                rows.append(Row(b, f"{what} points/s", figure, target=f">= {INGEST_SQLITE_TARGET:,.0f}",
                                passed=got >= INGEST_SQLITE_TARGET))
            if not complete:
                rows.append(Row(b, f"{what} every point stored", "no", target="all", passed=False))
        await js.delete_stream(RAW_STREAM)
    finally:
        await nc.close()


# ---- 2. fan-out --------------------------------------------------------------------------------------


@dataclass
class FanoutRun:
    latencies_ms: list[float]
    streams: int
    bad_streams: int
    ready_s: float
    # CPU seconds of the serving process while the points were published and delivered, per point delivered
    # to one stream, in microseconds.
    cpu_us_per_delivery: float = float("nan")
    # The same of the follower processes together, per point received.
    client_cpu_us_per_delivery: float = float("nan")

    @property
    def exact(self) -> bool:
        return self.bad_streams == 0


async def store_hello(run: Running, nc: NATS, jobs: Sequence[str], step: int) -> None:
    """One stored point per job at `step`: what a follower replays first, which tells it is following."""
    await publish_all(nc, [(subjects.worker_metrics(j), *report([point(j, step)])) for j in jobs])
    conn = run.backend.connect()
    try:
        deadline = time.monotonic() + 120
        while await asyncio.to_thread(run.backend.count, conn, list(jobs), step) < len(jobs):
            if time.monotonic() > deadline:
                raise RuntimeError("the hello points were not stored within 2 minutes")
            await asyncio.sleep(0.02)
    finally:
        conn.close()


async def fanout_once(address: str, api_key: str, jobs: Sequence[str], followers: int, points: int,
                      base: int, args: argparse.Namespace, publish: Callable[[str, int], Awaitable[None]],
                      workdir: Path, server_pid: int) -> FanoutRun:
    """`followers` streams per job in client processes; once every one has replayed its hello point,
    `points` points in total at --fanout-rate, round robin over the jobs; then the clients' verdicts."""
    per_job = points // len(jobs)
    streams = [(job, base) for job in jobs for _ in range(followers)]
    procs = max(1, min(args.client_procs, len(streams)))
    shards = [streams[i::procs] for i in range(procs)]
    children: list[tuple[subprocess.Popen[str], Path]] = []
    timeout_s = per_job * len(jobs) / args.fanout_rate + 30
    for i, shard in enumerate(shards):
        out = workdir / f"followers-{uuid.uuid4().hex[:8]}-{i}.json"
        spec = workdir / f"{out.stem}.spec.json"
        spec.write_text(json.dumps({"address": address, "api_key": api_key, "streams": shard,
                                    "expected": per_job, "channels": args.channels, "timeout_s": timeout_s,
                                    "batch": args.batch}))
        children.append((spawn("_followers", str(spec), str(out)), out))
    t0 = time.monotonic()
    try:
        for child, _ in children:
            assert child.stdout is not None
            line = await asyncio.to_thread(child.stdout.readline)
            if not line.startswith("READY"):
                raise RuntimeError(f"a follower process did not get ready: {line.strip()!r}")
        ready_s = time.monotonic() - t0
        cpu0 = cpu_seconds(server_pid)
        start = time.monotonic()
        for n in range(per_job * len(jobs)):
            due = start + n / args.fanout_rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await publish(jobs[n % len(jobs)], base + 1 + n // len(jobs))
        latencies: list[float] = []
        bad = 0
        client_cpu = 0.0
        for child, _ in children:
            await asyncio.to_thread(child.wait, timeout_s + 30)
        cpu = cpu_seconds(server_pid) - cpu0
        for _, out in children:
            verdict = json.loads(out.read_text())
            latencies += verdict["latencies_ms"]
            bad += verdict["bad_streams"]
            client_cpu += verdict["cpu_s"]
            for line in verdict["problems"][:3]:
                say(f"    follower problem: {line}")
    finally:
        for child, _ in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    delivered = sum(1 for latency in latencies if math.isfinite(latency))
    return FanoutRun(latencies, len(streams), bad, ready_s, cpu * 1e6 / max(delivered, 1),
                     client_cpu * 1e6 / max(delivered, 1))


@dataclass
class MetricsApart:
    """`python -m services.metrics` on its own, as compose and Kubernetes run it, beside the platform: the
    same environment as the platform's services process (its database, NATS, data folder, service token),
    its own gRPC port, the platform's jobs service. The platform's metrics service holds the ingest lease
    (services.metrics.ingest): this one serves the API and the streams, hearing what is stored from NATS,
    as a second replica does."""

    process: subprocess.Popen[bytes]
    address: str
    log: Path

    @classmethod
    def start(cls, run: Running, workdir: Path) -> MetricsApart:
        environ = Path(f"/proc/{run.services_pid}/environ").read_bytes().decode(errors="replace")
        env = dict(item.split("=", 1) for item in environ.split("\0") if "=" in item)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env.pop("TUNEFORGE_METRICS_PORT", None)  # the platform's Prometheus port, if any
        env.update(TUNEFORGE_GRPC_HOST="127.0.0.1", TUNEFORGE_GRPC_PORT=str(port),
                   TUNEFORGE_JOBS_ADDRESS=run.address)
        log = workdir / f"metrics-apart-{run.backend.name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen([sys.executable, "-m", "services.metrics"], cwd=ROOT, env=env,
                                       stdout=sink, stderr=subprocess.STDOUT,
                                       preexec_fn=die_with_parent(signal.SIGTERM))
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(address) as channel:
            ready = grpc.channel_ready_future(channel)
            while not ready.done():
                if process.poll() is not None or time.monotonic() > deadline:
                    terminate(process, 0)
                    raise RuntimeError(f"the metrics service apart did not start: {log.read_text()[-2000:]}")
                with contextlib.suppress(grpc.FutureTimeoutError):
                    ready.result(timeout=0.5)
        say(f"[{run.backend.name}] metrics service apart at {address} (pid {process.pid})")
        return cls(process, address, log)

    def stop(self) -> None:
        terminate(self.process, 30)


async def bench_fanout(run: Running, args: argparse.Namespace, ceiling: CeilingServer, workdir: Path,
                       rows: list[Row]) -> None:
    nc = await run.nats("bench-fanout")
    js = nc.jetstream()

    async def to_platform(job: str, step: int) -> None:
        event_id, payload = report([point(job, step, stamped=True)])
        await js.publish(subjects.worker_metrics(job), payload, headers={"Nats-Msg-Id": event_id})

    async def to_ceiling(job: str, step: int) -> None:
        await nc.publish(f"{FANOUT_PREFIX}.{job}", report([point(job, step, stamped=True)])[1])

    scenarios = [("1 job", run.fanout_jobs[:1], args.followers),
                 (f"{args.fanout_jobs} jobs", run.fanout_jobs[:args.fanout_jobs], args.followers_per_job)]
    b = run.backend.name
    apart = MetricsApart.start(run, workdir) if args.metrics_apart else None
    try:
        round_ = 0
        for label, jobs, followers in scenarios:
            name = f"fan-out {label} x {followers}"
            platform_runs, bare_runs, apart_runs = [], [], []
            for _ in range(args.repeat):
                round_ += 1
                base = round_ * STEP_BASE
                await store_hello(run, nc, jobs, base)
                platform_runs.append(await fanout_once(run.address, run.api_key, jobs, followers,
                                                       args.fanout_points, base, args, to_platform, workdir,
                                                       run.services_pid))
                bare_runs.append(await fanout_once(ceiling.address, "", jobs, followers, args.fanout_points,
                                                   base, args, to_ceiling, workdir, ceiling.process.pid))
                if apart is not None:  # steps of its own: the platform's run stored its own
                    round_ += 1
                    base = round_ * STEP_BASE
                    await store_hello(run, nc, jobs, base)
                    apart_runs.append(await fanout_once(apart.address, run.api_key, jobs, followers,
                                                        args.fanout_points, base, args, to_platform, workdir,
                                                        apart.process.pid))
            p50 = median([percentile(r.latencies_ms, 0.5) for r in platform_runs])
            p99 = median([percentile(r.latencies_ms, 0.99) for r in platform_runs])
            c50 = median([percentile(r.latencies_ms, 0.5) for r in bare_runs])
            c99 = median([percentile(r.latencies_ms, 0.99) for r in bare_runs])
            exact = all(r.exact for r in platform_runs)
            ready = median([r.ready_s for r in platform_runs])
            cpu = median([r.cpu_us_per_delivery for r in platform_runs])
            bare_cpu = median([r.cpu_us_per_delivery for r in bare_runs])
            clients = median([r.client_cpu_us_per_delivery for r in platform_runs])
            bare_clients = median([r.client_cpu_us_per_delivery for r in bare_runs])
            say(f"[{b}] {name}, {args.fanout_points} points at {args.fanout_rate:g}/s: platform p50 "
                f"{p50:.1f} ms p99 {p99:.1f} ms (all streams following after {ready:.1f} s), {cpu:.1f} us "
                f"services CPU per point delivered to a stream; bare grpc.aio p50 {c50:.1f} ms p99 {c99:.1f} "
                f"ms, {bare_cpu:.1f} us; the follower processes' CPU per point received: {clients:.1f} us "
                f"(bare: {bare_clients:.1f} us)")
            say(f"[{b}] {name}: every follower got every point exactly once, in order: "
                f"{'PASS' if exact else 'FAIL'} (platform: "
                f"{', '.join(f'{r.bad_streams} of {r.streams} streams wrong' for r in platform_runs)}; "
                f"bare: {', '.join(f'{r.bad_streams} wrong' for r in bare_runs)})")
            rows.append(Row(b, f"{name} p50", f"{p50:.1f} ms", f"{c50:.1f}", ratio(c50, p50)))
            rows.append(Row(b, f"{name} p99", f"{p99:.1f} ms", f"{c99:.1f}", ratio(c99, p99),
                            f"<= {FANOUT_P99_TARGET_MS:g} ms", p99 <= FANOUT_P99_TARGET_MS))
            rows.append(Row(b, f"{name} exactly once, in order", "yes" if exact else "NO", target="all",
                            passed=exact))
            if apart_runs:
                a50 = median([percentile(r.latencies_ms, 0.5) for r in apart_runs])
                a99 = median([percentile(r.latencies_ms, 0.99) for r in apart_runs])
                apart_exact = all(r.exact for r in apart_runs)
                say(f"[{b}] {name}, metrics service apart: p50 {a50:.1f} ms p99 {a99:.1f} ms, "
                    f"{median([r.cpu_us_per_delivery for r in apart_runs]):.1f} us of its CPU per point "
                    f"delivered to a stream; every follower got every point exactly once, in order: "
                    f"{'PASS' if apart_exact else 'FAIL'} "
                    f"({', '.join(f'{r.bad_streams} of {r.streams} streams wrong' for r in apart_runs)})")
                rows.append(Row(b, f"{name} p50 (metrics apart)", f"{a50:.1f} ms", f"{c50:.1f}",
                                ratio(c50, a50)))
                rows.append(Row(b, f"{name} p99 (metrics apart)", f"{a99:.1f} ms", f"{c99:.1f}",
                                ratio(c99, a99), f"<= {FANOUT_P99_TARGET_MS:g} ms",
                                a99 <= FANOUT_P99_TARGET_MS))
                rows.append(Row(b, f"{name} exactly once (metrics apart)", "yes" if apart_exact else "NO",
                                target="all", passed=apart_exact))
    finally:
        if apart is not None:
            apart.stop()
        await nc.close()


def encoded(p: metrics_pb2.MetricPoint) -> tuple[bytes, bytes]:
    """`p` as StreamMetricsResponse field 1 (a whole message: `point`) and field 2 (one of `points`)."""
    data = p.SerializeToString()
    size, length = len(data), bytearray()
    while True:
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return b"\x0a" + bytes(length) + data, b"\x12" + bytes(length) + data


def terminate(process: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; returns once the process is reaped."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spawn(*args: str) -> subprocess.Popen[str]:
    """This script in a process of its own, in the role `args[0]`; its stdout is a pipe. It gets SIGTERM
    when the benchmark dies (call from the main thread)."""
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            preexec_fn=die_with_parent(signal.SIGTERM))


def points_of(message: metrics_service_pb2.StreamMetricsResponse) -> list[metrics_pb2.MetricPoint]:
    """The points of a StreamMetrics message: its `point`, or (where the API has them) its `points`."""
    if message.HasField("point"):
        return [message.point]
    return list(getattr(message, "points", ()))


async def followers_main(spec: dict[str, Any]) -> dict[str, Any]:
    """A follower process: opens the streams, says READY once each replayed its hello point, then records
    each point's latency (now - point.time) and checks each stream got base+1 .. base+expected once, in
    order."""
    expected: int = spec["expected"]
    batch: dict[str, Any] = {"batch": True} if spec.get("batch") else {}
    metadata = (("authorization", f"Bearer {spec['api_key']}"),) if spec["api_key"] else None
    channels = [grpc.aio.insecure_channel(spec["address"]) for _ in range(spec["channels"])]
    stubs = [metrics_service_pb2_grpc.MetricsServiceStub(c) for c in channels]
    ready = asyncio.Event()
    hello_left = len(spec["streams"])
    latencies: list[float] = []
    problems: list[str] = []

    def greeted() -> None:
        nonlocal hello_left
        hello_left -= 1
        if hello_left == 0:
            ready.set()

    async def follow(i: int, job: str, base: int) -> bool:
        call = stubs[i % len(stubs)].StreamMetrics(metrics_service_pb2.StreamMetricsRequest(
            organization=ORG, job_id=job, start_step=base, follow=True, **batch), metadata=metadata)
        steps: list[int] = []
        greeting = True
        try:
            first = await call.read()
            greeted()
            greeting = False
            hello = [] if first is grpc.aio.EOF else points_of(first)
            if [p.step for p in hello[:1]] != [base]:
                problems.append(f"stream {i} of {job}: no hello point first ({first})")
                return False
            while len(steps) < expected:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                now = time.time_ns()
                for p in points_of(message):
                    steps.append(p.step)
                    latencies.append((now - p.time.ToNanoseconds()) / 1e6)
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as exc:
            problems.append(f"stream {i} of {job}: {exc.code().name} {exc.details()}")
        finally:
            if greeting:
                greeted()
            call.cancel()
        # A point that never came counts as infinitely late: the percentiles are over every expected one.
        latencies.extend([math.inf] * max(0, expected - len(steps)))
        if steps != list(range(base + 1, base + 1 + expected)):
            ordered = len(set(steps)) == len(steps) and steps == sorted(steps)
            problems.append(f"stream {i} of {job}: got {len(steps)} of {expected} points"
                            + ("" if ordered else " (repeated or out of order)"))
            return False
        return True

    tasks = [asyncio.ensure_future(follow(i, job, base)) for i, (job, base) in enumerate(spec["streams"])]
    try:
        await asyncio.wait_for(ready.wait(), timeout=300)
        cpu0 = time.process_time()
        print("READY", flush=True)
    except TimeoutError:
        cpu0 = time.process_time()
        print(f"NOT READY after 300 s: {hello_left} streams got nothing", flush=True)
    done, pending = await asyncio.wait(tasks, timeout=spec["timeout_s"])
    cpu_s = time.process_time() - cpu0
    for task in pending:
        task.cancel()
    results = [t.result() if t in done else False for t in tasks]
    for task in pending:
        with contextlib.suppress(BaseException):
            await task
    for channel in channels:
        await channel.close()
    return {"latencies_ms": latencies, "bad_streams": results.count(False), "problems": problems,
            "cpu_s": cpu_s}


# ---- 3. unary ----------------------------------------------------------------------------------------


def unary_requests(run: Running) -> dict[str, Message]:
    spec = job_pb2.JobSpec(base_model=BASE_MODEL)
    return {
        "EstimateJob": estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec,
                                                                 tokens_per_epoch=2_000_000),
        "GetJob": job_service_pb2.GetJobRequest(organization=ORG, job=run.fanout_jobs[0]),
        "ListBaseModels": estimation_service_pb2.ListBaseModelsRequest(),
    }


def capture_responses(run: Running, requests: dict[str, Message]) -> dict[str, bytes]:
    """One real response of each method, as bytes (what the bare server answers)."""
    captured: dict[str, bytes] = {}
    with grpc.insecure_channel(run.address) as channel:
        for name, request in requests.items():
            call = channel.unary_unary(METHODS[name], request_serializer=serialize)
            captured[name] = call(request, metadata=(("authorization", f"Bearer {run.api_key}"),), timeout=60)
    return captured


@dataclass
class UnaryRun:
    rps: float
    latencies_ms: list[float]
    errors: int


async def unary_load(address: str, api_key: str, name: str, request: Message, concurrency: int,
                     seconds: float) -> UnaryRun:
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    channels = [grpc.aio.insecure_channel(address) for _ in range(min(concurrency, 4))]
    try:
        calls = [c.unary_unary(METHODS[name], request_serializer=serialize,
                               response_deserializer=RESPONSE_TYPES[name].FromString) for c in channels]
        await calls[0](request, metadata=metadata, timeout=60)  # connect first
        latencies: list[float] = []
        errors = 0
        stop = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            call = calls[i % len(calls)]
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    await call(request, metadata=metadata, timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return UnaryRun(len(latencies) / (time.perf_counter() - t0), latencies, errors)
    finally:
        for channel in channels:
            await channel.close()


async def bench_unary(run: Running, args: argparse.Namespace, ceiling: CeilingServer,
                      requests: dict[str, Message], rows: list[Row]) -> None:
    b = run.backend.name
    for concurrency in (1, 16):
        for name, request in requests.items():
            platform_runs, bare_runs = [], []
            for _ in range(args.repeat):
                platform_runs.append(await unary_load(run.address, run.api_key, name, request, concurrency,
                                                      args.unary_seconds))
                bare_runs.append(await unary_load(ceiling.address, run.api_key, name, request, concurrency,
                                                  args.unary_seconds))
            got, bare = median([r.rps for r in platform_runs]), median([r.rps for r in bare_runs])
            p50 = median([percentile(r.latencies_ms, 0.5) for r in platform_runs])
            p99 = median([percentile(r.latencies_ms, 0.99) for r in platform_runs])
            c50 = median([percentile(r.latencies_ms, 0.5) for r in bare_runs])
            c99 = median([percentile(r.latencies_ms, 0.99) for r in bare_runs])
            errors = sum(r.errors for r in platform_runs)
            say(f"[{b}] {name} at concurrency {concurrency}: platform {got:,.0f} req/s p50 {p50:.2f} ms "
                f"p99 {p99:.2f} ms; bare grpc.aio {bare:,.0f} req/s p50 {c50:.2f} ms p99 {c99:.2f} ms; "
                f"ratio {ratio(got, bare):.1%}" + (f"; {errors} failed calls" if errors else ""))
            row = Row(b, f"{name} c={concurrency} (p50/p99 {p50:.1f}/{p99:.1f} ms)", f"{got:,.0f} req/s",
                      f"{bare:,.0f}", ratio(got, bare))
            if concurrency == 16:
                row.target, row.passed = f">= {UNARY_TARGETS[name]:.0%}", row.ratio >= UNARY_TARGETS[name]
            rows.append(row)
            if errors:
                rows.append(Row(b, f"{name} c={concurrency} calls succeed", f"{errors} failed", target="all",
                                passed=False))


# ---- the ceiling server ------------------------------------------------------------------------------


@dataclass
class CeilingServer:
    """The bare grpc.aio server (a process of its own): the captured bytes for the unary methods, and a
    fan-out of what arrives on core NATS `bench.fanout.<job>` to that job's StreamMetrics calls."""

    process: subprocess.Popen[str]
    address: str

    @classmethod
    def start(cls, run: Running, responses: dict[str, bytes], workdir: Path) -> CeilingServer:
        spec = workdir / "ceiling.json"
        spec.write_text(json.dumps({"nats_url": run.platform.nats_url, "nats_password": run.nats_password,
                                    "responses": {k: base64.b64encode(v).decode() for k, v in
                                                  responses.items()}}))
        spec.chmod(0o600)
        process = spawn("_ceiling", str(spec))
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("ADDRESS "):
            process.kill()
            raise RuntimeError(f"the ceiling server did not start: {line!r}")
        return cls(process, line.split()[1])

    def stop(self) -> None:
        terminate(self.process, 10)


async def ceiling_main(spec: dict[str, Any]) -> None:
    responses = {k: base64.b64decode(v) for k, v in spec["responses"].items()}
    followers: dict[str, list[asyncio.Queue[tuple[bytes, bytes]]]] = {}

    def unary(name: str) -> grpc.RpcMethodHandler:
        payload = responses[name]

        async def handle(_request: Message, _context: grpc.aio.ServicerContext) -> bytes:
            return payload

        decode = REQUEST_TYPES[name].FromString
        return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=decode)

    async def stream_metrics(request: metrics_service_pb2.StreamMetricsRequest,
                             _context: grpc.aio.ServicerContext) -> Any:
        # Each queued point is a StreamMetricsResponse's field 1 (`point`) or 2 (`points`, with `batch`):
        # one message's bytes, or one part of a batch's.
        batch = bool(getattr(request, "batch", False))
        queue: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        followers.setdefault(request.job_id, []).append(queue)
        try:
            hello = metrics_pb2.MetricPoint(job_id=request.job_id, kind=metrics_pb2.METRIC_KIND_TRAIN,
                                            step=request.start_step)
            yield encoded(hello)[1 if batch else 0]
            while True:
                first = await queue.get()
                if not batch:
                    yield first[0]
                    continue
                parts = [first[1]]
                while not queue.empty():
                    parts.append(queue.get_nowait()[1])
                yield b"".join(parts)
        finally:
            followers[request.job_id].remove(queue)

    async def on_points(msg: Msg) -> None:
        job = msg.subject.rsplit(".", 1)[1]
        queues = followers.get(job, [])
        for p in events_pb2.MetricsReported.FromString(msg.data).points:
            data = encoded(p)
            for queue in queues:
                queue.put_nowait(data)

    handlers = [
        grpc.method_handlers_generic_handler("tuneforge.v1.EstimationService", {
            "EstimateJob": unary("EstimateJob"), "ListBaseModels": unary("ListBaseModels")}),
        grpc.method_handlers_generic_handler("tuneforge.v1.JobService", {"GetJob": unary("GetJob")}),
        grpc.method_handlers_generic_handler("tuneforge.v1.MetricsService", {
            "StreamMetrics": grpc.unary_stream_rpc_method_handler(
                stream_metrics, request_deserializer=metrics_service_pb2.StreamMetricsRequest.FromString)}),
    ]
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    nc = await connect(spec["nats_url"], "bench-ceiling", user=SERVICES_USER, password=spec["nats_password"])
    await nc.subscribe(f"{FANOUT_PREFIX}.*", cb=on_points)
    consuming: set[asyncio.Task[None]] = set()

    async def on_consume(msg: Msg) -> None:
        task = asyncio.ensure_future(raw_consume(nc, msg))
        consuming.add(task)
        task.add_done_callback(consuming.discard)

    await nc.subscribe(RAW_CONSUME, cb=on_consume)
    await nc.flush()
    print(f"ADDRESS 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await nc.close()
    await server.stop(0)


# ---- summary -----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary: a figure, its ceiling and their ratio, and the target it must meet."""

    backend: str
    what: str
    figure: str
    ceiling: str = ""
    ratio: float = float("nan")
    target: str = ""
    passed: bool | None = None  # None: no target

    @property
    def result(self) -> str:
        return "" if self.passed is None else "PASS" if self.passed else "FAIL"


def print_summary(rows: Sequence[Row]) -> bool:
    header = ("backend", "measure", "figure", "ceiling", "ratio", "target", "result")
    table = [header] + [(r.backend, r.what, r.figure, r.ceiling,
                         "" if r.ratio != r.ratio else f"{r.ratio:.1%}", r.target, r.result) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    say("")
    say("SUMMARY (medians of --repeat alternating runs; ratio = platform / ceiling, for latency ceiling / "
        "platform)")
    for i, line in enumerate(table):
        say("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            say("  ".join("-" * w for w in widths))
    failed = [r for r in rows if r.passed is False]
    say(f"targets: {sum(r.passed is True for r in rows)} PASS, {len(failed)} FAIL")
    return not failed


# ---- main --------------------------------------------------------------------------------------------


async def bench_backend(backend: Backend, args: argparse.Namespace, workdir: Path, rows: list[Row]) -> None:
    # From the main thread: the platform's children die with the thread that started them.
    run = start_platform(backend, max(1, args.fanout_jobs))
    ceiling: CeilingServer | None = None
    try:
        requests = unary_requests(run)
        responses = await asyncio.to_thread(capture_responses, run, requests)
        say(f"[{backend.name}] captured responses: " + ", ".join(f"{k} {len(v):,} bytes"
                                                                for k, v in responses.items()))
        ceiling = CeilingServer.start(run, responses, workdir)
        if "ingest" in args.only:
            await bench_ingest(run, args, rows)
        if "fanout" in args.only:
            await bench_fanout(run, args, ceiling, workdir, rows)
        if "unary" in args.only:
            await bench_unary(run, args, ceiling, requests, rows)
    finally:
        if ceiling is not None:
            ceiling.stop()
        await asyncio.to_thread(run.platform.stop)


QUICK = {"ingest_messages_1": 300, "ingest_messages_100": 30, "followers": 100, "fanout_jobs": 10,
         "followers_per_job": 10, "fanout_points": 60, "unary_seconds": 0.3}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about 2 minutes")
    p.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    p.add_argument("--only", default="ingest,fanout,unary", help="comma-separated: ingest, fanout, unary")
    p.add_argument("--repeat", type=int, default=3, help="alternating runs of each measurement (median)")
    p.add_argument("--ingest-messages-1", type=int, default=2000, help="messages of 1 point")
    p.add_argument("--ingest-messages-100", type=int, default=200, help="messages of 100 points")
    p.add_argument("--executemany-rows", type=int, default=1000,
                   help="rows per transaction of the plain executemany ceiling")
    p.add_argument("--stall-seconds", type=float, default=30.0,
                   help="an ingest run that stores nothing new for this long ends, counted incomplete")
    p.add_argument("--followers", type=int, default=1000, help="followers of the one-job fan-out")
    p.add_argument("--fanout-jobs", type=int, default=100, help="jobs of the many-jobs fan-out")
    p.add_argument("--followers-per-job", type=int, default=10, help="followers of each of --fanout-jobs")
    p.add_argument("--fanout-points", type=int, default=500, help="points per fan-out run (all jobs)")
    p.add_argument("--fanout-rate", type=float, default=50.0, help="points/s during fan-out (all jobs)")
    p.add_argument("--batch", action="store_true",
                   help="followers ask for several points a message (StreamMetricsRequest.batch); the bare "
                   "server then sends what waits for a stream in one message too")
    p.add_argument("--metrics-apart", action="store_true",
                   help="also measure each fan-out against `python -m services.metrics` on its own (as "
                   "compose and Kubernetes run it), beside the platform's all-in-one services process")
    p.add_argument("--client-procs", type=int, default=2, help="follower processes")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels per follower process")
    p.add_argument("--unary-seconds", type=float, default=3.0, help="seconds per unary run")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--workdir", type=Path, default=None, help="keep the platforms' data here")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in p._actions}
        for name, value in QUICK.items():
            if getattr(args, name) == defaults[name]:
                setattr(args, name, value)
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    args.fanout_points = max(args.fanout_points, args.fanout_jobs)
    return args


async def main_async(args: argparse.Namespace, workdir: Path) -> bool:
    rows: list[Row] = []
    say(f"control-plane benchmark: repeat {args.repeat}; ingest {args.ingest_messages_1} x 1 point and "
        f"{args.ingest_messages_100} x 100 points; fan-out 1 job x {args.followers} and {args.fanout_jobs} "
        f"jobs x {args.followers_per_job}, {args.fanout_points} points at {args.fanout_rate:g}/s; unary "
        f"{args.unary_seconds:g} s per run; {os.cpu_count()} CPUs")
    with backends([b.strip() for b in args.backends.split(",") if b.strip()], workdir) as found:
        for backend in found:
            await bench_backend(backend, args, workdir, rows)
    return print_summary(rows)


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task waits: each coroutine of its await chain (Task.print_stack shows the outermost only)."""
    lines: list[str] = []
    step: Any = task.get_coro()
    while step is not None:
        frame = getattr(step, "cr_frame", None) or getattr(step, "gi_frame", None)
        if frame is not None:
            lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        following = getattr(step, "cr_await", None) or getattr(step, "gi_yieldfrom", None)
        if following is None and step is not task.get_coro():
            lines.append(f"    awaits {step!r}"[:300])
        step = following
    return f"task {task.get_name()}:\n" + "\n".join(lines)


def interrupted(signum: int, frame: Any) -> None:
    say(f"stopped by signal {signum}; where it was:")
    with contextlib.suppress(RuntimeError):  # no event loop running
        for task in asyncio.all_tasks(asyncio.get_running_loop()):
            say(awaiting(task))
    faulthandler.dump_traceback(sys.stdout, all_threads=True)
    raise KeyboardInterrupt


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "_followers":  # spec file, verdict file
        verdict = asyncio.run(followers_main(json.loads(Path(argv[1]).read_text())))
        Path(argv[2]).write_text(json.dumps(verdict))
        return 0
    if argv and argv[0] == "_ceiling":  # spec file
        asyncio.run(ceiling_main(json.loads(Path(argv[1]).read_text())))
        return 0
    args = parse_args(argv)
    # SIGTERM stops the run as Ctrl-C does (the platforms stop and the PostgreSQL schema is dropped), after
    # it printed where each task and thread was: a run that hangs says where.
    signal.signal(signal.SIGTERM, interrupted)
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ok = asyncio.run(main_async(args, workdir.resolve()))
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
