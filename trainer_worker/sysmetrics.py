"""Resource use of the training process: CPU and memory (psutil), and the GPU through NVML where one exists.

:class:`SystemSampler` is read once per logging step (the events file writes its values as a ``system``
point); :func:`peak_metrics` adds the run's peaks to the final metrics under stable keys that the estimation
service's calibration reads. NVML (``nvidia-ml-py``) is optional: a CPU worker without it, or without a
driver, simply reports no GPU values. Nothing here imports torch; the GPU peak is read only where the
training stack already loaded it.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from typing import Any

import psutil

log = logging.getLogger(__name__)

PEAK_GPU_MEMORY = "peak_gpu_memory_bytes"
PEAK_RSS = "peak_rss_bytes"


class SystemSampler:
    """Samples this process's CPU % and RSS, and its GPU's utilisation, memory and temperature."""

    def __init__(self, local_rank: int = 0) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading primes the counter; later ones cover the interval
        self._gpu = _nvml_handle(local_rank)

    @property
    def has_gpu(self) -> bool:
        return self._gpu is not None

    def __call__(self) -> dict[str, float]:
        values = {
            "cpu_percent": float(self._process.cpu_percent(None)),
            "memory_bytes": float(self._process.memory_info().rss),
        }
        if self._gpu is not None:
            values.update(_gpu_values(self._gpu))
        return values


def peak_metrics() -> dict[str, float]:
    """The process's peak resident memory and, with CUDA, the peak memory torch allocated on its GPU."""
    # ru_maxrss is in KiB on Linux: the true peak, not the highest of our samples.
    peaks = {PEAK_RSS: float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        peaks[PEAK_GPU_MEMORY] = float(torch.cuda.max_memory_allocated())
    return peaks


def _nvml_handle(local_rank: int) -> Any | None:
    """NVML's handle of the GPU this rank trains on (CUDA_VISIBLE_DEVICES maps it), or None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        device = visible[local_rank] if local_rank < len(visible) else str(local_rank)
        if device.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(device))
        return pynvml.nvmlDeviceGetHandleByUUID(device)
    except (pynvml.NVMLError, IndexError) as exc:  # no driver, or no such device: a CPU run
        log.debug("no GPU metrics: %s", exc)
        return None


def _gpu_values(handle: Any) -> dict[str, float]:
    import pynvml

    try:
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {
            "gpu_utilization": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "gpu_memory_bytes": float(memory.used),
            "gpu_temperature_celsius": float(
                pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            ),
        }
    except pynvml.NVMLError as exc:  # a reading failed; the next step tries again
        log.debug("GPU metrics unavailable: %s", exc)
        return {}
