"""benchmarks/bench_control_plane.py at its tiniest sizes: it starts the platform (SQLite, and PostgreSQL
where one is reachable) and a metrics service apart from it, runs every measurement against its ceiling
and prints the summary. The figures are not checked (they are timings); that it completes, and that the
followers got every point once, are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--repeat", "1", "--ingest-messages-1", "5", "--ingest-messages-100", "2", "--followers", "3",
        "--fanout-jobs", "2", "--followers-per-job", "2", "--fanout-points", "4", "--fanout-rate", "100",
        "--client-procs", "1", "--channels", "2", "--unary-seconds", "0.1", "--metrics-apart"]


# It takes about 30 s here; a run still going after this long hangs.
TIMEOUT_S = 400


def _logs(workdir: Path) -> str:
    """The last lines of the platforms' logs, for a failure's message."""
    return "".join(f"\n--- {log}:\n" + "".join(log.read_text(errors="replace").splitlines(True)[-25:])
                   for log in sorted(workdir.glob("*/data/logs/*.log")))


@pytest.mark.slow
def test_benchmark_runs_every_measurement_and_prints_the_summary(tmp_path: Path) -> None:
    output = tmp_path / "output.txt"
    with output.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "bench_control_plane.py"), *TINY, "--workdir",
             str(tmp_path)], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True)
        try:
            returncode = process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()  # it prints where each of its tasks and threads waits, and cleans up
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pytest.fail(f"the benchmark still ran after {TIMEOUT_S} s:\n{output.read_text()[-12000:]}"
                        f"{_logs(tmp_path)}")
    out = output.read_text()
    assert returncode == 0, out[-6000:] + _logs(tmp_path)
    assert "SUMMARY" in out and "targets:" in out, out[-3000:]
    summary = out[out.index("SUMMARY"):]
    postgres = "PostgreSQL skipped" not in out
    for backend in ("sqlite", "postgresql") if postgres else ("sqlite",):
        for measure in ("ingest 1 pt/msg vs raw JetStream", "ingest 100 pt/msg vs executemany",
                        "fan-out 1 job x 3 p99", "fan-out 2 jobs x 2 p99", "EstimateJob c=16", "GetJob c=16",
                        "ListBaseModels c=1"):
            assert any(line.startswith(backend) and measure in line for line in summary.splitlines()), \
                f"no '{measure}' line for {backend} in:\n{summary}"
        for scenario in ("1 job x 3", "2 jobs x 2"):
            assert (f"[{backend}] fan-out {scenario}: every follower got every point exactly once, in order: "
                    "PASS") in out, out[-3000:]
            assert any(line.startswith(backend) and f"fan-out {scenario} exactly once (metrics apart)" in line
                       and line.rstrip().endswith("PASS") for line in summary.splitlines()), summary
    assert "failed calls" not in out, out[-3000:]
