"""The secrets of a job's experiment trackers (JobSpec.integrations): W&B api_key, MLflow token.

Where they go, and where they never do:
- CreateJob takes them out of the spec (`take_secrets`) before anything stores it: the stored spec, GetJob,
  ListJobs, JobChanged events and the job's log never hold them.
- The jobs service seals them with its credentials key (TUNEFORGE_CREDENTIALS_KEY, the key that seals
  dataset import credentials; workers never hold it) into JobAssignment.sealed_tracker_secrets, with the
  job's id inside (`payload`), so the database, the outbox and the work queue hold only the sealed blob.
- The worker that holds the job's current delivery trades the blob for the secrets over a NATS request
  (TrackerSecretsRequest); the jobs service checks it is that job's holder and answers encrypted to a key
  pair the worker made for that one request (`box` / `unbox`: X25519, HKDF-SHA256, AES-GCM), so another
  connection of the shared "worker" NATS user that listens to replies reads nothing.
- The worker hands them to the training process as environment variables (WANDB_API_KEY,
  MLFLOW_TRACKING_TOKEN) and writes them nowhere.
"""

from __future__ import annotations

import json
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tuneforge.v1 import job_pb2

# Each secret field, by the tracker that has it, and the variable the training process gets it in.
SECRET_FIELDS: dict[tuple[str, str], str] = {
    ("wandb", "api_key"): "WANDB_API_KEY",
    ("mlflow", "token"): "MLFLOW_TRACKING_TOKEN",
}
_INFO = b"tuneforge tracker secrets v1"


def take_secrets(spec: job_pb2.JobSpec) -> dict[str, str]:
    """Clears every tracker secret in `spec` (in place); returns them by variable name."""
    out: dict[str, str] = {}
    for integration in spec.integrations:
        kind = integration.WhichOneof("integration")
        for (tracker, field), variable in SECRET_FIELDS.items():
            if kind == tracker:
                message = getattr(integration, tracker)
                value = getattr(message, field)
                if value:
                    out[variable] = value
                    message.ClearField(field)
    return out


def has_secrets(spec: job_pb2.JobSpec) -> bool:
    probe = job_pb2.JobSpec()
    probe.integrations.extend(spec.integrations)
    return bool(take_secrets(probe))


def payload(job_id: str, secrets: dict[str, str]) -> bytes:
    """What the jobs service seals: the secrets bound to their job."""
    return json.dumps({"job_id": job_id, "secrets": secrets}, sort_keys=True).encode()


def read_payload(data: bytes, job_id: str) -> dict[str, str]:
    """The secrets of an opened payload; ValueError when it belongs to another job."""
    parsed = json.loads(data)
    if parsed.get("job_id") != job_id:
        raise ValueError("the sealed tracker secrets belong to another job")
    return {str(k): str(v) for k, v in parsed.get("secrets", {}).items() if k in SECRET_FIELDS.values()}


class OneTimeKey:
    """An X25519 key pair for one request (the worker's) or one reply (the jobs service's)."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()

    @property
    def public(self) -> bytes:
        return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def _aead(self, peer: bytes) -> AESGCM:
        shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(shared)
        return AESGCM(key)

    def box(self, peer: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead(peer).encrypt(nonce, plaintext, _INFO)

    def unbox(self, peer: bytes, boxed: bytes) -> bytes:
        """Raises cryptography's InvalidTag when `boxed` was not made for this key by `peer`."""
        return self._aead(peer).decrypt(boxed[:12], boxed[12:], _INFO)
