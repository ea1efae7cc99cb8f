"""The live feed on a real nats-server: a process' own announcements reach its own subscriptions once,
without the round trip through the server; other processes hear them from NATS."""

from __future__ import annotations

import asyncio

from services.metrics.live import NatsLiveFeed
from tuneforge_core.nats import connect

SUBJECT = "tuneforge.live.metrics.job_a"


async def drain(queue: asyncio.Queue[tuple[str, bytes]], settle_s: float = 0.3) -> list[bytes]:
    """What the queue holds once nothing more has arrived for `settle_s`."""
    got: list[bytes] = []
    while True:
        try:
            got.append((await asyncio.wait_for(queue.get(), settle_s))[1])
        except TimeoutError:
            return got


async def test_own_announcements_arrive_once_at_once_and_others_hear_them_from_nats(nats_url: str) -> None:
    nc_a, nc_b = await connect(nats_url, "feed-a"), await connect(nats_url, "feed-b")
    try:
        a, b = NatsLiveFeed(nc_a), NatsLiveFeed(nc_b)
        async with a.subscribe([SUBJECT]) as mine, b.subscribe([SUBJECT]) as theirs, \
                a.subscribe(["tuneforge.live.metrics.*"]) as wildcard:
            await a.publish(SUBJECT, b"one")
            # Queued by publish itself, before any round trip through the server.
            assert mine.get_nowait() == (SUBJECT, b"one")
            await a.publish(SUBJECT, b"two")
            await nc_a.flush()  # the server has a's two before b's one (across connections, no order)
            await b.publish(SUBJECT, b"three")
            assert await drain(mine) == [b"two", b"three"]  # the server's copies of its own dropped
            # b's own "three" was queued at once, a's came from NATS: each exactly once.
            assert sorted(await drain(theirs)) == [b"one", b"three", b"two"]
            # A wildcard subscription is not fed locally: it hears everything from NATS, once.
            assert sorted(await drain(wildcard)) == [b"one", b"three", b"two"]
        # Unsubscribed: nothing is queued locally for a subscription that ended.
        assert a._local == {}
        await a.publish(SUBJECT, b"four")
        assert mine.empty()
    finally:
        await nc_a.close()
        await nc_b.close()
