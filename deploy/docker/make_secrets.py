"""Writes the secrets docker-compose.yml mounts: `python deploy/docker/make_secrets.py [FOLDER]`.

FOLDER defaults to deploy/secrets. Each secret is generated once (random) and kept: running it again
writes only the ones that are missing, so a deployment keeps its passwords. The folder is mode 0700 and
holds a .gitignore of `*`. The files are mode 0644 because compose mounts file secrets as they are on
the host, and the containers read them as their own users (10001 for ours); the 0700 folder keeps
other host users out.

Files (the names docker-compose.yml's `secrets:` use):
  postgres_password       PostgreSQL's password of the "tuneforge" role (POSTGRES_PASSWORD_FILE)
  database_url            the services' SQLAlchemy URL with that password (TUNEFORGE_DATABASE_URL_FILE)
  s3_credentials          AWS shared-credentials file of the object store's key (AWS_SHARED_CREDENTIALS_FILE)
  seaweedfs_s3.json       the S3 server's identities holding that key (weed -s3.config)
  nats_auth.conf          nats-server's users "services" and "worker" (with the worker's permissions)
  nats_services_password  the services' NATS password (TUNEFORGE_NATS_PASSWORD_FILE)
  nats_worker_password    the workers' NATS password (TUNEFORGE_NATS_PASSWORD_FILE)
  service_token           the token the services present to each other (TUNEFORGE_SERVICE_TOKEN_FILE)
  page_token_key          the key page tokens are signed with (TUNEFORGE_PAGE_TOKEN_KEY_FILE)
  credentials_key         the Fernet key sealing dataset import credentials (TUNEFORGE_CREDENTIALS_KEY_FILE)
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from pathlib import Path

from tuneforge_core.nats import SERVICES_USER, WORKER_USER, worker_permissions

# Where docker-compose.yml's services find the other containers, and the names it gives them.
POSTGRES_HOST, POSTGRES_DB, POSTGRES_USER = "postgres:5432", "tuneforge", "tuneforge"
S3_ACCESS_KEY_ID = "tuneforge"


def _token(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def _read(folder: Path, name: str) -> str:
    return (folder / name).read_text().strip()


def _write(folder: Path, name: str, content: str) -> bool:
    """Writes `name` unless it exists; True when it wrote it."""
    path = folder / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(content)
    path.chmod(0o644)
    return True


def nats_auth_config(services_password: str, worker_password: str) -> str:
    """nats-server's authorization block, as `tuneforge up` writes it for its embedded server."""
    users = [{"user": SERVICES_USER, "password": services_password},
             {"user": WORKER_USER, "password": worker_password, "permissions": worker_permissions()}]
    return f"authorization {{\n  users = {json.dumps(users, indent=2)}\n}}\n"


def make_secrets(folder: Path) -> list[str]:
    """Writes the missing secrets into `folder`; returns the names it wrote."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    _write(folder, ".gitignore", "*\n")
    wrote = [name for name, content in (
        ("postgres_password", _token() + "\n"),
        ("s3_secret_access_key", _token() + "\n"),
        ("nats_services_password", _token() + "\n"),
        ("nats_worker_password", _token() + "\n"),
        ("service_token", _token("tfs_") + "\n"),
        ("page_token_key", _token() + "\n"),
        ("credentials_key", base64.urlsafe_b64encode(os.urandom(32)).decode() + "\n"),  # a Fernet key
    ) if _write(folder, name, content)]
    password, s3_secret = _read(folder, "postgres_password"), _read(folder, "s3_secret_access_key")
    derived = {
        "database_url": f"postgresql+psycopg://{POSTGRES_USER}:{password}@{POSTGRES_HOST}/{POSTGRES_DB}\n",
        "s3_credentials": (f"[default]\naws_access_key_id = {S3_ACCESS_KEY_ID}\n"
                           f"aws_secret_access_key = {s3_secret}\n"),
        "seaweedfs_s3.json": json.dumps({"identities": [{
            "name": "tuneforge", "credentials": [{"accessKey": S3_ACCESS_KEY_ID, "secretKey": s3_secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, indent=2) + "\n",
        "nats_auth.conf": nats_auth_config(_read(folder, "nats_services_password"),
                                           _read(folder, "nats_worker_password")),
    }
    wrote += [name for name, content in derived.items() if _write(folder, name, content)]
    return wrote


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "secrets"
    wrote = make_secrets(folder)
    print(f"{folder}: wrote {', '.join(wrote)}" if wrote else f"{folder}: every secret already there")


if __name__ == "__main__":
    main(sys.argv[1:])
