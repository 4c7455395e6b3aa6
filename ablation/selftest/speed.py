"""The self-test's speed checks: the model's training images/s at each images-per-GPU of the sweep (the rows
benchmarks/gpu.py records, which `ablation sweep --dry-run` reads) and whether the loaders can feed it."""

from __future__ import annotations

import itertools
import math
import os
import platform
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ablation.selftest import cuda
from ablation.selftest.checks import TOLERANCES, Check, Settings, held

NORMS = ("bn", "gn")  # the paper's two: estimates take the run's norm's records first


def images_per_s(s: Settings, norm: str, b: int) -> tuple[float, Any]:
    """Training images/s of one GPU at b images (data excluded: one batch on the device), eager, as benchmarks/gpu.py's
    per_gpu case; and the config it ran."""
    from ablation.train.bookkeeping import configure_backends
    from ablation.train.distributed import DistEnv
    from ablation.train.models import create_model
    from ablation.train.optim import build_optimizer

    gpu = s.device.startswith("cuda")
    narrow = norm == "gn" and any(o.startswith("model.widths") for o in s.overrides)  # the tiny model's 8-channel layers
    cfg = s.cfg(f"norm.name={norm}", *(["norm.groups=4"] if narrow else []), f"batch_per_gpu={b}", "gpus=1",
                f"amp={str(gpu).lower()}", f"channels_last={str(gpu).lower()}")
    env = DistEnv(device=s.device)
    configure_backends(cfg, env)  # the trainer's cuDNN and TF32 settings: the figures are the training's
    torch.manual_seed(0)
    model = create_model(cfg, s.classes).to(s.device).train()
    fmt = torch.channels_last if cfg.channels_last and gpu else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = build_optimizer(cfg, model)
    x = torch.randn(b, 3, cfg.data.image_size, cfg.data.image_size).to(s.device, memory_format=fmt)
    y = torch.randint(0, s.classes, (b,)).to(s.device)
    ips, loss = timed_steps(model, opt, itertools.repeat((x, y)), cfg, env, s.warmup, s.steps)
    return (ips if math.isfinite(loss) else math.nan), cfg


def timed_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                cfg: Any, env: Any, warmup: int, steps: int, forward: Any = None) -> tuple[float, float]:
    """(training images/s over `steps` steps after `warmup`, the last loss): the one timed loop of the self-test
    and benchmarks/gpu.py; `forward` is the (compiled) model when it differs from the one the optimizer holds."""
    from ablation.train.loop import autocast

    fwd = model if forward is None else forward
    start, seen, loss = 0.0, 0, torch.zeros(())
    for i, (x, y) in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            cuda.sync(env.device)  # the warm-up's queued work (and any compilation) stays out of the timing
            start = time.perf_counter()
        with autocast(cfg, env):
            loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y) if i >= warmup else 0
    cuda.sync(env.device)
    return seen / (time.perf_counter() - start), float(loss.item())


def machine(device: str) -> dict[str, Any]:
    """The machine record benchmarks/common.py writes with each row (host, platform, CPU, cores, Python, torch, device)."""
    return {
        "host": socket.gethostname(), "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "device": cuda.versions(device)["gpu"] or "cpu", "torch": torch.__version__,
    }


def throughput(s: Settings) -> tuple[Check, list[dict[str, Any]], dict[int, float]]:
    """(the check, gpu.jsonl rows, images/s by images-per-GPU of the first norm) at each of s.batches, for bn and gn."""
    what = f"training images/s of one GPU at {', '.join(map(str, s.batches))} images per GPU (bn, gn; eager, data excluded)"
    rows, by_batch, stamp, m = [], {}, time.strftime("%Y-%m-%dT%H:%M:%S"), machine(s.device)
    for norm in NORMS:
        for b in s.batches:
            ips, cfg = images_per_s(s, norm, b)
            if norm == NORMS[0]:
                by_batch[b] = ips
            row = {"time": stamp, "machine": m, "case": "per_gpu", "model": cfg.model.name, "norm": norm, "image_size": cfg.data.image_size,
                   "gpus": 1, "batch_per_gpu": b, "global_batch": b, "compile": "off", "data": "excluded", "pipeline": None,
                   "amp": cfg.amp, "channels_last": cfg.channels_last, "images_per_s": round(ips, 2), "device": m["device"],
                   "tiny": s.tiny, "source": "ablation selftest"}
            if not s.tiny and math.isfinite(ips):
                row["images_per_s_per_gpu"] = row["images_per_s"]  # what the estimates read (never a tiny model's)
            rows.append(row)
    worst = min((r["images_per_s"] for r in rows), default=math.nan)
    detail = "; ".join(f"{r['norm']} {r['batch_per_gpu']}: {r['images_per_s']:.0f}" for r in rows)
    bound, unit, _ = TOLERANCES["throughput"]
    status = "pass" if math.isfinite(worst) and worst > bound else "fail"  # every figure positive and finite
    return Check("throughput", what, status, worst, bound, unit, detail), rows, by_batch


def loaders(s: Settings, root: Path, model_ips: dict[int, float]) -> Check:
    """Loader images/s with the profile's CPUs per task (every CPU second counted: ablation.data.bench) vs the model's
    images/s at each images-per-GPU; which data.pipeline feeds it."""
    from ablation.data import bench as databench

    what = f"can {s.cpus_per_task} CPU core(s) per GPU feed the model at every images-per-GPU, and with which data.pipeline"
    cfg = s.cfg()
    result = databench.run(root, cfg.data, 16 if s.tiny else 64, device=s.device)
    need = max(model_ips.values())
    capacity = {p: s.cpus_per_task * result.per_core(p) for p in result.allowed()}
    feeds = [p for p, c in capacity.items() if c >= need]
    best = max(capacity, key=capacity.get)  # type: ignore[arg-type]
    detail = (f"model needs {need:.0f} images/s (at {max(model_ips, key=model_ips.get)} per GPU); loaders deliver "
              + ", ".join(f"{p} {c:.0f}" for p, c in capacity.items())
              + (f"; {', '.join(feeds)} feed(s) it" if feeds else f"; none does: more CPUs per task, or data.pipeline={best}")
              + ("" if s.device.startswith("cuda") else "; device-decode left out: it saves no CPU on a CPU device"))
    check = held("loaders", what, capacity[best] / need, detail, at_least=True, fail_status="warn")
    check.extra = {"pipelines_that_feed": feeds, "capacity_images_per_s": capacity, "model_images_per_s": model_ips,
                   "cpu_ms_per_image": {p: result.cpu_ms(p) for p in capacity}, "device_ms_per_image": result.device_ms}
    return check
