"""`tuneforge usage` and `tuneforge jobs events` follow the README's rule for tables: nothing is cut, however
narrow the terminal; a table too wide for it is printed as one block of `HEADER  value` lines per row (the
rule `jobs list`, `datasets get` and `keys list` follow: services.cli.render.whole_ids)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from tuneforge.v1 import job_pb2, job_service_pb2

from services.cli.timeline import event_text, events_table
from services.cli.usage import UNITS, period_label, usage_table

JS = job_pb2.JobState
ET = job_pb2.JobEventType
WIDTHS = (40, 80, 120, 250)


def render(table: Table, width: int) -> str:
    out = StringIO()
    Console(file=out, width=width, color_system=None).print(table)
    return out.getvalue()


def stamp(at: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def weekly_usage() -> job_service_pb2.GetUsageResponse:
    monday = datetime(2026, 1, 5, tzinfo=UTC)
    periods = [job_service_pb2.UsagePeriod(
        start_time=stamp(monday + timedelta(weeks=i)), end_time=stamp(monday + timedelta(weeks=i + 1)),
        jobs_created=12 + i, gpu_hours=1234.5 + i, compute_hours=2345.25, cost_usd=98765.43,
        tokens_trained=31_500_000_000 + i,
        jobs_by_state=[job_service_pb2.JobStateCount(state=JS.JOB_STATE_SUCCEEDED, count=10),
                       job_service_pb2.JobStateCount(state=JS.JOB_STATE_FAILED, count=1),
                       job_service_pb2.JobStateCount(state=JS.JOB_STATE_RUNNING, count=1)])
        for i in range(3)]
    total = job_service_pb2.UsagePeriod(jobs_created=39, gpu_hours=3706.5, compute_hours=7035.75,
                                        cost_usd=296296.29, tokens_trained=94_500_000_003)
    return job_service_pb2.GetUsageResponse(periods=periods, total=total)


def test_usage_cuts_no_period_and_no_number_however_narrow_the_terminal() -> None:
    response, unit = weekly_usage(), UNITS["week"]
    for width in WIDTHS:
        text = render(usage_table(response, unit), width)
        assert "…" not in text, text
        for period in response.periods:
            assert period_label(period, unit) in text, text  # "week of 2026-01-05", whole
            assert f"{period.tokens_trained:,}" in text and f"{period.cost_usd:.2f}" in text, text
        assert "TOTAL" in text and "94,500,000,003" in text and "RUNNING" in text, text
    assert "┃ PERIOD" in render(usage_table(response, unit), 250)  # a table when it fits
    narrow = render(usage_table(response, unit), 80)
    assert "┃" not in narrow and narrow.count("PERIOD  ") == 4, narrow  # a block per period, and the total


def test_events_cut_no_message_however_narrow_the_terminal() -> None:
    path = "/tmp/readme-watch/.tuneforge/models/tiny-chat"
    events = [
        job_pb2.JobEvent(sequence=1, type=ET.JOB_EVENT_TYPE_QUEUED, message="Queued on pool cpu.",
                         time=stamp(datetime(2026, 1, 5, 9, 30, tzinfo=UTC))),
        job_pb2.JobEvent(sequence=2, type=ET.JOB_EVENT_TYPE_MODEL_DOWNLOADED, attempt=1,
                         message=f"Model {path} loaded from the local model root.", size_bytes=5_000_000,
                         duration=Duration(seconds=3),
                         time=stamp(datetime(2026, 1, 5, 9, 30, 5, tzinfo=UTC))),
        job_pb2.JobEvent(sequence=3, type=ET.JOB_EVENT_TYPE_CHECKPOINT_SAVED, attempt=1, step=120, epoch=1.5,
                         message="Checkpoint saved to s3://tuneforge-artifacts/jobs/job_01m8w5yd5pg1/"
                                 "checkpoint-120 with the optimizer state kept for a resume.",
                         time=stamp(datetime(2026, 1, 5, 9, 41, tzinfo=UTC))),
    ]
    for width in WIDTHS:
        text = render(events_table(events), width)
        assert "…" not in text, text
        assert "2026-01-05 09:30:05" in text and "MODEL_DOWNLOADED" in text, text
        squashed = "".join(text.replace("│", "").split())
        # A long message may wrap (a path longer than the terminal folds), but loses no text.
        for event in events:
            assert "".join(event_text(event).split()) in squashed, (event_text(event), text)
        if width >= 80:
            assert path in text, text  # on one line when the terminal has room for it
    assert "┃ SEQ" in render(events_table(events), 250)
    narrow = render(events_table(events), 80)
    assert "┃" not in narrow and narrow.count("MESSAGE  ") == 3, narrow
