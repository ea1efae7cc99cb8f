"""The lease on NATS (services.kit.lease) against a real nats-server: one holder at a time, handed over at
once on release, taken over once a holder that stopped renewing expires, and a holder that was taken
over says so."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext

from services.kit.lease import LEASE_BUCKET, Lease
from tuneforge_core.ids import new_id


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.drain()


async def leases(js: JetStreamContext, *holders: str, ttl_s: float = 2) -> list[Lease]:
    role = new_id("role").replace("_", "-")
    return [Lease(js, role, holder, ttl_s) for holder in holders]


async def test_one_holder_at_a_time_and_a_release_hands_it_over_at_once(js: JetStreamContext) -> None:
    a, b = await leases(js, "a", "b", ttl_s=30)
    stop = asyncio.Event()
    assert await a.acquire(stop) and a.held
    waiting = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(0.5)
    assert not waiting.done() and not b.held
    assert (await (await a.bucket()).get(a.role)).value == b"a"
    await a.release()
    assert not a.held
    # b tries every quarter of the TTL (7.5 s here): well before the TTL itself.
    assert await asyncio.wait_for(waiting, 10) and b.held
    assert (await (await b.bucket()).get(b.role)).value == b"b"


async def test_a_kept_lease_stays_and_one_no_longer_renewed_expires_to_the_next(js: JetStreamContext) -> None:
    a, b = await leases(js, "a", "b", ttl_s=2)
    stop = asyncio.Event()
    assert await a.acquire(stop)
    keeping = asyncio.create_task(a.keep())
    waiting = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(5)  # two and a half TTLs: a renews every 2/3 s
    assert not waiting.done() and not keeping.done()
    keeping.cancel()  # a stops renewing, as a killed holder does
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(waiting, 10)
    assert asyncio.get_running_loop().time() - started < 2 + 4  # the TTL, a try, a loaded machine


async def test_a_holder_taken_over_while_paused_finds_out_at_its_next_renewal(js: JetStreamContext) -> None:
    a, b = await leases(js, "a", "b", ttl_s=2)
    stop = asyncio.Event()
    assert await a.acquire(stop)
    assert await asyncio.wait_for(b.acquire(stop), 10)  # a did not renew: paused past its TTL
    await asyncio.wait_for(a.keep(), 5)  # returns: lost
    assert not a.held
    await a.release()  # nothing to release: b keeps it
    assert (await (await b.bucket()).get(b.role)).value == b"b"


async def test_waiting_ends_when_told_to_stop(js: JetStreamContext) -> None:
    a, b = await leases(js, "a", "b", ttl_s=30)
    stop = asyncio.Event()
    assert await a.acquire(stop)
    waiting = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(0.2)
    stop.set()
    assert await asyncio.wait_for(waiting, 2) is False


async def test_a_renewal_written_but_unanswered_is_not_taken_for_a_loss(js: JetStreamContext) -> None:
    (a,) = await leases(js, "a", ttl_s=2)
    stop = asyncio.Event()
    assert await a.acquire(stop)
    stale = a.revision
    # a's renewal reached the server, and its answer was lost: the key moved on, with a's name.
    written = await js.publish(f"$KV.{LEASE_BUCKET}.{a.role}", b"a",
                               headers={"Nats-Expected-Last-Subject-Sequence": str(stale)}, msg_ttl=2)
    keeping = asyncio.create_task(a.keep())
    await asyncio.sleep(2.5)  # past the TTL of the write a knows of: renewed meanwhile
    assert not keeping.done() and a.held and a.revision > written.seq
    keeping.cancel()


async def test_a_holder_that_died_is_released_for_by_whoever_saw_it_die(js: JetStreamContext) -> None:
    """`release_for_the_dead`: the key goes only while it names that holder; the next takes it at once."""
    dead, other, waiting = await leases(js, "dead", "other", "waiting", ttl_s=30)
    assert await dead.acquire(asyncio.Event())
    assert not await other.release_for_the_dead()  # not other's: nothing changes
    assert (await (await dead.bucket()).get(dead.role)).value == b"dead"
    stop = asyncio.Event()
    taking = asyncio.create_task(waiting.acquire(stop))
    await asyncio.sleep(0.2)
    seen_die = Lease(js, dead.role, "dead", 30)  # the parent's view of its child, sharing its name
    assert await seen_die.release_for_the_dead()
    assert await asyncio.wait_for(taking, 30 / 4 + 4)  # at its next try, not after the TTL
    assert not await seen_die.release_for_the_dead()  # now waiting's
    assert (await (await waiting.bucket()).get(waiting.role)).value == b"waiting"
