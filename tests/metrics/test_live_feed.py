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


async def test_a_listener_gets_own_announcements_within_publish_and_a_failing_one_harms_nothing(
        nats_url: str) -> None:
    nc_a, nc_b = await connect(nats_url, "feed-a"), await connect(nats_url, "feed-b")
    try:
        a, b = NatsLiveFeed(nc_a), NatsLiveFeed(nc_b)
        heard: list[tuple[str, bytes]] = []

        def broken(_subject: str, _data: bytes) -> None:
            raise RuntimeError("a listener's bug")

        async with a.listen([SUBJECT], broken), a.listen([SUBJECT], lambda s, d: heard.append((s, d))), \
                b.subscribe([SUBJECT]) as theirs:
            await a.publish(SUBJECT, b"one")
            # Delivered by publish itself; the broken listener neither stopped the other nor the publish.
            assert heard == [(SUBJECT, b"one")]
            await b.publish(SUBJECT, b"two")
            # "two" comes from NATS: waited for (a fixed sleep was too short on a loaded machine), then a
            # little longer, in which the server's copy of "one" would have come too (dropped: not heard).
            for _ in range(500):
                if len(heard) >= 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert heard == [(SUBJECT, b"one"), (SUBJECT, b"two")]
            assert sorted(await drain(theirs)) == [b"one", b"two"]
        assert a._local == {}
    finally:
        await nc_a.close()
        await nc_b.close()
