"""The jobs component served for real (gRPC on port 0, the tests' nats-server, SQLite), for tests that
call it as a client does or watch what it records."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.jobs.component import JobsComponent
from services.jobs.settings import JobSettings
from services.kit.runtime import Runtime, serve
from tuneforge_core.settings import KitSettings


@contextlib.asynccontextmanager
async def served_jobs(kit_settings: KitSettings, name: str) -> AsyncIterator[tuple[JobsComponent, str]]:
    """The served jobs component and its address; stopped on exit."""
    settings = JobSettings(**kit_settings.model_dump())
    built: list[JobsComponent] = []
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    def factory(runtime: Runtime) -> JobsComponent:
        built.append(JobsComponent(runtime, settings))
        return built[0]

    server = asyncio.create_task(serve([factory], kit_settings, name=name, on_ready=ready.set_result,
                                       stop=stop))
    address = await asyncio.wait_for(ready, 15)
    try:
        yield built[0], address
    finally:
        stop.set()
        await asyncio.wait_for(server, 15)
