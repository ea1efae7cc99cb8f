"""The migrations step: applies every service's Alembic migrations to head, creates the object store's
bucket when it is missing (TUNEFORGE_STORAGE_URL s3://bucket/prefix), then exits 0.

`python deploy/docker/migrate.py` (docker-compose.yml's one-shot "migrations" service; a Kubernetes Job or
an init step elsewhere) on TUNEFORGE_DATABASE_URL (or TUNEFORGE_DATABASE_URL_FILE), else on the SQLite
files in TUNEFORGE_DATA_DIR. The services still migrate at start (idempotent, a no-op once at head), but
several service processes starting together on a fresh database would race on the same tables (every
one of them opens the identity tables): the services start after this step has finished.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from services.kit.db import Database
from services.kit.runtime import configure_logging
from tuneforge_core.settings import KitSettings

log = logging.getLogger("tuneforge.migrate")


def migration_folders() -> dict[str, Path]:
    """Each service's name (its alembic_version_<name> table) and its migrations folder."""
    from services.datasets.component import MIGRATIONS as datasets
    from services.estimation.component import MIGRATIONS_DIR as estimation
    from services.jobs.component import MIGRATIONS as jobs
    from services.kit.identity import MIGRATIONS as identity
    from services.metrics.component import MIGRATIONS_DIR as metrics
    from services.serving.component import MIGRATIONS as serving

    return {"identity": identity, "datasets": datasets, "jobs": jobs, "estimation": estimation,
            "metrics": metrics, "serving": serving}


def migrate(settings: KitSettings, wait_s: float = 60.0) -> None:
    """Migrates every service; waits up to `wait_s` for the database to accept connections first."""
    for service, folder in migration_folders().items():
        db = Database(settings.database_url_for(service), service, workers=1)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    with db.engine.connect():
                        break
                except Exception as exc:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"error: database not reachable for {service}: {exc}") from None
                    time.sleep(1)
            db.migrate(folder)
            log.info("%s: migrated to head", service)
        finally:
            db.dispose()


def ensure_bucket(settings: KitSettings) -> str | None:
    """Creates the bucket of an s3:// storage URL if it does not exist; returns its name (None: not S3)."""
    url = urlparse(settings.storage_url)
    if url.scheme != "s3":
        return None
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url or None, region_name=settings.s3_region)
    try:
        client.head_bucket(Bucket=url.netloc)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
        client.create_bucket(Bucket=url.netloc)
        log.info("created bucket %s", url.netloc)
    return url.netloc


def main() -> None:
    settings = KitSettings()
    configure_logging(settings.log_level)
    migrate(settings)
    ensure_bucket(settings)
    print("migrations: every service at head", flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
