"""Answers worked out once: a bounded map of computed results, and a timed one for what the database holds.

The catalog is fixed for the life of the process and the arithmetic (services.estimation.estimator) is a
pure function of frozen inputs, so an answer computed for one set of inputs is the answer for the same
inputs again. `Memo` keeps the most recently used ones, keyed by those inputs themselves (frozen
dataclasses, or a protobuf request's deterministic serialization), never by anything coarser: a key that
differs in any figure the arithmetic reads is another key. What can change while the process runs (a
calibration that a finished job just recorded) is part of the key, or is kept by `Expiring` for a few
seconds only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Requests larger than this (a spec's serialized bytes) are answered without being remembered: the key would
# cost more memory than the answer saves, and a caller could fill the memo with megabyte keys.
MAX_KEY_BYTES = 4096


class Memo(Generic[K, V]):
    """The `maxsize` most recently used results by key. Thread-safe: reads on the event loop, writes from
    the loop or a worker thread. A result that raised is never kept (errors are computed again)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: K, value: V) -> V:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        found = self.get(key)
        return found if found is not None else self.put(key, compute())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class Expiring(Generic[K, V]):
    """Values read from a store, kept for `ttl_s` seconds; `forget` drops them all at once (after a write
    of this process). Another process' write shows here within `ttl_s`."""

    def __init__(
        self, ttl_s: float, maxsize: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.maxsize = maxsize
        self.clock = clock
        self._items: dict[K, tuple[float, V]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        if found is None or self.clock() >= found[0]:
            return None
        return found[1]

    def generation(self) -> int:
        """Take it before reading the store and pass it to `put`: a value read before a `forget` is not
        kept after it (it may predate the write that caused the forget)."""
        return self._generation

    def put(self, key: K, value: V, generation: int) -> None:
        with self._lock:
            if generation != self._generation or self.ttl_s <= 0:
                return
            if len(self._items) >= self.maxsize:
                self._items.clear()
            self._items[key] = (self.clock() + self.ttl_s, value)

    def forget(self) -> None:
        with self._lock:
            self._generation += 1
            self._items.clear()
