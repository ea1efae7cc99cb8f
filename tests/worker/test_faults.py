"""Faults around a running job, against a real nats-server with real training: object storage that refuses
the job's outputs, and the platform's NATS gone while a worker is asked to stop (as when `tuneforge up` is
killed: its nats-server goes with it and every child gets SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
import time
from urllib.parse import urlparse

import pytest
from google.rpc import error_details_pb2
from tuneforge.events.v1 import events_pb2

from services.kit.embedded import EmbeddedNats
from tests.worker.test_agent import FAST_HYPERPARAMETERS, Platform, platform  # noqa: F401

U = events_pb2.WorkerUpdateKind


def _messages(tf: Platform, job_id: str) -> list[str]:
    return [e.message for e in tf.events.entries if e.job_id == job_id]


@pytest.mark.slow
async def test_storage_refusing_the_outputs_is_said_and_the_last_delivery_fails_naming_it(
    platform: Platform,  # noqa: F811
) -> None:
    """Each delivery that cannot store the job's outputs says why in the job's log and goes back to the
    queue; the last one fails the job DEPENDENCY_UNAVAILABLE with the cause. Before, the job went back
    silently each time and then failed WORKER_LOST ("the workers died or stopped sending heartbeats")."""
    # A file where the job's output folder goes: every write under the prefix fails, even as root.
    (platform.store.root / "jobs" / "acme").mkdir(parents=True, exist_ok=True)
    (platform.store.root / "jobs" / "acme" / "job_refused").write_text("not a folder")
    await platform.assign("job_refused", {**FAST_HYPERPARAMETERS, "max_steps": 3})
    platform.start_agent("w1", {"TUNEFORGE_WORK_MAX_DELIVER": "2"})

    await platform.events.wait_for("job_refused", "FAILED", within_s=240)
    failed = platform.events.update("job_refused", U.WORKER_UPDATE_KIND_FAILED)
    (detail,) = failed.error.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (failed.attempt, info.reason) == (2, "DEPENDENCY_UNAVAILABLE"), failed
    assert failed.error.message.startswith("Attempt 2, the last of the job's 2 deliveries, could not go on: "
                                           "could not upload adapter: "), failed.error.message
    assert "Not a directory" in failed.error.message
    (went_back,) = [m for m in _messages(platform, "job_refused") if "goes back to the queue" in m]
    assert went_back.startswith("Attempt 1 could not go on: could not upload adapter: ")
    assert went_back.endswith("The job goes back to the queue for attempt 2 of 2, which starts again from "
                              "the beginning (no checkpoint was stored).")
    assert await platform.pending_work() == 0


@pytest.mark.slow
async def test_a_worker_asked_to_stop_after_nats_is_gone_hands_back_and_exits_soon(
    platform: Platform, nats_server: EmbeddedNats,  # noqa: F811
) -> None:
    """Its reports give up TUNEFORGE_WORKER_STOP_GRACE_S after the hand-back began. Before, each report
    retried for about 140 s, so the worker (and the data dir lock `tuneforge up` children inherit) outlived
    the platform by minutes and `tuneforge up` refused to start again."""
    await platform.assign("job_orphaned", {**FAST_HYPERPARAMETERS, "max_steps": 100_000})
    agent = platform.start_agent("w1", {"TUNEFORGE_WORKER_STOP_GRACE_S": "2"})
    await platform.events.wait_for("job_orphaned", "RUNNING", within_s=120)
    port = urlparse(nats_server.url).port
    nats_server.stop()
    await asyncio.sleep(1.0)  # the training goes on reporting into the void
    agent.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        code = await asyncio.to_thread(agent.wait, 60)
    finally:
        nats_server.port = port or 0  # back on its port, for the fixtures' teardown
        nats_server.start()
        for _ in range(300):  # the test's own client reconnects by itself
            if platform.nc.is_connected:
                break
            await asyncio.sleep(0.1)
    took = time.monotonic() - signalled
    assert code == 0, platform.logs()
    assert took < 30, f"the worker took {took:.0f}s to stop\n{platform.logs()}"
    assert "Traceback" not in platform.logs()
