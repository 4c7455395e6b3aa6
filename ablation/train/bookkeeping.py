"""Run-folder bookkeeping for the trainer: config, env, checkpoints, the final status and failures.

Everything here writes through ablation.rundir (atomic writes, torn-line-proof appends); only rank 0 calls it.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
import platform
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

import ablation
from ablation import provenance, rundir
from ablation.config import ConfigError, Derived, RunConfig, config_hash, run_id, to_dict
from ablation.cpus import cpu_budget
from ablation.data.layout import DatasetInfo
from ablation.errors import AblationError, DataError, DiskFullError
from ablation.train.distributed import DistEnv

log = logging.getLogger("ablation")


CHECKPOINT_VERSION = 1


SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST", "SLURM_NTASKS")


@dataclass
class TrainState:
    """Everything beyond model and optimizer that a resumed run needs to continue exactly."""

    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # steps of that epoch already done
    step: int = 0  # optimizer steps done in total
    partial: list[list[float]] = field(default_factory=list)  # per-rank [loss_sum, correct, count] of the epoch in progress
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    wall_seconds: float = 0.0  # training wall time over all starts
    device_seconds: float = 0.0  # wall time x processes on accelerators, over all starts
    epoch_seconds: float = 0.0  # wall time spent in the epoch in progress


def _git_commit() -> dict[str, Any]:
    """The package's git commit and whether the tree was dirty (None outside a checkout)."""
    here = Path(ablation.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def configure_backends(cfg: RunConfig, env: DistEnv) -> None:
    """On CUDA: cuDNN benchmarks convolution algorithms per shape (faster; not bitwise repeatable across
    starts, like any cuDNN choice), and TF32 is on or off for float32 convolutions and matmuls as cfg.tf32
    says (None leaves torch's defaults). Nothing on CPU."""
    if not env.device.startswith("cuda"):
        return
    torch.backends.cudnn.benchmark = True
    if cfg.tf32 is not None:
        set_backends({"matmul_fp32_precision": "tf32" if cfg.tf32 else "ieee", "conv_fp32_precision": "tf32" if cfg.tf32 else "ieee"})


# TF32 through the fp32_precision API, which every torch in the declared range (>=2.14) has. The legacy
# allow_tf32 flags are never touched: since torch 2.9, reading one after the other API set a value raises
# ("mix of the legacy and new APIs"), so one API for setting, reading and restoring.
_PRECISION = {"matmul_fp32_precision": lambda: torch.backends.cuda.matmul, "conv_fp32_precision": lambda: torch.backends.cudnn.conv}


def backend_settings() -> dict[str, Any]:
    """The torch backend flags this start trains with (env.json); they matter on CUDA only."""
    flags: dict[str, Any] = {"cudnn_benchmark": torch.backends.cudnn.benchmark}
    flags.update({key: holder().fp32_precision for key, holder in _PRECISION.items()})
    return flags


def set_backends(flags: dict[str, Any]) -> None:
    """Set the flags backend_settings() reports (any subset of them): what a test restores with."""
    for key, value in flags.items():
        if key == "cudnn_benchmark":
            torch.backends.cudnn.benchmark = value
        else:
            _PRECISION[key]().fp32_precision = value


def decode_versions() -> dict[str, str | None]:
    """What decoded pixels depend on: the JPEG decoders' libraries (two builds of libjpeg-turbo may round differently)."""
    import numpy
    import PIL
    import torchvision
    from PIL import features

    return {
        "pillow": PIL.__version__,
        "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
        "pillow_jpeg": features.version("jpg"),
        "torchvision_image_backend": torchvision.get_image_backend(),
        "numpy": numpy.__version__,
    }


def decoded_on(pipeline: str, device: str) -> str:
    """'cuda' where the training pixels are decoded by nvJPEG (device-decode on a GPU), else 'cpu' (libjpeg-turbo, Pillow)."""
    return "cuda" if pipeline == "device-decode" and device.startswith("cuda") else "cpu"


def environment(env: DistEnv, cfg: RunConfig) -> dict[str, Any]:
    """Versions, host, devices and SLURM ids of this start."""
    import timm
    import torchvision

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if env.device.startswith("cuda") else ["cpu"]
    return {
        "ablation": ablation.__version__,
        "git": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_backends": backend_settings(),
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "decode": decode_versions(),
        "packages": provenance.package_versions(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": env.device,
        "devices": devices,
        # Who decoded the training pixels: device-decode decodes on the training device (nvJPEG on a GPU, whose IDCT and
        # upsampling differ from libjpeg-turbo's by a few levels), every other pipeline in the CPU loaders. device is not in
        # the run id, so the report reads this to keep the two from being pooled silently.
        "decoded_on": decoded_on(cfg.data.pipeline, env.device),
        "cpu_threads": torch.get_num_threads(),
        "cpu": provenance.cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels' instruction set: the last digits of CPU runs
        "cpu_budget": cpu_budget(env.local_world_size, env.device, cfg.data.workers).as_dict(),
        "processes": env.world_size,
        "gpus_per_process": cfg.gpus // env.world_size,
        "slurm": {k: os.environ[k] for k in SLURM_KEYS if k in os.environ},
    }


@contextmanager
def folder_lock(rd: rundir.RunDir) -> Iterator[None]:
    """Hold an exclusive lock on the run folder: never two trainers writing one folder.

    A POSIX record lock (ablation.lock): forked loader workers do not inherit it, so it ends with the
    trainer and a killed trainer can be restarted at once; a lock file with a heartbeat where the file
    system's locks are missing or per node (Lustre localflock/noflock, BeeGFS, NFS nolock).
    """
    from ablation import lock

    rd.root.mkdir(parents=True, exist_ok=True)
    with lock.hold(rd.lock, what=f"run folder {rd.root}"):
        yield


def write_config(rd: rundir.RunDir, cfg: RunConfig, d: Derived, data: DatasetInfo | None = None) -> None:
    """Write config.yaml once, and config.json (its JSON twin, for the aggregator); a restart checks config.yaml
    describes the same run, and writes the twin where an older version (or a crash between the two) left none.

    data: the dataset scanned; its class and val-image counts join the derived values (derived.num_classes,
    derived.val_images: with train_images, what the report knows ImageNet-1k by; derived.dataset_subset where
    `ablation data prepare` wrote a subset)."""
    if rd.config.exists():
        old = yaml.safe_load(rd.config.read_text()) or {}
        if old.get("run_id") != run_id(cfg):
            raise ConfigError(f"{rd.config} describes run {old.get('run_id')}, not {run_id(cfg)}; use another results folder")
        text = rundir.config_json_text(old) if not rd.config_json.exists() and isinstance(old, dict) else None
    else:
        counts = {"num_classes": len(data.classes), "val_images": data.val_images} if data is not None else {}
        if data is not None and data.subset:  # a prepared subset says so: counts near ImageNet-1k's must not pass for it
            counts["dataset_subset"] = data.subset
        doc = {"run_id": run_id(cfg), "config_hash": config_hash(cfg), **to_dict(cfg), "derived": {**asdict(d), **counts}}
        rundir.write_text(rd.config, yaml.safe_dump(doc, sort_keys=False))
        text = rundir.config_json_text(yaml.safe_load(rd.config.read_text()))  # the values as config.yaml reads back
    if text is not None:
        rundir.write_text(rd.config_json, text)


def write_env(rd: rundir.RunDir, info: dict[str, Any], data: DatasetInfo, state: TrainState) -> None:
    """Write env.json: this start's environment, the dataset, and the list of all starts."""
    old = rundir.read_json(rd.env) or {}
    starts = old.get("starts", [])
    starts.append(
        {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": info["host"],
            "processes": info["processes"],
            "resumed_from_step": state.step,
            "slurm_job_id": info["slurm"].get("SLURM_JOB_ID"),
            "decoded_on": info.get("decoded_on"),  # per start: a run resumed on another device mixes its pixels
        }
    )
    rundir.write_json(rd.env, {**info, "data": asdict(data), "starts": starts})


def note_stop(rd: rundir.RunDir, note: dict[str, Any]) -> None:
    """Add how this start ended (the step, the signal, the time from signal to checkpoint) to its entry in env.json."""
    doc = rundir.read_json(rd.env) or {}
    if doc.get("starts"):
        doc["starts"][-1].update(note)
        rundir.write_json(rd.env, doc)


def write_final(rd: rundir.RunDir, cfg: RunConfig, state: TrainState, status: str,
                reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """Write final.json, the last file of a run."""
    val = [r["val_err1"] for r in state.history]
    doc = {
        "status": status,
        "reason": reason,
        "run_id": run_id(cfg),
        "metric": "median val top-1 error (%) of the last epochs",
        "metric_epochs": min(cfg.metric_epochs, len(val)),
        "val_err1": rundir.paper_metric(val, cfg.metric_epochs),
        "val_err5": rundir.paper_metric([r["val_err5"] for r in state.history], cfg.metric_epochs),
        "best_val_err1": min(val) if val else None,
        "epochs_done": len(state.history),
        "epochs": cfg.epochs,
        "steps": state.step,
        "wall_seconds": round(state.wall_seconds, 3),
        "gpu_hours": round(state.device_seconds / 3600, 6),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    rundir.write_json(rd.final, doc)
    return doc


def save_checkpoint(rd: rundir.RunDir, model: nn.Module, opt: torch.optim.Optimizer, state: TrainState, meta: dict[str, Any]) -> None:
    """Atomically save the training state (rank 0 only)."""
    blob = {"version": CHECKPOINT_VERSION, **meta, "model": model.state_dict(), "optimizer": opt.state_dict(), "state": asdict(state)}
    with rundir.atomic_path(rd.checkpoint) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(rd: rundir.RunDir, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any], device: str) -> TrainState:
    """Restore model, optimizer and state, refusing a checkpoint of another run or dataset."""
    try:
        # Only tensors and plain containers: a crafted pickle cannot run code (weights_only refuses it).
        blob = torch.load(rd.checkpoint, map_location=device, weights_only=True)
    except Exception as e:
        why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise AblationError(f"{rd.checkpoint}: cannot load checkpoint ({type(e).__name__}: {why}); "
                            "move it away to restart the run") from None
    if not isinstance(blob, dict) or "state" not in blob:
        raise AblationError(f"{rd.checkpoint}: not a checkpoint of this harness; move it away to restart the run")
    if blob.get("config_hash") != meta["config_hash"]:
        raise ConfigError(f"{rd.checkpoint} belongs to config {blob.get('config_hash')}, not {meta['config_hash']}")
    if blob.get("data_fingerprint") != meta["data_fingerprint"]:
        raise DataError(
            f"{rd.checkpoint} was trained on another dataset (fingerprint {blob.get('data_fingerprint')}, now {meta['data_fingerprint']}); "
            "point data.root at the original data"
        )
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    return TrainState(**blob["state"])


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(e: BaseException, rd: rundir.RunDir, state: TrainState) -> DiskFullError | None:
    """The DiskFullError to raise for an error caused by a full disk or quota, else None."""
    if isinstance(e, DiskFullError):
        return e
    cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
    if not (isinstance(cause, OSError) and cause.errno in DISK_FULL):
        return None
    return DiskFullError(
        f"{rd.root}: disk full at step {state.step} ({cause.strerror}); the last checkpoint is intact: "
        "free space and start the run again to resume"
    )


def record_failure(rd: rundir.RunDir, cfg: RunConfig, state: TrainState, stage: str, reason: str, rank: int, world: int) -> None:
    """A failed final.json naming the stage, the failing rank and its error, plus a line in failures.jsonl."""
    where = f"rank {rank}: " if world > 1 else ""
    rundir.append_jsonl(rd.failures, [{"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                       "stage": stage, "rank": rank, "step": state.step, "reason": reason}])
    failures = len(rundir.read_jsonl(rd.failures))
    if not state.history:  # failed before the checkpoint was read: the epochs already done still count
        try:
            state = TrainState(history=rundir.read_jsonl(rd.metrics))
        except AblationError:
            pass
    log.error(f"{rd.root.name}: failed during {stage}: {where}{reason}")
    write_final(rd, cfg, state, "failed", f"{where}{reason}", stage=stage, failed_rank=rank, failures=failures)


def remove_temporaries(rd: rundir.RunDir) -> None:
    """Delete what a killed atomic write left behind (.<name>.<random>.tmp); the folder is locked, so none is live."""
    for p in [*rd.root.glob(".*.tmp"), *rd.predictions.glob(".*.tmp")]:
        p.unlink(missing_ok=True)
