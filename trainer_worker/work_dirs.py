"""The attempts' work folders, ``<data dir>/worker/jobs/<job id>/attempt-<N>``, and who may delete them.

Each delivery of a job works in its own folder (the dataset's copy, RUN.json, the events file, train.log,
checkpoints before they are stored) and deletes it when it ends (unless TUNEFORGE_WORKER_KEEP_WORK_DIRS).
A worker killed outright (``kill -9``, the OOM killer, a lost node) never does: its folder stayed forever,
and disk use grew with every crash. Workers on one host may share the data dir, so a worker cannot simply
empty it when it starts: a sibling may be training in it.

So each attempt holds an exclusive lock (``flock``) on ``<folder>/.attempt.lock`` for as long as it runs
(its training process inherits it, so an orphan still writing there keeps it too), and :func:`sweep`
deletes the attempt folders whose lock nobody holds: a lock dies with the process that held it, whatever
killed it. The agent sweeps when it starts and every little while after (``trainer_worker.agent``), not
at all when it keeps work dirs. A folder kept on purpose (a worker with TUNEFORGE_WORKER_KEEP_WORK_DIRS
marks it ``.kept`` when its attempt ends) is never swept, whichever worker sweeps.

The race between a sweep and an attempt taking its folder: the sweep deletes a folder only while holding
its lock, and an attempt, once it holds the lock, checks that the lock file is still the one at the path
(not one the sweep deleted meanwhile) and otherwise creates the folder again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

from trainer_worker.story import size_of

log = logging.getLogger(__name__)

LOCK_NAME = ".attempt.lock"
KEPT_NAME = ".kept"
ATTEMPT_PREFIX = "attempt-"
_TRIES = 50


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (not one deleted from under it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)


class AttemptLock:
    """The running attempt's hold on its work folder: no sweep deletes the folder while it is held."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self.fd = folder, fd

    @classmethod
    def acquire(cls, folder: Path) -> AttemptLock:
        """Create `folder` (and its parents) and hold its lock. Blocks while a sweep holds it (only as long
        as the sweep takes to delete the folder, which is then created again)."""
        path = folder / LOCK_NAME
        for _ in range(_TRIES):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:  # a sweep removed a parent folder in between
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, path):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())  # for people: the agent that holds it
                    return cls(folder, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # swept meanwhile: take the new folder
        raise RuntimeError(f"could not take the work folder {folder}: it kept being deleted")

    def keep(self) -> None:
        """Mark the folder as kept on purpose (TUNEFORGE_WORKER_KEEP_WORK_DIRS): no sweep deletes it."""
        with contextlib.suppress(OSError):
            (self.folder / KEPT_NAME).touch()

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


def _sweep_one(folder: Path) -> int | None:
    """Delete `folder` if no running attempt holds its lock; its size in bytes, or None when kept."""
    if (folder / KEPT_NAME).exists():
        return None
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # deleted meanwhile, or not ours to touch
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a running attempt, in this process or another
        if not _same_file(fd, path) or (folder / KEPT_NAME).exists():
            return None
        size = size_of([folder])
        shutil.rmtree(folder, ignore_errors=True)
        return size
    finally:
        os.close(fd)


def sweep(work_root: Path) -> tuple[int, int]:
    """Delete the attempt folders under `work_root`/jobs that no running attempt holds (left by workers
    that died), and job folders left empty; returns (folders deleted, bytes freed). Each deletion is
    logged with its size, and the total once."""
    jobs = work_root / "jobs"
    removed, freed = 0, 0
    try:
        job_dirs = sorted(p for p in jobs.iterdir() if p.is_dir())
    except FileNotFoundError:
        return 0, 0
    for job_dir in job_dirs:
        try:
            attempts = sorted(p for p in job_dir.iterdir()
                              if p.name.startswith(ATTEMPT_PREFIX) and p.is_dir())
        except FileNotFoundError:
            continue
        for folder in attempts:
            try:
                size = _sweep_one(folder)
            except Exception as exc:  # never a reason to stop the worker
                log.warning("could not clean up the work folder %s: %s", folder, exc)
                continue
            if size is not None:
                removed, freed = removed + 1, freed + size
                log.info("removed the work folder of job %s %s, left by a worker that is gone (%s)",
                         job_dir.name, folder.name.replace("-", " "), _human(size))
        with contextlib.suppress(OSError):
            job_dir.rmdir()  # only when empty
    if removed:
        log.info("removed %d work folder%s of attempts no running worker holds, %s in all (%s)", removed,
                 "" if removed == 1 else "s", _human(freed), jobs)
    return removed, freed
