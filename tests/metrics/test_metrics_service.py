"""MetricsService through real gRPC stubs, with points published to JetStream as a worker publishes them."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tuneforge.v1 import job_pb2, metrics_pb2, metrics_service_pb2

from tests.metrics.conftest import EVAL, ORG, SYSTEM, TRAIN, Stack, point, wait_until
from trainer_worker.reporting import log_sequence
from tuneforge_core import subjects
from tuneforge_core.ids import new_id


def error_details(exc: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """(ErrorInfo.reason, BadRequest field names) of an error status."""
    status = rpc_status.from_call(exc)
    assert status is not None, "the error carries no google.rpc.Status"
    reason, fields = "", []
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return reason, fields


def keys(points: list[metrics_pb2.MetricPoint]) -> list[tuple[int, int]]:
    return [(p.step, p.kind) for p in points]


def stream_request(job_id: str, *, follow: bool = True, kinds: tuple[int, ...] = (),
                   start_step: int = 0) -> metrics_service_pb2.StreamMetricsRequest:
    return metrics_service_pb2.StreamMetricsRequest(organization=ORG, job_id=job_id, follow=follow,
                                                    kinds=kinds, start_step=start_step)


async def test_replay_then_follow_until_the_job_ends(stack: Stack) -> None:
    job = stack.jobs.add()
    await stack.report(job.id, [point(1), point(2), point(3)])
    assert len(await stack.wait_stored(job.id, 3)) == 3

    received: list[metrics_pb2.MetricPoint] = []
    task = stack.collect(stream_request(job.id), received)
    await wait_until(lambda: len(received) == 3)
    assert keys(received) == [(1, TRAIN), (2, TRAIN), (3, TRAIN)]

    await stack.report(job.id, [point(4), point(5), point(5, EVAL, loss=0.5)])
    await wait_until(lambda: len(received) == 6)
    # A redelivered report (another event id, same attempt) is stored again but not streamed twice.
    await stack.report(job.id, [point(4), point(5)])
    # The last points may land after the state change: the grace period still forwards them.
    await stack.change_state(job, job_pb2.JOB_STATE_SUCCEEDED)
    await stack.report(job.id, [point(6)])
    await asyncio.wait_for(task, 10)

    assert keys(received) == [(1, TRAIN), (2, TRAIN), (3, TRAIN), (4, TRAIN), (5, TRAIN), (5, EVAL),
                              (6, TRAIN)]
    assert received[5].eval_loss == 0 and received[5].loss == 0.5 and received[5].job_id == job.id


async def test_follow_false_ends_after_the_replay(stack: Stack) -> None:
    job = stack.jobs.add()
    await stack.report(job.id, [point(step) for step in range(1, 6)])
    await stack.wait_stored(job.id, 5)
    responses = [r async for r in stack.metrics.StreamMetrics(stream_request(job.id, follow=False))]
    assert [r.point.step for r in responses] == [1, 2, 3, 4, 5]
    # start_step replays from there on.
    responses = [r async for r in stack.metrics.StreamMetrics(stream_request(job.id, follow=False,
                                                                             start_step=4))]
    assert [r.point.step for r in responses] == [4, 5]


async def test_stream_of_a_long_finished_job_ends_at_once(stack: Stack) -> None:
    job = stack.jobs.add(state=job_pb2.JOB_STATE_FAILED)
    job.end_time.FromSeconds(1_700_000_000)
    await stack.report(job.id, [point(1)])
    await stack.wait_stored(job.id, 1)
    start = asyncio.get_running_loop().time()
    responses = [r async for r in stack.metrics.StreamMetrics(stream_request(job.id))]
    assert [r.point.step for r in responses] == [1]
    assert asyncio.get_running_loop().time() - start < 0.5  # no grace wait for a job long over


async def test_stream_ends_after_job_changed_to_a_final_state(stack: Stack) -> None:
    job = stack.jobs.add(state=job_pb2.JOB_STATE_QUEUED)
    received: list[metrics_pb2.MetricPoint] = []
    task = stack.collect(stream_request(job.id), received)
    await asyncio.sleep(0.3)
    await stack.change_state(job, job_pb2.JOB_STATE_RUNNING)  # not final: the stream goes on
    await asyncio.sleep(0.8)
    assert not task.done()
    await stack.change_state(job, job_pb2.JOB_STATE_CANCELLED)
    await asyncio.wait_for(task, 5)
    assert received == []


async def test_redelivered_points_replace_instead_of_duplicating(stack: Stack) -> None:
    job = stack.jobs.add()
    first = await stack.report(job.id, [point(1, loss=1.0), point(2, loss=2.0)])
    await stack.report(job.id, [point(1, loss=1.0), point(2, loss=2.0)], event_id=first)  # same event again
    # The job was redelivered to another worker, which repeats the steps with other values.
    await stack.report(job.id, [point(1, loss=1.5, attempt=2), point(2, loss=2.5, attempt=2)])
    # A late redelivery of the first attempt does not overwrite the newer attempt's point; the marker
    # point (step 3) is stored last by the single ingest consumer, so once it is there all is applied.
    await stack.report(job.id, [point(2, loss=9.0, attempt=1), point(3, loss=3.0, attempt=1)])
    stored = await stack.wait_stored(job.id, 3)
    assert [(p.step, p.loss, p.attempt) for p in stored] == [(1, 1.5, 2), (2, 2.5, 2), (3, 3.0, 1)]


async def test_unknown_job_is_not_found_and_bad_requests_name_the_field(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stack.metrics.StreamMetrics(stream_request("job_missing")):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(caught.value)[0] == "NOT_FOUND"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.metrics.ListMetrics(metrics_service_pb2.ListMetricsRequest(organization=ORG,
                                                                               job_id="job_missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # The jobs service's INVALID_ARGUMENT comes through with its code and field (renamed to ours).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.metrics.ListMetrics(metrics_service_pb2.ListMetricsRequest(organization=ORG,
                                                                               job_id="BAD!"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["job_id"])

    # A job of another organization does not exist for this one.
    other = stack.jobs.add(organization="other")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stack.metrics.StreamMetrics(stream_request(other.id, follow=False)):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stack.metrics.StreamMetrics(metrics_service_pb2.StreamMetricsRequest(
                organization=ORG, kinds=[99], start_step=-1)):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(caught.value) == ("INVALID_ARGUMENT", ["job_id", "kinds[0]", "start_step"])


async def test_kinds_filter(stack: Stack) -> None:
    job = stack.jobs.add()
    await stack.report(job.id, [point(10), point(10, EVAL), point(10, SYSTEM), point(20), point(20, EVAL)])
    await stack.wait_stored(job.id, 5)
    received: list[metrics_pb2.MetricPoint] = []
    task = stack.collect(stream_request(job.id, kinds=(EVAL,)), received)
    await wait_until(lambda: len(received) == 2)
    await stack.report(job.id, [point(30), point(30, EVAL), point(30, SYSTEM)])
    await stack.wait_stored(job.id, 8)
    await stack.change_state(job, job_pb2.JOB_STATE_SUCCEEDED)
    await asyncio.wait_for(task, 5)
    assert keys(received) == [(10, EVAL), (20, EVAL), (30, EVAL)]

    listed = await stack.list_all(job.id, kinds=(TRAIN, SYSTEM))
    assert keys(listed) == [(10, TRAIN), (10, SYSTEM), (20, TRAIN), (30, TRAIN), (30, SYSTEM)]


async def test_list_metrics_pages(stack: Stack) -> None:
    job = stack.jobs.add()
    await stack.report(job.id, [point(step) for step in range(25)])
    await stack.wait_stored(job.id, 25)
    steps, token, pages = [], "", 0
    while True:
        response = await stack.metrics.ListMetrics(metrics_service_pb2.ListMetricsRequest(
            organization=ORG, job_id=job.id, page_size=10, page_token=token))
        steps += [p.step for p in response.points]
        pages += 1
        token = response.next_page_token
        if not token:
            break
        # A token is bound to its query.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.metrics.ListMetrics(metrics_service_pb2.ListMetricsRequest(
                organization=ORG, job_id=job.id, kinds=[EVAL], page_token=token))
        assert error_details(caught.value)[0] == "INVALID_PAGE_TOKEN"
    assert steps == list(range(25)) and pages == 3


async def test_points_published_while_streams_start_are_seen_exactly_once(stack: Stack) -> None:
    """Streams opened at different moments of a steady flow of reports each see every point once:
    nothing falls between the database read and the live subscription, nothing comes twice."""
    job = stack.jobs.add()
    batches = 60
    expected = [(step, kind) for step in range(batches) for kind in (TRAIN, EVAL, SYSTEM)]
    streams: list[list[metrics_pb2.MetricPoint]] = [[] for _ in range(4)]
    tasks: list[asyncio.Task[object]] = []

    for step in range(batches):
        await stack.report(job.id, [point(step, kind) for kind in (TRAIN, EVAL, SYSTEM)])
        if step % 15 == 5:
            tasks.append(stack.collect(stream_request(job.id), streams[len(tasks)]))
        await asyncio.sleep(0.005)
    await stack.wait_stored(job.id, len(expected))
    await stack.change_state(job, job_pb2.JOB_STATE_SUCCEEDED)
    await asyncio.wait_for(asyncio.gather(*tasks), 15)
    assert len(tasks) == 4
    for received in streams:
        assert len(received) == len(expected)
        assert sorted(keys(received)) == sorted(expected)


async def test_undecodable_message_is_dropped_and_ingest_goes_on(stack: Stack) -> None:
    job = stack.jobs.add()
    await stack.js.publish(subjects.worker_metrics(job.id), b"\xff\xffnot a protobuf",
                           headers={"Nats-Msg-Id": new_id("evt")})
    await stack.report(job.id, [point(1)])
    assert keys(await stack.wait_stored(job.id, 1)) == [(1, TRAIN)]


async def test_client_cancel_unsubscribes(stack: Stack) -> None:
    job = stack.jobs.add()
    nc = stack.component.runtime.nc

    def live_subscriptions() -> int:
        return sum(job.id in sub.subject for sub in list(nc._subs.values()))

    received: list[metrics_pb2.MetricPoint] = []
    task = stack.collect(stream_request(job.id), received)
    await wait_until(lambda: live_subscriptions() == 3)  # points stored and reported, job events
    task.cancel()
    await wait_until(lambda: live_subscriptions() == 0)


async def test_stream_logs_replays_follows_and_filters(stack: Stack) -> None:
    job = stack.jobs.add()
    info, warning = metrics_pb2.LOG_LEVEL_INFO, metrics_pb2.LOG_LEVEL_WARNING
    error = metrics_pb2.LOG_LEVEL_ERROR
    worker, training = metrics_pb2.LOG_SOURCE_WORKER, metrics_pb2.LOG_SOURCE_TRAINING

    def entry(seq: int, level: int, source: int = training, attempt: int = 1) -> metrics_pb2.LogEntry:
        return metrics_pb2.LogEntry(sequence=seq, level=level, source=source, attempt=attempt,
                                    message=f"line {seq}")

    await stack.report_logs(job.id, [entry(1, info, worker), entry(2, warning), entry(3, info)])
    await stack.report_logs(job.id, [entry(2, warning)])  # a repeat does not duplicate
    await asyncio.sleep(0.3)
    everything = [r.entry.sequence async for r in stack.metrics.StreamLogs(
        metrics_service_pb2.StreamLogsRequest(organization=ORG, job_id=job.id))]
    assert everything == [1, 2, 3]

    received: list[metrics_pb2.LogEntry] = []

    async def follow() -> None:
        async for response in stack.metrics.StreamLogs(metrics_service_pb2.StreamLogsRequest(
                organization=ORG, job_id=job.id, min_level=warning, sources=[training], follow=True)):
            received.append(response.entry)

    task = asyncio.create_task(follow())
    stack.tasks.append(task)  # type: ignore[arg-type]
    await wait_until(lambda: len(received) == 1)
    await stack.report_logs(job.id, [entry(4, error), entry(5, info), entry(6, error, worker),
                                     entry(1, error, attempt=2)])
    await stack.change_state(job, job_pb2.JOB_STATE_FAILED)
    await asyncio.wait_for(task, 5)
    assert [(e.attempt, e.sequence) for e in received] == [(1, 2), (1, 4), (2, 1)]
    assert received[1].message == "line 4" and received[1].job_id == job.id


async def test_a_resumed_attempt_never_takes_a_live_stream_backwards(stack: Stack) -> None:
    """Attempt 1 reached step 567; attempt 2 resumes from the checkpoint of step 400 and repeats 401..567.
    A follower's series only moves forward; the store keeps the newest attempt's point per step."""
    job = stack.jobs.add()
    await stack.report(job.id, [point(step, loss=1.0) for step in (1, 400, 401, 500, 567)]
                       + [point(400, SYSTEM), point(567, SYSTEM)])
    await stack.wait_stored(job.id, 7)
    received: list[metrics_pb2.MetricPoint] = []
    task = stack.collect(stream_request(job.id), received)
    await wait_until(lambda: len(received) == 7)

    await stack.report(job.id, [point(step, loss=2.0, attempt=2) for step in (401, 500, 567, 568, 600)]
                       + [point(401, SYSTEM, attempt=2), point(600, SYSTEM, attempt=2)])
    await stack.report(job.id, [point(601, loss=2.0, attempt=2)])
    await wait_until(lambda: len(received) == 11)
    await stack.change_state(job, job_pb2.JOB_STATE_SUCCEEDED)
    await asyncio.wait_for(task, 10)

    for kind in (TRAIN, SYSTEM):
        steps = [p.step for p in received if p.kind == kind]
        assert steps == sorted(set(steps)), f"kind {kind} went backwards or repeated: {steps}"
    assert [(p.step, p.attempt) for p in received if p.kind == TRAIN][-3:] == [(568, 2), (600, 2), (601, 2)]
    assert [(p.step, p.attempt) for p in received if p.kind == SYSTEM] == [(400, 1), (567, 1), (600, 2)]
    stored = {(p.step, p.kind): p for p in await stack.list_all(job.id)}
    assert (stored[(401, TRAIN)].attempt, stored[(401, TRAIN)].loss) == (2, 2.0), "the newest attempt wins"
    assert stored[(400, TRAIN)].attempt == 1

    # A stream opened afterwards replays the stored series once, in step order.
    replayed = [r.point async for r in stack.metrics.StreamMetrics(stream_request(job.id, kinds=(TRAIN,)))]
    assert [(p.step, p.attempt) for p in replayed] == [(1, 1), (400, 1), (401, 2), (500, 2), (567, 2),
                                                       (568, 2), (600, 2), (601, 2)]


async def test_log_sequences_of_later_attempts_follow_earlier_ones(stack: Stack) -> None:
    """A worker numbers lines (attempt << 32) + n, so a job's log is one increasing sequence."""
    job = stack.jobs.add()

    def entry(attempt: int, n: int) -> metrics_pb2.LogEntry:
        return metrics_pb2.LogEntry(sequence=log_sequence(attempt, n), attempt=attempt,
                                    level=metrics_pb2.LOG_LEVEL_INFO, source=metrics_pb2.LOG_SOURCE_WORKER,
                                    message=f"attempt {attempt} line {n}")

    await stack.report_logs(job.id, [entry(2, 1), entry(2, 2)])  # the later attempt's lines land first
    await stack.report_logs(job.id, [entry(1, 1), entry(1, 2), entry(1, 3)])
    await asyncio.sleep(0.3)
    await stack.change_state(job, job_pb2.JOB_STATE_SUCCEEDED)
    streamed = [r.entry async for r in stack.metrics.StreamLogs(
        metrics_service_pb2.StreamLogsRequest(organization=ORG, job_id=job.id))]
    assert [(e.attempt, e.message) for e in streamed] == [
        (1, "attempt 1 line 1"), (1, "attempt 1 line 2"), (1, "attempt 1 line 3"),
        (2, "attempt 2 line 1"), (2, "attempt 2 line 2")]
    sequences = [e.sequence for e in streamed]
    assert sequences == sorted(sequences) and len(set(sequences)) == 5
