"""status_from_exception: a full disk or database is RESOURCE_EXHAUSTED saying what is full, never
INTERNAL; anything else unexpected stays INTERNAL. Both are logged with their incident id."""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

import grpc
import pytest
import sqlalchemy.exc
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import create_engine, text

from tuneforge_core.errors import ResourceExhausted, error_from_status, full_storage, status_from_exception

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


def info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    out = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(out)
    return out


def wrapped(orig: Exception) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("INSERT INTO datasets ...", {}, orig)


def real_sqlite_full(tmp_path: Path) -> sqlalchemy.exc.OperationalError:
    """SQLAlchemy's error for a real SQLITE_FULL: a database that may not grow past a few pages."""
    engine = create_engine(f"sqlite:///{tmp_path / 'full.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x BLOB)"))
        with pytest.raises(sqlalchemy.exc.OperationalError) as caught, engine.begin() as conn:
            conn.execute(text("PRAGMA max_page_count = 3"))
            for _ in range(10):
                conn.execute(text("INSERT INTO t VALUES (randomblob(100000))"))
        return caught.value
    finally:
        engine.dispose()


@pytest.mark.parametrize(("make", "what"), [
    (lambda _: OSError(errno.ENOSPC, "No space left on device"), "disk"),
    (lambda _: OSError(errno.EDQUOT, "Disk quota exceeded"), "disk"),
    (lambda _: wrapped(sqlite3.OperationalError("database or disk is full")), "database"),
    (real_sqlite_full, "database"),
])
def test_a_full_disk_or_database_is_resource_exhausted(
        make: object, what: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    exc = make(tmp_path)  # type: ignore[operator]
    assert full_storage(exc) == what
    with caplog.at_level(logging.ERROR, logger="tuneforge_core.errors"):
        status = status_from_exception(exc)
    assert status.code == EXHAUSTED
    assert f"server's {what}" in status.message and "full" in status.message
    assert "retry later" in status.message
    details = info(status)
    assert details.reason == "QUOTA_EXCEEDED" and details.domain == "tuneforge.dev"
    assert details.metadata["resource"] == what
    incident = details.metadata["incident"]
    assert incident in status.message
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the incident is still logged, with its traceback
    assert "No space" not in status.message and "INSERT" not in status.message  # nothing internal leaks


def test_a_full_disk_behind_another_error_is_found() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not store the split") from inner
    except RuntimeError as outer:
        assert full_storage(outer) == "disk"
        assert status_from_exception(outer).code == EXHAUSTED


def test_a_postgres_disk_full_is_the_database() -> None:
    class DiskFull(Exception):
        sqlstate = "53100"

    assert full_storage(wrapped(DiskFull("could not extend file"))) == "database"


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOENT, "No such file or directory"),
    wrapped(sqlite3.OperationalError("database is locked")),
    ValueError("boom"),
])
def test_other_failures_stay_internal(exc: Exception) -> None:
    assert full_storage(exc) is None
    status = status_from_exception(exc)
    assert status.code == INTERNAL and info(status).reason == "INTERNAL"


def test_retry_after_travels_as_retry_info_and_back() -> None:
    """An error that says when to retry carries a google.rpc.RetryInfo (what gRPC clients in any language
    read), and the typed error rebuilt from the status has it again; one that does not say carries none."""
    status = status_from_exception(ResourceExhausted("slow down", retry_after_s=0.25))
    retry = error_details_pb2.RetryInfo()
    assert [d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR)] == [True]
    assert retry.retry_delay.ToMilliseconds() == 250
    back = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, status.message, status)
    assert isinstance(back, ResourceExhausted) and back.retry_after_s == 0.25
    plain = status_from_exception(ResourceExhausted("no hint"))
    assert not any(d.Is(retry.DESCRIPTOR) for d in plain.details)
    assert error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", plain).retry_after_s is None
