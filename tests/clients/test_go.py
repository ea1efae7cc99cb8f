"""The Go client generated into gen/go (protoc-gen-go + protoc-gen-go-grpc): it and the clients/go example
vet and compile against Debian's Go packages (GOPATH mode: the Go module proxy is not reachable here), and
the example lists the base models and decodes NOT_FOUND and INVALID_ARGUMENT details from the running
platform. Skipped, saying why, where no Go toolchain can be installed (no apt-get, or not root)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tuneforge.v1 import errors_pb2, estimation_service_pb2

from services.client import TuneForgeClient
from tests.clients.conftest import REPO, RunningPlatform
from tuneforge_core.errors import ERROR_DOMAIN
from tuneforge_core.reasons import Reason


@dataclass
class GoBuild:
    example: Path
    output: str


@pytest.fixture(scope="module")
def go_build(tmp_path_factory: pytest.TempPathFactory) -> GoBuild:
    tools = subprocess.run([str(REPO / "scripts/install_go_tools.sh")], capture_output=True, text=True,
                           timeout=900)
    if tools.returncode == 3:
        pytest.skip(f"no Go toolchain: {tools.stderr.strip()}")
    assert tools.returncode == 0, tools.stderr
    out = tmp_path_factory.mktemp("go-bin")
    done = subprocess.run([str(REPO / "scripts/go_build.sh"), str(out)], capture_output=True, text=True,
                          timeout=900)
    if done.returncode == 3:
        pytest.skip(f"no Go toolchain: {done.stderr.strip()}")
    assert done.returncode == 0, f"go vet/build failed:\n{done.stdout}\n{done.stderr}"
    return GoBuild(out / "tuneforge-go-example", done.stdout + done.stderr)


def test_generated_go_vets_and_compiles(go_build: GoBuild) -> None:
    assert go_build.example.is_file() and os.access(go_build.example, os.X_OK)
    # Every package of gen/go was built, not only the ones the example imports.
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "gen/go").rglob("*.go")}
    assert packages >= {"gen/go/tuneforge/v1", "gen/go/tuneforge/events/v1"}
    assert all(p in go_build.output for p in packages), go_build.output


@pytest.mark.slow
def test_go_example_calls_the_platform_and_decodes_errors(go_build: GoBuild,
                                                          running_platform: RunningPlatform) -> None:
    env = {**os.environ, "TUNEFORGE_API_KEY": running_platform.api_key}
    done = subprocess.run([str(go_build.example), "-address", running_platform.platform.address], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    out: dict[str, dict[str, Any]] = {}
    for line in done.stdout.splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    assert list(out) == ["models", "not_found", "invalid", "done"], done.stdout

    with TuneForgeClient(running_platform.platform.address, api_key=running_platform.api_key) as client:
        request = estimation_service_pb2.ListBaseModelsRequest(page_size=100)
        catalog = [m.id for m in client.estimation.ListBaseModels(request, timeout=30).models]
    assert out["models"]["count"] == len(catalog) > 0 and out["models"]["ids"] == catalog

    not_found = out["not_found"]
    assert not_found["code"] == "NotFound" and not_found["reason"] == Reason.NOT_FOUND.value, not_found
    assert not_found["domain"] == ERROR_DOMAIN and not_found["known_reason"] is True
    assert "job_does_not_exist" in not_found["message"]

    invalid = out["invalid"]
    assert invalid["code"] == "InvalidArgument" and invalid["reason"] == Reason.INVALID_ARGUMENT.value
    fields = {v["field"] for v in invalid["violations"]}
    assert {"spec.base_model", "spec.dataset", "spec.lora.rank"} <= fields, invalid
    # The reason strings are ErrorReason's value names in Go as in Python.
    assert errors_pb2.ErrorReason.Value(invalid["reason"]) == errors_pb2.INVALID_ARGUMENT
