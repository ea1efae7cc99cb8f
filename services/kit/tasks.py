"""Ending background tasks, even those that lose a cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# A task still running this long after its cancel is cancelled again; after GIVE_UP_S it is left running.
RECANCEL_S = 1.0
GIVE_UP_S = 10.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, recancel_s: float = RECANCEL_S,
                          give_up_s: float = GIVE_UP_S) -> set[asyncio.Task[Any]]:
    """Cancels the tasks and waits until they have ended, cancelling those still running again every
    `recancel_s`: a cancellation can be lost. On Python 3.11, `asyncio.wait_for` returns its future's result
    when that future completes in the same turn of the event loop as the cancel, and nats-py's
    `Subscription.next_msg` awaits one under every fetch of a consumer: a consumer cancelled as a message
    arrived went on consuming, and the shutdown that awaited it waited for ever (the services process
    outlived a killed `tuneforge up`).

    Returns the tasks still running after `give_up_s` (logged). What the tasks raised is not raised here."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_s
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(recancel_s, left))
    if pending:
        log.warning("%d task(s) still running %.0f s after they were cancelled: %s", len(pending), give_up_s,
                    ", ".join(sorted(task.get_name() for task in pending)))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: asyncio would log it as never retrieved
    return pending
