"""`tuneforge jobs events` (the job's timeline: ListJobEvents, or WatchJob's events with --follow) and
`tuneforge jobs eval` (the evaluation after training: GetJobEvaluation)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from tuneforge.v1 import evaluation_pb2, job_pb2, job_service_pb2

from services.cli.render import enum_name, size_text, whole_ids

Address = Annotated[str, typer.Option("--address", envvar="TUNEFORGE_ADDRESS",
                                      help="gRPC address of the platform.")]
Org = Annotated[str, typer.Option("--org", envvar="TUNEFORGE_ORGANIZATION",
                                  help="Organization (default: the API key's; another is refused).")]
JobRef = Annotated[str, typer.Argument(help="Job id or name.")]
DEFAULT_ADDRESS = "127.0.0.1:50051"
# Metrics where lower is better (the report's primary metric says which one matters).
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def event_type(event: job_pb2.JobEvent) -> str:
    return enum_name(job_pb2.JobEventType, event.type, "JOB_EVENT_TYPE_")


def event_text(event: job_pb2.JobEvent) -> str:
    """The event's sentence, and the numbers that go with it."""
    extras: list[str] = []
    if event.step:
        extras.append(f"step {event.step}")
    if event.epoch:
        extras.append(f"epoch {event.epoch:g}")
    if event.size_bytes:
        extras.append(size_text(event.size_bytes))
    if event.HasField("duration"):
        extras.append(f"{event.duration.ToTimedelta().total_seconds():.1f} s")
    if event.worker_id and event.worker_id not in event.message:
        extras.append(f"worker {event.worker_id}")
    if event.reason and event.reason not in event.message:
        extras.append(event.reason)
    extras += [f"{key} {value:.4g}" for key, value in sorted(event.metrics.items())]
    text = event.message or event_type(event).replace("_", " ").lower()
    return f"{text} ({', '.join(extras)})" if extras else text


def _time(event: job_pb2.JobEvent) -> str:
    return event.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if event.HasField("time") else "-"


def events_table(events: Iterable[job_pb2.JobEvent]) -> Table:
    """SEQ | TIME (UTC) | TYPE | ATTEMPT | MESSAGE. Nothing is cut: on a terminal too narrow for the table,
    each event is printed as its own block, its message wrapped (whole_ids)."""
    table = Table("SEQ", "TIME (UTC)", "TYPE", "ATTEMPT", "MESSAGE")
    for e in events:
        table.add_row(str(e.sequence), _time(e), event_type(e), str(e.attempt) if e.attempt else "-",
                      Text(event_text(e)))
    return whole_ids(table)


def event_line(event: job_pb2.JobEvent) -> Text:
    attempt = f"#{event.attempt}" if event.attempt else "-"
    return Text(f"{event.sequence:>4}  {_time(event)}  {event_type(event):<20} {attempt:<3} "
                f"{event_text(event)}")


def _json_line(message: job_pb2.JobEvent) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)


def _number(value: float) -> str:
    return f"{value:.4g}"


def _change(name: str, base: float, tuned: float) -> str:
    delta = tuned - base
    relative = f" ({delta / abs(base):+.1%})" if base else ""
    better = (delta < 0) if name in LOWER_IS_BETTER else (delta > 0)
    mark = "" if delta == 0 else (" better" if better else " worse")
    return f"{delta:+.4g}{relative}{mark}"


def metrics_table(report: evaluation_pb2.EvaluationReport) -> Table:
    """METRIC | BASE | TUNED | CHANGE, the primary metric first (marked *)."""
    table = Table("METRIC", "BASE", "TUNED", "CHANGE")
    names = sorted(set(report.base_metrics) | set(report.tuned_metrics),
                   key=lambda n: (n != report.primary_metric, n))
    for name in names:
        base, tuned = report.base_metrics.get(name), report.tuned_metrics.get(name)
        change = _change(name, base, tuned) if base is not None and tuned is not None else "-"
        label = f"{name} *" if name == report.primary_metric else name
        table.add_row(label, "-" if base is None else _number(base), "-" if tuned is None else _number(tuned),
                      change)
    return table


def print_report(job_id: str, report: evaluation_pb2.EvaluationReport, console: Console) -> None:
    status = enum_name(evaluation_pb2.EvaluationStatus, report.status, "EVALUATION_STATUS_")
    console.print(Text(f"job {job_id}: evaluation {status}"), soft_wrap=True)
    if report.message:
        console.print(Text(report.message))
    if report.status != evaluation_pb2.EVALUATION_STATUS_SUCCEEDED:
        return
    console.print(Text(f"split: {report.split or '-'}, examples: {report.example_count}"))
    if report.primary_metric:
        verdict = "improved" if report.improved else "did not improve"
        console.print(Text(f"the tuned model {verdict} on {report.primary_metric} (*)"))
    console.print(metrics_table(report))
    for i, sample in enumerate(report.samples, 1):
        parts: list[Text | Padding] = [Text(f"sample {i}", style="bold")]
        for label, text in (("prompt", sample.prompt), ("reference", sample.reference),
                            ("base answer", sample.base_answer), ("tuned answer", sample.tuned_answer)):
            if label == "reference" and not text:
                continue
            parts += [Text(f"{label}:", style="dim"), Padding(Text(text or "(empty)"), (0, 0, 0, 2))]
        console.print(Group(*parts))


def register(jobs_app: typer.Typer) -> None:
    """Adds `jobs events` and `jobs eval` to the CLI (services.cli.main)."""

    @jobs_app.command("events")
    def jobs_events(
        ref: JobRef,
        follow: Annotated[bool, typer.Option("--follow", "-f",
                                             help="Keep printing new events until the job ends.")] = False,
        address: Address = DEFAULT_ADDRESS, org: Org = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print the events as JSON.")] = False,
    ) -> None:
        """The job's timeline, oldest first: queued, worker assigned, downloads, training, epochs,
        checkpoints, evaluation, early stop, uploads, restarts, and how it ended."""
        from services.cli.main import api, console

        with api(address, org) as client:
            if follow:
                for response in client.watch_job_events(ref):
                    for event in response.events:
                        console.print(_json_line(event) if as_json else event_line(event), highlight=False,
                                      markup=False, soft_wrap=as_json)
                return
            events: list[job_pb2.JobEvent] = []
            token = ""
            while True:
                page = client.list_job_events(ref, page_size=1000, page_token=token)
                events += page.events
                token = page.next_page_token
                if not token:
                    break
        if as_json:
            console.print_json(json_format.MessageToJson(job_service_pb2.ListJobEventsResponse(events=events),
                                                         preserving_proto_field_name=True))
            return
        console.print(events_table(events))

    @jobs_app.command("eval")
    def jobs_eval(
        ref: JobRef, address: Address = DEFAULT_ADDRESS, org: Org = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ) -> None:
        """The evaluation after training: base and tuned model on the test split, metric by metric, and
        sample answers side by side. PENDING until the job evaluated; SKIPPED when it did not."""
        from services.cli.main import api, console

        with api(address, org) as client:
            response = client.get_job_evaluation(ref)
        if as_json:
            console.print_json(json_format.MessageToJson(response, preserving_proto_field_name=True))
            return
        print_report(response.job, response.evaluation, console)
