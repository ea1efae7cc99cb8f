"""Worker pools end to end: the platform with two real trainer workers, each announcing its own pool
(TUNEFORGE_WORKER_POOL); each job trains the tiny model on its own pool's worker, a job for a pool no
worker announces waits with the reason and is counted in ListPools, and `tuneforge pools` and
`tuneforge jobs create --pool --priority` work against it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2
from typer.testing import CliRunner

from services.cli.main import app
from tests.auth import org_client
from tests.e2e.conftest import FAST_WORKER_CHECKS, lora_spec, start_platform, wait_final


@pytest.mark.slow
def test_each_job_trains_in_its_own_pool_and_one_for_a_pool_without_workers_waits(
        tmp_path: Path, tiny_assets: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = tiny_assets
    platform = start_platform(tmp_path / "p", workers=0, model=model, **FAST_WORKER_CHECKS)
    try:
        for worker, pool in (("worker-a", "cpu-a"), ("worker-b", "cpu-b")):
            monkeypatch.setenv("TUNEFORGE_WORKER_POOL", pool)  # the child's environment at its start
            platform.start_worker(worker)
        monkeypatch.delenv("TUNEFORGE_WORKER_POOL")
        with org_client(platform.address, platform.data_dir, "e2e") as client:
            ds = client.upload_dataset(data, "chat-pools", request_id=str(uuid.uuid4())).dataset
            jobs = {}
            for pool in ("cpu-b", "cpu-a", "cpu-c"):
                spec = lora_spec(model, ds.id, epochs=1)
                spec.hardware.pool = pool
                jobs[pool] = client.create_job(spec, name=f"for-{pool}")
            for pool, worker in (("cpu-a", "worker-a"), ("cpu-b", "worker-b")):
                final = wait_final(client, jobs[pool].id)
                assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
                assert final.worker_id == worker
            waiting = client.get_job(jobs["cpu-c"].id)
            assert waiting.state == job_pb2.JOB_STATE_QUEUED and waiting.attempt == 0
            reason = "waiting for a worker in pool cpu-c; none seen "
            assert waiting.status_message.startswith(reason), waiting
            workers = {w.id: w.pool for w in client.list_workers().workers}
            assert workers == {"worker-a": "cpu-a", "worker-b": "cpu-b"}
            pools = {p.name: p for p in client.list_pools()}
            assert set(pools) == {"cpu-a", "cpu-b", "cpu-c"}
            cpu_a, cpu_c = pools["cpu-a"], pools["cpu-c"]
            assert (cpu_c.workers_alive, cpu_c.queued_jobs, cpu_c.queued_jobs_own) == (0, 1, 1)
            assert (cpu_a.workers_alive, cpu_a.queued_jobs) == (1, 0)

            common = ["--address", platform.address, "--org", "e2e"]
            runner = CliRunner(env={"TUNEFORGE_API_KEY": client.api_key, "COLUMNS": "200"})
            result = runner.invoke(app, ["workers", *common])
            assert result.exit_code == 0 and "worker-a" in result.output and "cpu-b" in result.output, \
                result.output
            result = runner.invoke(app, ["pools", *common])
            assert result.exit_code == 0, result.output
            assert "cpu-c" in result.output and "cpu-a" in result.output, result.output
            result = runner.invoke(app, ["jobs", "create", "--model", str(model), "--dataset", ds.id,
                                         "--epochs", "1", "--pool", "cpu-a", "--priority", "high", "--json",
                                         *common])
            assert result.exit_code == 0, result.output
            assert '"priority": "JOB_PRIORITY_HIGH"' in result.output and '"pool": "cpu-a"' in result.output
            result = runner.invoke(app, ["jobs", "create", "--model", str(model), "--dataset", ds.id,
                                         "--priority", "urgent", *common])
            assert result.exit_code == 2 and "--priority" in result.output
            result = runner.invoke(app, ["jobs", "create", "--model", str(model), "--dataset", ds.id,
                                         "--pool", "Not_A_Pool", *common])
            assert result.exit_code == 2 and "spec.hardware.pool" in result.output, result.output
    finally:
        platform.stop()
