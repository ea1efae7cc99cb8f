"""The embedded nats-server's credentials and permissions, on a real nats-server: no anonymous client, the
"worker" user does what a worker does and nothing else, the "services" user does everything.

The whole worker path (a job pulled, trained, reported, cancelled) with these permissions is proven by the
end-to-end tests, which run the platform as `tuneforge up` does.
"""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, StreamConfig
from tuneforge.events.v1 import events_pb2

from services.kit.embedded import EmbeddedNats, NatsAuth
from services.platform.supervisor import NATS_AUTH_DIR, Platform, PlatformConfig
from tests.platform.conftest import Seeded
from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects
from tuneforge_core.settings import KitSettings

JOB = "job-1"


@pytest.fixture
def auth(tmp_path: Path) -> NatsAuth:
    return NatsAuth.load_or_create(tmp_path / "nats" / "auth")


@pytest.fixture
def server(tmp_path: Path, auth: NatsAuth) -> Iterator[EmbeddedNats]:
    nats_server = EmbeddedNats(tmp_path / "nats", auth=auth)
    nats_server.start()
    try:
        yield nats_server
    finally:
        nats_server.stop()


class Conn:
    """A connection as one user, with the permission errors the server sent it."""

    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors
        self.js = nc.jetstream(timeout=1.0)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]


async def open_as(url: str, auth: NatsAuth, user: str) -> Conn:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(url, user=user, password=auth.passwords[user], error_cb=on_error,
                            inbox_prefix=kit_nats.inbox_prefix(user), max_reconnect_attempts=0)
    return Conn(nc, errors)


@pytest.fixture
async def services(server: EmbeddedNats, auth: NatsAuth) -> AsyncIterator[Conn]:
    conn = await open_as(server.url, auth, kit_nats.SERVICES_USER)
    await kit_nats.ensure_streams(conn.js)
    try:
        yield conn
    finally:
        await conn.nc.close()


@pytest.fixture
async def worker(server: EmbeddedNats, auth: NatsAuth, services: Conn) -> AsyncIterator[Conn]:
    conn = await open_as(server.url, auth, kit_nats.WORKER_USER)
    try:
        yield conn
    finally:
        await conn.nc.close()


def job_changed(state: int, event_id: str) -> events_pb2.JobChanged:
    event = events_pb2.JobChanged(event_id=event_id)
    event.job.id = JOB
    event.job.state = state  # type: ignore[assignment]
    return event


async def settle(conn: Conn) -> None:
    await conn.nc.flush(timeout=2)
    await asyncio.sleep(0.3)


def test_credentials_are_generated_once_into_private_files(tmp_path: Path, auth: NatsAuth) -> None:
    folder = tmp_path / "nats" / "auth"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for user in NatsAuth.USERS:
        path = folder / f"{user}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(auth.passwords[user]) >= 40
    assert auth.passwords[kit_nats.SERVICES_USER] != auth.passwords[kit_nats.WORKER_USER]
    assert NatsAuth.load_or_create(folder).passwords == auth.passwords, "written once, then read back"
    config = auth.write_config()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert NatsAuth.load_or_create(tmp_path / "other").passwords != auth.passwords


async def test_anonymous_and_wrong_password_connections_are_refused(server: EmbeddedNats) -> None:
    for credentials in ({}, {"user": "worker", "password": "guess"}, {"user": "nobody", "password": "x"}):
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=2, **credentials)


async def test_connect_sends_the_credentials_from_the_settings(
    server: EmbeddedNats, auth: NatsAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEFORGE_NATS_USER", "services")
    monkeypatch.setenv("TUNEFORGE_NATS_PASSWORD", auth.passwords["services"])
    assert auth.passwords["services"] not in repr(KitSettings())
    nc = await kit_nats.connect(server.url, "test")
    try:
        await kit_nats.ensure_streams(nc.jetstream())
        assert nc.new_inbox().startswith("_INBOX.services.")
    finally:
        await nc.close()


async def test_worker_cannot_read_or_forge_job_events_nor_read_others_traffic(
    services: Conn, worker: Conn
) -> None:
    received: list[Msg] = []

    async def collect(msg: Msg) -> None:
        received.append(msg)

    # Core subscriptions to what is not the worker's: job and dataset events, every job's worker
    # updates, metrics and logs, live points, the services' replies, everything.
    for subject in (subjects.job_events(JOB), subjects.ALL_JOB_EVENTS, "tuneforge.events.>",
                    subjects.dataset_events("d"), "tuneforge.worker.jobs.>", subjects.ALL_WORKER_LOGS,
                    subjects.WORKER_HEARTBEATS, "tuneforge.live.>", "_INBOX.>", "_INBOX.services.>", ">"):
        await worker.nc.subscribe(subject, cb=collect)
    await settle(worker)
    spied: list[Msg] = []

    async def spy(msg: Msg) -> None:
        spied.append(msg)

    await services.nc.subscribe("tuneforge.>", cb=spy)
    await kit_nats.publish(services.js, subjects.job_events(JOB), job_changed(2, "e1"), "e1")
    await kit_nats.publish(services.js, subjects.worker_logs("other"), b"secret log", "l1")
    await services.nc.publish(subjects.live_logs("other"), b"secret")
    await services.js.stream_info(subjects.STREAM_EVENTS)  # a reply into the services' inbox
    await settle(services)
    await settle(worker)
    assert received == []
    assert len(worker.violations()) == 11, worker.errors
    assert all("subscription" in v.lower() for v in worker.violations())

    # Forged events: neither stored nor delivered.
    before = (await services.js.stream_info(subjects.STREAM_EVENTS)).state.messages
    spied.clear()
    await worker.nc.publish(subjects.job_events(JOB), job_changed(5, "forged").SerializeToString())
    await worker.nc.publish(subjects.dataset_events("d"), b"forged")
    await worker.nc.publish(subjects.live_metrics(JOB), b"forged")
    with pytest.raises(Exception):  # noqa: B017 - the server drops it: no ack comes
        await worker.js.publish(subjects.job_events(JOB), b"forged", timeout=1)
    await settle(worker)
    await settle(services)
    assert spied == []
    assert (await services.js.stream_info(subjects.STREAM_EVENTS)).state.messages == before
    assert sum("publish" in v.lower() for v in worker.violations()) == 4, worker.errors


async def test_worker_cannot_create_update_or_delete_streams_or_others_consumers(
    services: Conn, worker: Conn
) -> None:
    await kit_nats.ensure_pull_consumer(services.js, subjects.STREAM_EVENTS, "services-consumer",
                                        subjects.ALL_JOB_EVENTS)
    attempts = [
        worker.js.delete_stream(subjects.STREAM_EVENTS),
        worker.js.delete_stream(subjects.STREAM_WORK),
        worker.js.purge_stream(subjects.STREAM_WORKER),
        worker.js.add_stream(StreamConfig(name="SPY", subjects=["tuneforge.events.>"])),
        worker.js.add_stream(StreamConfig(name="SPY2", subjects=["spy.>"])),
        worker.js.update_stream(StreamConfig(name=subjects.STREAM_EVENTS, subjects=["tuneforge.>"])),
        worker.js.delete_consumer(subjects.STREAM_EVENTS, "services-consumer"),
        worker.js.delete_consumer(subjects.STREAM_WORK, subjects.trainers_consumer("")),
        kit_nats.ensure_pull_consumer(worker.js, subjects.STREAM_EVENTS, "spy", subjects.ALL_JOB_EVENTS),
        worker.js.delete_msg(subjects.STREAM_EVENTS, 1),
    ]
    for attempt in attempts:
        with pytest.raises(Exception):  # noqa: B017 - denied: the server never answers
            await attempt
    names = await services.js.streams_info()
    expected = sorted(c.name or "" for c in kit_nats.stream_configs())
    assert sorted(s.config.name or "" for s in names) == expected
    consumers = await services.js.consumers_info(subjects.STREAM_EVENTS)
    assert [c.name for c in consumers] == ["services-consumer"]
    assert len(worker.violations()) == len(attempts), worker.errors


async def test_worker_does_everything_a_worker_does(services: Conn, worker: Conn,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The calls trainer_worker makes (tuneforge_core.nats helpers and the agent's own), as the worker."""
    caplog.set_level(logging.WARNING)
    # Start-up: the streams are read, not changed; the consumers of its routes are ensured.
    await kit_nats.ensure_streams(worker.js)
    durables = [await kit_nats.ensure_trainers_consumer(worker.js, gpu, 30.0, 5)
                for gpu in ("", "nvidia-h100")]
    assert durables == ["trainers-any", "trainers-nvidia-h100"]
    info = await worker.js.consumer_info(subjects.STREAM_WORK, durables[0])
    assert info.config.max_deliver == 5
    assert await kit_nats.queued_routes(worker.js) == []
    heartbeats: list[Msg] = []

    async def on_heartbeat(msg: Msg) -> None:
        heartbeats.append(msg)

    await services.nc.subscribe(subjects.WORKER_HEARTBEATS, queue=subjects.JOBS_HEARTBEATS_QUEUE,
                                cb=on_heartbeat)
    await settle(services)

    # A job queued by the jobs service, pulled and held by the worker.
    assignment = events_pb2.JobAssignment(job_id=JOB, event_id="a1")
    await kit_nats.publish(services.js, subjects.work_jobs(""), assignment, "a1")
    await kit_nats.publish(services.js, subjects.job_events(JOB), job_changed(2, "e1"), "e1")
    assert await kit_nats.queued_routes(worker.js) == ["any"]
    sub = await worker.js.pull_subscribe(subjects.work_jobs(""), durable=durables[0],
                                         stream=subjects.STREAM_WORK)
    [msg] = await sub.fetch(1, timeout=2)
    assert events_pb2.JobAssignment.FromString(msg.data).job_id == JOB
    await msg.in_progress()

    # Its job's latest JobChanged, and an ordered consumer on its events (cancellation).
    latest = await worker.js.get_last_msg(subjects.STREAM_EVENTS, subjects.job_events(JOB))
    assert events_pb2.JobChanged.FromString(latest.data or b"").job.state == 2
    changes: list[int] = []

    async def on_change(m: Msg) -> None:
        changes.append(events_pb2.JobChanged.FromString(m.data).job.state)

    watch = await worker.js.subscribe(subjects.job_events(JOB), stream=subjects.STREAM_EVENTS, cb=on_change,
                                      ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
    await kit_nats.publish(services.js, subjects.job_events(JOB), job_changed(6, "e2"), "e2")
    for _ in range(50):
        if changes == [2, 6]:
            break
        await asyncio.sleep(0.1)
    assert changes == [2, 6]

    # Its reports: status, metrics, logs (JetStream, acknowledged), heartbeats (core NATS).
    await kit_nats.publish(worker.js, subjects.worker_status(JOB), b"status", "s1", attempts=1)
    await kit_nats.publish(worker.js, subjects.worker_metrics(JOB), b"metrics", "m1", attempts=1)
    await kit_nats.publish(worker.js, subjects.worker_logs(JOB), b"logs", "l1", attempts=1)
    await worker.nc.publish(subjects.WORKER_HEARTBEATS, b"heartbeat")
    await settle(worker)
    await settle(services)
    assert [m.data for m in heartbeats] == [b"heartbeat"]
    assert (await services.js.stream_info(subjects.STREAM_WORKER)).state.messages == 3

    await msg.nak()
    [again] = await sub.fetch(1, timeout=2)
    await again.ack_sync()
    await watch.unsubscribe()
    await sub.unsubscribe()
    assert worker.errors == []
    assert "nats error" not in caplog.text


async def test_services_user_may_do_everything(services: Conn) -> None:
    await kit_nats.ensure_pull_consumer(services.js, subjects.STREAM_EVENTS, "any-consumer", ">")
    await services.js.add_stream(StreamConfig(name="SCRATCH", subjects=["scratch.>"]))
    await services.js.delete_stream("SCRATCH")
    got: list[Msg] = []

    async def collect(msg: Msg) -> None:
        got.append(msg)

    await services.nc.subscribe(">", cb=collect)
    await services.nc.publish(subjects.job_events(JOB), b"x")
    await settle(services)
    assert got and services.errors == []


def test_children_get_their_own_user_and_never_the_other(tmp_path: Path, auth: NatsAuth,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_NATS_USER", "operator")
    monkeypatch.setenv("TUNEFORGE_NATS_PASSWORD", "operator-secret")
    platform = Platform(PlatformConfig(data_dir=tmp_path))
    external = platform.child_env("worker")  # an external NATS: the operator's credentials as they are
    assert (external["TUNEFORGE_NATS_USER"], external["TUNEFORGE_NATS_PASSWORD"]) == ("operator",
                                                                                      "operator-secret")
    platform.nats_auth = auth
    services_env, worker_env = platform.child_env("services"), platform.child_env("worker")
    assert services_env["TUNEFORGE_NATS_USER"] == "services"
    assert services_env["TUNEFORGE_NATS_PASSWORD"] == auth.passwords["services"]
    assert worker_env["TUNEFORGE_NATS_USER"] == "worker"
    assert worker_env["TUNEFORGE_NATS_PASSWORD"] == auth.passwords["worker"]
    assert auth.passwords["services"] not in worker_env.values()
    assert auth.passwords["worker"] not in services_env.values()
    assert "TUNEFORGE_NATS_PASSWORD" not in platform.child_env()


def test_the_platform_nats_server_fsyncs_every_write(seeded_platform: Seeded) -> None:
    """`tuneforge up`'s server syncs JetStream to disk before acknowledging (`sync_interval: always`),
    with its users; a test's throwaway server does not."""
    conf = (seeded_platform.platform.data_dir / NATS_AUTH_DIR / "nats-server.conf").read_text()
    assert "sync_interval: always" in conf and "authorization" in conf
    assert "sync_interval" not in EmbeddedNats(Path("/nonexistent"), auth=None).config()


async def test_a_server_that_fsyncs_every_write_takes_publishes(tmp_path: Path, auth: NatsAuth) -> None:
    server = EmbeddedNats(tmp_path / "synced", auth=auth, sync_always=True)
    url = server.start()
    try:
        services = await open_as(url, auth, kit_nats.SERVICES_USER)
        await kit_nats.ensure_streams(services.js)
        ack = await services.js.publish(subjects.job_events(JOB), b"x")
        assert ack.seq >= 1
        await services.nc.close()
    finally:
        server.stop()
