"""Every call of the self-test that only CUDA has, in one place (docs/selftest.md lists them).

CI never has a GPU, so nothing here runs there: each function is a few lines that the CPU path of its
check replaces (gloo for NCCL, our SyncBatchNorm2d for torch's, libjpeg-turbo for nvJPEG, the wall clock
for CUDA events), and the checks call them only when the device is a GPU.
"""

from __future__ import annotations

import subprocess
from typing import Any

import torch

# What each function below calls, for the docs' list (tests/test_selftest.py checks the two agree).
CUDA_ONLY = {
    "available": "torch.cuda.is_available",
    "versions": "torch.cuda.get_device_name, torch.version.cuda, torch.backends.cudnn.version, nvidia-smi (driver)",
    "sync": "torch.cuda.synchronize",
    "set_device": "torch.cuda.set_device",
    "device_count": "torch.cuda.device_count",
    "process_group_backend": "NCCL (torch.distributed) for the multi-GPU checks",
    "strict_fp32": "TF32 off for fp32 comparisons (torch.backends.cuda.matmul / cudnn.conv fp32_precision)",
}


def available() -> bool:
    """True where a CUDA device can be used."""
    return torch.cuda.is_available()


def device_count() -> int:
    """CUDA devices visible to this process."""
    return torch.cuda.device_count()


def set_device(index: int) -> None:
    """Make cuda:<index> this process's device (one process per GPU)."""
    torch.cuda.set_device(index)


def sync(device: str) -> None:
    """Wait for the device's queued work (a timing must include the work, not only its launch)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def process_group_backend(device: str) -> str:
    """NCCL between GPUs, gloo between CPU processes (what the trainer uses: ablation.train.distributed.setup)."""
    return "nccl" if device.startswith("cuda") else "gloo"


def versions(device: str) -> dict[str, Any]:
    """The GPU's name, the driver, CUDA and cuDNN versions (None for each on a CPU device)."""
    if not device.startswith("cuda"):
        return {"gpu": None, "gpus": 0, "driver": None, "cuda": torch.version.cuda, "cudnn": None}
    return {
        "gpu": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "driver": _driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
    }


def _driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (torch does not expose it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def strict_fp32(device: str) -> dict[str, str] | None:
    """Turn TF32 off so fp32 comparisons compare fp32 (TF32 keeps 10 mantissa bits); the old settings, or None on a CPU."""
    if not device.startswith("cuda"):
        return None
    old = {"matmul": torch.backends.cuda.matmul.fp32_precision, "conv": torch.backends.cudnn.conv.fp32_precision}
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    return old


def restore_fp32(old: dict[str, str] | None) -> None:
    """Put back what strict_fp32 changed."""
    if old is not None:
        torch.backends.cuda.matmul.fp32_precision = old["matmul"]
        torch.backends.cudnn.conv.fp32_precision = old["conv"]
