"""Cleanup that a cancelled call cannot skip: waiting out the worker threads that still write, then
removing what they stored.

Threads cannot be stopped: a thread still storing objects or committing after a cancelled RPC gave up
would escape the cleanup that follows. Every change of a dataset therefore awaits its threads with
`to_the_end`, and deletes the objects it stored unless its commit `succeeded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from tuneforge_core.storage import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")


async def to_the_end(work: Awaitable[T]) -> T:
    """Awaits `work` even when the caller is cancelled meanwhile (then re-raises the cancellation)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


def succeeded(task: asyncio.Future[Any] | None) -> bool:
    """Whether `task` ran and returned (not cancelled, no exception)."""
    return task is not None and task.done() and not task.cancelled() and task.exception() is None


def delete_objects(store: ObjectStore, prefix: str) -> None:
    """Deletes every object under `prefix`, best effort: objects left behind are orphaned but harmless
    (no row points at them), so a failure is logged rather than raised over the caller's own outcome."""
    try:
        store.delete_prefix(prefix)
    except Exception:
        log.exception("could not delete objects under %s; they are orphaned", prefix)
