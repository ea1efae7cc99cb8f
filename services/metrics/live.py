"""Core NATS as the live feed: what the metrics service announces after a commit, and what streams follow.

Announcements also loop back inside the process: a stream of this process following a job hears what this
process stored straight from `publish`, not after a round trip through the NATS server (a publish, the
server, the socket read, the subscription's callback task: each a turn of an event loop that may be busy
writing to a thousand streams). The copy the server sends back carries this feed's origin and is dropped by
the subscriptions that had it already; other processes (other replicas of the service) hear it from NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

LiveMessage = tuple[str, bytes]
# The header naming the feed (one per process) that published an announcement.
ORIGIN_HEADER = "Tuneforge-Live-Origin"


def _exact(subject: str) -> bool:
    return not any(token in ("*", ">") for token in subject.split("."))


# What `listen` hands each message to: (subject, payload). It runs inside `publish` for this process' own
# announcements, so it must be quick and must not raise.
Deliver = Callable[[str, bytes], None]


class NatsLiveFeed:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self.origin = uuid.uuid4().hex
        # This process' listeners by exact subject: what `publish` hands its payload to.
        self._local: dict[str, list[Deliver]] = {}

    async def publish(self, subject: str, payload: bytes) -> None:
        """Fire and forget: a follower that misses it still finds the data in the database. This process'
        own listeners on `subject` have it before this returns."""
        for deliver in self._local.get(subject, ()):
            try:
                deliver(subject, payload)
            except Exception:
                log.exception("a listener on %s failed", subject)
        await self._nc.publish(subject, payload, headers={ORIGIN_HEADER: self.origin})

    @contextlib.asynccontextmanager
    async def subscribe(self, subjects: Sequence[str]) -> AsyncIterator[asyncio.Queue[LiveMessage]]:
        """Queues every message on `subjects` until the block ends, each once (see `listen`)."""
        queue: asyncio.Queue[LiveMessage] = asyncio.Queue()
        async with self.listen(subjects, lambda subject, data: queue.put_nowait((subject, data))):
            yield queue

    @contextlib.asynccontextmanager
    async def listen(self, subjects: Sequence[str], deliver: Deliver) -> AsyncIterator[None]:
        """Hands every message on `subjects` to `deliver` until the block ends, each once: this process' own
        announcements from within `publish` (no turn of the event loop in between), the others' as NATS
        delivers them.

        The block starts only after the server has confirmed the interest (a flush round trip), so
        anything published after it is delivered: reading the database next is then free of gaps. (This
        process' own announcements are delivered from before the subscription is made.)
        """
        exact = {subject for subject in subjects if _exact(subject)}
        origin = self.origin

        async def on_message(msg: Msg) -> None:
            headers = msg.headers
            if headers and msg.subject in exact and headers.get(ORIGIN_HEADER) == origin:
                return  # delivered by `publish` already
            deliver(msg.subject, msg.data)

        for subject in exact:
            self._local.setdefault(subject, []).append(deliver)
        subscriptions: list[Subscription] = []
        try:
            for subject in subjects:
                subscriptions.append(await self._nc.subscribe(subject, cb=on_message))
            await self._nc.flush()
            yield
        finally:
            for subject in exact:
                listeners = self._local.get(subject, [])
                with contextlib.suppress(ValueError):
                    listeners.remove(deliver)
                if not listeners:
                    self._local.pop(subject, None)
            for sub in subscriptions:
                try:
                    await sub.unsubscribe()
                except Exception:
                    log.debug("unsubscribe from %s failed", sub.subject, exc_info=True)
