"""The step/epoch loop: train steps, divergence checks, evaluation, checkpoints at boundaries, stops.

A checkpoint holds the partial-epoch sums, so a resumed run continues the same arithmetic, and
metrics.jsonl is rewritten from the checkpointed history, so a line is never written twice.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ablation import faults, rundir
from ablation.config import RunConfig
from ablation.errors import DiskFullError
from ablation.norms import registry, sync_running_stats
from ablation.norms.precise import precise_bn, running_stat_layers
from ablation.train.bookkeeping import DISK_FULL, TrainState, note_stop, save_checkpoint
from ablation.train.coordination import StopVote
from ablation.train.distributed import DistEnv
from ablation.train.loaders import MiniBatchValSampler, to_device
from ablation.train.optim import lr_at
from ablation.train.tracking import Tracker

log = logging.getLogger("ablation")


class Diverged(Exception):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, epoch: int, value: float):
        super().__init__(f"loss is {value} at step {step} (epoch {epoch + 1})")
        self.step, self.epoch = step, epoch


def all_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over processes (identity in one process)."""
    if env.world_size > 1:
        dist.all_reduce(t)
    return t


class Evaluation(NamedTuple):
    """One evaluation: top-1 and top-5 error (%) over the whole validation set, and this process's top-k predictions."""

    err1: float
    err5: float
    top: torch.Tensor | None  # [images of this process, k] class indices, best first, on the device (None: no images)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, cfg: RunConfig,
             vote: StopVote | None = None, polls: int = 0) -> Evaluation | None:
    """Top-1 and top-5 error (%) over the whole validation set (each process a shard), and the shard's top-k classes
    per image, in the loader's order (the errors are counted from them).

    None when the vote says stop: it is asked before each of the first `polls` batches (those every rank has).
    """
    model.eval()
    counts, images = torch.zeros(2, dtype=torch.float64, device=env.device), 0
    tops: list[torch.Tensor] = []  # kept on the device: no host sync per batch
    for i, (x, y) in enumerate(loader):
        faults.hit("eval")
        if vote is not None and i < polls and vote.poll():
            model.train()
            return None
        x, y = to_device(x, y, env, cfg)
        with autocast(cfg, env):
            out = model(x)
        top = out.topk(min(rundir.TOPK, out.shape[1]), dim=1).indices
        tops.append(top)
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).double()
        images += len(y)  # a Python int: no tensor built from host values per batch
    model.train()
    c1, c5, n = all_sum(torch.cat([counts, counts.new_tensor([images])]), env).tolist()
    return Evaluation(100.0 * (1 - c1 / n), 100.0 * (1 - c5 / n), torch.cat(tops) if tops else None)


def applicable_modes(cfg: RunConfig, model: nn.Module) -> tuple[str, ...]:
    """The eval.modes that apply to the run's norm: precise where layers keep population statistics, batch where
    training normalizes by per-GPU batch statistics (a built-in's registry entry, a user layer's ``batch_dependent``);
    ema always. syncbn's statistics span the global batch, so it has no mini-batch evaluation of its own."""
    info = registry.lookup(cfg.norm.name)
    if info is not None:
        per_batch = info.per_gpu_stats
    else:
        per_batch = any(getattr(m, "batch_dependent", False) for m in model.modules())
    keeps = bool(running_stat_layers(model))
    return tuple(m for m in cfg.eval.modes if m == "ema" or (m == "precise" and keeps) or (m == "batch" and per_batch))


@torch.no_grad()
def evaluate_minibatch(model: nn.Module, loader: DataLoader, env: DistEnv, cfg: RunConfig) -> tuple[float, float]:
    """Top-1 and top-5 error (%) of mini-batch evaluation (eval.modes batch): the validation images in normalization
    batches of norm.batch images in a fixed random order (loaders.MiniBatchValSampler), each normalized by its own statistics:
    a training-mode forward, no autograd, every buffer put back after each forward so no statistic moves."""
    sampler: MiniBatchValSampler = loader.batch_sampler
    kept = [b.clone() for b in model.buffers()]
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)
    model.train()
    try:
        for i, (x, y) in enumerate(loader):
            x, y = to_device(x, y, env, cfg)
            with autocast(cfg, env):
                out = model(x)
            for b, k in zip(model.buffers(), kept):
                b.copy_(k)
            real = sampler.real(i).to(out.device)
            top = out[real].topk(min(rundir.TOPK, out.shape[1]), dim=1).indices
            hit = top == y[real][:, None]
            counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), real.sum()]).double()
    finally:
        for b, k in zip(model.buffers(), kept):
            b.copy_(k)
    c1, c5, n = all_sum(counts, env).tolist()
    if not n:
        raise RuntimeError(f"mini-batch evaluation: the validation set holds no whole normalization batch of {sampler.nb} images")
    return 100.0 * (1 - c1 / n), 100.0 * (1 - c5 / n)


def gather_topk(top: torch.Tensor | None, env: DistEnv, num_images: int, k: int) -> np.ndarray | None:
    """Every process's top-k rows (evaluate's) as one uint16 [num_images, k] array in the validation set's order, on
    rank 0 (None elsewhere; a collective). Process r evaluated images r, r + W, r + 2W ... (loaders.val_shard), so
    with the shards padded to one length and stacked [row, rank], row-major order is image order: one process or
    N, the same array."""
    if top is None:
        top = torch.zeros((0, k), dtype=torch.int64, device=env.device)
    if env.world_size > 1:
        rows = -(-num_images // env.world_size)
        padded = top.new_zeros((rows, k), dtype=torch.int32)
        padded[: len(top)] = top
        parts = [torch.empty_like(padded) for _ in range(env.world_size)]
        dist.all_gather(parts, padded)
        if not env.is_main:
            return None
        top = torch.stack(parts, dim=1).reshape(rows * env.world_size, k)[:num_images]
    if len(top) != num_images:
        raise RuntimeError(f"evaluation predicted {len(top)} validation images, not {num_images}")
    return top.cpu().numpy().astype(np.uint16)


def autocast(cfg: RunConfig, env: DistEnv) -> Any:
    """bfloat16 autocast on GPU when amp is on; nothing on CPU."""
    if cfg.amp and env.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _progress(total: int, initial: int, desc: str, env: DistEnv) -> Any:
    """A progress bar on a terminal (rank 0), nothing in logs."""
    from tqdm import tqdm

    # No monitor thread: it would make this process multi-threaded for good, and a fork after that (the local
    # executor's children, the report's readers in a notebook that trained) is unsafe, so those run without one.
    tqdm.monitor_interval = 0
    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, disable=not (env.is_main and sys.stderr.isatty()))


class EpochLoop:
    """One run's training loop; holds the per-epoch accumulators between steps."""

    def __init__(self, cfg, rd, env, d, ddp, model, opt, state: TrainState, meta, should_stop, eval_polls: int):
        self.cfg, self.rd, self.env, self.d = cfg, rd, env, d
        self.ddp, self.model, self.opt, self.state, self.meta = ddp, model, opt, state, meta
        self.should_stop = should_stop or (lambda: False)
        self.vote = StopVote(env, self.should_stop)  # polled after every step and evaluation batch
        self.eval_polls = eval_polls
        self.stage = "train"  # train | eval | checkpoint: what a failure interrupted
        self.eval_model: nn.Module = model  # the compiled model when cfg.compile is on
        self.tracker = Tracker()  # live curves (ablation.train.tracking): the trainer sets rank 0's
        self.losses: list[torch.Tensor] = []  # per-step losses not yet checked (kept on device: no sync per step)
        self.session_start = time.monotonic()
        self.last_save = time.monotonic()
        self.accounted = time.monotonic()
        self.images = 0  # images trained in this epoch since this start (run_epoch)
        self.bn_synced_at: int | None = None  # the step at which BN running statistics were last synced
        # (labels uint16 [N], val.json) of the per-image results (rundir.write_predictions); the trainer sets them
        self.val_record: tuple[np.ndarray, dict[str, Any]] | None = None
        self.modes: tuple[str, ...] = ("ema",)  # the eval.modes that apply to this run's norm (applicable_modes)
        self.minibatch_loader: DataLoader | None = None  # eval.modes batch: the validation set in normalization batches

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

    def _precise_bn(self, epoch: int, train_loader: DataLoader, images: int | None = None) -> None:
        """PreciseBN (norm.precise_bn_images = N; ablation.norms.precise): population statistics over N training images.

        The images are the first ceil(N / global batch) global batches of this epoch's order (at most the
        whole epoch), with this epoch's augmentation: the training loader's own images, sampler layout and
        transforms, chosen by (seed, epoch) alone, so a resumed run recomputes the same numbers. Each
        modelled GPU's batch_per_gpu images are one batch (one normalization batch of norm.batch images where
        that is set). Under no_grad, off the optimizer, every rank in step (a collective). `images` overrides N
        (eval.modes precise: eval.precise_images)."""
        n = self.cfg.norm.precise_bn_images if images is None else images
        if not n:
            return
        d, sampler = self.d, train_loader.batch_sampler
        steps = min(-(-n // d.global_batch), d.steps_per_epoch)
        where = (sampler.epoch, sampler.start)
        sampler.set_epoch(epoch, 0)
        try:
            with autocast(self.cfg, self.env):
                precise_bn(self.model, (to_device(x, y, self.env, self.cfg)[0] for x, y in itertools.islice(train_loader, steps)))
        finally:
            sampler.set_epoch(*where)

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
            x, y = to_device(x, y, env, cfg)
            with autocast(cfg, env):
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
            faults.hit("step", st.step)  # ABLATION_FAULT=step:<n>:kill: the kill-and-resume tests stop the process here
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
        train_loss, correct, count = all_sum(self._sums(acc), env).tolist()  # acc stays this rank's: a stop in evaluation saves it
        self.stage = "eval"
        self._sync_bn()
        self._precise_bn(epoch, train_loader)
        val = evaluate(self.eval_model, val_loader, env, cfg, self.vote, self.eval_polls)
        if val is None:
            return self._stop(acc)
        val1, val5 = val.err1, val.err5
        self._write_predictions(epoch + 1, val.top)
        extra = self._extra_modes(epoch, train_loader, val_loader)
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
        st.history.append({**{k: row[k] for k in rundir.METRIC_KEYS}, **extra})
        st.epoch, st.step_in_epoch, st.partial, st.epoch_seconds = epoch + 1, 0, [], 0.0
        self._checkpoint(None)
        if env.is_main:
            rundir.write_metrics(self.rd.root, st.history)
        self.tracker.epoch(st.history[-1])  # after the checkpoint: an epoch a start shows is one a resume will not redo
        modes = "".join(f"  val err {mode} {extra[keys[0]]:.2f}%" for mode, keys in rundir.MODE_METRIC_KEYS.items() if keys[0] in extra)
        log.info(
            f"epoch {epoch + 1}/{cfg.epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} err {row['train_err1']:.2f}%  "
            f"val err {val1:.2f}% (top-5 {val5:.2f}%){modes}  {row['images_per_s']:.0f} img/s  {row['epoch_seconds']:.1f}s"
        )
        return True

    def _extra_modes(self, epoch: int, train_loader: DataLoader, val_loader: DataLoader) -> dict[str, float]:
        """The epoch's other evaluations (eval.modes), as metrics.jsonl fields (rundir.MODE_METRIC_KEYS).

        precise: PreciseBN over eval.precise_images training images, evaluated, then every buffer put back: the EMA
        (and what training continues from) is untouched. batch: evaluate_minibatch. Both are functions of the
        training state, so a start stopped here evaluates them again to the same numbers. Not polled for stops: a
        stop signal is honoured at the next step, after them."""
        out: dict[str, float] = {}
        if "precise" in self.modes:
            kept = [b.clone() for b in self.model.buffers()]
            try:
                self._precise_bn(epoch, train_loader, self.cfg.eval.precise_images)
                val = evaluate(self.eval_model, val_loader, self.env, self.cfg)
            finally:
                for b, k in zip(self.model.buffers(), kept):
                    b.copy_(k)
            out.update(zip(rundir.MODE_METRIC_KEYS["precise"], (val.err1, val.err5)))
        if "batch" in self.modes and self.minibatch_loader is not None:
            out.update(zip(rundir.MODE_METRIC_KEYS["batch"], evaluate_minibatch(self.model, self.minibatch_loader, self.env, self.cfg)))
        return out

    def _write_predictions(self, epoch: int, top: torch.Tensor | None) -> None:
        """Gather the evaluation's per-image top-k and write predictions/epoch_NNN.npy (rank 0), before the epoch's
        checkpoint: a start killed in between evaluates the epoch again and writes the same bytes."""
        if self.val_record is None:
            return
        labels, meta = self.val_record
        rows = gather_topk(top, self.env, meta["images"], meta["k"])
        if rows is not None:
            rundir.write_predictions(self.rd.root, epoch, rows, labels, meta)

    def _flush(self, epoch: int, lr: float, bar: Any) -> bool:
        """Check the buffered losses for divergence, log them; return whether a timed checkpoint is due."""
        env, st = self.env, self.state
        if not self.losses:
            return False
        losses = torch.stack(self.losses)
        timed = bool(self.cfg.checkpoint_every_minutes) and time.monotonic() - self.last_save > 60 * self.cfg.checkpoint_every_minutes
        flags = torch.tensor([float(timed and env.is_main)], device=losses.device)  # rank 0's clock decides for all
        packed = all_sum(torch.cat([losses, flags]), env)
        losses = (packed[:-1] / env.world_size).tolist()
        timed = packed[-1].item() > 0
        first = st.step - len(losses)
        self.losses = []
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if env.is_main and self.cfg.log_steps:
            # One write of whole lines: a kill leaves at most a torn last line, which readers and the resume drop.
            rows = [{"step": first + i, "epoch": epoch + 1, "lr": lr_at(self.cfg, self.d, first + i), "loss": v}
                    for i, v in enumerate(losses)]
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
        took = round(time.monotonic() - at, 3) if at is not None else None  # rounded once: the log and env.json agree
        after = f" {took:.2f}s after {sig}" if took is not None else ""
        log.info(f"{self.meta['run_id']}: stopped at step {st.step} ({self.stage}); checkpoint written{after}, will resume from here")
        if self.env.is_main:
            note_stop(self.rd, {"stopped_at_step": st.step, "stopped_in": self.stage, "stop_signal": sig, "signal_to_checkpoint_s": took})
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
