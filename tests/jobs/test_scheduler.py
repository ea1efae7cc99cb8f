"""The fair scheduler's decision (services.jobs.scheduler.plan) and its settings, as pure functions: which
held jobs go to which free workers, in what order, and what is left waiting in what order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from tuneforge.v1 import job_pb2

from services.jobs.models import WorkerRow
from services.jobs.scheduler import (
    Candidate,
    DeclaredPool,
    Dispatch,
    jobs_ahead,
    parse_org_weights,
    parse_worker_pools,
    plan,
    unservable,
)

P = job_pb2.JobPriority
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def worker(worker_id: str, gpu_type: str = "cpu", gpu_count: int = 0, pool: str = "default") -> WorkerRow:
    return WorkerRow(id=worker_id, gpu_type=gpu_type, gpu_count=gpu_count, pool=pool)


def job(job_id: str, org: str, minute: int, *, priority: int = P.JOB_PRIORITY_NORMAL, gpu_type: str = "",
        gpu_count: int = 1, pool: str = "") -> Candidate:
    return Candidate(job_id, org, priority, T0 + timedelta(minutes=minute),
                     job_pb2.HardwareConfig(gpu_type=gpu_type, gpu_count=gpu_count, pool=pool))


def order(decided: list[Dispatch]) -> list[str]:
    return [d.job.id for d in decided]


def test_one_organizations_many_jobs_do_not_starve_anothers_one() -> None:
    held = [job(f"a{i}", "org-a", i) for i in range(200)] + [job("b0", "org-b", 300)]
    # org-a runs 2 already; a worker frees: org-b's job goes, though it is the newest of all.
    decided = plan([worker("w1")], held, [], {"org-a": 2}, {})
    assert order(decided.dispatch) == ["b0"]
    assert decided.dispatch[0].worker_id == "w1"
    # What is left goes in arrival order within org-a.
    assert [j.id for j in decided.waiting[:3]] == ["a0", "a1", "a2"]


def test_equal_shares_alternate_and_ties_go_to_the_oldest_waiting_job() -> None:
    held = [job(f"a{i}", "org-a", i) for i in range(4)] + [job(f"b{i}", "org-b", 10 + i) for i in range(4)]
    decided = plan([worker(f"w{i}") for i in range(6)], held, [], {}, {})
    assert order(decided.dispatch) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert [j.id for j in decided.waiting] == ["a3", "b3"]


def test_weights_share_the_workers_in_proportion() -> None:
    held = [job(f"a{i}", "org-a", i) for i in range(6)] + [job(f"b{i}", "org-b", 10 + i) for i in range(6)]
    decided = plan([worker(f"w{i}") for i in range(6)], held, [], {}, {"org-a": 2.0})
    ids = order(decided.dispatch)
    assert ids == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert sum(i.startswith("a") for i in ids) == 4 and sum(i.startswith("b") for i in ids) == 2
    # What runs counts: org-a already at 4 of weight 2 and org-b at 1 of weight 1 -> org-b is behind.
    assert order(plan([worker("w")], held, [], {"org-a": 4, "org-b": 1}, {"org-a": 2.0}).dispatch) == ["b0"]


def test_with_one_worker_tied_shares_go_round_not_to_the_oldest_queue() -> None:
    """One worker: every time it frees, each organization runs nothing (a tie). The organization whose last
    dispatch is longest ago goes, so org-b's one job is next even behind org-a's 200 older ones."""
    held = [job(f"a{i}", "org-a", i) for i in range(200)] + [job("b0", "org-b", 300)]
    last = {"org-a": T0 + timedelta(hours=1)}  # org-a's job just ended on the worker
    assert order(plan([worker("w1")], held, [], {}, {}, last_dispatch=last).dispatch) == ["b0"]
    # Never dispatched beats any time; between two that never were, the oldest waiting job.
    assert order(plan([worker("w1")], held, [], {}, {}).dispatch) == ["a0"]
    # The round goes on: org-b went last, so org-a is next, and org-c (never) before both.
    last = {"org-a": T0 + timedelta(hours=1), "org-b": T0 + timedelta(hours=2)}
    assert order(plan([worker("w1")], held, [], {}, {}, last_dispatch=last).dispatch) == ["a0"]
    c0 = job("c0", "org-c", 400)
    assert order(plan([worker("w1")], [*held, c0], [], {}, {}, last_dispatch=last).dispatch) == ["c0"]


def test_within_an_organization_higher_priority_first_then_older() -> None:
    held = [job("low", "org-a", 0, priority=P.JOB_PRIORITY_LOW), job("normal", "org-a", 1),
            job("high-new", "org-a", 3, priority=P.JOB_PRIORITY_HIGH),
            job("high-old", "org-a", 2, priority=P.JOB_PRIORITY_HIGH)]
    decided = plan([worker("w1"), worker("w2")], held, [], {}, {})
    assert order(decided.dispatch) == ["high-old", "high-new"]
    assert [j.id for j in decided.waiting] == ["normal", "low"]


def test_jobs_dispatched_and_not_yet_taken_occupy_free_workers_first() -> None:
    held = [job("a1", "org-a", 5)]
    outstanding = [job("a0", "org-a", 0)]
    assert plan([worker("w1")], held, outstanding, {"org-a": 1}, {}).dispatch == []
    assert order(plan([worker("w1"), worker("w2")], held, outstanding, {"org-a": 1}, {}).dispatch) == ["a1"]


def test_each_job_takes_the_smallest_free_worker_that_fits() -> None:
    free = [worker("big", "nvidia-h100", 8), worker("small", "nvidia-h100", 1), worker("cpu")]
    held = [job("one-gpu", "org-a", 0, gpu_type="nvidia-h100"),
            job("eight-gpus", "org-b", 1, gpu_type="nvidia-h100", gpu_count=8)]
    decided = plan(free, held, [], {}, {})
    assert {(d.job.id, d.worker_id) for d in decided.dispatch} == {
        ("one-gpu", "small"), ("eight-gpus", "big")}
    # A CPU job takes the CPU worker, not a GPU one.
    assert plan(free, [job("c", "org-a", 0)], [], {}, {}).dispatch[0].worker_id == "cpu"


def test_a_job_no_free_worker_takes_lets_the_next_go() -> None:
    """Work-conserving: an organization whose first job waits for a GPU still gets its CPU job run."""
    held = [job("gpu", "org-a", 0, priority=P.JOB_PRIORITY_HIGH, gpu_type="nvidia-h100"),
            job("cpu", "org-a", 1)]
    decided = plan([worker("w1")], held, [], {}, {})
    assert order(decided.dispatch) == ["cpu"]
    assert [j.id for j in decided.waiting] == ["gpu"]


def test_a_pool_job_goes_only_to_that_pools_workers() -> None:
    free = [worker("wa", pool="cpu-a"), worker("wb", pool="cpu-b")]
    held = [job("for-b", "org-a", 0, pool="cpu-b"), job("for-c", "org-a", 1, pool="cpu-c"),
            job("anywhere", "org-a", 2)]
    decided = plan(free, held, [], {}, {})
    assert {(d.job.id, d.worker_id) for d in decided.dispatch} == {("for-b", "wb"), ("anywhere", "wa")}
    assert [j.id for j in decided.waiting] == ["for-c"]


def test_the_running_limit_caps_an_organization() -> None:
    held = [job("a1", "org-a", 0), job("b1", "org-b", 1)]
    decided = plan([worker("w1"), worker("w2")], held, [], {"org-a": 2}, {}, running_limit=2)
    assert order(decided.dispatch) == ["b1"]
    assert decided.at_limit == {"org-a"}


def test_jobs_ahead_counts_what_goes_first_to_the_same_workers() -> None:
    workers = [worker("wa", pool="cpu-a"), worker("wg", "nvidia-t4", 1)]
    outstanding = [job("o", "org-a", 0, pool="cpu-a")]
    waiting = [job("x", "org-a", 1, pool="cpu-a"), job("g", "org-b", 2, gpu_type="nvidia-t4"),
               job("y", "org-b", 3)]
    ahead = jobs_ahead(waiting, outstanding, workers)
    # y (any pool, any worker) competes with everything; g only with jobs a T4 worker takes.
    assert ahead == {"x": 1, "g": 0, "y": 3}


def test_org_weights_setting() -> None:
    assert parse_org_weights("") == {}
    assert parse_org_weights(" org-a=2, org-b=0.5 ,") == {"org-a": 2.0, "org-b": 0.5}
    for bad in ("org-a", "org-a=0", "org-a=-1", "org-a=x", "Org A=1", "org-a=inf", "a=1,a=2"):
        with pytest.raises(ValueError, match="TUNEFORGE_ORG_WEIGHTS"):
            parse_org_weights(bad)


def test_worker_pools_setting() -> None:
    assert parse_worker_pools("default:cpu, gpu-a:nvidia-h100x8,gpu-b:NVIDIA-T4x1,x:nvidia-rtx4090x2") == [
        DeclaredPool("default", "cpu", 0), DeclaredPool("gpu-a", "nvidia-h100", 8),
        DeclaredPool("gpu-b", "nvidia-t4", 1), DeclaredPool("x", "nvidia-rtx4090", 2)]
    for bad in ("default", "Bad_Pool:cpu", "gpu-a:nvidia-h100", "gpu-a:nvidia-h100x0", "gpu-a:h100x65"):
        with pytest.raises(ValueError, match="TUNEFORGE_WORKER_POOLS"):
            parse_worker_pools(bad)


def test_unservable_names_the_field_and_the_largest_pool() -> None:
    pools = parse_worker_pools("default:cpu,gpu-a:nvidia-h100x8,gpu-b:nvidia-t4x1")

    def hw(gpu_type: str = "", gpu_count: int = 1, pool: str = "") -> job_pb2.HardwareConfig:
        return job_pb2.HardwareConfig(gpu_type=gpu_type, gpu_count=gpu_count, pool=pool)

    assert unservable(hw(), pools) is None
    assert unservable(hw("nvidia-h100", 8), pools) is None
    assert unservable(hw("nvidia-h100", 8, "gpu-b"), []) is None  # none declared: any job may wait
    assert unservable(hw("", 1, "gpu-c"), pools) == (
        "spec.hardware.pool", "no worker pool is named 'gpu-c'; the pools are default, gpu-a, gpu-b, the "
        "largest gpu-a (nvidia-h100 x8)")
    assert unservable(hw("nvidia-a100"), pools) == (
        "spec.hardware.gpu_type", "no worker has nvidia-a100 GPUs; the largest pool available is gpu-a "
        "(nvidia-h100 x8)")
    assert unservable(hw("nvidia-t4", 2), pools) == (
        "spec.hardware.gpu_count", "asks for 2 nvidia-t4 GPUs, but the workers have at most 1; the largest "
        "pool available is gpu-b (nvidia-t4 x1)")
    assert unservable(hw("nvidia-h100", 1, "gpu-b"), pools) == (
        "spec.hardware.gpu_type", "no worker in pool gpu-b has nvidia-h100 GPUs; the largest pool available "
        "is gpu-b (nvidia-t4 x1)")
