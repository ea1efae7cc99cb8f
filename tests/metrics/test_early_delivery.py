"""Early delivery: a stream following a job gets the items of a worker's report as the worker publishes it,
before the ingest has stored them, and still gets every item exactly once and in order (see the module doc
of services.metrics.fanout).

Reports are published on the in-memory feed of test_manager as a worker publishes them (the core NATS
copy of a JetStream publish), and stored with `record_metrics_batch`, as the ingest consumer does once it
fetched them: the interleavings of the two are exact. The served stack's tests (test_fanout and
test_metrics_service) run the same path against a real nats-server and JetStream ingest.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import metrics_pb2

from services.metrics import fanout
from services.metrics.manager import MetricsManager
from tests.metrics.conftest import ORG, point, wait_until
from tests.metrics.test_fanout import Reader, finish, make_manager
from tests.metrics.test_manager import MemoryFeed
from tuneforge_core import subjects

Report = tuple[str, bytes]
TOPIC = "tuneforge.live.metrics.job_a"


def reported(*steps: int, job: str = "job_a", named: str = "") -> Report:
    """A worker's MetricsReported of `steps` on `job`'s subject (its points naming `named`, if given)."""
    points = [point(step) for step in steps]
    for p in points:
        p.job_id = named
    return subjects.worker_metrics(job), events_pb2.MetricsReported(
        event_id=f"report-{steps[0]}", points=points).SerializeToString()


async def store(manager: MetricsManager, *reports: Report) -> None:
    """What the ingest does with reports it fetched: one transaction, then the announcement."""
    refused, _ = await manager.record_metrics_batch(list(reports))
    assert not refused


async def stored_steps(manager: MetricsManager) -> list[int]:
    points, _ = await manager.list_metrics(ORG, "job_a", [], 100, "")
    return [p.step for p in points]


def follow(manager: MetricsManager) -> Reader[metrics_pb2.MetricPoint]:
    return Reader(manager.stream_metric_chunks(ORG, "job_a", [], 0, True))


async def following(manager: MetricsManager, followers: int, topic_name: str = TOPIC) -> None:
    """Until `followers` streams are subscribed (the live feed, the reports and the job's events)."""
    def ready() -> bool:
        topic, watch = manager.hub.topics.get(topic_name), manager.hub.watches.get("job_a")
        return (topic is not None and topic.ready.done() and len(topic.followers) == followers
                and watch is not None and watch.ready.done())
    await wait_until(ready)


async def promoted(manager: MetricsManager, feed: MemoryFeed) -> Reader[metrics_pb2.MetricPoint]:
    """A follower on the early feed: step 0 reported, then stored (its announcement promotes it)."""
    reader = follow(manager)
    await following(manager, 1)
    await feed.publish(*reported(0))
    await store(manager, reported(0))
    await wait_until(lambda: reader.steps == [0])
    return reader


async def test_a_reported_point_reaches_its_followers_before_it_is_stored(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path)
    reader = follow(manager)
    await following(manager, 1)
    first = reported(0)
    await feed.publish(*first)
    await asyncio.sleep(0.05)
    # A new follower takes stored items only (its replay and the announcements cover them exactly)...
    assert reader.steps == []
    await store(manager, first)
    await wait_until(lambda: reader.steps == [0])
    # ...until an announcement settles an item that was handed out early: from then on it takes reports as
    # they are published.
    second = reported(1, 2)
    await feed.publish(*second)
    await wait_until(lambda: reader.steps == [0, 1, 2])
    assert await stored_steps(manager) == [0], "shown before it is stored"
    await store(manager, second)  # its announcement sends nothing twice
    assert await stored_steps(manager) == [0, 1, 2]
    await finish(manager, jobs, feed)
    await asyncio.wait_for(reader.task, 5)
    assert reader.steps == [0, 1, 2]


async def test_a_follower_joining_while_reports_wait_to_be_stored_gets_each_once_in_order(
        tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path)
    early = follow(manager)
    await following(manager, 1)
    r0, r1, r2, r3, r4 = (reported(step) for step in range(5))
    await feed.publish(*r0)
    await store(manager, r0)
    await feed.publish(*r1)
    await feed.publish(*r2)
    await wait_until(lambda: early.steps == [0, 1, 2])

    late = follow(manager)  # 1 and 2 are neither stored (its replay) nor announced (its live feed) yet
    await following(manager, 2)
    await wait_until(lambda: late.steps == [0])
    await feed.publish(*r3)
    await wait_until(lambda: early.steps == [0, 1, 2, 3])
    assert late.steps == [0]
    # 1's announcement: `late` takes it as stored, then is offered what is still waiting (2, 3), in order,
    # and takes reports as published from then on.
    await store(manager, r1)
    await wait_until(lambda: late.steps == [0, 1, 2, 3])
    await feed.publish(*r4)
    await wait_until(lambda: late.steps == early.steps == [0, 1, 2, 3, 4])
    await store(manager, r2, r3, r4)
    await finish(manager, jobs, feed)
    await asyncio.wait_for(asyncio.gather(early.task, late.task), 5)
    assert early.steps == late.steps == [0, 1, 2, 3, 4]


async def test_a_report_the_ingest_would_refuse_or_skip_is_not_handed_out(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path)
    reader = await promoted(manager, feed)
    subject = subjects.worker_metrics("job_a")
    await feed.publish(*reported(1, named="job_b"))  # points of another job on this job's subject
    await feed.publish(subject, b"\xff\xff not a MetricsReported")
    skipped = metrics_pb2.MetricPoint(kind=metrics_pb2.MetricKind.Value("METRIC_KIND_TRAIN"), step=-1)
    await feed.publish(subject, events_pb2.MetricsReported(points=[skipped]).SerializeToString())
    await feed.publish(*reported(2))
    await wait_until(lambda: reader.steps == [0, 2])
    await asyncio.sleep(0.05)
    assert reader.steps == [0, 2]
    assert manager.hub.topics[TOPIC].pending_keys == {(2, metrics_pb2.METRIC_KIND_TRAIN): 1}
    await finish(manager, jobs, feed)
    await asyncio.wait_for(reader.task, 5)


async def test_a_slow_follower_on_reports_catches_up_from_storage_exactly(tmp_path: Path) -> None:
    """Reports are stored three behind their publishing while a follower stops reading: it drops back to
    stored items, replays what is stored, is promoted again, and gets every point once, in order."""
    manager, jobs, feed = make_manager(tmp_path, follower_buffer=5)
    fast, slow = follow(manager), follow(manager)
    await following(manager, 2)
    reports = [reported(step) for step in range(80)]
    await feed.publish(*reports[0])
    await store(manager, reports[0])
    await wait_until(lambda: fast.steps == [0] and slow.steps == [0])
    slow.go.clear()  # stops reading
    for step in range(1, 60):
        await feed.publish(*reports[step])
        if step >= 3:
            await store(manager, reports[step - 3])
        await asyncio.sleep(0)
    await wait_until(lambda: fast.steps == list(range(60)))
    topic = manager.hub.topics[TOPIC]
    assert any(f.lagged for f in topic.followers), "the slow one fell behind"

    slow.go.set()
    for step in range(60, 80):
        await feed.publish(*reports[step])
        await store(manager, reports[step - 3])
        await asyncio.sleep(0)
    await store(manager, *reports[77:80])
    await wait_until(lambda: slow.steps == list(range(80)))
    assert sum(chunk.resumed for chunk in slow.chunks) >= 1
    await finish(manager, jobs, feed)
    await asyncio.wait_for(asyncio.gather(fast.task, slow.task), 5)
    assert fast.steps == slow.steps == list(range(80))
    assert not topic.pending and not topic.pending_keys


async def test_a_forgotten_early_point_announced_after_all_is_not_sent_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager, jobs, feed = make_manager(tmp_path)
    early = await promoted(manager, feed)
    monkeypatch.setattr(fanout, "EARLY_TTL_S", 0.0)  # its announcement is "never" coming
    await feed.publish(*reported(1))
    await wait_until(lambda: early.steps == [0, 1])
    await feed.publish(*reported(2))  # forgets 1
    await wait_until(lambda: early.steps == [0, 1, 2])
    late = follow(manager)
    await following(manager, 2)
    await store(manager, reported(1), reported(2))  # announced to everyone: 2 was forgotten too
    await wait_until(lambda: late.steps == [0, 1, 2])
    await finish(manager, jobs, feed)
    await asyncio.wait_for(asyncio.gather(early.task, late.task), 5)
    assert early.steps == late.steps == [0, 1, 2]


async def test_without_live_from_reports_streams_get_stored_points_only(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path, live_from_reports=False)
    reader = follow(manager)
    await following(manager, 1)
    assert len(feed.subscribers) == 2  # stored points and job events: no reports
    for step in range(3):
        await feed.publish(*reported(step))
        await asyncio.sleep(0.02)
        assert reader.steps == list(range(step)), "not before it is stored"
        await store(manager, reported(step))
        await wait_until(lambda: reader.steps == list(range(step + 1)))  # noqa: B023
    await finish(manager, jobs, feed)
    await asyncio.wait_for(reader.task, 5)
    assert reader.steps == [0, 1, 2]


async def test_log_lines_are_handed_out_early_too(tmp_path: Path) -> None:
    manager, jobs, feed = make_manager(tmp_path)
    reader = Reader(manager.stream_log_chunks(ORG, "job_a", 0, [], True))
    await following(manager, 1, "tuneforge.live.logs.job_a")

    def logs(sequence: int) -> Report:
        entry = metrics_pb2.LogEntry(attempt=1, sequence=sequence, message=f"line {sequence}\x00")
        return subjects.worker_logs("job_a"), events_pb2.LogsReported(entries=[entry]).SerializeToString()

    await feed.publish(*logs(1))
    await manager.record_logs_batch([logs(1)])
    await wait_until(lambda: len(reader.items) == 1)
    await feed.publish(*logs(2))
    await wait_until(lambda: [e.sequence for e in reader.items] == [1, 2])
    # As the ingest stores it: a NUL becomes U+FFFD.
    assert reader.items[1].message == "line 2\ufffd" and reader.items[1].job_id == "job_a"
    await manager.record_logs_batch([logs(2)])
    await finish(manager, jobs, feed)
    await asyncio.wait_for(reader.task, 5)
    assert [e.sequence for e in reader.items] == [1, 2]

