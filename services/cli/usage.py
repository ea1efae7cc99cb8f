"""`tuneforge usage`: the organization's jobs, compute and spend per day, week or month (GetUsage)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table
from tuneforge.v1 import job_pb2, job_service_pb2

from services.cli.render import whole_ids

P = job_service_pb2.UsagePeriodUnit
UNITS = {"day": P.USAGE_PERIOD_UNIT_DAY, "week": P.USAGE_PERIOD_UNIT_WEEK, "month": P.USAGE_PERIOD_UNIT_MONTH}
# The states a usage table has a column for; any other state a job is in is added after them.
STATE_COLUMNS = (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED)


def parse_when(value: str, *, end: bool) -> datetime:
    """A UTC date (YYYY-MM-DD) or date and time (ISO 8601; no zone means UTC). A bare date as --until
    means the end of that day, so `--since 2026-11-01 --until 2026-11-30` is the whole of November."""
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            at = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return at + timedelta(days=1) if end else at
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD) or ISO 8601 time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def state_name(state: int) -> str:
    return job_pb2.JobState.Name(job_pb2.JobState.ValueType(state)).removeprefix("JOB_STATE_") \
        if state in job_pb2.JobState.values() \
        else str(state)


def period_label(period: job_service_pb2.UsagePeriod, unit: int) -> str:
    start = period.start_time.ToDatetime(UTC)
    if unit == P.USAGE_PERIOD_UNIT_MONTH:
        return start.strftime("%Y-%m")
    if unit == P.USAGE_PERIOD_UNIT_WEEK:
        return f"week of {start:%Y-%m-%d}"
    return start.strftime("%Y-%m-%d")


def usage_table(response: job_service_pb2.GetUsageResponse, unit: int) -> Table:
    """One row per period (empty ones too) and a TOTAL row: jobs created, jobs by the state they ended in
    (or are in, for the current period), GPU-hours, compute hours, cost and tokens. Nothing is cut: on a
    terminal too narrow for the table, each period is printed as its own block (whole_ids)."""
    seen = {c.state for p in response.periods for c in p.jobs_by_state}
    states = [*STATE_COLUMNS, *sorted(seen - set(STATE_COLUMNS))]
    table = Table("PERIOD", "CREATED", *(state_name(s) for s in states), "GPU-H", "COMPUTE-H", "COST USD",
                  "TOKENS")

    def row(label: str, p: job_service_pb2.UsagePeriod) -> list[str]:
        counts = {c.state: c.count for c in p.jobs_by_state}
        return [label, str(p.jobs_created), *(str(counts.get(s, 0)) for s in states), f"{p.gpu_hours:.2f}",
                f"{p.compute_hours:.2f}", f"{p.cost_usd:.2f}", f"{p.tokens_trained:,}"]

    for period in response.periods:
        table.add_row(*row(period_label(period, unit), period))
    table.add_section()
    table.add_row(*row("TOTAL", response.total), style="bold")
    return whole_ids(table)


def register(app: typer.Typer) -> None:
    """Adds the `usage` command to the CLI (services.cli.main)."""

    @app.command("usage")
    def usage(
        period: Annotated[str, typer.Option(help="Group by day, week (from Monday) or month; UTC.")] = "day",
        since: Annotated[str, typer.Option(help="From this UTC date or time (default: 30 days ago).")] = "",
        until: Annotated[str, typer.Option(
            help="Up to this UTC date (that whole day) or time (default: now).")] = "",
        address: Annotated[str, typer.Option("--address", envvar="TUNEFORGE_ADDRESS",
                                             help="gRPC address of the platform.")] = "127.0.0.1:50051",
        org: Annotated[str, typer.Option("--org", envvar="TUNEFORGE_ORGANIZATION",
                                         help="Organization (default: the API key's).")] = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print the usage as JSON.")] = False,
    ) -> None:
        """The organization's jobs, GPU-hours, compute hours, cost and tokens trained per period. A job's
        compute and cost count in the period it ended in, or in the current one while it runs."""
        from services.cli.main import api, console, to_json

        unit = UNITS.get(period.strip().lower())
        if unit is None:
            raise typer.BadParameter(f"{period!r}: use day, week or month", param_hint="--period")
        start = parse_when(since, end=False) if since else None
        end = parse_when(until, end=True) if until else None
        with api(address, org) as client:
            response = client.get_usage(start, end, unit)
        if as_json:
            console.print_json(to_json(response))
            return
        console.print(usage_table(response, unit))
