"""The jobs service's half of tracker secrets (tuneforge_core.tracker_secrets has the whole story).

CreateJob calls `TrackerSecretKeeper.seal`: the spec loses its secrets, the assignment gains them sealed
with the credentials key, exactly as the datasets service seals import credentials (the same
`CredentialCipher`, the same TUNEFORGE_CREDENTIALS_KEY or generated <data_dir>/secrets/credentials.key).
The component answers the holding worker's TrackerSecretsRequest with `answer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Protocol

import grpc
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.models import JobRow
from services.kit.db import Database
from tuneforge_core import states
from tuneforge_core.errors import FailedPrecondition, error_status
from tuneforge_core.reasons import Reason
from tuneforge_core.tracker_secrets import OneTimeKey, payload, read_payload

log = logging.getLogger(__name__)
S = job_pb2.JobState


class Cipher(Protocol):
    """What the keeper needs of `services.kit.credentials.CredentialCipher` (the component hands it
    one): the deployment's one cipher of sealed credentials. Its errors are RuntimeErrors
    (CredentialsKeyError: a malformed key, or a blob sealed with a key this server lacks)."""

    def seal(self, plaintext: bytes) -> bytes: ...

    def open(self, sealed: bytes) -> bytes: ...


class TrackerSecretKeeper:
    """Seals a new job's tracker secrets, and opens them for the worker holding the job, only."""

    def __init__(self, db: Database, cipher: Callable[[], Cipher]) -> None:
        self.db = db
        self._cipher_factory = cipher
        self._cipher: Cipher | None = None

    def cipher(self) -> Cipher:
        if self._cipher is None:  # read (or generated) on first use, like the datasets service's
            self._cipher = self._cipher_factory()
        return self._cipher

    def seal(self, job_id: str, secrets: dict[str, str]) -> bytes:
        """The sealed blob of the secrets `tuneforge_core.tracker_secrets.take_secrets` took out of the
        job's spec, for its assignment; b"" when there are none."""
        if not secrets:
            return b""
        try:
            return self.cipher().seal(payload(job_id, secrets))
        except RuntimeError as exc:  # a malformed TUNEFORGE_CREDENTIALS_KEY: the operator's to mend
            raise FailedPrecondition(f"spec.integrations: the job's tracker secrets cannot be sealed here: "
                                     f"{exc}", reason=Reason.DEPENDENCY_UNAVAILABLE) from None

    async def answer(self, data: bytes) -> bytes:
        """The TrackerSecretsReply to a worker's request (serialized); refusals carry an error."""
        try:
            request = events_pb2.TrackerSecretsRequest.FromString(data)
        except Exception:
            return _refusal(grpc.StatusCode.INVALID_ARGUMENT, "an undecodable TrackerSecretsRequest")
        row = await self.db.run(lambda s: s.get(JobRow, request.job_id) if request.job_id else None)
        why = _not_holder(row, request)
        if why is not None:
            log.warning("refused the tracker secrets of job %s to worker %s (attempt %d): %s",
                        request.job_id, request.worker_id, request.attempt, why)
            return _refusal(grpc.StatusCode.FAILED_PRECONDITION, why)
        try:
            secrets = read_payload(self.cipher().open(request.sealed), request.job_id)
        except (RuntimeError, ValueError) as exc:
            log.warning("could not open the tracker secrets of job %s: %s", request.job_id, exc)
            return _refusal(grpc.StatusCode.FAILED_PRECONDITION, f"the tracker secrets do not open: {exc}",
                            Reason.DEPENDENCY_UNAVAILABLE)
        if len(request.public_key) != 32:
            return _refusal(grpc.StatusCode.INVALID_ARGUMENT, "public_key must be 32 bytes (X25519)")
        mine = OneTimeKey()
        sealed = mine.box(request.public_key, json.dumps(secrets).encode())
        log.info("handed the tracker secrets of job %s to worker %s (attempt %d)", request.job_id,
                 request.worker_id, request.attempt)
        return events_pb2.TrackerSecretsReply(public_key=mine.public, encrypted=sealed).SerializeToString()


def _not_holder(row: JobRow | None, request: events_pb2.TrackerSecretsRequest) -> str | None:
    """Why the requester may not have the job's secrets, or None when it holds the job's current delivery
    (the same record the worker updates are fenced on: services.jobs.manager._fence)."""
    if row is None:
        return "no such job"
    if row.state not in (S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING):
        return f"the job is {states.name(row.state)}, not preparing or running"
    if not request.worker_id or request.worker_id != row.worker_id or request.attempt != row.attempt:
        return (f"worker {request.worker_id} attempt {request.attempt} does not hold the job (its current "
                f"delivery is attempt {row.attempt} on worker {row.worker_id or 'none yet'})")
    return None


def _refusal(code: grpc.StatusCode, message: str, reason: Reason = Reason.PERMISSION_DENIED) -> bytes:
    return events_pb2.TrackerSecretsReply(error=error_status(code, message, reason)).SerializeToString()
