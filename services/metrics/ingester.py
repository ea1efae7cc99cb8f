"""The ingest of worker reports in a process of its own (`MetricsSettings.ingest_process`).

The process that serves the metrics streams writes every live point to every follower; on a busy machine its
event loop is the bottleneck of the fan-out. The ingest (JetStream fetches and acks, the database writes and
their threads, the announcements) shared that loop and that GIL. Here it runs in a child process with an
event loop, a NATS connection, a database engine and preparing processes of its own: what it stores it
announces on NATS, where the serving process hears it as it hears another replica's (services.metrics.live),
and its streams take the reports themselves from NATS as the worker publishes them (early delivery).

The child ingests while it holds the ingest lease, one replica's at a time (services.metrics.ingest), under
a holder name the service gave it. When it dies the service releases the lease for it if it still held it,
so the child started after it (or another replica) takes it at once, not after `ingest_lease_s`, and first
stores what the dead one had fetched and not acked.

`IngestProcess` starts the child, starts it again when it dies (after `RESTART_DELAY_S`), and stops it with
the service. The child ends when the service that started it ends, however that happens: it watches a pipe
whose other end only the service holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from nats.js import JetStreamContext
from tuneforge.v1 import job_pb2

from services.kit.db import Database
from services.kit.lease import Lease, holder_name
from services.kit.tasks import cancel_and_wait
from services.metrics.ingest import INGEST_LEASE, IngestHandlers, preparing_processes, run_ingest
from services.metrics.live import NatsLiveFeed
from services.metrics.manager import MetricsManager
from services.metrics.repository import StorageForm
from services.metrics.settings import MetricsSettings
from tuneforge_core import logs
from tuneforge_core.nats import connect
from tuneforge_core.settings import KitSettings

log = logging.getLogger(__name__)

# How long after the ingest process died it is started again; the delay doubles, up to MAX_RESTART_DELAY_S,
# while it keeps dying within STABLE_S of its start (a database or NATS it cannot reach).
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
STABLE_S = 10.0
# How long a stopping ingest process may take to finish the batches it holds before it is killed.
STOP_GRACE_S = 10.0


class IngestProcess:
    """The ingest's child process, kept running from `start` to `stop`."""

    def __init__(self, kit: KitSettings, settings: MetricsSettings, js: JetStreamContext) -> None:
        self.kit, self.settings, self.js = kit, settings, js
        self.process: BaseProcess | None = None
        self.holder = ""  # the lease holder name of the last child started
        self.starts = 0
        self._keep: Connection | None = None  # the service's end of the pipe the child watches
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._watch = asyncio.create_task(self._run(), name="metrics-ingest-process")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY_S
        while True:
            started = loop.time()
            process = self._spawn()
            ended: asyncio.Future[None] = loop.create_future()

            def on_end(ended: asyncio.Future[None] = ended) -> None:
                if not ended.done():
                    ended.set_result(None)

            loop.add_reader(process.sentinel, on_end)
            try:
                await ended
            finally:
                loop.remove_reader(process.sentinel)
            process.join()
            await self._release_for(process)
            delay = RESTART_DELAY_S if loop.time() - started >= STABLE_S else delay
            log.error("the metrics ingest process (pid %s) ended with exit code %s; starting it again in "
                      "%.0f s", process.pid, process.exitcode, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY_S)

    async def _release_for(self, process: BaseProcess) -> None:
        lease = Lease(self.js, INGEST_LEASE, self.holder, self.settings.ingest_lease_s)
        try:
            if await lease.release_for_the_dead():
                log.info("released the ingest lease that process %s held", process.pid)
        except Exception as exc:  # it expires after its TTL anyway
            log.warning("could not release the ingest lease that process %s held (%s: %s)", process.pid,
                        type(exc).__name__, exc)

    def _spawn(self) -> BaseProcess:
        # spawn: the service runs grpc's and the database's threads, which a fork would copy mid-work.
        context = multiprocessing.get_context("spawn")
        watched, self._keep = context.Pipe(duplex=False)
        self.holder = f"{holder_name()}:ingest-{self.starts + 1}"
        process = context.Process(target=serve, args=(self.kit, self.settings, watched, self.holder),
                                  name="tuneforge-metrics-ingest")
        process.start()
        watched.close()  # the child holds its copy: the pipe ends (EOF there) once ours is closed
        self.process = process
        self.starts += 1
        log.info("metrics ingest runs in process %s", process.pid)
        return process

    async def stop(self) -> None:
        if self._watch is not None:
            await cancel_and_wait([self._watch])
            self._watch = None
        process, keep = self.process, self._keep
        self.process = self._keep = None
        if keep is not None:
            keep.close()  # the child finishes its batches in hand, then ends
        if process is None:
            return
        await asyncio.to_thread(process.join, STOP_GRACE_S)
        if process.exitcode is None:
            log.warning("the metrics ingest process did not end within %.0f s; killing it", STOP_GRACE_S)
            process.kill()
            await asyncio.to_thread(process.join)


class _NoJobLookups:
    """The ingest never looks a job up (it checks deletions in its own database)."""

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        raise RuntimeError("the metrics ingest process does not look jobs up")


def serve(kit: KitSettings, settings: MetricsSettings, watched: Connection, holder: str) -> None:
    """The child's entry point: consumes worker reports until `watched` ends (or SIGTERM / SIGINT),
    holding the ingest lease as `holder`."""
    logs.configure(kit.log_level, kit.log_format)
    asyncio.run(_serve(kit, settings, watched, holder))
    # Its batches are written and acked, its connections closed. An exit as usual would wait for the
    # preparing processes to wind down (seconds, while one still starts); they end with this process.
    logging.shutdown()
    os._exit(0)


async def _serve(kit: KitSettings, settings: MetricsSettings, watched: Connection, holder: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(watched.fileno(), stop.set)  # readable at EOF: the service closed its end, or died
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect(kit.nats_url, "metrics-ingest", user=kit.nats_user or None,
                       password=kit.nats_password or None)
    db = Database(kit.database_url_for("metrics"), "metrics", kit.db_workers)
    preparing = preparing_processes(settings, kit)
    manager = MetricsManager(db, _NoJobLookups(), NatsLiveFeed(nc), settings, preparing=preparing)
    handlers = IngestHandlers(manager)
    form = StorageForm.of(db.engine.dialect)
    try:
        # The preparing processes start once the lease is held: a child that waits needs none.
        await run_ingest(nc.jetstream(), settings, handlers, stop, holder,
                         on_held=lambda: preparing.start(form))
    except Exception as exc:  # a consumer failed: the service starts the process again
        log.error("%r; the ingest process ends", exc, exc_info=exc)
        raise SystemExit(1) from exc
    finally:
        preparing.close()
        with contextlib.suppress(Exception):
            await nc.drain()
        db.dispose()
