"""Core NATS as the live feed: what the metrics service announces after a commit, and what streams follow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

LiveMessage = tuple[str, bytes]


class NatsLiveFeed:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc

    async def publish(self, subject: str, payload: bytes) -> None:
        """Fire and forget: a follower that misses it still finds the data in the database."""
        await self._nc.publish(subject, payload)

    @contextlib.asynccontextmanager
    async def subscribe(self, subjects: Sequence[str]) -> AsyncIterator[asyncio.Queue[LiveMessage]]:
        """Queues every message on `subjects` until the block ends.

        The block starts only after the server has confirmed the interest (a flush round trip), so
        anything published after it is queued: reading the database next is then free of gaps.
        """
        queue: asyncio.Queue[LiveMessage] = asyncio.Queue()

        async def on_message(msg: Msg) -> None:
            queue.put_nowait((msg.subject, msg.data))

        subscriptions: list[Subscription] = []
        try:
            for subject in subjects:
                subscriptions.append(await self._nc.subscribe(subject, cb=on_message))
            await self._nc.flush()
            yield queue
        finally:
            for sub in subscriptions:
                try:
                    await sub.unsubscribe()
                except Exception:
                    log.debug("unsubscribe from %s failed", sub.subject, exc_info=True)
