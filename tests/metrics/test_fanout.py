"""Live fan-out: many followers of a job share one subscription, each gets every point exactly once and in
order, a slow follower neither blocks the others nor loses anything (it catches up from storage), and
the shared subscription goes with the last follower.

The manager-level tests drive the real MetricsManager, FanoutHub and SQLite with the in-memory feed of
test_manager (the interleavings are then exact); the gRPC ones run the served stack of conftest (real
nats-server, JetStream ingest, SQLite).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Generic, TypeVar

import grpc.aio
import pytest
from sqlalchemy import text
from tuneforge.v1 import job_pb2, metrics_pb2, metrics_service_pb2, metrics_service_pb2_grpc

from services.kit.db import Database
from services.metrics.component import MIGRATIONS_DIR
from services.metrics.fanout import Chunk, Follower, _Topic, live_item, varint
from services.metrics.manager import MetricsManager
from services.metrics.servicer import RESUMED, _batched
from services.metrics.settings import MetricsSettings
from tests.auth import service_credentials
from tests.metrics.conftest import ORG, TRAIN, Stack, point, wait_until
from tests.metrics.test_manager import DictJobs, MemoryFeed
from tuneforge_core.errors import NotFound

Point = metrics_pb2.MetricPoint
I = TypeVar("I")  # noqa: E741
RUNNING, SUCCEEDED = job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_SUCCEEDED


def make_manager(tmp_path: Path, url: str = "",
                 **settings: float) -> tuple[MetricsManager, DictJobs, MemoryFeed]:
    db = Database(url or f"sqlite:///{tmp_path / 'metrics.db'}", "metrics")
    db.migrate(MIGRATIONS_DIR)
    jobs, feed = DictJobs(), MemoryFeed()
    values: dict[str, float] = {"follow_grace_s": 0.1, "job_poll_interval_s": 0.2, **settings}
    manager = MetricsManager(db, jobs, feed, MetricsSettings.model_validate(values))
    jobs.jobs["job_a"] = job_pb2.Job(id="job_a", organization=ORG, state=RUNNING)
    return manager, jobs, feed


def steps_of(chunks: list[Chunk[Point]]) -> list[int]:
    return [shared.item.step for chunk in chunks for shared in chunk.items]


async def finish(manager: MetricsManager, jobs: DictJobs, feed: MemoryFeed) -> None:
    """Ends job_a as the jobs service would: the state, then JobChanged on its events subject."""
    from tuneforge.events.v1 import events_pb2

    from tuneforge_core import subjects

    jobs.jobs["job_a"] = job_pb2.Job(id="job_a", organization=ORG, state=SUCCEEDED)
    await feed.publish(subjects.job_events("job_a"),
                       events_pb2.JobChanged(job=jobs.jobs["job_a"]).SerializeToString())


class Reader(Generic[I]):
    """Reads a chunk stream in the background, one chunk at a time while `go` is set."""

    def __init__(self, stream: AsyncGenerator[Chunk[I], None]) -> None:
        self.chunks: list[Chunk[I]] = []
        self.go = asyncio.Event()
        self.go.set()
        self.task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: AsyncGenerator[Chunk[I], None]) -> None:
        async with aclosing(stream):
            async for chunk in stream:
                self.chunks.append(chunk)
                await self.go.wait()

    @property
    def items(self) -> list[I]:
        return [shared.item for chunk in self.chunks for shared in chunk.items]

    @property
    def steps(self) -> list[int]:
        return [getattr(item, "step") for item in self.items]  # noqa: B009


# ---- the wire form --------------------------------------------------------------------------------------

def test_frames_are_the_responses_protobuf_would_write() -> None:
    points = [point(1), point(300, loss=0.25), point(2**40)]
    response = metrics_service_pb2.StreamMetricsResponse
    for p in points:
        assert live_item(p, ()).framed == response(point=p).SerializeToString()
        assert live_item(p, ()).repeated == response(points=[p]).SerializeToString()
    for n in (1, 127, 128, 300, 2**35):
        # start_step is field 4, a varint: its encoding is one tag byte, then the varint.
        assert varint(n) == metrics_service_pb2.StreamMetricsRequest(start_step=n).SerializeToString()[1:]
    assert varint(0) == b"\x00"
    chunk = Chunk([live_item(p, ()) for p in points], resumed=True)
    (batched,) = list(_batched(chunk))
    parsed = metrics_service_pb2.StreamMetricsResponse.FromString(batched)
    assert list(parsed.points) == points and parsed.resumed_from_storage and not parsed.HasField("point")
    single = metrics_service_pb2.StreamMetricsResponse.FromString(chunk.items[0].framed + RESUMED)
    assert single.point == points[0] and single.resumed_from_storage
    entry = metrics_pb2.LogEntry(sequence=7, message="héllo")
    batched_logs = b"".join(_batched(Chunk([live_item(entry, ())] * 3)))
    logs = metrics_service_pb2.StreamLogsResponse.FromString(batched_logs)
    assert list(logs.entries) == [entry] * 3 and not logs.resumed_from_storage


def test_batches_respect_the_message_limits() -> None:
    from services.metrics import servicer
    items = [live_item(point(step), ()) for step in range(2500)]
    messages = list(_batched(Chunk(items)))
    assert len(messages) == 3 and all(len(m) <= servicer.BATCH_MAX_BYTES for m in messages)
    steps = [p.step for m in messages for p in metrics_service_pb2.StreamMetricsResponse.FromString(m).points]
    assert steps == list(range(2500))


# ---- manager level (exact interleavings) ----------------------------------------------------------------

async def test_many_followers_share_one_subscription_and_each_get_every_point_once(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path)
    await manager.record_metrics("job_a", [point(step) for step in range(5)])
    readers = [Reader(manager.stream_metric_chunks(ORG, "job_a", [], 0, True)) for _ in range(50)]
    await wait_until(lambda: all(r.steps == list(range(5)) for r in readers))
    # One subscription for the stored points, one for the worker's reports (early delivery) and one for
    # the job's events, whoever follows.
    assert len(feed.subscribers) == 3 and manager.hub.subscriptions() == 2
    for step in range(5, 40):
        await manager.record_metrics("job_a", [point(step)])
    await finish(manager, jobs, feed)
    await asyncio.wait_for(asyncio.gather(*(r.task for r in readers)), 5)
    assert all(r.steps == list(range(40)) for r in readers)
    # The same bytes went to every stream: each live point was serialized once.
    live = [{id(s.framed) for s in r.chunks[-1].items} for r in readers]
    assert all(ids == live[0] for ids in live)
    assert feed.subscribers == [] and manager.hub.subscriptions() == 0


async def test_each_point_is_handed_to_the_followers_in_the_order_they_joined(tmp_path: Path) -> None:
    """Join order, whoever leaves in between (a set's order, by address, made 1,000 followers' latency worse:
    see _Topic.followers)."""
    offered: list[int] = []

    def follower(n: int) -> Follower[Point]:
        def matches(_key: tuple[int, ...]) -> bool:
            offered.append(n)
            return True

        return Follower(matches, lambda key: (key[0], key[1]), capacity=10)

    topic = _Topic("live.job_a", lambda data: [Point.FromString(data)], lambda p: (p.step, int(p.kind)))
    joined = [follower(n) for n in range(200)]
    for f in joined:
        topic.followers[f] = None
    for f in joined[50:100]:
        del topic.followers[f]
    topic.followers[joined[60]] = None  # joins again: last
    topic.dispatch(point(1).SerializeToString())
    assert offered == [*range(50), *range(100, 200), 60]
    assert [len(f.buffer) for f in joined] == [1] * 50 + [0] * 10 + [1] + [0] * 39 + [1] * 100


async def test_a_slow_follower_blocks_no_one_and_catches_up_from_storage(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path, follower_buffer=5)
    fast = Reader(manager.stream_metric_chunks(ORG, "job_a", [], 0, True))
    slow = Reader(manager.stream_metric_chunks(ORG, "job_a", [], 0, True))
    await manager.record_metrics("job_a", [point(0)])
    await wait_until(lambda: fast.steps == [0] and slow.steps == [0])
    slow.go.clear()  # stops reading

    for step in range(1, 60):
        await manager.record_metrics("job_a", [point(step)])
        await asyncio.sleep(0)
    await wait_until(lambda: fast.steps == list(range(60)))
    follower = next(f for f in manager.hub.topics["tuneforge.live.metrics.job_a"].followers
                    if f.lagged)
    assert follower.dropped_from is not None and len(follower.buffer) == 0, "dropped, not held"
    assert slow.steps in ([0], [0, 1])  # what it read before it stopped

    slow.go.set()
    await wait_until(lambda: slow.steps == list(range(60)))
    assert sum(chunk.resumed for chunk in slow.chunks) == 1
    assert not any(chunk.resumed for chunk in fast.chunks)
    # Back on the live feed, exactly once.
    for step in range(60, 70):
        await manager.record_metrics("job_a", [point(step)])
    await finish(manager, jobs, feed)
    await asyncio.wait_for(asyncio.gather(fast.task, slow.task), 5)
    assert fast.steps == slow.steps == list(range(70))


async def test_points_arriving_during_the_replay_are_sent_exactly_once(tmp_path: Path) -> None:
    """A long replay (many pages) while points keep arriving, with a buffer so small that the follower
    also falls behind during the replay: every point once, in order."""
    await _replay_while_points_arrive(tmp_path)


async def test_replay_while_points_arrive_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    await _replay_while_points_arrive(tmp_path, postgres_url)


async def _replay_while_points_arrive(tmp_path: Path, url: str = "") -> None:
    for buffer in (1000, 3):
        (tmp_path / str(buffer)).mkdir()
        manager, jobs, feed = make_manager(tmp_path / str(buffer), url, replay_batch=7,
                                           follower_buffer=buffer)
        if url:  # one schema for both rounds: start from an empty table
            await manager.db.run(lambda s: s.execute(text("delete from metrics_points")))
        await manager.record_metrics("job_a", [point(step) for step in range(50)])
        next_step = 50
        chunks: list[Chunk[Point]] = []
        async with aclosing(manager.stream_metric_chunks(ORG, "job_a", [], 0, True)) as stream:
            async for chunk in stream:
                chunks.append(chunk)
                if next_step < 120:  # two points committed and announced per chunk read
                    await manager.record_metrics("job_a", [point(next_step)])
                    await manager.record_metrics("job_a", [point(next_step + 1)])
                    next_step += 2
                elif steps_of(chunks)[-1:] == [119]:
                    await finish(manager, jobs, feed)
        assert steps_of(chunks) == list(range(120)), f"buffer {buffer}"
        assert feed.subscribers == []


async def test_logs_fan_out_and_catch_up_too(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path, follower_buffer=2)

    def entry(seq: int) -> metrics_pb2.LogEntry:
        return metrics_pb2.LogEntry(sequence=seq, attempt=1, level=metrics_pb2.LOG_LEVEL_INFO,
                                    source=metrics_pb2.LOG_SOURCE_TRAINING, message=f"line {seq}")

    streams = [manager.stream_log_chunks(ORG, "job_a", 0, [], True) for _ in range(2)]
    readers = [Reader(s) for s in streams]
    await manager.record_logs("job_a", [entry(1)])
    await wait_until(lambda: all(len(r.chunks) == 1 for r in readers))
    readers[1].go.clear()
    for seq in range(2, 30):
        await manager.record_logs("job_a", [entry(seq)])
    readers[1].go.set()
    await finish(manager, jobs, feed)
    await asyncio.wait_for(asyncio.gather(*(r.task for r in readers)), 5)
    for reader in readers:
        assert [entry.sequence for entry in reader.items] == list(range(1, 30))
    assert any(chunk.resumed for chunk in readers[1].chunks)


async def test_the_job_state_is_polled_once_per_job_not_per_follower(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path, job_poll_interval_s=0.1)
    readers = [Reader(manager.stream_metric_chunks(ORG, "job_a", [], 0, True)) for _ in range(20)]
    await wait_until(lambda: manager.hub.subscriptions() == 2)
    before = jobs.calls
    await asyncio.sleep(1.0)
    polls = jobs.calls - before
    assert 1 <= polls <= 15, polls  # about 10 for all 20 followers, not 200
    # A lost JobChanged: the shared poll ends every stream (after the grace), as each stream's poll did.
    jobs.jobs["job_a"] = job_pb2.Job(id="job_a", organization=ORG, state=SUCCEEDED)
    await asyncio.wait_for(asyncio.gather(*(r.task for r in readers)), 5)
    assert feed.subscribers == []


async def test_followers_of_a_job_that_goes_away_end_with_its_error(tmp_path: Path) -> None:
    """The shared poll finds the job gone (DeleteJob): every stream ends with NOT_FOUND, as each stream's
    own poll ended it before."""
    manager, jobs, feed = make_manager(tmp_path, job_poll_interval_s=0.1)
    readers = [Reader(manager.stream_metric_chunks(ORG, "job_a", [], 0, True)) for _ in range(3)]
    await wait_until(lambda: manager.hub.subscriptions() == 2)
    del jobs.jobs["job_a"]
    for reader in readers:
        with pytest.raises(NotFound):
            await asyncio.wait_for(reader.task, 5)
    assert feed.subscribers == [] and manager.hub.subscriptions() == 0


async def test_a_follower_of_a_long_finished_job_ends_at_once_beside_running_ones(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path, follow_grace_s=30.0)
    done = job_pb2.Job(id="job_b", organization=ORG, state=SUCCEEDED)
    done.end_time.FromSeconds(1)
    jobs.jobs["job_b"] = done
    await manager.record_metrics("job_b", [point(1), point(2)])
    running = Reader(manager.stream_metric_chunks(ORG, "job_a", [], 0, True))
    ended = [p.step async for p in manager.stream_metrics(ORG, "job_b", [], 0, True)]
    assert ended == [1, 2]
    assert not running.task.done()
    running.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running.task
    assert feed.subscribers == []


# ---- over gRPC ------------------------------------------------------------------------------------------

def request(job_id: str, batch: bool = False) -> metrics_service_pb2.StreamMetricsRequest:
    return metrics_service_pb2.StreamMetricsRequest(organization=ORG, job_id=job_id, follow=True, batch=batch)


def live_subscriptions(stack: Stack, job_id: str) -> int:
    nc = stack.component.runtime.nc
    return sum(job_id in sub.subject for sub in list(nc._subs.values()))


async def test_many_grpc_followers_one_subscription_every_point_once_in_order(stack: Stack) -> None:
    job = stack.jobs.add()
    received: list[list[Point]] = [[] for _ in range(30)]
    flags: list[int] = [0] * 30

    async def follow(i: int) -> None:
        async for response in stack.metrics.StreamMetrics(request(job.id, batch=i % 2 == 1)):
            received[i].extend(response.points if i % 2 else [response.point])
            flags[i] += response.resumed_from_storage

    await stack.report(job.id, [point(0)])
    await stack.wait_stored(job.id, 1)
    tasks = [asyncio.create_task(follow(i)) for i in range(30)]
    stack.tasks.extend(tasks)
    await wait_until(lambda: all(len(r) == 1 for r in received))
    # Stored points, the worker's reports of them (early delivery) and job events, shared by all 30.
    assert live_subscriptions(stack, job.id) == 3
    for step in range(1, 100, 3):
        await stack.report(job.id, [point(s) for s in range(step, step + 3)])
    await stack.wait_stored(job.id, 100)
    await stack.change_state(job, SUCCEEDED)
    await asyncio.wait_for(asyncio.gather(*tasks), 15)
    for r in received:
        assert [(p.step, p.kind) for p in r] == [(s, TRAIN) for s in range(100)]
    assert flags == [0] * 30
    assert live_subscriptions(stack, job.id) == 0


async def test_a_stalled_grpc_client_neither_blocks_others_nor_loses_points(stack: Stack) -> None:
    """A client that stops reading: the others keep receiving; once it reads again it gets every point
    once, in order, and is told that it caught up from storage."""
    stack.component.manager.hub.capacity = 4
    job = stack.jobs.add()
    big = {f"k{i:03d}": float(i) for i in range(100)}  # about 2 KB a point

    def heavy(step: int) -> Point:
        p = point(step)
        p.values.update(big)
        return p

    # A channel whose flow-control window stays at its initial 64 KiB (no BDP probing): a client that
    # stops reading stops the server's writes after a few dozen points.
    channel = grpc.aio.insecure_channel(stack.component.runtime.address, interceptors=service_credentials(),
                                        options=[("grpc.http2.bdp_probe", 0)])
    slow_call = metrics_service_pb2_grpc.MetricsServiceStub(channel).StreamMetrics(request(job.id))
    fast: list[Point] = []
    fast_task = stack.collect(request(job.id), fast)
    await stack.report(job.id, [heavy(0)])
    first = await asyncio.wait_for(slow_call.read(), 10)
    assert first.point.step == 0
    total = 400
    for step in range(1, total, 10):
        await stack.report(job.id, [heavy(s) for s in range(step, min(step + 10, total))])
    await wait_until(lambda: len(fast) == total, timeout_s=60)  # while the slow client reads nothing
    follower = next(iter(f for f in stack.component.manager.hub.topics[
        f"tuneforge.live.metrics.{job.id}"].followers if f.lagged), None)
    assert follower is not None, "the stalled stream fell behind"

    slow: list[Point] = [first.point]
    resumed = 0
    while len(slow) < total:
        response = await asyncio.wait_for(slow_call.read(), 30)
        assert response is not grpc.aio.EOF
        slow.append(response.point)
        resumed += response.resumed_from_storage
    assert [p.step for p in slow] == list(range(total)) == [p.step for p in fast]
    assert resumed >= 1  # once per time it fell behind (the writes it could make went on meanwhile)
    await stack.change_state(job, SUCCEEDED)
    await asyncio.wait_for(fast_task, 10)
    assert await asyncio.wait_for(slow_call.read(), 10) is grpc.aio.EOF
    await channel.close()


async def test_the_shared_subscription_goes_with_the_last_follower(stack: Stack) -> None:
    job = stack.jobs.add()
    hub = stack.component.manager.hub
    metrics = [stack.collect(request(job.id), []) for _ in range(4)]

    async def follow_logs() -> None:
        async for _ in stack.metrics.StreamLogs(metrics_service_pb2.StreamLogsRequest(
                organization=ORG, job_id=job.id, follow=True)):
            pass

    logs = asyncio.create_task(follow_logs())
    stack.tasks.append(logs)
    # Metrics and logs, stored and reported (early delivery), and job events.
    await wait_until(lambda: live_subscriptions(stack, job.id) == 5)
    for task in metrics[:3]:
        task.cancel()
    await asyncio.sleep(0.3)
    assert live_subscriptions(stack, job.id) == 5
    metrics[3].cancel()
    await wait_until(lambda: live_subscriptions(stack, job.id) == 3)  # logs (both) and job events
    logs.cancel()
    await wait_until(lambda: live_subscriptions(stack, job.id) == 0 and hub.subscriptions() == 0)
