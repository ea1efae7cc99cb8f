"""A durable JetStream pull consumer loop with explicit acks.

The handler returns normally to ack. `PermanentError` (an undecodable or impossible message) terminates
the message so it is not redelivered forever; any other exception naks it with a delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from tuneforge_core.nats import ensure_pull_consumer

log = logging.getLogger(__name__)


class PermanentError(Exception):
    """The message can never be processed; it is terminated instead of redelivered."""


async def consume(js: JetStreamContext, *, stream: str, durable: str, subject: str,
                  handler: Callable[[Msg], Awaitable[None]], batch: int = 64,
                  ack_wait_s: float = 30.0, nak_delay_s: float = 1.0) -> None:
    await ensure_pull_consumer(js, stream, durable, subject, ack_wait_s=ack_wait_s)
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                continue
            for msg in msgs:
                try:
                    await handler(msg)
                    await msg.ack()
                except asyncio.CancelledError:
                    raise
                except PermanentError as exc:
                    log.error("dropping message on %s: %s", msg.subject, exc)
                    await msg.term()
                except Exception:
                    log.exception("handler failed for %s; will retry", msg.subject)
                    await msg.nak(delay=nak_delay_s)
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            log.debug("unsubscribe failed", exc_info=True)
