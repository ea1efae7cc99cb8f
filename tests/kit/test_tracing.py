"""Traces cross the outbox and NATS: the traceparent of the span that wrote an event is kept with its outbox
row (SQLite and PostgreSQL), the relay publishes it in a child span whose context goes out in the message's
headers, and a consumer continues that trace; server calls get a span, log lines get the ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select
from tuneforge.v1 import job_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.models import JobOutbox
from services.kit.consumer import consume
from services.kit.db import Database
from services.kit.interceptors import TracingInterceptor
from services.kit.outbox import OutboxRelay, add_event
from tuneforge_core import logs, subjects, tracing
from tuneforge_core.nats import connect, ensure_streams, publish

_EXPORTER = InMemorySpanExporter()
_installed = False


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process' tracer provider (an SDK one, set once) exporting into memory, emptied per test."""
    global _installed
    if not _installed:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            trace.set_tracer_provider(TracerProvider())
            provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        _installed = True
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def _hex(span_id: int) -> str:
    return trace.format_span_id(span_id)


def _traceparent_ids(traceparent: str) -> tuple[str, str]:
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


def _migrated(url: str) -> Database:
    db = Database(url, "jobs")
    db.migrate(MIGRATIONS)
    return db


def _store_and_read(db: Database) -> tuple[str | None, str | None, str]:
    """Writes one event inside a span and one outside; returns both rows' traceparents and the span's."""
    with tracing.span("CreateJob") as current, db.session() as session:
        add_event(session, JobOutbox, subjects.job_events("job_a"), job_pb2.Job(id="job_a"), "evt_a")
        expected = tracing.current_traceparent()
    with db.session() as session:
        add_event(session, JobOutbox, subjects.job_events("job_b"), job_pb2.Job(id="job_b"), "evt_b")
    with db.session() as session:
        rows = dict(session.execute(select(JobOutbox.event_id, JobOutbox.traceparent)).tuples().all())
    assert expected is not None and current.get_span_context().is_valid
    return rows["evt_a"], rows["evt_b"], expected


def test_the_outbox_row_keeps_the_writers_traceparent_on_sqlite(spans: InMemorySpanExporter,
                                                                 tmp_path: Path) -> None:
    db = _migrated(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        inside, outside, expected = _store_and_read(db)
    finally:
        db.dispose()
    assert inside == expected
    assert outside is None  # no span: nothing to continue


@pytest.mark.postgres
def test_the_outbox_row_keeps_the_writers_traceparent_on_postgresql(spans: InMemorySpanExporter,
                                                                     postgres_url: str) -> None:
    db = _migrated(postgres_url)
    try:
        inside, outside, expected = _store_and_read(db)
    finally:
        db.dispose()
    assert inside == expected and outside is None


async def test_the_trace_goes_from_the_row_through_the_nats_headers_to_the_consumer(
        spans: InMemorySpanExporter, tmp_path: Path, nats_url: str) -> None:
    db = _migrated(f"sqlite:///{tmp_path / 'jobs.db'}")
    nc = await connect(nats_url, name="test-tracing")
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=1)
        with tracing.span("CreateJob") as create, db.session() as session:
            add_event(session, JobOutbox, subjects.job_events("job_t"), job_pb2.Job(id="job_t"), "evt_t")
        create_ctx = create.get_span_context()
        relay = OutboxRelay(db, js, JobOutbox)
        assert await relay.relay_once() == 1

        # The message on the stream carries a traceparent of the same trace, naming the publish span.
        raw = await js.get_last_msg(subjects.STREAM_EVENTS, subjects.job_events("job_t"))
        headers = raw.headers or {}
        assert headers.get("Nats-Msg-Id") == "evt_t"
        trace_id, parent_id = _traceparent_ids(headers[tracing.TRACEPARENT])
        assert trace_id == trace.format_trace_id(create_ctx.trace_id)
        publish = next(s for s in spans.get_finished_spans() if s.name.startswith("outbox publish"))
        assert publish.kind is SpanKind.PRODUCER
        assert publish.parent is not None and publish.parent.span_id == create_ctx.span_id
        assert publish.context is not None and _hex(publish.context.span_id) == parent_id

        # A consumer's span continues that trace, and is current while its handler runs.
        seen: list[tuple[str, str] | None] = []
        handled = asyncio.Event()

        async def handler(msg: Msg) -> None:
            seen.append(tracing.ids())
            handled.set()

        task = asyncio.create_task(consume(js, stream=subjects.STREAM_EVENTS, durable="tracing-test",
                                           subject=subjects.job_events("job_t"), handler=handler))
        try:
            await asyncio.wait_for(handled.wait(), 30)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        consumed = next(s for s in spans.get_finished_spans() if s.name.startswith("consume "))
        assert consumed.kind is SpanKind.CONSUMER and consumed.context is not None
        assert (consumed.attributes or {})["messaging.consumer.group.name"] == "tracing-test"
        assert consumed.parent is not None and _hex(consumed.parent.span_id) == parent_id
        assert seen == [(trace_id, _hex(consumed.context.span_id))]
    finally:
        await nc.close()
        db.dispose()


async def test_a_row_written_without_a_span_is_published_without_a_traceparent(
        spans: InMemorySpanExporter, tmp_path: Path, nats_url: str) -> None:
    db = _migrated(f"sqlite:///{tmp_path / 'jobs.db'}")
    nc = await connect(nats_url, name="test-tracing")
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=1)
        with db.session() as session:
            add_event(session, JobOutbox, subjects.job_events("job_u"), job_pb2.Job(id="job_u"), "evt_u")
        assert await OutboxRelay(db, js, JobOutbox).relay_once() == 1
        raw = await js.get_last_msg(subjects.STREAM_EVENTS, subjects.job_events("job_u"))
        assert tracing.TRACEPARENT not in (raw.headers or {})
        assert spans.get_finished_spans() == ()
    finally:
        await nc.close()
        db.dispose()


async def test_every_call_gets_a_server_span_continuing_the_callers_trace(
        spans: InMemorySpanExporter) -> None:
    server = grpc.aio.server(interceptors=[TracingInterceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with tracing.span("client") as client:
            traceparent = tracing.current_traceparent()
        assert traceparent is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), metadata=((tracing.TRACEPARENT, traceparent),))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    finally:
        await server.stop(None)
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    calls = [s for s in spans.get_finished_spans() if s.name == "grpc.health.v1.Health/Check"]
    assert len(calls) == 2 and all(s.kind is SpanKind.SERVER for s in calls)
    ok, failed = calls
    client_ctx = client.get_span_context()
    assert ok.context is not None and ok.context.trace_id == client_ctx.trace_id
    assert ok.parent is not None and ok.parent.span_id == client_ctx.span_id
    assert (ok.attributes or {})["rpc.grpc.status_code"] == 0 and ok.status.is_ok
    assert failed.parent is None  # no traceparent sent: a trace of its own
    assert (failed.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not failed.status.is_ok


async def test_what_is_published_detached_starts_no_span_in_the_trace(
        spans: InMemorySpanExporter, nats_url: str) -> None:
    nc = await connect(nats_url, name="test-tracing")
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=1)
        with tracing.span("assignment"):
            await publish(js, subjects.worker_status("job_d"), b"traced", "evt_d1")
            traced = await js.get_last_msg(subjects.STREAM_WORKER, subjects.worker_status("job_d"))
            with tracing.detached():
                await publish(js, subjects.worker_status("job_d"), b"progress", "evt_d2")
            detached = await js.get_last_msg(subjects.STREAM_WORKER, subjects.worker_status("job_d"))
            assert tracing.ids() is not None  # the span is current again after the block
    finally:
        await nc.close()
    assert tracing.TRACEPARENT in (traced.headers or {})
    assert tracing.TRACEPARENT not in (detached.headers or {})


def test_json_log_lines_carry_the_trace_and_span_ids_while_a_span_records(
        spans: InMemorySpanExporter) -> None:
    out = io.StringIO()
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler := logs.handler("json", stream=out))
    logger.setLevel(logging.INFO)
    try:
        with tracing.span("work"):
            logger.info("inside")
            expected = tracing.ids()
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert expected is not None
    assert (inside["trace_id"], inside["span_id"]) == expected
    assert "trace_id" not in outside and "span_id" not in outside


def test_the_json_lines_exporter_writes_one_object_per_span(tmp_path: Path) -> None:
    provider = TracerProvider()  # its own provider: the process' global one is left alone
    path = tmp_path / "spans" / "trace.jsonl"
    provider.add_span_processor(SimpleSpanProcessor(tracing.JsonLinesExporter(path)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("parent"), tracer.start_as_current_span("child", attributes={"n": 1}):
        pass
    provider.shutdown()
    child, parent = (json.loads(line) for line in path.read_text().splitlines())
    assert (child["name"], parent["name"]) == ("child", "parent")
    assert child["trace_id"] == parent["trace_id"] and child["parent_span_id"] == parent["span_id"]
    assert parent["parent_span_id"] == "" and child["attributes"] == {"n": 1}
    assert child["kind"] == "INTERNAL" and child["end_time_ns"] >= child["start_time_ns"]


def test_a_tracing_setting_it_does_not_know_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="TUNEFORGE_TRACING"):
        tracing.configure("jaeger", service_name="x")
    with pytest.raises(ValueError, match="TUNEFORGE_TRACING_FILE"):
        tracing.configure("file", "", service_name="x")
