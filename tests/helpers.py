"""What several test files share: the tiny run settings, the `python -m ablation` runner, run-folder checks, NormSpecs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from ablation import config, rundir
from ablation.norms import NormSpec

ROOT = Path(__file__).resolve().parents[1]

# A tiny ResNet-18-shaped model on 16-pixel images: seconds per run on a CPU.
TINY = [
    "model.name=resnet18",
    "model.widths=[8,16,16,16]",
    "model.stem_width=8",
    "model.stem=small",
    "data.image_size=16",
    "data.eval_resize=16",
    "data.workers=0",
    "data.eval_batch=64",
    "device=cpu",
    "log_every_steps=2",
]

# 4 modelled GPUs x 4 images = global batch 16; 192 training images (tiny_data) = 12 steps per epoch.
RUN = TINY + ["gpus=4", "batch_per_gpu=4", "epochs=2"]

# metrics.jsonl fields that legitimately differ between two otherwise equal runs.
TIME_KEYS = {"images_per_s", "epoch_seconds", "wall_seconds"}


def ablation(args: list[str], env: dict[str, str], *, cwd: Path | None = None, launcher: list[str] | None = None,
             timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m ablation ARGS` (or under a launcher such as torchrun) and capture its output.

    check: raise AssertionError, with the command and its output, when it exits non-zero.
    """
    cmd = (launcher or [sys.executable, "-m"]) + ["ablation", *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def ablation_ok(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess:
    """ablation(..., check=True): the command must succeed."""
    return ablation(args, env, check=True, **kw)


def run_folder(proc: subprocess.CompletedProcess) -> Path:
    """The run folder path the train command prints as its last line."""
    return Path(proc.stdout.strip().splitlines()[-1])


def metrics_without_time(folder: Path) -> list[dict]:
    """metrics.jsonl rows without the timing fields, which legitimately differ between runs."""
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rundir.read_jsonl(folder / rundir.METRICS)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model state (weights and BN running statistics) in a run's checkpoint."""
    return torch.load(folder / rundir.CHECKPOINT, weights_only=False)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    """Metrics (less timings), per-step losses and every tensor of the final checkpoint are equal."""
    assert metrics_without_time(a) == metrics_without_time(b)
    assert rundir.read_jsonl(a / "steps.jsonl") == rundir.read_jsonl(b / "steps.jsonl")
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def norm_spec(name: str, gpus_per_process: int = 1, apply_act: bool = False, **norm: object) -> NormSpec:
    """A NormSpec for a norm name, its norm.* options (validated as a run config would be) and apply_act."""
    cfg = config.replace(config.RunConfig(), **{"norm.name": name, **{f"norm.{k}": v for k, v in norm.items()}})
    return NormSpec(cfg.norm, gpus_per_process, apply_act=apply_act)
