"""The platform as `tuneforge up` runs it (a real nats-server, the four services in one process, SQLite and
local storage), with no workers, seeded with two datasets and two jobs so every List RPC has pages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tuneforge.v1 import job_pb2

from services.platform.supervisor import Platform, PlatformConfig
from tests.auth import org_client

ORG = "acme"


@dataclass
class Seeded:
    platform: Platform
    dataset_ids: list[str]
    job_ids: list[str]

    @property
    def address(self) -> str:
        return self.platform.address


def chat_file(path: Path, rows: int = 120) -> Path:
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"{2 * i}"}]}) + "\n" for i in range(rows)))
    return path


@pytest.fixture(scope="session")
def seeded_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    yield from seed_platform(tmp_path_factory.mktemp("platform"))


def seed_platform(root: Path) -> Iterator[Seeded]:
    """A platform with no workers, two datasets and two jobs of ORG; stopped when the generator closes."""
    # No calls-per-second limit: the page token and hostile-input tests call as fast as they can.
    platform = Platform(PlatformConfig(data_dir=root / "data", grpc_port=0, workers=0,
                                       env={"TUNEFORGE_API_CALLS_PER_SECOND": "0"}))
    platform.start()
    try:
        with org_client(platform.address, platform.data_dir, ORG) as client:
            datasets = [client.upload_dataset(chat_file(root / f"chat{i}.jsonl"), f"chat-{i}").dataset
                        for i in range(2)]
            jobs = [client.create_job(job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", dataset=d.id),
                                      name=f"job-{i}") for i, d in enumerate(datasets)]
        yield Seeded(platform, [d.id for d in datasets], [j.id for j in jobs])
    finally:
        platform.stop()


@dataclass
class Failure:
    """A failed call's code, and its ErrorInfo reason and field violations."""

    code: grpc.StatusCode
    message: str
    reason: str
    fields: list[str]

    @classmethod
    def of(cls, err: grpc.RpcError) -> Failure:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                detail.Unpack(bad_request)
        return cls(err.code(), err.details() or "", info.reason,  # type: ignore[attr-defined]
                   [v.field for v in bad_request.field_violations])
