"""A training process whose agent died before it could start watching still stops on its own."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from trainer_worker.stop import EXIT_CANCELLED


def test_process_orphaned_before_install_stops_within_the_grace(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    # The stand-in agent starts the child and exits at once; the child installs its stop handling only
    # after it has been handed to init, the way a slow import would have it.
    child = (
        "import os, sys, time\n"
        f"open({str(marker)!r}, 'w').write(str(os.getpid()))\n"
        "while os.getppid() != 1: time.sleep(0.01)\n"
        "from trainer_worker.errors import Cancelled\n"
        "from trainer_worker.stop import StopSignal\n"
        "try:\n"
        "    StopSignal().install(poll_seconds=0.05, orphan_grace_seconds=5)\n"
        "    time.sleep(60)\n"
        "except Cancelled:\n"
        f"    sys.exit({EXIT_CANCELLED})\n"
    )
    agent = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {child!r}])"
    subprocess.run([sys.executable, "-c", agent], check=True, cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(marker.read_text())
    deadline = time.monotonic() + 20
    while _alive(pid):
        assert time.monotonic() < deadline, "the orphaned training process kept running"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
