"""The trainer: a function of a run config and a run folder. It knows nothing of sweeps or SLURM.

Reproducibility rests on three choices:
- every image's augmentation is seeded by (seed, epoch, index) and every global batch is a fixed
  slice of a per-epoch permutation, so the data a modelled GPU sees does not depend on how many
  processes stand in for the GPUs, on data workers, or on where a run was resumed;
- a checkpoint holds the partial-epoch sums, so a resumed run continues the same arithmetic;
- metrics.jsonl is rewritten from the checkpointed history, so a line is never written twice.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import ablation
from ablation import faults, rundir
from ablation.config import ConfigError, Derived, RunConfig, config_hash, derive, lr_at, normalized, run_id, to_dict
from ablation.data import DatasetInfo, DatasetScan, SeededImageFolder, finish_on_device, pipeline_transforms, scan_layout
from ablation.cluster import cpu_budget
from ablation.coordination import FailureGuard, StopVote, eval_polls
from ablation.distributed import DistEnv, setup
from ablation.errors import AblationError, DataError, DiskFullError
from ablation.models import create_model
from ablation.norms import interleave, sync_running_stats

log = logging.getLogger("ablation")
CHECKPOINT_VERSION = 1
# Fault injection for the kill-and-resume tests: SIGKILL this process right after this step.
FAULT_KILL_ENV = "ABLATION_FAULT_KILL_AT_STEP"
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST", "SLURM_NTASKS")


class Diverged(Exception):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, epoch: int, value: float):
        super().__init__(f"loss is {value} at step {step} (epoch {epoch + 1})")
        self.step, self.epoch = step, epoch


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


# ---------------------------------------------------------------- data


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of every global batch of one epoch, as (epoch, index) pairs.

    The global batch of step s is slice s of a per-epoch permutation; modelled GPU g takes the g-th
    chunk of batch_per_gpu images, and process p stands in for GPUs p*k ... p*k+k-1. Its batch holds
    their images interleaved (ablation.norms.interleave: row j*k + i is image j of its GPU i), the
    layout per-GPU BN reads; every modelled GPU sees the same images whatever the process count.
    """

    def __init__(self, num_images: int, d: Derived, cfg: RunConfig, rank: int, world: int):
        self.num_images, self.d, self.seed = num_images, d, cfg.seed
        self.per_process = d.global_batch // world
        self.gpus_per_process = cfg.gpus // world
        self.offset = rank * self.per_process
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch and the first step to yield (a resumed epoch skips what was done)."""
        self.epoch, self.start = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_images, generator=g)
        for s in range(self.start, self.d.steps_per_epoch):
            base = s * self.d.global_batch + self.offset
            mine = perm[base : base + self.per_process].tolist()
            b = len(mine) // self.gpus_per_process
            yield [(self.epoch, i) for i in interleave([mine[g * b : g * b + b] for g in range(self.gpus_per_process)])]

    def __len__(self) -> int:
        return self.d.steps_per_epoch - self.start


class EpochIndexed(Dataset):
    """Takes (epoch, index) keys so persistent workers see the epoch that seeds the augmentation."""

    def __init__(self, ds: SeededImageFolder):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        self.ds.set_epoch(epoch)
        return self.ds[index]


def _scan_dataset(root: str, env: DistEnv) -> DatasetScan:
    """Check the dataset and list its files once per start: rank 0 walks the folders, the other ranks
    receive the lists (1.3M ImageNet paths walked once, not twice on every rank)."""
    if env.world_size == 1:
        return scan_layout(root)
    box: list[Any] = [None]
    if env.is_main:
        try:
            box[0] = scan_layout(root)
        except DataError as e:
            box[0] = str(e)  # every rank raises it: none is left waiting for a list that never comes
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise DataError(box[0])
    return box[0]


def _loader(ds: Dataset, cfg: RunConfig, env: DistEnv, **kw: Any) -> DataLoader:
    """A DataLoader with the run's worker settings, capped by this process's CPU budget (ablation.cluster.cpu_budget)."""
    # More workers than cores only adds contention; the images do not depend on the worker count.
    workers = cpu_budget(env.local_world_size, env.device, cfg.data.workers).workers
    return DataLoader(
        ds,
        num_workers=workers,
        pin_memory=env.device.startswith("cuda"),
        persistent_workers=workers > 0,
        **kw,
    )


# ---------------------------------------------------------------- optimizer


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov by default) with decay on every parameter, or not on 1-D ones if asked."""
    o = cfg.optim
    params = list(model.parameters())
    if o.no_decay_1d:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": o.weight_decay}]
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


# ---------------------------------------------------------------- run-folder bookkeeping


def _git_commit() -> dict[str, Any]:
    """The package's git commit and whether the tree was dirty (None outside a checkout)."""
    here = Path(ablation.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
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
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def backend_settings() -> dict[str, bool]:
    """The torch backend flags this start trains with (env.json); they matter on CUDA only."""
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


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
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": env.device,
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "cpu_budget": cpu_budget(env.local_world_size, env.device, cfg.data.workers).as_dict(),
        "processes": env.world_size,
        "gpus_per_process": cfg.gpus // env.world_size,
        "slurm": {k: os.environ[k] for k in SLURM_KEYS if k in os.environ},
    }


@contextmanager
def _folder_lock(rd: rundir.RunDir) -> Iterator[None]:
    """Hold an exclusive lock on the run folder: never two trainers writing one folder.

    A POSIX record lock (ablation.lock): forked loader workers do not inherit it, so it ends with the
    trainer and a killed trainer can be restarted at once; a lock file with a heartbeat where the file
    system's locks are missing or per node (Lustre localflock/noflock, BeeGFS, NFS nolock).
    """
    from ablation import lock

    rd.root.mkdir(parents=True, exist_ok=True)
    with lock.hold(rd.lock, what=f"run folder {rd.root}"):
        yield


def _write_config(rd: rundir.RunDir, cfg: RunConfig, d: Derived) -> None:
    """Write config.yaml once; a restart checks it describes the same run."""
    if rd.config.exists():
        old = yaml.safe_load(rd.config.read_text()) or {}
        if old.get("run_id") != run_id(cfg):
            raise ConfigError(f"{rd.config} describes run {old.get('run_id')}, not {run_id(cfg)}; use another results folder")
        return
    doc = {"run_id": run_id(cfg), "config_hash": config_hash(cfg), **to_dict(cfg), "derived": asdict(d)}
    rundir.write_text(rd.config, yaml.safe_dump(doc, sort_keys=False))


def _write_env(rd: rundir.RunDir, info: dict[str, Any], data: DatasetInfo, state: TrainState) -> None:
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
        }
    )
    rundir.write_json(rd.env, {**info, "data": asdict(data), "starts": starts})


def _note_stop(rd: rundir.RunDir, note: dict[str, Any]) -> None:
    """Add how this start ended (the step, the signal, the time from signal to checkpoint) to its entry in env.json."""
    doc = rundir.read_json(rd.env) or {}
    if doc.get("starts"):
        doc["starts"][-1].update(note)
        rundir.write_json(rd.env, doc)


def _final(rd: rundir.RunDir, cfg: RunConfig, state: TrainState, status: str, reason: str | None = None, **extra: Any) -> dict[str, Any]:
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


# ---------------------------------------------------------------- checkpoints


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
        raise AblationError(f"{rd.checkpoint}: cannot load checkpoint ({type(e).__name__}: {why}); move it away to restart the run") from None
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


# ---------------------------------------------------------------- the loop


def _all_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over processes (identity in one process)."""
    if env.world_size > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, cfg: RunConfig, vote: StopVote | None = None, polls: int = 0) -> tuple[float, float] | None:
    """Top-1 and top-5 error (%) over the whole validation set (each process a shard).

    None when the vote says stop: it is asked before each of the first `polls` batches (those every rank has).
    """
    model.eval()
    counts, images = torch.zeros(2, dtype=torch.float64, device=env.device), 0
    for i, (x, y) in enumerate(loader):
        faults.hit("eval")
        if vote is not None and i < polls and vote.poll():
            model.train()
            return None
        x, y = _to_device(x, y, env, cfg)
        with _autocast(cfg, env):
            out = model(x)
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).double()
        images += len(y)  # a Python int: no tensor built from host values per batch
    model.train()
    c1, c5, n = _all_sum(torch.cat([counts, counts.new_tensor([images])]), env).tolist()
    return 100.0 * (1 - c1 / n), 100.0 * (1 - c5 / n)


def _autocast(cfg: RunConfig, env: DistEnv) -> Any:
    """bfloat16 autocast on GPU when amp is on; nothing on CPU."""
    if cfg.amp and env.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _to_device(x: torch.Tensor | Any, y: torch.Tensor, env: DistEnv, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the device (channels-last on GPU when asked).

    A data.pipeline=split batch (uint8 pixels, with their augmentation parameters when training) gets
    its photometric steps there, batched: the float batch the reference pipeline would have made.
    """
    fmt = torch.channels_last if cfg.channels_last and env.device != "cpu" else torch.contiguous_format
    if not isinstance(x, torch.Tensor) or x.dtype == torch.uint8:
        return finish_on_device(x, cfg.data, env.device, fmt), y.to(env.device, non_blocking=True)
    if env.device == "cpu":
        return x, y
    return x.to(env.device, non_blocking=True, memory_format=fmt), y.to(env.device, non_blocking=True)


def _progress(total: int, initial: int, desc: str, env: DistEnv) -> Any:
    """A progress bar on a terminal (rank 0), nothing in logs."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, disable=not (env.is_main and sys.stderr.isatty()))


def setup_logging(rd: rundir.RunDir | None, env: DistEnv) -> None:
    """Plain lines to stdout and train.log on rank 0; warnings only elsewhere."""
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(fmt)
    log.addHandler(out)
    if rd is not None and env.is_main:
        rd.root.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(rd.log)
        fh.setFormatter(fmt)
        log.addHandler(fh)


def train(cfg: RunConfig, run_dir: str | Path, env: DistEnv | None = None, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the run in run_dir; return final.json's content.

    Returns {"status": "interrupted"} without writing final.json when should_stop() asked for a
    stop: the state is checkpointed and the same call later resumes it.
    """
    cfg = normalized(cfg)
    env = env or setup(cfg.device)
    rd = rundir.RunDir(run_dir)
    if cfg.gpus % env.world_size:
        raise ConfigError(f"gpus ({cfg.gpus}) must be a multiple of the number of processes ({env.world_size})")
    finished = rd.is_finished()
    # A missing or malformed dataset is the user's to fix, not the run's failure: refuse before writing anything.
    scan = None if finished else _scan_dataset(cfg.data.root, env)
    setup_logging(rd, env)
    if finished:
        final = rd.final_status() or {}
        log.info(f"{rd.root.name}: already finished ({final.get('status')}, val error {final.get('val_err1')}); nothing to do")
        return final
    lock = _folder_lock(rd) if env.is_main else nullcontext()
    with lock:
        return _train_locked(cfg, rd, env, scan, should_stop)


def _train_locked(cfg: RunConfig, rd: rundir.RunDir, env: DistEnv, scan: DatasetScan, should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    """The body of train() once the folder is ours: set-up and loop; any failure is recorded as one."""
    info = scan.info
    gpp = cfg.gpus // env.world_size
    d = derive(cfg, info.train_images)
    meta = {"run_id": run_id(cfg), "config_hash": config_hash(cfg), "data_fingerprint": info.fingerprint}
    if env.is_main:
        _write_config(rd, cfg, d)  # another run's folder is refused here, not marked failed
        _remove_temporaries(rd)
    state, loop = TrainState(), None

    def record(reason: str, rank: int) -> None:
        _record_failure(rd, cfg, state, loop.stage if loop else "setup", reason, rank, env.world_size)

    guard = FailureGuard(rd.root, env, record)
    guard.start()
    try:
        faults.hit("setup")
        if env.is_main and (rd.final_status() or {}).get("status") == "failed":
            rd.final.unlink()  # a retried failure is running again, not failed (failures.jsonl keeps the count)
        configure_backends(cfg, env)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg, len(info.classes), gpus_per_process=gpp).to(env.device)
        if cfg.channels_last and env.device != "cpu":
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(cfg, model)
        state = load_checkpoint(rd, model, opt, meta, env.device) if rd.checkpoint.exists() else TrainState()
        resumed = state.step > 0 or state.epoch > 0
        if env.is_main:
            _write_env(rd, environment(env, cfg), info, state)
            rundir.write_jsonl(rd.metrics, state.history)
            if cfg.log_steps:
                rundir.write_jsonl(rd.steps, [r for r in rundir.read_jsonl(rd.steps) if r["step"] < state.step])
        ddp = _wrap_ddp(model, env) if env.world_size > 1 else model
        ddp, eval_model = _compiled(cfg, ddp, model)

        train_tf, val_tf = pipeline_transforms(_eval_data_cfg(cfg, d))
        train_ds = SeededImageFolder(cfg.data.root, "train", train_tf, cfg.seed, scan=scan)
        val_ds = SeededImageFolder(cfg.data.root, "val", val_tf, cfg.seed, scan=scan)
        if env.device != "cpu" and cfg.data.pipeline == "reference":
            log.info("data.pipeline=reference augments in float on the loader's CPU cores; data.pipeline=split needs "
                     "fewer of them (measure both with `ablation data bench`)")
        sampler = GlobalBatchSampler(len(train_ds), d, cfg, env.rank, env.world_size)
        train_loader = _loader(EpochIndexed(train_ds), cfg, env, batch_sampler=sampler)
        val_idx = list(range(env.rank, len(val_ds), env.world_size))
        val_loader = _loader(torch.utils.data.Subset(val_ds, val_idx), cfg, env, batch_size=cfg.data.eval_batch)

        what = "resuming at" if resumed else "starting"
        log.info(
            f"{meta['run_id']}: {what} epoch {state.epoch + 1}/{cfg.epochs} step {state.step}/{d.total_steps}; "
            f"{cfg.norm.name} x {cfg.gpus} GPUs x {cfg.batch_per_gpu} images = global batch {d.global_batch}, lr {d.lr:g}, "
            f"{env.world_size} process(es) on {env.device}, {gpp} GPU(s) per process"
        )
        if env.device == "cpu" and (cfg.amp or cfg.channels_last):
            log.warning("amp and channels_last apply on GPU only; training in float32, contiguous, on the CPU")
        loop = _Loop(cfg, rd, env, d, ddp, model, opt, state, meta, should_stop, eval_polls(len(val_ds), env, cfg.data.eval_batch))
        loop.eval_model = eval_model
        t0 = time.monotonic()
        for epoch in range(state.epoch, cfg.epochs):
            sampler.set_epoch(epoch, state.step_in_epoch)
            if not loop.run_epoch(epoch, train_loader, val_loader):
                loop.vote.close()
                guard.close()
                return {"status": "interrupted", "step": state.step}
        loop.vote.close()
    except Diverged as e:
        guard.close()
        loop.account_time()
        log.warning(f"{meta['run_id']}: diverged: {e}")
        return _final(rd, cfg, state, "diverged", str(e), diverged_step=e.step) if env.is_main else {"status": "diverged"}
    except Exception as e:
        if loop:
            loop.account_time()
        full = _disk_full(e, rd, state)
        if full:
            guard._note(str(full))  # the peers stop too; a full disk is not the run's failure
            guard.close()
            raise full from None
        guard.failed(_reason(e))
        guard.close()
        raise
    guard.close()
    final = _final(rd, cfg, state, "ok") if env.is_main else {"status": "ok"}
    if env.is_main:
        log.info(f"{meta['run_id']}: done in {time.monotonic() - t0:.0f}s: val error {final['val_err1']:.2f}% (median of last {final['metric_epochs']} epochs)")
    return final


def _reason(e: BaseException) -> str:
    """'Type: last line of the message' (a DataLoader worker's error arrives wrapped in a traceback)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(e: BaseException, rd: rundir.RunDir, state: TrainState) -> DiskFullError | None:
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


def _record_failure(rd: rundir.RunDir, cfg: RunConfig, state: TrainState, stage: str, reason: str, rank: int, world: int) -> None:
    """A failed final.json naming the stage, the failing rank and its error, plus a line in failures.jsonl."""
    where = f"rank {rank}: " if world > 1 else ""
    rundir.append_jsonl(rd.failures, [{"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "stage": stage, "rank": rank, "step": state.step, "reason": reason}])
    failures = len(rundir.read_jsonl(rd.failures))
    if not state.history:  # failed before the checkpoint was read: the epochs already done still count
        try:
            state = TrainState(history=rundir.read_jsonl(rd.metrics))
        except AblationError:
            pass
    log.error(f"{rd.root.name}: failed during {stage}: {where}{reason}")
    _final(rd, cfg, state, "failed", f"{where}{reason}", stage=stage, failed_rank=rank, failures=failures)


def _remove_temporaries(rd: rundir.RunDir) -> None:
    """Delete what a killed atomic write left behind (.<name>.<random>.tmp); the folder is locked, so none is live."""
    for p in rd.root.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def _compiled(cfg: RunConfig, ddp: nn.Module, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(training forward, evaluation forward): torch.compile'd when cfg.compile is not 'off'.

    One compiled module serves train and eval (separate graphs, guarded on the training flag), so
    switching modes after the first epoch recompiles nothing; the smaller last evaluation batch makes
    the batch dimension dynamic once. Checkpoints still save `model`, whose state the compiled module shares.
    """
    if cfg.compile == "off":
        return ddp, model
    compiled = torch.compile(ddp, backend=cfg.compile)
    return compiled, (compiled if ddp is model else torch.compile(model, backend=cfg.compile))


def _wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP without its own buffer broadcast: the BN running-statistics rule is applied before each evaluation and checkpoint."""
    import inspect

    ddp_cls = nn.parallel.DistributedDataParallel
    # torch >= 2.15 renamed broadcast_buffers; syncing at init is harmless (every rank starts equal).
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_cls).parameters else {"broadcast_buffers": False}
    return ddp_cls(model, device_ids=[env.device] if env.device != "cpu" else None, **sync)


def _eval_data_cfg(cfg: RunConfig, d: Derived) -> Any:
    """The data config with the derived eval resize filled in."""
    import dataclasses

    return dataclasses.replace(cfg.data, eval_resize=d.eval_resize)


class _Loop:
    """One run's training loop; holds the per-epoch accumulators between steps."""

    def __init__(self, cfg, rd, env, d, ddp, model, opt, state: TrainState, meta, should_stop, eval_polls: int):
        self.cfg, self.rd, self.env, self.d = cfg, rd, env, d
        self.ddp, self.model, self.opt, self.state, self.meta = ddp, model, opt, state, meta
        self.should_stop = should_stop or (lambda: False)
        self.vote = StopVote(env, self.should_stop)  # polled after every step and evaluation batch
        self.eval_polls = eval_polls
        self.stage = "train"  # train | eval | checkpoint: what a failure interrupted
        self.eval_model: nn.Module = model  # the compiled model when cfg.compile is on
        self.losses: list[torch.Tensor] = []  # per-step losses not yet checked (kept on device: no sync per step)
        self.session_start = time.monotonic()
        self.last_save = time.monotonic()
        self.accounted = time.monotonic()
        self.kill_at_step = int(os.environ.get(FAULT_KILL_ENV, "0"))
        self.images = 0  # images trained in this epoch since this start (run_epoch)
        self.bn_synced_at: int | None = None  # the step at which BN running statistics were last synced

    def account_time(self) -> None:
        """Add the time since the last call to the run's wall and device seconds."""
        now = time.monotonic()
        dt = now - self.accounted
        self.accounted = now
        self.state.wall_seconds += dt
        self.state.epoch_seconds += dt
        if self.env.device != "cpu":
            self.state.device_seconds += dt * self.env.world_size

    def _sums(self, acc: torch.Tensor) -> torch.Tensor:
        """This rank's [loss x images, correct, images] of the epoch so far: acc plus the images counted since this start."""
        return acc + acc.new_tensor([0.0, 0.0, float(self.images)])

    def _sync_bn(self) -> None:
        """Apply the BN running-statistics rule across processes (a collective: every rank calls it at the
        same step); once per step at most, before evaluating or checkpointing, never after every step."""
        if self.bn_synced_at != self.state.step:
            sync_running_stats(self.model)
            self.bn_synced_at = self.state.step

    def _partial_for_rank(self) -> torch.Tensor:
        """This rank's saved partial-epoch sums (a different process count folds them into rank 0)."""
        acc = torch.zeros(3, dtype=torch.float64, device=self.env.device)
        p = self.state.partial
        if len(p) == self.env.world_size:
            acc += torch.tensor(p[self.env.rank], dtype=torch.float64, device=self.env.device)
        elif p and self.env.is_main:
            acc += torch.tensor([sum(col) for col in zip(*p)], dtype=torch.float64, device=self.env.device)
        return acc

    def run_epoch(self, epoch: int, train_loader: DataLoader, val_loader: DataLoader) -> bool:
        """Train the rest of one epoch, validate, checkpoint; False when stopped early."""
        cfg, d, st, env = self.cfg, self.d, self.state, self.env
        acc = self._partial_for_rank()
        self.images = 0  # images of this epoch trained since this start; acc[2] holds those before it
        bar = _progress(d.steps_per_epoch, st.step_in_epoch, f"epoch {epoch + 1}/{cfg.epochs}", env)
        for x, y in train_loader:
            lr = lr_at(cfg, d, st.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            x, y = _to_device(x, y, env, cfg)
            with _autocast(cfg, env):
                out = self.ddp(x)
                loss = F.cross_entropy(out, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            # No host sync per step: sums stay on the device, the image count is a Python int, and BN running
            # statistics are synced across processes only before evaluation and checkpoints (_sync_bn).
            with torch.no_grad():
                correct = (out.argmax(1) == y).sum()
                acc[:2] += torch.stack([loss.detach().double() * len(y), correct.double()])
            self.images += len(y)
            self.losses.append(loss.detach().float())
            st.step += 1
            st.step_in_epoch += 1
            if st.step == self.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            faults.hit("step", st.step)
            if self.vote.poll():
                self._flush(epoch, lr, bar)
                bar.close()
                return self._stop(acc)
            every = cfg.checkpoint_every_steps
            due_ckpt = bool(every) and st.step % every == 0 and st.step_in_epoch < d.steps_per_epoch
            if st.step % cfg.log_every_steps == 0 or due_ckpt:
                if self._flush(epoch, lr, bar) or due_ckpt:
                    self._checkpoint(acc)
        self._flush(epoch, lr_at(cfg, d, max(st.step - 1, 0)), bar)
        bar.close()
        train_loss, correct, count = _all_sum(self._sums(acc), env).tolist()  # acc stays this rank's: a stop in evaluation saves it
        self.stage = "eval"
        self._sync_bn()
        val = evaluate(self.eval_model, val_loader, env, cfg, self.vote, self.eval_polls)
        if val is None:
            return self._stop(acc)
        val1, val5 = val
        self.stage = "train"
        self.account_time()
        row = {
            "epoch": epoch + 1,
            "lr": lr_at(cfg, d, st.step - 1),
            "train_loss": train_loss / count,
            "train_err1": 100.0 * (1 - correct / count),
            "val_err1": val1,
            "val_err5": val5,
            "images_per_s": d.global_batch * d.steps_per_epoch / max(st.epoch_seconds, 1e-9),
            "epoch_seconds": st.epoch_seconds,
            "wall_seconds": st.wall_seconds,
        }
        st.history.append({k: row[k] for k in rundir.METRIC_KEYS})
        st.epoch, st.step_in_epoch, st.partial, st.epoch_seconds = epoch + 1, 0, [], 0.0
        self._checkpoint(None)
        if env.is_main:
            rundir.write_jsonl(self.rd.metrics, st.history)
        log.info(
            f"epoch {epoch + 1}/{cfg.epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} err {row['train_err1']:.2f}%  "
            f"val err {val1:.2f}% (top-5 {val5:.2f}%)  {row['images_per_s']:.0f} img/s  {row['epoch_seconds']:.1f}s"
        )
        return True

    def _flush(self, epoch: int, lr: float, bar: Any) -> bool:
        """Check the buffered losses for divergence, log them; return whether a timed checkpoint is due."""
        env, st = self.env, self.state
        if not self.losses:
            return False
        losses = torch.stack(self.losses)
        timed = bool(self.cfg.checkpoint_every_minutes) and time.monotonic() - self.last_save > 60 * self.cfg.checkpoint_every_minutes
        flags = torch.tensor([float(timed and env.is_main)], device=losses.device)  # rank 0's clock decides for all
        packed = _all_sum(torch.cat([losses, flags]), env)
        losses = (packed[:-1] / env.world_size).tolist()
        timed = packed[-1].item() > 0
        first = st.step - len(losses)
        self.losses = []
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if env.is_main and self.cfg.log_steps:
            # One write of whole lines: a kill leaves at most a torn last line, which readers and the resume drop.
            rows = [{"step": first + i, "epoch": epoch + 1, "lr": lr_at(self.cfg, self.d, first + i), "loss": v} for i, v in enumerate(losses)]
            rundir.append_jsonl(self.rd.steps, rows)
        if bad is not None:
            raise Diverged(first + bad, epoch, losses[bad])
        bar.update(len(losses))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.3g}")
        return timed

    def _stop(self, acc: torch.Tensor) -> bool:
        """Checkpoint where every process agreed to stop, log how long that took since the signal; False."""
        st = self.state
        self._checkpoint(acc)
        at, sig = getattr(self.should_stop, "at", None), getattr(self.should_stop, "name", None)
        took = time.monotonic() - at if at is not None else None
        after = f" {took:.2f}s after {sig}" if took is not None else ""
        log.info(f"{self.meta['run_id']}: stopped at step {st.step} ({self.stage}); checkpoint written{after}, will resume from here")
        if self.env.is_main:
            _note_stop(self.rd, {"stopped_at_step": st.step, "stopped_in": self.stage, "stop_signal": sig, "signal_to_checkpoint_s": None if took is None else round(took, 3)})
        return False

    def _checkpoint(self, acc: torch.Tensor | None) -> None:
        """Save the state; acc holds this rank's partial-epoch sums (None at an epoch end)."""
        env, st = self.env, self.state
        self._sync_bn()
        if acc is not None:
            acc = self._sums(acc)
            if env.world_size > 1:
                parts = [torch.zeros_like(acc) for _ in range(env.world_size)]
                dist.all_gather(parts, acc)
            else:
                parts = [acc]
            st.partial = [p.tolist() for p in parts]
            self.account_time()
        if env.is_main:
            stage, self.stage = self.stage, "checkpoint"
            try:
                save_checkpoint(self.rd, self.model, self.opt, st, self.meta)
            except OSError as e:
                if e.errno in DISK_FULL:  # the temporary file is gone; the previous checkpoint is untouched
                    raise DiskFullError(
                        f"{self.rd.checkpoint}: disk full writing the checkpoint of step {st.step} ({e.strerror}); "
                        "the previous checkpoint is intact: free space and start the run again to resume"
                    ) from None
                raise
            self.stage = stage
        self.last_save = time.monotonic()
