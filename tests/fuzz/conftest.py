"""The platform as `tuneforge up` runs it, private to the fuzz tests (they cancel jobs and delete datasets,
which the seeded session platform of tests/platform must keep), seeded so every id field has a real value
to point at."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2

from services.client import TuneForgeClient
from services.platform.supervisor import Platform, PlatformConfig
from tests.platform.conftest import ORG, Seeded, chat_file


@pytest.fixture(scope="module")
def fuzz_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    root: Path = tmp_path_factory.mktemp("fuzz-platform")
    platform = Platform(PlatformConfig(data_dir=root / "data", grpc_port=0, workers=0))
    platform.start()
    try:
        with TuneForgeClient(platform.address, ORG) as client:
            datasets = [client.upload_dataset(chat_file(root / f"chat{i}.jsonl"), f"chat-{i}").dataset
                        for i in range(2)]
            jobs = [client.create_job(job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", dataset=d.id),
                                      name=f"job-{i}") for i, d in enumerate(datasets)]
        yield Seeded(platform, [d.id for d in datasets], [j.id for j in jobs])
    finally:
        platform.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many calls the hostile-input test made, per RPC and in all, when it ran."""
    module = sys.modules.get("tests.fuzz.test_hostile_input")
    if module is not None and module.CALLS:
        terminalreporter.write_sep("-", "hostile input")
        terminalreporter.write_line(module.calls_line())
