"""Durable JetStream pull consumer loops with explicit acks.

`consume` hands messages to its handler one at a time: the handler returns normally to ack.
`PermanentError` (an undecodable or impossible message) ends the message's deliveries so it is not
redelivered forever, and so does a database `DataError` (`refused_value`: a value the database refuses,
e.g. too long for its column: the same message fails the same way on every delivery); any other exception
naks it with a delay that doubles with each delivery of the message, up to a minute, or 5 s while a server
is unreachable (`nak_delay`), so a message failing for a reason not yet known is retried, but cannot spin.

A message whose deliveries end that way is first kept, as it came, in the dead-letter stream
(TF_DEAD_LETTERS, subject `tuneforge.dead.<stream>.<consumer>`; `_bury`), its headers saying from where,
why and after how many deliveries; only then is it terminated. So is a message that failed
`dead_after` deliveries (20 by default, about a quarter of an hour with the doubling delays) for any
reason but an unreachable server: an outage is waited out however long it lasts, a message that keeps
failing is set aside where an operator finds it (`tuneforge dead-letters list`) and can publish it
again once the fault is fixed. When it cannot be kept (NATS is failing too), it is redelivered instead:
nothing is dropped unseen.

`consume_batches` hands over everything one fetch returned (up to `batch` messages) at once, for handlers
that write a whole batch in one transaction: the handler returns the messages that can never succeed (kept
as dead letters and terminated, alone), every other message is acked after the handler returned (i.e. after
its commit), and an exception naks the whole batch for redelivery when it says a server is unreachable
(`unreachable`: the database, NATS, a socket error), or else hands the batch over again in halves, so that
one failing message does not hold back the rest (`_handle_batch`); a message failing alone with a
`DataError`, or for the `dead_after`th time, is kept as a dead letter and terminated.

While a fetch is handled, its messages not settled yet get an in-progress ack every third of the ack
wait (`_in_progress`): one handled for longer (a slow database, a batch halved down to its failing message)
is not handed to another replica of the service meanwhile.

With tracing on, `consume` handles each message inside a CONSUMER span that continues the trace its
headers carry (tuneforge_core.tracing), so what the handler writes (an outbox row) stays in that trace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.kit.tasks import cancel_and_wait
from services.kit.telemetry import DEAD_LETTERS
from tuneforge_core import subjects, tracing
from tuneforge_core.nats import ensure_pull_consumer

log = logging.getLogger(__name__)


class PermanentError(Exception):
    """The message can never be processed; it is terminated instead of redelivered."""


# Deliveries after which a message failing for any reason but an unreachable server is given up on (kept as
# a dead letter): with the delays doubling from 1 s up to a minute, about 14 minutes of retries.
DEAD_AFTER_DELIVERIES = 20
# The headers a dead letter carries besides the original's own (those not starting with "Nats-").
DEAD_SUBJECT = "Tuneforge-Dead-Subject"  # the subject it was published on
DEAD_CONSUMER = "Tuneforge-Dead-Consumer"  # the durable consumer that gave up on it
DEAD_CAUSE = "Tuneforge-Dead-Cause"  # "permanent", "refused_value" or "deliveries"
DEAD_REASON = "Tuneforge-Dead-Reason"  # why, one line
DEAD_DELIVERIES = "Tuneforge-Dead-Deliveries"  # how many times it was delivered
DEAD_SEQUENCE = "Tuneforge-Dead-Sequence"  # its sequence in its stream
DEAD_TRUNCATED = "Tuneforge-Dead-Truncated"  # its size in bytes, where only its start is kept (too large)
DEAD_HEADERS_DROPPED = "Tuneforge-Dead-Headers-Dropped"  # the size of its own headers, too large to keep
# Room left below the server's max_payload when a dead letter is cut to fit (the header estimate's slack).
_PAYLOAD_MARGIN = 256
# The most header bytes JetStream stores with a message (nats-server refuses more: "header size exceeds
# maximum allowed of 64k").
_MAX_HEADER_BYTES = 64 * 1024
_REASON_CHARS = 1000

# Gives a message up (see the module): (message, cause, reason).
Bury = Callable[[Msg, str, str], Awaitable[None]]

# Handler of `consume_batches`: takes the batch, returns {index in the batch: why that message can never be
# processed}; raises when the batch should be redelivered.
BatchHandler = Callable[[Sequence[Msg]], Awaitable[Mapping[int, PermanentError]]]


async def consume(js: JetStreamContext, *, stream: str, durable: str, subject: str,
                  handler: Callable[[Msg], Awaitable[None]], batch: int = 64,
                  ack_wait_s: float = 30.0, nak_delay_s: float = 1.0,
                  dead_after: int = DEAD_AFTER_DELIVERIES) -> None:
    """Hands each message to `handler` (see the module); `dead_after` 0: a failing message is retried for
    as long as it fails."""
    await ensure_pull_consumer(js, stream, durable, subject, ack_wait_s=ack_wait_s)
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
    bury: Bury = partial(_bury, js, durable)
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            progress = asyncio.create_task(_in_progress(msgs, ack_wait_s))
            try:
                for msg in msgs:
                    try:
                        with tracing.consumer_span(f"consume {msg.subject}", msg.headers,
                                                   {"messaging.system": "nats",
                                                    "messaging.destination.name": msg.subject,
                                                    "messaging.consumer.group.name": durable}):
                            await handler(msg)
                        await msg.ack()
                    except asyncio.CancelledError:
                        raise
                    except PermanentError as exc:
                        await bury(msg, "permanent", str(exc))
                    except Exception as exc:
                        if refused_value(exc):
                            await bury(msg, "refused_value", f"the database refuses a value it holds: {exc}")
                            continue
                        if out_of_deliveries(msg, exc, dead_after):
                            log.exception("handler failed for %s at its last delivery", msg.subject)
                            await bury(msg, "deliveries", _given_up(msg, exc))
                            continue
                        delay = nak_delay(msg, nak_delay_s, exc)
                        log.exception("handler failed for %s; will retry in %.0f s", msg.subject, delay)
                        await _settle(msg.nak(delay=delay), msg)
            finally:
                progress.cancel()
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            log.debug("unsubscribe failed", exc_info=True)


async def consume_batches(js: JetStreamContext, *, stream: str, durable: str, subject: str,
                          handler: BatchHandler, batch: int = 256, fetch_wait_s: float = 1.0,
                          ack_wait_s: float = 30.0, nak_delay_s: float = 1.0, in_flight: int = 1,
                          dead_after: int = DEAD_AFTER_DELIVERIES,
                          until: asyncio.Event | None = None) -> None:
    """Like `consume`, but the handler gets each fetch's messages together (see the module doc).

    A fetch returns at once with whatever is pending (up to `batch`), waiting up to `fetch_wait_s` only when
    nothing is: batches grow by themselves when messages arrive faster than they are handled, and a lone
    message is not held back. Up to `in_flight` batches are handled at once (the next is fetched while the
    last is handled): a handler that allows more than one must keep whatever order it needs itself. Each
    batch is settled when its own handler returns. `batch` x `in_flight` must not exceed the consumer's
    max_ack_pending (1000 here, or more when they need it).

    Once `until` is set it fetches no more: it returns when the batches it holds are handled and settled
    (cancel it to stop sooner; what it fetched and did not settle is redelivered after the ack wait).
    """
    await ensure_pull_consumer(js, stream, durable, subject, ack_wait_s=ack_wait_s,
                               max_ack_pending=max(1000, batch * max(1, in_flight)))
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
    bury: Bury = partial(_bury, js, durable)
    handling: set[asyncio.Task[None]] = set()
    try:
        while until is None or not until.is_set():
            while len(handling) >= max(1, in_flight):
                _, handling = await asyncio.wait(handling, return_when=asyncio.FIRST_COMPLETED)
            if until is not None and until.is_set():
                break
            try:
                msgs = await sub.fetch(batch, timeout=fetch_wait_s)
            except (TimeoutError, NatsTimeoutError):
                continue
            if msgs:
                handling.add(asyncio.create_task(_in_time(
                    msgs, ack_wait_s, _handle_batch(msgs, handler, nak_delay_s, bury, dead_after))))
        if handling:
            await asyncio.wait(handling)
    finally:
        await cancel_and_wait(handling)
        try:
            await sub.unsubscribe()
        except Exception:
            log.debug("unsubscribe failed", exc_info=True)


async def unsettled(js: JetStreamContext, stream: str, durable: str,
                    filter_subject: str) -> list[tuple[str, bytes]]:
    """What the consumer handed out and is not acked yet, nor anything after it that it handed out, in
    stream order, as (subject, data) read from the stream (one that keeps acked messages: limits
    retention). For the new holder of a lease to store first what a holder that died had fetched, instead
    of after the ack wait, behind what came next (services.metrics.ingest). Some of it may have been handled
    already (acks come in any order, and one may have been lost): the handler must be idempotent. Empty
    when the consumer does not exist yet."""
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        return []
    first = (info.ack_floor.stream_seq or 0) + 1 if info.ack_floor else 1
    last = (info.delivered.stream_seq or 0) if info.delivered else 0
    found: list[tuple[str, bytes]] = []
    seq = first
    while seq <= last:
        try:
            raw = await js.get_msg(stream, seq, subject=filter_subject, next=True)
        except NotFoundError:  # nothing on the subject from `seq` on (removed by the stream's limits)
            break
        if raw.seq is None or raw.seq > last:
            break
        found.append((raw.subject or "", raw.data or b""))
        seq = raw.seq + 1
    return found


async def _handle_batch(msgs: Sequence[Msg], handler: BatchHandler, nak_delay_s: float, bury: Bury,
                        dead_after: int) -> None:
    """Hands the batch over and settles each message. When the handler fails for a reason that is not the
    database being unreachable (`unreachable`), the batch is handed over again in halves, and so on down
    to single messages: one message that makes the handler fail (a value nothing checked for yet) is
    redelivered alone (until its `dead_after`th delivery), and the rest of its batch is stored, not held
    back with it on every redelivery."""
    try:
        refused = await handler(msgs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if len(msgs) > 1 and not unreachable(exc):
            log.warning("batch handler failed for %d messages (%s: %s); handling each half alone", len(msgs),
                        type(exc).__name__, exc)
            half = len(msgs) // 2
            await _handle_batch(msgs[:half], handler, nak_delay_s, bury, dead_after)
            await _handle_batch(msgs[half:], handler, nak_delay_s, bury, dead_after)
            return
        if len(msgs) == 1 and refused_value(exc):
            await bury(msgs[0], "refused_value", f"the database refuses a value it holds: {exc}")
            return
        last = len(msgs) == 1 and out_of_deliveries(msgs[0], exc, dead_after)
        log.exception("batch handler failed for %d messages; %s", len(msgs),
                      "that was its last delivery" if last else "will retry")
        if last:
            await bury(msgs[0], "deliveries", _given_up(msgs[0], exc))
            return
        for msg in msgs:
            await _settle(msg.nak(delay=nak_delay(msg, nak_delay_s, exc)), msg)
        return
    for index, msg in enumerate(msgs):
        reason = refused.get(index)
        if reason is None:
            await _settle(msg.ack(), msg)
        else:
            await bury(msg, "permanent", str(reason))


MAX_NAK_DELAY_S = 60.0
UNREACHABLE_NAK_DELAY_S = 5.0


def refused_value(exc: BaseException) -> bool:
    """Whether `exc` is the database refusing a value (a DB-API DataError, from the driver or wrapped by
    SQLAlchemy: too long for its column, out of its type's range): the same message fails the same way
    on every delivery."""
    return any(cls.__name__ == "DataError" for cls in type(exc).__mro__)


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a server the handler needs (or the network to it) failed rather than something
    in the batch: a DB-API OperationalError or InterfaceError, raised by the driver or wrapped by
    SQLAlchemy, a NATS error, or an OSError. Splitting a batch cannot help then; it is retried whole."""
    if isinstance(exc, OSError | NatsError):
        return True
    return any(cls.__name__ in ("OperationalError", "InterfaceError") for cls in type(exc).__mro__)


def nak_delay(msg: Msg, first_s: float, exc: BaseException | None = None) -> float:
    """How long JetStream waits before redelivering a message that failed with `exc`: `first_s` after its
    first delivery, doubling with each further one, at most `MAX_NAK_DELAY_S`, or `UNREACHABLE_NAK_DELAY_S`
    when `exc` says a server was unreachable (`unreachable`: the message is not at fault, and it should go
    through soon after the server is back); never less than `first_s`."""
    delivered = _delivered(msg)
    cap = UNREACHABLE_NAK_DELAY_S if exc is not None and unreachable(exc) else MAX_NAK_DELAY_S
    return min(first_s * 2 ** min(delivered - 1, 16), max(cap, first_s))


async def _in_progress(msgs: Sequence[Msg], ack_wait_s: float) -> None:
    """Tells JetStream, every third of `ack_wait_s`, that the messages not settled yet are still being
    handled (an in-progress ack, +WPI): a fetch handled for longer than the ack wait (a slow database, a
    batch halved down to its failing message, the last messages of a `consume` fetch) is then not handed
    to another replica of the service meanwhile. Runs until cancelled."""
    while True:
        await asyncio.sleep(ack_wait_s / 3)
        for msg in msgs:
            if not msg.is_acked:  # neither acked, naked nor terminated yet
                try:
                    await msg.in_progress()
                except Exception:  # only means JetStream may redeliver it after the ack wait
                    log.debug("in-progress ack failed for %s", msg.subject, exc_info=True)


async def _in_time(msgs: Sequence[Msg], ack_wait_s: float, handling: Awaitable[None]) -> None:
    """Awaits `handling` of `msgs` while telling JetStream they are in progress (`_in_progress`)."""
    progress = asyncio.create_task(_in_progress(msgs, ack_wait_s))
    try:
        await handling
    finally:
        progress.cancel()


def _delivered(msg: Msg) -> int:
    try:
        return max(1, int(msg.metadata.num_delivered or 1))
    except Exception:  # not a JetStream message (no metadata to read)
        return 1


def out_of_deliveries(msg: Msg, exc: BaseException, dead_after: int) -> bool:
    """Whether a message that failed with `exc` has had its last delivery: its `dead_after`th (0: never),
    and `exc` not an unreachable server (an outage is waited out)."""
    return dead_after > 0 and _delivered(msg) >= dead_after and not unreachable(exc)


def _given_up(msg: Msg, exc: BaseException) -> str:
    return f"failed {_delivered(msg)} deliveries, the last with {type(exc).__name__}: {exc}"


async def _bury(js: JetStreamContext, durable: str, msg: Msg, cause: str, reason: str) -> None:
    """Keeps `msg` in the dead-letter stream (see the module), then terminates it; naks it instead when it
    could not be kept. Published with a Nats-Msg-Id of its stream, consumer and sequence: a message given up
    on twice (its termination lost) is kept once."""
    try:
        stream, sequence = msg.metadata.stream, int(msg.metadata.sequence.stream or 0)
    except Exception:  # not a JetStream message
        stream, sequence = "", 0
    own = {DEAD_SUBJECT: msg.subject, DEAD_CONSUMER: durable, DEAD_CAUSE: cause,
           DEAD_REASON: " ".join(reason.split())[:_REASON_CHARS],
           DEAD_DELIVERIES: str(_delivered(msg)), DEAD_SEQUENCE: str(sequence)}
    if sequence:
        own["Nats-Msg-Id"] = f"{stream}.{durable}.{sequence}"
    headers, data = _fitted(js, {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")},
                            own, msg.data)
    kept_in = subjects.dead_letters(stream or "unknown", durable)
    try:
        await js.publish(kept_in, data, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.warning("could not keep the message on %s as a dead letter (%s: %s); it will be redelivered",
                    msg.subject, cause, reason, exc_info=True)
        await _settle(msg.nak(delay=UNREACHABLE_NAK_DELAY_S), msg)
        return
    DEAD_LETTERS.labels(durable, cause).inc()
    log.error("gave up on the message on %s (%s: %s); kept on %s", msg.subject, cause, reason, kept_in)
    await _settle(msg.term(), msg)


def _header_bytes(headers: Mapping[str, str]) -> int:
    """The size of `headers` as NATS sends them ("NATS/1.0", a line each, a blank line)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def _fitted(js: JetStreamContext, theirs: dict[str, str], own: dict[str, str],
            data: bytes) -> tuple[dict[str, str], bytes]:
    """The dead letter's headers and body within the server's max_payload, which counts both: a message
    published near that size has no room left for the dead letter's headers, and the server would refuse
    the whole (closing the connection) each time the message came back. Nor may the headers pass
    JetStream's 64 KiB: original headers that leave no room for the dead letter's own are dropped
    (DEAD_HEADERS_DROPPED: their size); a body too large keeps its start (DEAD_TRUNCATED: its size). The
    original stays in its own stream, at DEAD_SEQUENCE, while that stream keeps it."""
    headers = {**theirs, **own}
    if _header_bytes(headers) > _MAX_HEADER_BYTES - _PAYLOAD_MARGIN:
        headers = {**own, DEAD_HEADERS_DROPPED: str(_header_bytes(theirs))}
    limit = int(getattr(getattr(js, "_nc", None), "max_payload", 0) or 0) - _PAYLOAD_MARGIN
    if limit <= 0 or _header_bytes(headers) + len(data) <= limit:
        return headers, data
    headers[DEAD_TRUNCATED] = str(len(data))
    return headers, data[:max(limit - _header_bytes(headers), 0)]


async def _settle(outcome: Awaitable[None], msg: Msg) -> None:
    """Acks, naks or terminates; a failure there (connection lost) only means JetStream redelivers the
    message after ack_wait, which the handlers tolerate, so it must not stop the loop."""
    try:
        await outcome
    except asyncio.CancelledError:
        raise
    except Exception:
        log.warning("could not settle a message on %s; it will be redelivered", msg.subject, exc_info=True)
