"""`tuneforge dead-letters` against a real nats-server set up as `tuneforge up` sets it up (its users'
passwords in <data_dir>/nats/auth, platform.json naming its URL): a message a real consumer gave up on is
listed, shown decoded, published again on its subject with its own headers (not the dead letter's) and
deleted; mistakes are one clear line and exit status 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import metrics_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.kit.consumer import PermanentError, consume
from services.kit.embedded import EmbeddedNats, NatsAuth
from services.platform.supervisor import NATS_AUTH_DIR
from tuneforge_core import subjects
from tuneforge_core.nats import SERVICES_USER, ensure_streams

runner = CliRunner()
JOB = "job_dead"
SUBJECT = subjects.worker_metrics(JOB)


@pytest.fixture
def platform_dir(tmp_path: Path) -> Iterator[tuple[Path, EmbeddedNats]]:
    data_dir = tmp_path / "tf"
    auth = NatsAuth.load_or_create(data_dir / NATS_AUTH_DIR)
    server = EmbeddedNats(data_dir / "nats", auth=auth)
    server.start()
    (data_dir / "platform.json").write_text(json.dumps({"nats_url": server.url}))
    try:
        yield data_dir, server
    finally:
        server.stop()


def password(data_dir: Path, user: str = SERVICES_USER) -> str:
    return (data_dir / NATS_AUTH_DIR / f"{user}.password").read_text().strip()


async def services_connection(data_dir: Path, url: str) -> nats.NATS:
    return await nats.connect(url, user=SERVICES_USER, password=password(data_dir),
                              inbox_prefix=f"_INBOX.{SERVICES_USER}")


async def bury(data_dir: Path, url: str, steps: list[int]) -> None:
    """Reports of `steps` on the job's metrics subject, each given up on by a consumer that refuses it."""
    nc = await services_connection(data_dir, url)
    js = nc.jetstream()
    await ensure_streams(js)
    for step in steps:
        report = events_pb2.MetricsReported(event_id=f"evt-{step}", points=[
            metrics_pb2.MetricPoint(job_id=JOB, step=step, kind=metrics_pb2.METRIC_KIND_TRAIN)])
        await js.publish(SUBJECT, report.SerializeToString(),
                         headers={"Nats-Msg-Id": f"evt-{step}", "traceparent": f"00-{step:032x}-{1:016x}-01"})

    async def refuse(_msg: object) -> None:
        raise PermanentError("a metrics report this service cannot decode")

    task = asyncio.create_task(consume(js, stream=subjects.STREAM_WORKER, durable="metrics-dead-test",
                                       subject=SUBJECT, handler=refuse, batch=10, nak_delay_s=0.02))
    try:
        for _ in range(400):
            with contextlib.suppress(NotFoundError):
                if (await js.stream_info(subjects.STREAM_DEAD_LETTERS)).state.messages == len(steps):
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the consumer kept no dead letter")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.drain()


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, ["dead-letters", *args], env={"COLUMNS": "250", **(env or {})})
    return result.exit_code, result.output


def test_a_dead_letter_is_listed_shown_replayed_and_deleted(platform_dir: tuple[Path, EmbeddedNats]) -> None:
    data_dir, server = platform_dir
    asyncio.run(bury(data_dir, server.url, [7, 8]))
    at = ("--data-dir", str(data_dir))

    code, out = cli("list", *at)
    assert code == 0, out
    assert out.count(SUBJECT) == 2 and "metrics-dead-test" in out and "permanent" in out
    assert "cannot decode" in out
    code, out = cli("list", *at, "--json", "--limit", "1")
    letters = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and [(d["sequence"], d["subject"], d["cause"]) for d in letters] == [
        (1, SUBJECT, "permanent")]
    code, out = cli("list", *at, "--after", "1")
    assert code == 0 and "next page" not in out and out.count(SUBJECT) == 1

    code, out = cli("show", "1", *at)
    assert code == 0, out
    assert "tuneforge.events.v1.MetricsReported" in out and '"step": "7"' in out and "traceparent" in out

    code, out = cli("replay", "1", *at)
    assert code == 0, out
    assert f"published again on {SUBJECT} (stream {subjects.STREAM_WORKER}, sequence 3)" in out

    async def republished() -> tuple[bytes, dict[str, str], list[int]]:
        nc = await services_connection(data_dir, server.url)
        js = nc.jetstream()
        again = await js.get_msg(subjects.STREAM_WORKER, 3)
        info = await js.stream_info(subjects.STREAM_DEAD_LETTERS)
        left = [seq for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages]
        await nc.close()
        return again.data or b"", dict(again.headers or {}), left

    data, headers, left = asyncio.run(republished())
    assert events_pb2.MetricsReported.FromString(data).points[0].step == 7
    # Its own headers, not the dead letter's (Nats-Msg-Id is left out: the original's would be a duplicate).
    assert headers == {"traceparent": f"00-{7:032x}-{1:016x}-01"}
    assert left == [2]

    code, out = cli("show", "1", *at)
    assert code == 1 and "no dead letter 1" in out
    code, out = cli("delete", "2", *at)
    assert code == 0 and "dead letter 2 deleted" in out
    code, out = cli("list", *at)
    assert code == 0 and "no dead letters (0 kept)" in out
    code, out = cli("show", "2", *at)
    assert code == 1 and "no dead letter 2: TF_DEAD_LETTERS is empty" in out, out


def test_mistakes_are_one_clear_line(platform_dir: tuple[Path, EmbeddedNats], tmp_path: Path) -> None:
    data_dir, server = platform_dir
    code, out = cli("list", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 1 and "no NATS URL" in out and "platform.json" in out
    code, out = cli("list", "--nats-url", "nats://127.0.0.1:1", "--data-dir", str(data_dir))
    assert code == 1 and "cannot connect to NATS at nats://127.0.0.1:1" in out
    # A wrong password is refused.
    code, out = cli("list", "--data-dir", str(data_dir),
                    env={"TUNEFORGE_NATS_USER": SERVICES_USER, "TUNEFORGE_NATS_PASSWORD": "wrong"})
    assert code == 1 and "cannot connect to NATS" in out, out
    # No stream yet: the platform's services create it.
    code, out = cli("list", "--data-dir", str(data_dir))
    assert code == 1 and "no TF_DEAD_LETTERS stream" in out, out
    asyncio.run(bury(data_dir, server.url, [1]))
    code, out = cli("replay", "5", "--data-dir", str(data_dir))
    assert code == 1 and "no dead letter 5" in out and "1 to 1" in out, out
    code, out = cli("show", "0", "--data-dir", str(data_dir))
    assert code == 2  # typer: the sequence is at least 1
