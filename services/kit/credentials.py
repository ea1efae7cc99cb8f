"""Encryption of the secrets the platform keeps for later: a dataset import's source credentials and a
job's experiment-tracker keys (services/jobs/tracker_secrets.py).

An import outlives its CreateDataset call (it runs in the background, and resumes after a restart), so
the request that started it, credentials included, is kept as an object next to the dataset, sealed with
Fernet (AES-128-CBC plus HMAC-SHA256: tampering or a wrong key fails loudly instead of yielding garbage).
The key comes from TUNEFORGE_CREDENTIALS_KEY; the embedded setup generates one on first use and keeps it
in the data dir, readable by its owner only. Several comma-separated keys allow rotation: the first
encrypts, any of them decrypts.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from services.kit.keyfiles import load_or_create_key, secret_file

KEY_FILE = "credentials.key"


class CredentialsKeyError(RuntimeError):
    """The configured key is malformed, or a sealed object was written with a key this server lacks."""


def _load_or_create_key(data_dir: Path) -> str:
    """The key in data_dir/secrets/credentials.key, made with mode 0600 if absent (services.kit.keyfiles)."""
    return load_or_create_key(secret_file(data_dir, KEY_FILE), Fernet.generate_key)


class CredentialCipher:
    """Seals and opens byte strings with the server's credentials key(s)."""

    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise CredentialsKeyError("TUNEFORGE_CREDENTIALS_KEY holds no key")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in parts])
        except ValueError as exc:
            raise CredentialsKeyError(
                "TUNEFORGE_CREDENTIALS_KEY must be one or more comma-separated Fernet keys (32 url-safe "
                "base64-encoded bytes each, e.g. from `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            ) from exc

    @classmethod
    def from_settings(cls, configured: str, data_dir: Path) -> CredentialCipher:
        return cls(configured or _load_or_create_key(data_dir))

    def seal(self, plaintext: bytes) -> bytes:
        return self._fernet.encrypt(plaintext)

    def open(self, sealed: bytes) -> bytes:
        try:
            return self._fernet.decrypt(sealed)
        except InvalidToken as exc:
            raise CredentialsKeyError(
                "sealed credentials do not open with this server's credentials key "
                "(the key changed, or the object was altered)"
            ) from exc
