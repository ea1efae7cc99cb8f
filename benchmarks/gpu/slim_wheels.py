"""Shrink carried wheels to what the GPU machine loads, so that they fit the device tool's 64 MiB carry.

    python benchmarks/gpu/slim_wheels.py .cache/gpu-wheels      # rewrites bitsandbytes-*.whl in place

bitsandbytes ships one native library per CUDA (11.8 ... 13.2) and ROCm version (~43 MB zipped); the GPU
machine's torch is built for CUDA 13.0, so only the CUDA 13.x and CPU libraries are kept (~9 MB). The
wheel's RECORD is rewritten to match. Other wheels are left as they are. Prints every wheel's size and the
total, and exits non-zero when the total is over the limit.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

LIMIT = 64 * 2**20
# The repository's own files travel too (about 7 MB); keep room for them.
BUDGET = 54 * 2**20
# Native libraries to drop, by file name: every CUDA but 13.x, and ROCm.
DROP = {"bitsandbytes": re.compile(r"libbitsandbytes_(cuda1[12]\d|rocm\d+)\.(so|dll|dylib)$")}


def slim(wheel: Path, drop: re.Pattern[str]) -> int:
    """Rewrite ``wheel`` without the members whose name matches ``drop``; the number dropped."""
    out = wheel.with_suffix(".slim")
    dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if drop.search(info.filename):
                dropped += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if not drop.search(x.split(",")[0])) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    out.replace(wheel)
    return dropped


def main(folder: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {folder}", file=sys.stderr)
        return 1
    for wheel in wheels:
        project = wheel.name.split("-")[0].lower()
        if project in DROP:
            dropped = slim(wheel, DROP[project])
            if dropped:
                print(f"{wheel.name}: dropped {dropped} native libraries for other CUDA/ROCm versions")
    total = 0
    for wheel in sorted(folder.glob("*.whl"), key=lambda w: -w.stat().st_size):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(
        f"{total / 2**20:7.2f} MiB  in all ({len(wheels)} wheels; carry limit 64 MiB with the repo)"
    )
    if total > BUDGET:
        print(f"over the {BUDGET / 2**20:.0f} MiB left for wheels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/gpu-wheels")))
