"""`tuneforge dead-letters`: what the services' consumers gave up on (TF_DEAD_LETTERS), for an operator.

A message a service could never handle, or that failed its last delivery, is kept in the TF_DEAD_LETTERS
stream with headers saying where it came from and why (services.kit.consumer). These commands read that
stream over NATS itself, as the platform's services user: listing them, showing one (its body decoded as the
event its subject carries), publishing one again on its original subject once the fault is fixed, and
deleting one. They need NATS and its services credentials, not an API key: dead letters belong to the
platform, not to one organization. By default they find both in the data folder of `tuneforge up`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, TypeVar

import nats
import typer
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import RawStreamMsg
from nats.js.errors import NoStreamResponseError, NotFoundError
from rich.markup import escape
from rich.table import Table
from tuneforge.events.v1 import events_pb2

from services.cli.render import size_text, whole_ids
from services.kit.consumer import (
    DEAD_CAUSE,
    DEAD_CONSUMER,
    DEAD_DELIVERIES,
    DEAD_HEADERS_DROPPED,
    DEAD_REASON,
    DEAD_SEQUENCE,
    DEAD_SUBJECT,
    DEAD_TRUNCATED,
)
from services.platform.supervisor import NATS_AUTH_DIR
from tuneforge_core import subjects
from tuneforge_core.nats import SERVICES_USER, inbox_prefix

T = TypeVar("T")
STREAM = subjects.STREAM_DEAD_LETTERS
CONNECT_TIMEOUT_S = 10.0
# The headers a dead letter carries besides the original's own; a replay sends the original's only.
_DEAD_PREFIX = "Tuneforge-Dead-"
# The event each subject carries (tuneforge_core.subjects), to show a dead letter's body as that message.
_EVENTS: tuple[tuple[str, str, type[Message]], ...] = (
    (subjects.WORK_JOBS_PREFIX + ".", "", events_pb2.JobAssignment),
    ("tuneforge.worker.jobs.", ".status", events_pb2.WorkerJobUpdate),
    ("tuneforge.worker.jobs.", ".metrics", events_pb2.MetricsReported),
    ("tuneforge.worker.jobs.", ".logs", events_pb2.LogsReported),
    ("tuneforge.events.jobs.", "", events_pb2.JobChanged),
    ("tuneforge.events.datasets.", "", events_pb2.DatasetChanged),
)


NatsUrl = Annotated[str, typer.Option("--nats-url", envvar="TUNEFORGE_NATS_URL",
                                      help="NATS of the platform (default: the one `tuneforge up` started "
                                      "from --data-dir).")]
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="TUNEFORGE_DATA_DIR",
                                       help="The data folder of `tuneforge up`, for its NATS URL and "
                                       "services password (TUNEFORGE_NATS_USER and TUNEFORGE_NATS_PASSWORD "
                                       "override the password).")]
Sequence = Annotated[int, typer.Argument(min=1, help="The dead letter's sequence (from `list`).")]


class Problem(Exception):
    """What stops a command, said to the operator (exit status 1)."""


@dataclass(frozen=True)
class Connection:
    url: str
    user: str
    password: str


def connection(nats_url: str, data_dir: Path) -> Connection:
    """Where NATS is and the services user's credentials: the options and TUNEFORGE_NATS_* first, then what
    `tuneforge up` keeps in `data_dir` (platform.json, nats/auth/services.password)."""
    user = os.environ.get("TUNEFORGE_NATS_USER", "")
    password = os.environ.get("TUNEFORGE_NATS_PASSWORD", "")
    if not nats_url:
        state = data_dir / "platform.json"
        try:
            nats_url = str(json.loads(state.read_text())["nats_url"])
        except (OSError, ValueError, KeyError, TypeError):
            raise Problem(f"no NATS URL: give --nats-url (or TUNEFORGE_NATS_URL), or --data-dir of a "
                          f"platform `tuneforge up` started ({state} could not be read)") from None
    if not user and not password:
        secret = data_dir / NATS_AUTH_DIR / f"{SERVICES_USER}.password"
        if secret.is_file():
            user, password = SERVICES_USER, secret.read_text().strip()
    return Connection(nats_url, user, password)


async def _connect(where: Connection) -> NATS:
    credentials: dict[str, Any] = {}
    if where.user:
        credentials = {"user": where.user, "password": where.password,
                       "inbox_prefix": inbox_prefix(where.user)}
    errors: list[BaseException] = []

    async def said(exc: BaseException) -> None:  # kept for the message, not printed with a traceback
        errors.append(exc)

    try:  # a second try, then NoServersError; CONNECT_TIMEOUT_S in all at most
        return await asyncio.wait_for(nats.connect(
            servers=[where.url], name="tuneforge-dead-letters", connect_timeout=2, allow_reconnect=False,
            max_reconnect_attempts=1, reconnect_time_wait=0.2, error_cb=said, **credentials),
            CONNECT_TIMEOUT_S)
    except (TimeoutError, NoServersError, NatsError, OSError) as exc:
        cause = errors[-1] if errors else exc
        raise Problem(f"cannot connect to NATS at {where.url} as {where.user or 'no user'}: "
                      f"{str(cause) or type(cause).__name__}") from None


def _run(where: Connection, work: Callable[[NATS], Awaitable[T]]) -> T:
    async def main() -> T:
        nc = await _connect(where)
        try:
            return await work(nc)
        except NotFoundError:
            raise Problem(f"no {STREAM} stream on this NATS: the platform's services create it when they "
                          "start") from None
        finally:
            await nc.close()

    return asyncio.run(main())


async def _letter(nc: NATS, sequence: int) -> RawStreamMsg:
    try:
        return await nc.jetstream().get_msg(STREAM, sequence)
    except NotFoundError:
        info = await nc.jetstream().stream_info(STREAM)  # NotFoundError again: no stream at all
        if not info.state.messages:
            raise Problem(f"no dead letter {sequence}: {STREAM} is empty") from None
        raise Problem(f"no dead letter {sequence}: {STREAM} holds sequences {info.state.first_seq} to "
                      f"{info.state.last_seq} (some may have been deleted); see `tuneforge dead-letters "
                      "list`") from None


def _headers(letter: RawStreamMsg) -> dict[str, str]:
    return dict(letter.headers or {})


def _when(letter: RawStreamMsg) -> str:
    return letter.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if letter.time else "-"


def _event_type(subject: str) -> type[Message] | None:
    for prefix, suffix, message_type in _EVENTS:
        if subject.startswith(prefix) and subject.endswith(suffix):
            return message_type
    return None


def _summary(letter: RawStreamMsg) -> dict[str, Any]:
    headers = _headers(letter)
    return {"sequence": letter.seq, "time": _when(letter), "subject": headers.get(DEAD_SUBJECT, ""),
            "consumer": headers.get(DEAD_CONSUMER, ""), "cause": headers.get(DEAD_CAUSE, ""),
            "deliveries": headers.get(DEAD_DELIVERIES, ""), "reason": headers.get(DEAD_REASON, ""),
            "size_bytes": len(letter.data or b"")}


def register(app: typer.Typer) -> None:
    """Adds `tuneforge dead-letters` to the CLI (services.cli.main)."""
    dead = typer.Typer(help="What the services gave up on (TF_DEAD_LETTERS): list, show, replay, delete. "
                       "An operator's tool: it talks to NATS as the services user.", no_args_is_help=True)
    app.add_typer(dead, name="dead-letters")

    def fail(problem: Problem) -> typer.Exit:
        from services.cli.main import err_console

        err_console.print(f"[red]error[/red] {escape(str(problem))}", highlight=False, soft_wrap=True)
        return typer.Exit(1)

    @dead.command("list")
    def list_letters(
        after: Annotated[int, typer.Option(help="Only those after this sequence (the next page).")] = 0,
        limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 50,
        nats_url: NatsUrl = "", data_dir: DataDir = Path(".tuneforge"),
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per dead letter.")] = False,
    ) -> None:
        """The dead letters, oldest first: where each came from, which consumer gave up, why."""
        from services.cli.main import console

        async def read(nc: NATS) -> tuple[list[RawStreamMsg], int]:
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            found: list[RawStreamMsg] = []
            sequence = max(after + 1, info.state.first_seq)
            while len(found) < limit and sequence <= info.state.last_seq:
                try:  # the next one at or after `sequence` (deleted ones leave gaps)
                    letter = await js.get_msg(STREAM, sequence, subject=subjects.ALL_DEAD_LETTERS, next=True)
                except NotFoundError:
                    break
                found.append(letter)
                sequence = (letter.seq or sequence) + 1
            return found, info.state.messages

        try:
            letters, total = _run(connection(nats_url, data_dir), read)
        except Problem as problem:
            raise fail(problem) from None
        if as_json:
            for letter in letters:
                console.print(json.dumps(_summary(letter)), highlight=False, soft_wrap=True)
            return
        if not letters:
            console.print(f"no dead letters{f' after {after}' if after else ''} ({total} kept)")
            return
        table = Table("SEQ", "TIME", "SUBJECT", "CONSUMER", "CAUSE", "DELIVERIES", "REASON")
        for letter in letters:
            s = _summary(letter)
            table.add_row(str(s["sequence"]), s["time"], escape(s["subject"]), escape(s["consumer"]),
                          escape(s["cause"]), s["deliveries"], escape(s["reason"]))
        console.print(whole_ids(table))
        last = letters[-1].seq or 0
        if len(letters) == limit:
            console.print(f"next page: --after {last}")

    @dead.command("show")
    def show(sequence: Sequence, nats_url: NatsUrl = "", data_dir: DataDir = Path(".tuneforge"),
             out: Annotated[Path | None, typer.Option(help="Also write its body, as it is, to this file.")]
             = None) -> None:
        """One dead letter: its headers, and its body as the event its subject carries."""
        from services.cli.main import console

        try:
            letter = _run(connection(nats_url, data_dir), lambda nc: _letter(nc, sequence))
        except Problem as problem:
            raise fail(problem) from None
        headers, data = _headers(letter), letter.data or b""
        console.print(f"dead letter {letter.seq} on {escape(letter.subject or '')}, kept {_when(letter)} UTC",
                      highlight=False, soft_wrap=True)
        for key, value in headers.items():
            console.print(f"  {escape(key)}: {escape(value)}", highlight=False, soft_wrap=True)
        subject = headers.get(DEAD_SUBJECT, "")
        message_type = _event_type(subject)
        what = f"body ({size_text(len(data))})"
        if DEAD_TRUNCATED in headers:
            what += f", only the start of {size_text(int(headers[DEAD_TRUNCATED] or 0))}"
        if message_type is None:
            console.print(f"{what}: no event type is known for {escape(subject) or 'its subject'}")
        else:
            try:
                decoded = json_format.MessageToJson(message_type.FromString(data), indent=2,
                                                    preserving_proto_field_name=True)
                console.print(f"{what}, as {message_type.DESCRIPTOR.full_name}:")
                console.print_json(decoded)
            except DecodeError as exc:
                console.print(f"{what}: not a {message_type.DESCRIPTOR.full_name} ({escape(str(exc))})")
        if out is not None:
            out.write_bytes(data)
            console.print(f"body written to {escape(str(out))}")

    @dead.command("replay")
    def replay(sequence: Sequence, nats_url: NatsUrl = "", data_dir: DataDir = Path(".tuneforge"),
               keep: Annotated[bool, typer.Option("--keep", help="Keep the dead letter after it is sent.")]
               = False) -> None:
        """Publishes the dead letter again on its original subject, with its original headers, for its
        consumer to handle anew (fix the cause first); then deletes it, unless --keep."""
        from services.cli.main import console

        async def send(nc: NATS) -> str:
            letter = await _letter(nc, sequence)
            headers = _headers(letter)
            subject = headers.get(DEAD_SUBJECT, "")
            if not subject:
                raise Problem(f"dead letter {sequence} has no {DEAD_SUBJECT} header: nothing says where it "
                              "came from")
            if DEAD_TRUNCATED in headers:
                raise Problem(f"dead letter {sequence} holds only the start of its body ({DEAD_TRUNCATED}: "
                              f"{headers[DEAD_TRUNCATED]} bytes); the whole is in its own stream at sequence "
                              f"{headers.get(DEAD_SEQUENCE, '?')} while that stream keeps it")
            if DEAD_HEADERS_DROPPED in headers:
                raise Problem(f"dead letter {sequence} was kept without its own headers "
                              f"({DEAD_HEADERS_DROPPED}); a replay would not be the message it was")
            original = {k: v for k, v in headers.items() if not k.startswith((_DEAD_PREFIX, "Nats-"))}
            try:
                ack = await nc.jetstream().publish(subject, letter.data or b"", headers=original or None)
            except NoStreamResponseError:
                raise Problem(f"no stream takes {subject} now; dead letter {sequence} is kept") from None
            except NatsTimeout:
                raise Problem(f"NATS did not confirm the publish on {subject}; dead letter {sequence} is "
                              "kept (see whether it arrived before replaying it again)") from None
            if not keep:
                await nc.jetstream().delete_msg(STREAM, sequence)
            return f"{subject} (stream {ack.stream}, sequence {ack.seq})"

        try:
            where = _run(connection(nats_url, data_dir), send)
        except Problem as problem:
            raise fail(problem) from None
        console.print(f"dead letter {sequence} published again on {escape(where)}"
                      + ("" if keep else "; deleted from " + STREAM), highlight=False, soft_wrap=True)

    @dead.command("delete")
    def delete(sequence: Sequence, nats_url: NatsUrl = "", data_dir: DataDir = Path(".tuneforge")) -> None:
        """Deletes a dead letter (one that is handled, or that will never be)."""
        from services.cli.main import console

        async def remove(nc: NATS) -> None:
            await _letter(nc, sequence)  # a clear error for a sequence that is not there
            await nc.jetstream().delete_msg(STREAM, sequence)

        try:
            _run(connection(nats_url, data_dir), remove)
        except Problem as problem:
            raise fail(problem) from None
        console.print(f"dead letter {sequence} deleted from {STREAM}")
