"""Stop requests for a training process: SIGTERM/SIGINT from the agent, or the agent itself dying.

Before training starts (imports, model loading, tokenizing) there is nothing to keep, so a stop request
interrupts at once by raising :class:`~trainer_worker.errors.Cancelled` from the signal handler, except
inside :meth:`StopSignal.deferred` (the imports of the training stack): an exception raised while a C
extension initializes its module can abort the whole process (SIGABRT, no clean exit), so there the
request is only noted and raised as soon as the block ends. Once the
training loop runs, a request only sets a flag that the loop reads between optimizer steps, so a stop never
leaves a half-applied update or a half-written file behind.

When the parent is gone no one will wait for a clean exit: the watcher thread delivers SIGTERM to its own
process and, after a grace period, ends the process outright rather than let an orphan train on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from trainer_worker.errors import Cancelled

EXIT_CANCELLED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
EXIT_ORPHANED = 129


class StopSignal:
    """Set once by a signal handler or the parent watcher; read by the training loop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        # True until training starts: the signal handler raises instead of only setting the flag.
        self.interruptible = True

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a stop request does not interrupt; a request made inside it is raised at its end."""
        interruptible, self.interruptible = self.interruptible, False
        try:
            yield
        finally:
            self.interruptible = interruptible
        if interruptible and self.requested:
            self.interruptible = False
            raise Cancelled(self.reason)

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def install(self, *, poll_seconds: float = 0.5, orphan_grace_seconds: float = 30.0) -> StopSignal:
        """Handle SIGTERM/SIGINT and start watching the parent process."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.request(f"received {signal.Signals(signum).name}")
            if self.interruptible:
                self.interruptible = False  # raise once; cleanup code must not be interrupted again
                raise Cancelled(self.reason)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        parent = os.getppid()
        # A parent that died while this process was still importing has already handed it to init (pid 1):
        # watching for a change of parent would then wait forever.
        orphaned = parent == 1

        def watch_parent() -> None:
            while not orphaned and os.getppid() == parent:
                time.sleep(poll_seconds)
            self.request("parent exited")
            os.kill(os.getpid(), signal.SIGTERM)  # handled on the main thread, like the agent's own SIGTERM
            time.sleep(orphan_grace_seconds)
            os._exit(EXIT_ORPHANED)

        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
        return self
