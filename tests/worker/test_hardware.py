"""Hardware detection (trainer_worker.hardware): NVML names and memory to the catalog's hardware options,
CUDA_VISIBLE_DEVICES as CUDA reads it, no guess for mixed or sliced GPUs, and this CPU host as "cpu", 0;
then how the agent's settings win over what it detects, and the pool setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainer_worker.agent import AgentSettings, WorkerHardware
from trainer_worker.hardware import (
    CATALOG_GPUS,
    DEV_NVIDIA0,
    MIB,
    PROC_GPUS,
    Gpu,
    HostGpus,
    detect,
    hardware_option,
    summarize,
    visible_gpus,
)

CATALOG = Path(__file__).parents[2] / "services" / "estimation" / "catalog" / "hardware.json"
GIB = 1 << 30
GPU_HOST = PROC_GPUS.exists() or DEV_NVIDIA0.exists()


@pytest.mark.parametrize(
    ("nvml_name", "memory_mib", "option"),
    [
        # Names as nvidia-smi / nvmlDeviceGetName print them on these cards, with their total memory.
        ("Tesla T4", 15360, "nvidia-t4"),
        ("NVIDIA L4", 23034, "nvidia-l4"),
        ("NVIDIA A10G", 23028, "nvidia-a10g"),
        ("NVIDIA L40S", 46068, "nvidia-l40s"),
        ("NVIDIA A100-SXM4-40GB", 40960, "nvidia-a100-40gb"),
        ("NVIDIA A100-PCIE-40GB", 40960, "nvidia-a100-40gb"),
        ("A100-SXM4-40GB", 40536, "nvidia-a100-40gb"),  # older drivers: no brand word
        ("NVIDIA A100-SXM4-80GB", 81920, "nvidia-a100-80gb"),
        ("NVIDIA A100 80GB PCIe", 81920, "nvidia-a100-80gb"),
        ("NVIDIA H100 80GB HBM3", 81559, "nvidia-h100"),
        ("NVIDIA H100 PCIe", 81559, "nvidia-h100"),
        ("NVIDIA H100 NVL", 95830, "nvidia-h100"),  # more memory than the option plans with: still one
        ("NVIDIA H200", 143771, "nvidia-h200"),
        ("NVIDIA H200 NVL", 143771, "nvidia-h200"),
        # Not the catalog's: near names are other cards, and no card is guessed.
        ("NVIDIA A10", 23028, ""),
        ("NVIDIA L40", 46068, ""),
        ("NVIDIA GH200 480GB", 97871, ""),
        ("NVIDIA H800", 81559, ""),
        ("NVIDIA GeForce RTX 4090", 24564, ""),
        ("NVIDIA H100 80GB HBM3", 40 * 1024, ""),  # less memory than an H100 has: not one for a job
        ("NVIDIA A100-SXM4-80GB", 0, ""),  # memory unknown
        ("", 81920, ""),
    ],
)
def test_an_nvml_name_and_memory_map_to_a_hardware_option(nvml_name: str, memory_mib: int,
                                                          option: str) -> None:
    assert hardware_option(nvml_name, memory_mib * MIB) == option


def test_the_table_covers_every_gpu_of_the_estimation_catalog() -> None:
    catalog = {o["gpu_type"]: o["memory_mib"] for o in json.loads(CATALOG.read_text())["options"]}
    catalog.pop("cpu")
    assert {gpu.option: gpu.memory_mib for gpu in CATALOG_GPUS} == catalog


H100S = [Gpu("NVIDIA H100 80GB HBM3", 81559 * MIB, f"GPU-{n}{n}{n}a-{n}") for n in range(4)]


@pytest.mark.parametrize(
    ("cuda_visible_devices", "visible"),
    [
        (None, [0, 1, 2, 3]),
        ("2,0", [2, 0]),
        (" 1 , 3 ", [1, 3]),
        ("0,7,1", [0]),  # CUDA stops at the first entry that names no GPU
        ("0,-1,1", [0]),  # -1 hides the rest
        ("", []),
        ("-1", []),
        ("GPU-222a", [2]),  # a unique UUID prefix
        ("GPU-111a-1,GPU-333", [1, 3]),
        ("GPU-,1", []),  # a prefix of every UUID names none
        ("1,1", [1]),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(cuda_visible_devices: str | None,
                                                       visible: list[int]) -> None:
    assert visible_gpus(H100S, cuda_visible_devices) == [H100S[n] for n in visible]


def test_the_visible_gpus_make_one_hardware_option_or_none() -> None:
    assert summarize(H100S) == HostGpus("nvidia-h100", 4, 81559 * MIB, "NVIDIA H100 80GB HBM3")
    assert summarize([]) == HostGpus("cpu", 0)
    t4 = Gpu("Tesla T4", 15360 * MIB, "GPU-t4")
    mixed = summarize([H100S[0], t4, H100S[1]])
    assert mixed == HostGpus("", 3, 15360 * MIB, "NVIDIA H100 80GB HBM3, Tesla T4"), "no majority vote"
    sliced = summarize(visible_gpus(H100S, "MIG-5c3f2b9e-aa01-5e2b-9a1c-2f1d7c6b8e11"))
    assert (sliced.gpu_type, sliced.gpu_count, sliced.gpu_memory_bytes) == ("", 1, 0)
    assert summarize([Gpu("NVIDIA GeForce RTX 4090", 24 * GIB)]).gpu_type == ""


@pytest.mark.skipif(GPU_HOST, reason="this host has an NVIDIA GPU")
def test_this_cpu_host_is_cpu_whatever_cuda_visible_devices_says(tmp_path: Path) -> None:
    assert detect() == HostGpus("cpu", 0)
    assert detect("0,1") == HostGpus("cpu", 0), "naming devices makes no GPU appear"
    # Without NVML (no driver library here), the driver's /proc entries are counted instead.
    gpus = tmp_path / "gpus"
    for bus in ("0000:17:00.0", "0000:65:00.0"):
        (gpus / bus).mkdir(parents=True)
    missing = tmp_path / "nvidia0"
    assert detect(None, proc_gpus=gpus, dev_nvidia0=missing) == HostGpus("", 2)
    assert detect("1", proc_gpus=gpus, dev_nvidia0=missing) == HostGpus("", 1)
    assert detect("", proc_gpus=gpus, dev_nvidia0=missing) == HostGpus("cpu", 0)
    assert detect("-1", proc_gpus=gpus, dev_nvidia0=missing) == HostGpus("cpu", 0)


@pytest.mark.skipif(not GPU_HOST, reason="needs an NVIDIA GPU and its driver")
def test_nvml_reports_this_hosts_gpus() -> None:
    import pynvml

    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    host = detect(None)
    assert host.gpu_count == count and host.gpu_name and host.gpu_memory_bytes > 0, host
    assert detect("") == HostGpus("cpu", 0)


def test_the_agent_detects_without_importing_torch() -> None:
    script = ("import sys; from trainer_worker import hardware; hardware.detect(); "
              "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 0


def test_the_settings_win_over_what_is_detected() -> None:
    h100s = HostGpus("nvidia-h100", 8, 81559 * MIB, "NVIDIA H100 80GB HBM3")
    assert WorkerHardware.from_settings(AgentSettings(), h100s) == WorkerHardware(
        "nvidia-h100", 8, "default", 81559 * MIB, "NVIDIA H100 80GB HBM3")
    assert WorkerHardware.from_settings(AgentSettings(worker_gpu_count=2), h100s).gpu_count == 2
    configured = WorkerHardware.from_settings(AgentSettings(worker_gpu_type="nvidia-h200"), h100s)
    assert (configured.gpu_type, configured.gpu_count) == ("nvidia-h200", 8)
    assert WorkerHardware.from_settings(AgentSettings(), HostGpus("cpu", 0)) == WorkerHardware("cpu", 0)
    unknown = HostGpus("", 2, 24 * GIB, "NVIDIA GeForce RTX 4090")
    assert WorkerHardware.from_settings(AgentSettings(worker_pool="rtx"), unknown) == WorkerHardware(
        "", 2, "rtx", 24 * GIB, "NVIDIA GeForce RTX 4090")


def test_the_pool_setting_is_a_pool_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AgentSettings().worker_pool == "default"
    monkeypatch.setenv("TUNEFORGE_WORKER_POOL", "cpu-b")
    assert AgentSettings().worker_pool == "cpu-b"
    monkeypatch.setenv("TUNEFORGE_WORKER_POOL", " ")
    assert AgentSettings().worker_pool == "default"
    for bad in ("GPU_A", "h100--spot", "-a", "a" * 41):
        monkeypatch.setenv("TUNEFORGE_WORKER_POOL", bad)
        with pytest.raises(ValidationError, match=r"TUNEFORGE_WORKER_POOL .* is not a pool name"):
            AgentSettings()
