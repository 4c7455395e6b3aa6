"""The trainer: a function of a run config and a run folder. It knows nothing of sweeps or SLURM.

run_training() is the one way a run is trained (the `ablation train` command, a SLURM job and the local
executor's runs all call it): it joins the process group, trains, and leaves it. train() sets a run up
and hands it to the pieces, one concern each: ablation.train.loaders (which images,
loaders, batches on the device), ablation.train.loop (steps, evaluation, checkpoints at boundaries, stops),
ablation.train.bookkeeping (config, env, checkpoints, final status, failures in the run folder),
ablation.train.coordination (stop votes, one failing rank ending all) and ablation.train.tracking (live curves).

Reproducibility rests on three choices:
- every image's augmentation is seeded by (seed, epoch, index) and every global batch is a fixed
  slice of a per-epoch permutation, so the data a modelled GPU sees does not depend on how many
  processes stand in for the GPUs, on data workers, or on where a run was resumed;
- a checkpoint holds the partial-epoch sums, so a resumed run continues the same arithmetic;
- metrics.jsonl is rewritten from the checkpointed history, so a line is never written twice.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ablation import faults, rundir
from ablation.config import ConfigError, RunConfig, config_hash, derive, normalized, run_id
from ablation.data.layout import DatasetScan
from ablation.data.pipelines import DecodedCache, SeededImageFolder, pipeline_transforms
from ablation.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, last_line
from ablation.norms import count_steps_per_layer
from ablation.signals import StopRequest
from ablation.train.bookkeeping import (
    TrainState,
    configure_backends,
    disk_full_error,
    environment,
    folder_lock,
    load_checkpoint,
    record_failure,
    remove_temporaries,
    write_config,
    write_env,
    write_final,
)
from ablation.train.coordination import FailureGuard, eval_polls
from ablation.train.distributed import DistEnv, setup, teardown
from ablation.train.loaders import (
    EpochIndexed,
    GlobalBatchSampler,
    MiniBatchValSampler,
    eval_data_cfg,
    make_loader,
    scan_dataset,
    val_shard,
)
from ablation.train.loop import Diverged, EpochLoop, applicable_modes
from ablation.train.models import check_model_norm, create_model
from ablation.train.optim import build_optimizer
from ablation.train.tracking import Tracker, open_tracker, require

__all__ = ["run_training", "train", "train_command"]

log = logging.getLogger("ablation")


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


def run_training(cfg: RunConfig, runs_root: str | Path, stop: Callable[[], bool] | None = None, *,
                 print_folder: bool = False) -> dict[str, Any]:
    """Train cfg's run in runs_root/<run id> as one process of its run: join the process group (torchrun's or
    SLURM's, when there is one), train, leave it; return final.json's content.

    `stop` (a StopRequest installed on the stop signals) asks for a checkpoint and {"status": "interrupted"}.
    print_folder: print the run folder on rank 0 at the end (the `ablation train` command does).
    """
    env = setup(cfg.device)
    folder = Path(runs_root) / run_id(cfg)
    try:
        return train(cfg, folder, env, should_stop=stop)
    finally:
        teardown()
        if print_folder and env.is_main and folder.exists():
            print(folder, flush=True)


def train_command(cfg: RunConfig, runs_root: str | Path) -> int:
    """`ablation train`: check the model, route the stop signals to a checkpoint, train; the exit code
    (0 done, 3 diverged, 4 stopped with a checkpoint: run it again to resume)."""
    check_model_norm(cfg)
    stop = StopRequest().install()  # SIGTERM / SIGUSR2: checkpoint at the next step boundary, exit 4
    final = run_training(cfg, runs_root, stop, print_folder=True)
    status = final.get("status")
    if status == "diverged":
        print(f"error: run diverged: {final.get('reason')}", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_INTERRUPTED if status == "interrupted" else EXIT_OK


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
    scan = None if finished else scan_dataset(cfg.data.root, env)
    if not finished:
        require(cfg.tracking)  # tracking=tensorboard without its package: one line, before the folder is touched
    setup_logging(rd, env)
    if finished:
        final = rd.final_status() or {}
        log.info(f"{rd.root.name}: already finished ({final.get('status')}, val error {final.get('val_err1')}); nothing to do")
        return final
    lock = folder_lock(rd) if env.is_main else nullcontext()
    with lock:
        return _train_locked(cfg, rd, env, scan, should_stop)


def _train_locked(cfg: RunConfig, rd: rundir.RunDir, env: DistEnv, scan: DatasetScan,
                  should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    """The body of train() once the folder is ours: set-up and loop; any failure is recorded as one."""
    info = scan.info
    gpp = cfg.gpus // env.world_size
    d = derive(cfg, info.train_images)
    meta = {"run_id": run_id(cfg), "config_hash": config_hash(cfg), "data_fingerprint": info.fingerprint}
    if env.is_main:
        write_config(rd, cfg, d, info)  # another run's folder is refused here, not marked failed
        remove_temporaries(rd)
    state, loop, tracker, failed = TrainState(), None, Tracker(), False

    def record(reason: str, rank: int) -> None:
        record_failure(rd, cfg, state, loop.stage if loop else "setup", reason, rank, env.world_size)

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
            write_env(rd, environment(env, cfg), info, state)
            rundir.write_metrics(rd.root, state.history)
            rundir.prune_predictions(rd.root, state.epoch)  # the epochs after the checkpoint are evaluated again
            if cfg.log_steps:
                rundir.write_jsonl(rd.steps, [r for r in rundir.read_jsonl(rd.steps) if r["step"] < state.step])
        tracker = open_tracker(cfg, rd, meta["run_id"], state.history, env.is_main)  # live curves, rank 0 (tracking=)
        ddp = wrap_ddp(model, env) if env.world_size > 1 else model
        ddp, eval_model = compiled_forwards(cfg, ddp, model)

        train_tf, val_tf = pipeline_transforms(eval_data_cfg(cfg, d))
        cache = decoded_cache(cfg)
        train_ds = SeededImageFolder(cfg.data.root, "train", train_tf, cfg.seed, scan=scan, cache=cache)
        val_ds = SeededImageFolder(cfg.data.root, "val", val_tf, cfg.seed, scan=scan, cache=cache)
        if env.device != "cpu" and cfg.data.pipeline == "reference":
            log.info("data.pipeline=reference augments in float on the loader's CPU cores; data.pipeline=split needs "
                     "fewer of them (measure both with `ablation data bench`)")
        sampler = GlobalBatchSampler(len(train_ds), d, cfg, env.rank, env.world_size)
        train_loader = make_loader(EpochIndexed(train_ds), cfg, env, batch_sampler=sampler)
        val_idx = list(val_shard(len(val_ds), env))
        val_loader = make_loader(torch.utils.data.Subset(val_ds, val_idx), cfg, env, batch_size=cfg.data.eval_batch)

        what = "resuming at" if resumed else "starting"
        log.info(
            f"{meta['run_id']}: {what} epoch {state.epoch + 1}/{cfg.epochs} step {state.step}/{d.total_steps}; "
            f"{cfg.norm.name} x {cfg.gpus} GPUs x {cfg.batch_per_gpu} images = global batch {d.global_batch}, lr {d.lr:g}, "
            f"{env.world_size} process(es) on {env.device}, {gpp} GPU(s) per process"
        )
        if env.device == "cpu" and (cfg.amp or cfg.channels_last):
            log.warning("amp and channels_last apply on GPU only; training in float32, contiguous, on the CPU")
        if env.device == "cpu" and cfg.data.pipeline == "device-decode" and env.is_main:
            log.warning("data.pipeline=device-decode on a CPU device decodes every JPEG in the training process: no CPU is saved "
                        "and the pixels are libjpeg-turbo's, not nvJPEG's (recorded in env.json); data.pipeline=split is faster here")
        loop = EpochLoop(cfg, rd, env, d, ddp, model, opt, state, meta, should_stop, eval_polls(len(val_ds), env, cfg.data.eval_batch))
        loop.eval_model = eval_model
        loop.val_record = val_record(scan, val_ds)
        loop.tracker = tracker
        loop.modes = applicable_modes(cfg, model)
        skipped = [m for m in cfg.eval.modes if m not in loop.modes]
        if skipped:
            log.info(f"eval.modes {', '.join(skipped)}: not applicable to norm {cfg.norm.name} (docs/norms.md); not evaluated")
        if "batch" in loop.modes:
            batches = MiniBatchValSampler(len(val_ds), cfg, env.rank, env.world_size)  # indices into the whole validation set
            loop.minibatch_loader = make_loader(val_ds, cfg, env, batch_sampler=batches)
        t0 = time.monotonic()
        for epoch in range(state.epoch, cfg.epochs):
            sampler.set_epoch(epoch, state.step_in_epoch)
            if not loop.run_epoch(epoch, train_loader, val_loader):
                loop.vote.close()
                return {"status": "interrupted", "step": state.step}
        loop.vote.close()
    except Diverged as e:
        loop.account_time()
        log.warning(f"{meta['run_id']}: diverged: {e}")
        return write_final(rd, cfg, state, "diverged", str(e), diverged_step=e.step) if env.is_main else {"status": "diverged"}
    except Exception as e:
        if loop:
            loop.account_time()
        full = disk_full_error(e, rd, state)
        if full:
            guard.note(str(full))  # the peers stop too; a full disk is not the run's failure
            raise full from None
        failed = True
        guard.failed(f"{type(e).__name__}: {last_line(e)}")
        raise
    finally:
        guard.close()
        try:
            tracker.close(failed)
        except Exception as e:  # the curves are a view of metrics.jsonl: losing their tail does not fail the run
            log.warning(f"tracking={cfg.tracking}: closing the tracker failed: {type(e).__name__}: {last_line(e)}")
    final = write_final(rd, cfg, state, "ok") if env.is_main else {"status": "ok"}
    if env.is_main:
        log.info(f"{meta['run_id']}: done in {time.monotonic() - t0:.0f}s: val error {final['val_err1']:.2f}% "
                 f"(median of last {final['metric_epochs']} epochs)")
    return final


def val_record(scan: DatasetScan, val_ds: SeededImageFolder) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(labels, val.json) of the run's per-image results (rundir.write_predictions): the validation set's classes in its
    order, its size, the top-k kept, the dataset's fingerprint and the validation set's own; None (with a warning)
    where uint16 cannot hold the class indices."""
    classes = len(scan.info.classes)
    if classes > 1 << 16:
        log.warning(f"{classes} classes: per-image results ({rundir.PREDICTIONS}/) hold class indices as uint16 and are not written")
        return None
    meta = {"images": len(val_ds), "classes": classes, "k": min(rundir.TOPK, classes), "fingerprint": scan.info.fingerprint,
            "val_fingerprint": scan.split_fingerprint("val")}
    return np.asarray(val_ds.targets, dtype=np.uint16), meta


def decoded_cache(cfg: RunConfig) -> DecodedCache | None:
    """The in-memory cache of decoded images that data.cache_gb asks for, or None."""
    if cfg.data.cache_gb <= 0:
        return None
    if cfg.data.workers > 0:
        # Workers copy the dataset when an epoch's iterator starts and exit at its end: a cache there is refilled
        # every epoch, which only costs memory.
        log.warning(f"data.cache_gb={cfg.data.cache_gb:g} is ignored with data.workers={cfg.data.workers}: "
                    "it keeps images in the process that loads them, i.e. with data.workers=0")
        return None
    return DecodedCache(int(cfg.data.cache_gb * 2**30))


def compiled_forwards(cfg: RunConfig, ddp: nn.Module, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(training forward, evaluation forward): torch.compile'd when cfg.compile is not 'off'.

    One compiled module serves train and eval (separate graphs, guarded on the training flag), so
    switching modes after the first epoch recompiles nothing; the smaller last evaluation batch makes
    the batch dimension dynamic once. Checkpoints still save `model`, whose state the compiled module shares.
    """
    if cfg.compile == "off":
        return ddp, model
    count_steps_per_layer(model)  # the model-level step count is eager-only bookkeeping; compiled layers count their own
    compiled = torch.compile(ddp, backend=cfg.compile)
    return compiled, (compiled if ddp is model else torch.compile(model, backend=cfg.compile))


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP without its own buffer broadcast: the BN running-statistics rule is applied before each evaluation and checkpoint."""
    import inspect

    ddp_cls = nn.parallel.DistributedDataParallel
    # torch >= 2.15 renamed broadcast_buffers; syncing at init is harmless (every rank starts equal).
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_cls).parameters
            else {"broadcast_buffers": False})
    return ddp_cls(model, device_ids=[env.device] if env.device != "cpu" else None, **sync)


