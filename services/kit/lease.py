"""A lease on NATS: one holder at a time of a named role among the replicas of a service.

For work that must be done by one process at a time however many replicas run, such as the metrics
ingest, whose reports must be stored in the order they were published (services.metrics.ingest). The
lease is a key of the JetStream key-value bucket `LEASE_BUCKET`, written with a per-message TTL
(nats-server 2.11 or later):
- `acquire` creates the key; it succeeds only when no one holds it (the key is absent: never written,
  released, or expired). Until then it tries again every quarter of the TTL.
- `keep` writes the key again every third of the TTL, each write expecting the revision of the holder's
  last (JetStream's `Nats-Expected-Last-Subject-Sequence`). It returns when a write is refused and the key
  does not hold this holder's name (someone else holds it: this holder was paused for longer than the
  TTL; a write that got through but whose answer was lost is taken for what it is), or when no write got
  through for the TTL less one renewal (NATS unreachable: by then someone else may hold it).
- `release` deletes the key, expecting the holder's revision: a replica that stops hands the role over at
  the next try of one that waits, not after the TTL.
A holder that dies leaves the key to expire: the role moves within the TTL and a quarter, or at once where
something that saw it die releases it for it (`release_for_the_dead`). A holder paused
for longer than its TTL (a stopped process, a long GC pause) may act for a moment beside the next one;
whoever relies on a lease says what that costs it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import Header, KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tuneforge_core.nats import StreamSettings

log = logging.getLogger(__name__)

LEASE_BUCKET = "tf_leases"
# JetStream's code for a write whose expected last sequence is not the subject's (the key changed).
_WRONG_LAST_SEQUENCE = 10071


def holder_name() -> str:
    """This process, as a lease names its holder: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The lease on `role` for `holder`, held `ttl_s` seconds after each write (whole seconds, at least
    2: JetStream's per-message TTL)."""

    def __init__(self, js: JetStreamContext, role: str, holder: str, ttl_s: float) -> None:
        self.js, self.role, self.holder = js, role, holder
        self.ttl_s = max(2, math.ceil(ttl_s))
        self.revision = 0  # of the holder's last write; 0 while not held
        self._kv: KeyValue | None = None

    async def bucket(self) -> KeyValue:
        """The bucket, created where it does not exist yet (by whichever replica comes first: creating it
        again with the same configuration changes nothing)."""
        if self._kv is None:
            try:
                self._kv = await self.js.key_value(LEASE_BUCKET)
            except BucketNotFoundError:
                self._kv = await self.js.create_key_value(KeyValueConfig(
                    bucket=LEASE_BUCKET, history=1, replicas=StreamSettings().stream_replicas or 1,
                    description="who holds each role that one replica at a time may have"))
        return self._kv

    @property
    def held(self) -> bool:
        return self.revision > 0

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Waits until this holder has the lease (True) or `stop` is set (False)."""
        waited = False
        while not stop.is_set():
            try:
                kv = await self.bucket()
                self.revision = await kv.create(self.role, self.holder.encode(), msg_ttl=self.ttl_s)
                log.info("%s holds the %s lease", self.holder, self.role)
                return True
            except KeyWrongLastSequenceError:
                if not waited:
                    log.info("the %s lease is held by %s; %s waits for it", self.role,
                             await self._holder_now(), self.holder)
                waited = True
            except (NatsError, OSError) as exc:
                log.warning("cannot take the %s lease (%s: %s); trying again", self.role,
                            type(exc).__name__, exc)
            try:
                await asyncio.wait_for(stop.wait(), self.ttl_s / 4)
            except TimeoutError:
                pass
        return False

    async def keep(self) -> None:
        """Renews the held lease until it is lost; returns then (see the module doc)."""
        loop = asyncio.get_running_loop()
        every = self.ttl_s / 3
        renewed = loop.time()
        while True:
            await asyncio.sleep(every)
            try:
                ack = await self.js.publish(
                    f"$KV.{LEASE_BUCKET}.{self.role}", self.holder.encode(),
                    headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(self.revision)},
                    msg_ttl=self.ttl_s, timeout=every)
                self.revision, renewed = ack.seq, loop.time()
            except Exception as exc:  # refused, or NATS unreachable
                if getattr(exc, "err_code", None) == _WRONG_LAST_SEQUENCE:
                    mine = await self._own_revision()
                    if mine:  # the last renewal was written, its answer lost
                        self.revision = mine
                        continue
                    log.warning("%s lost the %s lease: it was taken over", self.holder, self.role)
                    self.revision = 0
                    return
                if loop.time() - renewed >= self.ttl_s - every:
                    log.warning("%s gives the %s lease up: not renewed for %.0f s (%s: %s)", self.holder,
                                self.role, loop.time() - renewed, type(exc).__name__, exc)
                    self.revision = 0
                    return
                log.warning("cannot renew the %s lease (%s: %s); trying again", self.role,
                            type(exc).__name__, exc)

    async def release(self) -> None:
        """Deletes the key if this holder still has it, so that another replica takes the role at once."""
        revision, self.revision = self.revision, 0
        if not revision:
            return
        try:
            await (await self.bucket()).delete(self.role, last=revision)
            log.info("%s released the %s lease", self.holder, self.role)
        except Exception as exc:  # it expires after the TTL anyway
            log.warning("could not release the %s lease (%s: %s); it expires within %d s", self.role,
                        type(exc).__name__, exc, self.ttl_s)

    async def release_for_the_dead(self) -> bool:
        """For whoever knows that this holder is gone (the parent that saw its process die): deletes the key
        if it still names this holder, so that the next holder takes the role at once instead of after the
        TTL. True when it did."""
        self.revision = await self._own_revision()
        if not self.revision:
            return False
        await self.release()
        return True

    async def _own_revision(self) -> int:
        """The key's revision if this holder wrote its value, else 0."""
        try:
            entry = await (await self.bucket()).get(self.role)
        except Exception:  # deleted, expired, or unreadable: not ours to keep
            return 0
        return entry.revision or 0 if entry.value == self.holder.encode() else 0

    async def _holder_now(self) -> str:
        try:
            entry = await (await self.bucket()).get(self.role)
        except Exception:  # only for the log line
            return "another replica"
        return (entry.value or b"").decode(errors="replace") or "another replica"
