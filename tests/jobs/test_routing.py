"""The work queue by GPU type: route names, one consumer per route with the max-deliveries advisory of
each captured, and what an older version queued on the one shared subject moved to the routed ones."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError
from tuneforge.events.v1 import events_pb2

from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects


@pytest.mark.parametrize(
    ("gpu_type", "route"),
    [("", "any"), ("cpu", "any"), (" CPU ", "any"), ("nvidia-h100", "nvidia-h100"),
     ("NVIDIA-A100-80GB", "nvidia-a100-80gb"), ("weird.type >*", "weird_type___")],
)
def test_routes_are_one_safe_subject_token(gpu_type: str, route: str) -> None:
    assert subjects.gpu_route(gpu_type) == route
    assert subjects.work_jobs(gpu_type) == f"tuneforge.work.jobs.{route}"
    assert subjects.trainers_consumer(gpu_type) == f"trainers-{route}"


def assignment(job_id: str, gpu_type: str = "") -> events_pb2.JobAssignment:
    out = events_pb2.JobAssignment(event_id=f"{job_id}.assignment", job_id=job_id)
    out.spec.hardware.gpu_type = gpu_type
    return out


async def test_every_routes_consumer_reports_running_out_of_deliveries(nats_url: str) -> None:
    nc = await kit_nats.connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await kit_nats.ensure_streams(js)
        for gpu_type in ("", "nvidia-t4"):
            await kit_nats.ensure_trainers_consumer(js, gpu_type, ack_wait_s=0.5, max_deliver=1)
            job = assignment(f"job_{gpu_type or 'any'}", gpu_type)
            await kit_nats.publish(js, subjects.work_jobs(gpu_type), job, job.event_id)
            durable = subjects.trainers_consumer(gpu_type)
            sub = await js.pull_subscribe(subjects.work_jobs(gpu_type), durable=durable,
                                          stream=subjects.STREAM_WORK)
            (msg,) = await sub.fetch(1, timeout=2)
            assert msg.metadata.num_delivered == 1  # then never acked: the claim lapses
        advisories = await js.pull_subscribe(subjects.WORK_MAX_DELIVERIES, durable="test-advisories",
                                             stream=subjects.STREAM_ADVISORIES)
        seen: set[str] = set()
        for _ in range(50):
            try:
                for msg in await advisories.fetch(10, timeout=0.5):
                    seen.add(json.loads(msg.data)["consumer"])
            except Exception:
                pass
            if len(seen) == 2:
                break
            await asyncio.sleep(0.1)
        assert seen == {"trainers-any", "trainers-nvidia-t4"}
    finally:
        await nc.drain()


async def test_work_queued_by_an_older_version_is_moved_to_its_route(nats_url: str) -> None:
    nc = await kit_nats.connect(nats_url, "test")
    js = nc.jetstream()
    try:
        # As the version before routing left it: one subject, one consumer "trainers", two jobs waiting.
        await js.add_stream(StreamConfig(name=subjects.STREAM_WORK, subjects=[subjects.LEGACY_WORK_JOBS],
                                         retention=RetentionPolicy.WORK_QUEUE))
        await js.add_consumer(subjects.STREAM_WORK, ConsumerConfig(
            durable_name=subjects.LEGACY_TRAINERS_CONSUMER, ack_policy=AckPolicy.EXPLICIT,
            filter_subject=subjects.LEGACY_WORK_JOBS))
        for job in (assignment("job_a"), assignment("job_b", "nvidia-h100")):
            await kit_nats.publish(js, subjects.LEGACY_WORK_JOBS, job, job.event_id)

        await kit_nats.ensure_streams(js)
        assert await kit_nats.reroute_legacy_work(js) == 2
        assert await kit_nats.queued_routes(js) == ["any", "nvidia-h100"]
        info = await js.stream_info(subjects.STREAM_WORK)
        assert info.state.messages == 2, "the old copies were acked away"
        with pytest.raises(NotFoundError):
            await js.consumer_info(subjects.STREAM_WORK, subjects.LEGACY_TRAINERS_CONSUMER)
        assert await kit_nats.reroute_legacy_work(js) == 0, "nothing to do the next time"

        await kit_nats.ensure_trainers_consumer(js, "nvidia-h100", ack_wait_s=5, max_deliver=5)
        durable = subjects.trainers_consumer("nvidia-h100")
        sub = await js.pull_subscribe(subjects.work_jobs("nvidia-h100"), durable=durable,
                                      stream=subjects.STREAM_WORK)
        (msg,) = await sub.fetch(1, timeout=2)
        assert events_pb2.JobAssignment.FromString(msg.data).job_id == "job_b"
    finally:
        await nc.drain()
