"""Job states and the moves between them: the one copy every service, the CLI and the worker read.

```
            ┌──────────── cancel ─────────────┐
 QUEUED ──▶ PREPARING ──▶ RUNNING ──▶ SUCCEEDED │
   │  ▲        │  ▲          │  │     FAILED    ▼
   │  └────────┴──┴──────────┘  └──▶ CANCELLING ──▶ CANCELLED
   └──────────── cancel ──────────────────────────▶ CANCELLED
```
(the arrow back into QUEUED: the worker holding the job was lost and deliveries are left)

A new delivery of the job (another attempt) may move PREPARING or RUNNING back to PREPARING; any state
that has not ended may fail (a worker's failure, or WORKER_LOST when deliveries ran out). SUCCEEDED,
FAILED and CANCELLED are final: nothing moves a job out of them.

PREPARING or RUNNING may also go back to QUEUED: the jobs service does so when the worker holding the job
stopped sending heartbeats (or shut down) while deliveries are left, with Job.status_message saying which
worker and which attempt comes next. The job's attempt stays that of the lost delivery until a worker
takes the next one (QUEUED -> PREPARING, attempt + 1). A heartbeat from that same worker still running that
same attempt moves it back to where it was (QUEUED -> PREPARING or RUNNING).
"""

from __future__ import annotations

from typing import TypeAlias

import grpc
from google.rpc import status_pb2
from tuneforge.v1 import job_pb2

from tuneforge_core.errors import error_status
from tuneforge_core.reasons import Reason

S = job_pb2.JobState
State: TypeAlias = job_pb2.JobState.ValueType

FINAL: frozenset[State] = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED})
# Jobs that have not ended: they still hold their dataset, a queue slot or a worker.
ACTIVE: frozenset[State] = frozenset(
    {S.JOB_STATE_QUEUED, S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLING}
)
# A worker holds the job (it has started on some delivery and not ended).
ON_WORKER: frozenset[State] = frozenset({S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLING})
# A worker that sees one of these stops (or never starts) the job.
CANCEL_REQUESTED: frozenset[State] = frozenset({S.JOB_STATE_CANCELLING, S.JOB_STATE_CANCELLED})

TRANSITIONS: dict[State, frozenset[State]] = {
    S.JOB_STATE_UNSPECIFIED: frozenset({S.JOB_STATE_QUEUED}),
    S.JOB_STATE_QUEUED: frozenset(
        {S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}
    ),
    S.JOB_STATE_PREPARING: frozenset({
        S.JOB_STATE_QUEUED, S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED,
        S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLING, S.JOB_STATE_CANCELLED,
    }),
    S.JOB_STATE_RUNNING: frozenset({
        S.JOB_STATE_QUEUED, S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED,
        S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLING, S.JOB_STATE_CANCELLED,
    }),
    S.JOB_STATE_CANCELLING: frozenset({S.JOB_STATE_CANCELLED, S.JOB_STATE_FAILED, S.JOB_STATE_SUCCEEDED}),
    S.JOB_STATE_SUCCEEDED: frozenset(),
    S.JOB_STATE_FAILED: frozenset(),
    S.JOB_STATE_CANCELLED: frozenset(),
}


def is_final(state: int) -> bool:
    return state in FINAL


def can_move(current: int, target: int) -> bool:
    """Whether the state machine allows `current` -> `target` (an unknown state allows nothing)."""
    return target in TRANSITIONS.get(current, frozenset())  # type: ignore[call-overload]


def name(state: int) -> str:
    """The state's short name ("RUNNING"), or its number when this build does not know it."""
    try:
        return S.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return str(state)


def cancelled_status() -> status_pb2.Status:
    """The Job.error of a cancelled job (CANCELLED, reason CANCELLED)."""
    return error_status(grpc.StatusCode.CANCELLED, "The job was cancelled by a user.", Reason.CANCELLED)
