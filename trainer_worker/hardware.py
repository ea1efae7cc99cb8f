"""What GPUs this host has, as the worker announces them and routes jobs by them.

NVML (``nvidia-ml-py``, imported only here and only when asked) gives each GPU's model name, memory and
UUID; `CUDA_VISIBLE_DEVICES` then says which of them this process may use, as CUDA reads it (indices in
NVML's PCI bus order, or UUID prefixes; the list ends at the first entry that names no GPU). Where NVML
cannot be loaded (no package, no driver: any ``NVMLError``) the count falls back to the driver's
``/proc`` entries and `CUDA_VISIBLE_DEVICES`, and the type is unknown.

The GPU model maps to a hardware option of the estimation service's catalog (``ListHardwareOptions``:
"nvidia-h100", "nvidia-a100-80gb", ...) through `hardware_option`, a pure function of the NVML name and the
memory. Anything it cannot tell for sure (a model the table does not know, less memory than the option
promises, a MIG slice, GPUs of different models on one host) is "" (a GPU of unknown type) rather than a
guess: a job estimated for 80 GB must never land on a 40 GB card. TUNEFORGE_WORKER_GPU_TYPE and
TUNEFORGE_WORKER_GPU_COUNT override all of this (`trainer_worker.agent.WorkerHardware.from_settings`).

Nothing here imports torch: the agent that calls it never loads the training stack.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1 << 20
# A card reports a little less than its catalog memory on some drivers (ECC, reserved memory); less than
# this share of it is another card (or a slice of one).
MEMORY_TOLERANCE = 0.95
PROC_GPUS = Path("/proc/driver/nvidia/gpus")
DEV_NVIDIA0 = Path("/dev/nvidia0")


@dataclass(frozen=True)
class CatalogGpu:
    """A GPU of the estimation catalog (services/estimation/catalog/hardware.json): its hardware option,
    the NVML model names it covers (after `model_of`), and the memory the catalog plans with."""

    option: str
    model: re.Pattern[str]
    memory_mib: int


# Every GPU of the catalog, with the memory it lists. A model that shares its name across memory sizes
# (A100 40 GB and 80 GB) is told apart by memory: the largest option whose memory the card has wins.
# tests/worker/test_hardware.py checks that this table covers the catalog.
CATALOG_GPUS: tuple[CatalogGpu, ...] = (
    CatalogGpu("nvidia-t4", re.compile(r"T4\b"), 15360),  # "Tesla T4"
    CatalogGpu("nvidia-l4", re.compile(r"L4\b"), 23034),  # "NVIDIA L4" (never the L40 or L40S)
    CatalogGpu("nvidia-a10g", re.compile(r"A10G\b"), 23028),  # "NVIDIA A10G" (not the A10)
    CatalogGpu("nvidia-l40s", re.compile(r"L40S\b"), 46068),  # "NVIDIA L40S" (not the L40)
    CatalogGpu("nvidia-a100-40gb", re.compile(r"A100\b"), 40960),  # "NVIDIA A100-SXM4-40GB", "-PCIE-40GB"
    CatalogGpu("nvidia-a100-80gb", re.compile(r"A100\b"), 81920),  # "NVIDIA A100-SXM4-80GB", "A100 80GB PCIe"
    CatalogGpu("nvidia-h100", re.compile(r"H100\b"), 81559),  # "NVIDIA H100 80GB HBM3", "H100 NVL"
    CatalogGpu("nvidia-h200", re.compile(r"H200\b"), 143771),  # "NVIDIA H200", "NVIDIA H200 NVL"
)


def model_of(nvml_name: str) -> str:
    """The model part of an NVML device name: upper case, without the "NVIDIA " / "Tesla " brand words
    ("Tesla T4" -> "T4", "NVIDIA A100-SXM4-80GB" -> "A100-SXM4-80GB")."""
    model = " ".join(nvml_name.upper().split())
    for brand in ("NVIDIA ", "TESLA "):
        model = model.removeprefix(brand)
    return model


def hardware_option(nvml_name: str, memory_bytes: int) -> str:
    """The catalog's hardware option of a GPU that NVML names `nvml_name` with `memory_bytes` of memory, or
    "" when it is none of them for sure: an unknown model, or less memory than the option plans with."""
    model = model_of(nvml_name)
    fits = [gpu for gpu in CATALOG_GPUS
            if gpu.model.match(model) and memory_bytes >= MEMORY_TOLERANCE * gpu.memory_mib * MIB]
    return max(fits, key=lambda gpu: gpu.memory_mib).option if fits else ""


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it; a MIG slice (named by CUDA_VISIBLE_DEVICES) has no name or memory."""

    name: str
    memory_bytes: int
    uuid: str = ""
    mig: bool = False


@dataclass(frozen=True)
class HostGpus:
    """What this host gives the worker: a hardware option ("cpu" without a GPU, "" for GPUs of unknown
    type), how many, each one's memory (the smallest, should they differ) and the NVML model name."""

    gpu_type: str
    gpu_count: int
    gpu_memory_bytes: int = 0
    gpu_name: str = ""

    def describe(self) -> str:
        if self.gpu_type == "cpu":
            return "no GPU"
        memory = f", {self.gpu_memory_bytes // MIB} MiB each" if self.gpu_memory_bytes else ""
        name = self.gpu_name or "GPU"
        return f"{self.gpu_count} x {name}{memory}: {self.gpu_type or 'unknown type'}"


def visible_entries(cuda_visible_devices: str | None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES up to the first empty one or "-1" (which hide the rest), or
    None when it is unset (every GPU is visible)."""
    if cuda_visible_devices is None:
        return None
    entries = []
    for item in (v.strip() for v in cuda_visible_devices.split(",")):
        if not item or item == "-1":
            break
        entries.append(item)
    return entries


def visible_gpus(gpus: Sequence[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The GPUs of `gpus` (NVML's order) that CUDA_VISIBLE_DEVICES leaves visible, as CUDA reads it: an
    index, a UUID or a unique UUID prefix ("GPU-8f2c"), or a MIG slice ("MIG-..."); the list ends at the
    first entry that names no GPU, and a GPU named twice counts once."""
    entries = visible_entries(cuda_visible_devices)
    if entries is None:
        return list(gpus)
    chosen: list[Gpu] = []
    for entry in entries:
        if entry.upper().startswith("MIG-"):
            gpu: Gpu | None = Gpu("", 0, entry, mig=True)
        elif entry.isdigit():
            gpu = gpus[int(entry)] if int(entry) < len(gpus) else None
        else:
            matches = [g for g in gpus if g.uuid.lower().startswith(entry.lower())]
            gpu = matches[0] if len(matches) == 1 else None
        if gpu is None:
            break
        if gpu not in chosen:
            chosen.append(gpu)
    return chosen


def summarize(gpus: Sequence[Gpu]) -> HostGpus:
    """The host's hardware from its visible GPUs: "cpu" for none; the hardware option they all map to;
    "" (unknown type, with a log line) for MIG slices or GPUs of different models, whose jobs the fleet's
    operator must route by setting TUNEFORGE_WORKER_GPU_TYPE."""
    if not gpus:
        return HostGpus("cpu", 0)
    names = list(dict.fromkeys(g.name for g in gpus if not g.mig))
    memory = min(g.memory_bytes for g in gpus)
    if any(g.mig for g in gpus):
        log.warning("this worker sees MIG slices (%s): their GPU type is unknown; set "
                    "TUNEFORGE_WORKER_GPU_TYPE to route jobs to it", ", ".join(g.uuid for g in gpus if g.mig))
        return HostGpus("", len(gpus), memory, ", ".join(names))
    if len(names) > 1:
        log.warning("this worker sees GPUs of different models (%s): it does not guess one type for all; "
                    "set CUDA_VISIBLE_DEVICES to one model, or TUNEFORGE_WORKER_GPU_TYPE", ", ".join(names))
        return HostGpus("", len(gpus), memory, ", ".join(names))
    option = hardware_option(names[0], memory)
    if not option:
        log.warning("this worker's GPU %r (%d MiB) is no hardware option of the catalog: it takes jobs of "
                    "any GPU type; set TUNEFORGE_WORKER_GPU_TYPE to route jobs to it", names[0],
                    memory // MIB)
    return HostGpus(option, len(gpus), memory, names[0])


def nvml_gpus() -> list[Gpu]:
    """Every GPU NVML sees on this host (all of them, whatever CUDA_VISIBLE_DEVICES says), in its index
    order. Raises ImportError without nvidia-ml-py and pynvml.NVMLError without a driver. A GPU in MIG
    mode is listed as a MIG slice: CUDA hands out its slices, not the whole card."""
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            try:
                mig = pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
            except pynvml.NVMLError:  # NOT_SUPPORTED on cards without MIG
                mig = False
            gpus.append(Gpu(pynvml.nvmlDeviceGetName(handle),
                            int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), uuid, mig=mig))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def detect(cuda_visible_devices: str | None = None, *, proc_gpus: Path = PROC_GPUS,
           dev_nvidia0: Path = DEV_NVIDIA0) -> HostGpus:
    """This host's GPUs as this process may use them (CUDA_VISIBLE_DEVICES from the environment unless
    given): through NVML, or, where NVML cannot be loaded, counted from the driver's /proc entries."""
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml
    except ImportError:
        log.info("nvidia-ml-py is not installed: counting GPUs from the driver's /proc entries")
        return _counted(cuda_visible_devices, proc_gpus, dev_nvidia0)
    try:
        gpus = nvml_gpus()
    except pynvml.NVMLError as exc:  # no driver (a CPU host), or one that cannot answer
        log.info("NVML is not available (%s): counting GPUs from the driver's /proc entries", exc)
        return _counted(cuda_visible_devices, proc_gpus, dev_nvidia0)
    host = summarize(visible_gpus(gpus, cuda_visible_devices))
    log.info("hardware (NVML): %s", host.describe())
    return host


def _counted(cuda_visible_devices: str | None, proc_gpus: Path, dev_nvidia0: Path) -> HostGpus:
    """Without NVML: "cpu" unless the driver shows a GPU that CUDA_VISIBLE_DEVICES does not hide; then as
    many GPUs of unknown type as CUDA_VISIBLE_DEVICES names, or as the driver lists (one at least)."""
    entries = visible_entries(cuda_visible_devices)
    listed = sum(1 for _ in proc_gpus.iterdir()) if proc_gpus.is_dir() else 0
    if entries == [] or not (listed or dev_nvidia0.exists()):
        return HostGpus("cpu", 0)
    count = len(entries) if entries is not None else listed
    return HostGpus("", max(1, count))
