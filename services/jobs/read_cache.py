"""GetJob's answers kept between calls, never older than the job.

A job is read far more often than it changes (clients poll GetJob; the metrics service asks which job a
stream is about), and a read from the database, however light, costs a hop to a database thread. So GetJob
keeps the answer it last read of each job (by id), and gives it again while nothing says the job changed:

- Each job has a *generation* here, moved on by every change this process learns of: its own, at flush
  time, before they commit (`watch`: a session hook on the jobs database; any change of the job's row,
  whether or not it raised the revision, like a heartbeat filling in the hardware a job's usage is priced
  on), and other replicas', from their JobChanged events (`observe`). An answer is given only while its
  job's generation is the one taken before it was read; so a read that began before a change committed,
  and returns after, is not kept either. A change that rolls back only costs a read.
- Another replica's event can be late or, across a NATS reconnect, lost, and a running job's usage grows
  with the clock: an answer is therefore given for at most `ttl_s` after it was read. Within one process
  (the embedded platform, a single jobs service) answers are exact but for that clock; across replicas
  they are at most `ttl_s` old.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session
from tuneforge.v1 import job_pb2

from services.jobs.models import JobDeletionRow, JobRow
from services.kit.db import Database


class JobReadCache:
    # Generations kept, the least recently moved forgotten first: one matters only while a read of its job
    # is in flight or an answer of it kept, and an answer lives `ttl_s` at most.
    GENERATIONS = 100_000

    def __init__(self, *, ttl_s: float = 1.0, size: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._lock = threading.Lock()  # flush hooks run on database threads
        self._generations: OrderedDict[str, int] = OrderedDict()
        # job id -> (read at, monotonic seconds; the generation it was read in; the job)
        self._answers: OrderedDict[str, tuple[float, int, job_pb2.Job]] = OrderedDict()

    # -- what the job is now ---------------------------------------------------------------------

    def get(self, organization: str, job_id: str) -> job_pb2.Job | None:
        """A copy of the kept answer for the organization's job `job_id`, or None when there is none fit to
        give (never read, too old, or the job changed since)."""
        kept = self._answers.get(job_id)
        if kept is None:
            return None
        read_at, generation, job = kept
        if (time.monotonic() - read_at > self.ttl_s or job.organization != organization
                or generation != self._generations.get(job_id, 0)):
            return None
        copy = job_pb2.Job()
        copy.CopyFrom(job)
        return copy

    def generation(self, job_id: str) -> int:
        """The job's generation now: take it before reading the job, for `keep`."""
        return self._generations.get(job_id, 0)

    def keep(self, job: job_pb2.Job, generation: int) -> None:
        """Keeps `job`, read from the database after `generation(job.id)` returned `generation`, unless a
        change moved the generation on meanwhile."""
        with self._lock:
            if self._generations.get(job.id, 0) != generation:
                return
            kept = job_pb2.Job()
            kept.CopyFrom(job)
            self._answers[job.id] = (time.monotonic(), generation, kept)
            self._answers.move_to_end(job.id)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)

    # -- what changed ----------------------------------------------------------------------------

    def changed(self, job_id: str) -> None:
        """The job changed (or is about to): its kept answer, and any read in flight, are out of date."""
        with self._lock:
            self._generations[job_id] = self._generations.get(job_id, 0) + 1
            self._generations.move_to_end(job_id)
            while len(self._generations) > self.GENERATIONS:
                self._generations.popitem(last=False)
            self._answers.pop(job_id, None)

    def observe(self, job_id: str) -> None:
        """A JobChanged event of the job, from this replica or another."""
        self.changed(job_id)

    def forget_all(self) -> None:
        """Drops every kept answer (a change was announced that cannot be read)."""
        with self._lock:
            self._answers.clear()

    def watch(self, db: Database) -> None:
        """Moves generations on from this process' own changes to the jobs database, as each is flushed."""

        def after_flush(session: Session, _context: Any) -> None:
            for obj in (*session.new, *session.dirty, *session.deleted):
                if isinstance(obj, JobRow) and obj.id:
                    self.changed(obj.id)
                elif isinstance(obj, JobDeletionRow):
                    self.changed(obj.job_id)

        event.listen(db.sessions, "after_flush", after_flush)
