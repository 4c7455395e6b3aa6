"""The self-test's multi-process checks: real DDP processes vs one process standing in for them, and SyncBatchNorm vs
batch norm over the global batch. NCCL between GPUs; gloo between CPU processes, as the CPU tests do.

Each process takes its modelled GPU's rows of one global batch (row j belongs to GPU j mod k, the stand-in's
layout), runs one forward and backward of the run's model wrapped as the trainer wraps it, and saves its loss and
gradients; the parent computes the same step in one process and compares.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ablation.selftest import cuda
from ablation.selftest.checks import Check, Settings, held, rel_l2, skipped, strict_fp32

BATCH_PER_GPU = 4


def _global_batch(size: int, n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch in every process."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(loss, flattened gradients) of one step."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = model.module.parameters() if hasattr(model, "module") else model.parameters()
    return loss.item(), torch.cat([p.grad.detach().float().flatten().cpu() for p in params])


def worker(rank: int, world: int, s: Settings, store: str, out: str) -> None:
    """One process of the group: a DDP step with per-GPU BN, then a step with norm.name=syncbn; saved to out/rank<r>.pt."""
    import warnings

    from ablation.train.distributed import DistEnv
    from ablation.train.trainer import wrap_ddp

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's notice that all_reduce moved: once per process, noise
    device = s.device
    if device.startswith("cuda"):
        cuda.set_device(rank)
        device = f"cuda:{rank}"
    else:
        torch.set_num_threads(1)  # two processes on a few shared cores
    dist.init_process_group(cuda.process_group_backend(device), init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        with strict_fp32(device):
            for norm in ("bn", "syncbn"):
                cfg = s.cfg("amp=false", "channels_last=false", f"gpus={world}", f"batch_per_gpu={BATCH_PER_GPU}", f"norm.name={norm}")
                model = _model(s, cfg, device, 1)  # after init_process_group: syncbn picks torch's nn.SyncBatchNorm under NCCL
                x, y = _global_batch(cfg.data.image_size, world * BATCH_PER_GPU, s.classes)
                mine = slice(rank, None, world)  # modelled GPU `rank`'s rows
                ddp = wrap_ddp(model, DistEnv(rank, world, rank, world, device))
                loss, grads = _step(ddp, x[mine].to(device), y[mine].to(device))
                total = torch.tensor([loss], dtype=torch.float64, device=device)
                dist.all_reduce(total)
                results[norm] = {"loss": total.item() / world, "grads": grads, "layer": type(_first_norm(model)).__name__}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _model(s: Settings, cfg: Any, device: str, gpus_per_process: int) -> torch.nn.Module:
    """The run's model, seeded alike in every process."""
    from ablation.train.models import create_model

    torch.manual_seed(0)
    return create_model(cfg, s.classes, gpus_per_process=gpus_per_process).to(device).train()


def _first_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The model's first batch-norm layer (which class syncbn became)."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def run(s: Settings) -> list[Check]:
    """ddp_vs_stand_in and syncbn: skipped with fewer than 2 processes, else both from one group of processes."""
    what_ddp = f"{max(s.gpus, 2)} real DDP processes vs one process standing in for them (per-GPU BN; loss and gradients)"
    what_sync = "SyncBatchNorm over the processes vs batch norm over the global batch in one process (loss and gradients)"
    if s.gpus < 2:
        why = "needs 2 GPUs" if s.device.startswith("cuda") else "needs 2 processes (--gpus 2)"
        return [skipped("ddp_vs_stand_in", what_ddp, why), skipped("syncbn", what_sync, why)]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        # fork on a CPU (no CUDA state to inherit; seconds saved on importing torch again); CUDA needs spawn
        method = "spawn" if s.device.startswith("cuda") else "fork"
        mp.start_processes(worker, args=(s.gpus, s, str(Path(tmp) / "store"), tmp), nprocs=s.gpus, join=True, start_method=method)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(s.gpus)]
    checks = []
    for norm, name, what in (("bn", "ddp_vs_stand_in", what_ddp), ("syncbn", "syncbn", what_sync)):
        cfg = s.cfg("amp=false", "channels_last=false", f"gpus={s.gpus}", f"batch_per_gpu={BATCH_PER_GPU}", f"norm.name={norm}")
        # bn: one process standing in for every GPU (per-GPU statistics); syncbn: one process is the global batch
        model = _model(s, cfg, s.device, s.gpus if norm == "bn" else 1)
        x, y = _global_batch(cfg.data.image_size, s.gpus * BATCH_PER_GPU, s.classes)
        with strict_fp32(s.device):
            loss, grads = _step(model, x.to(s.device), y.to(s.device))
        got = ranks[0][norm]
        spread = max(rel_l2(r[norm]["grads"], got["grads"]) for r in ranks)  # DDP leaves every rank the same gradients
        figure = max(abs(got["loss"] - loss) / abs(loss), rel_l2(got["grads"], grads), spread)
        detail = (f"{s.gpus} processes ({cuda.process_group_backend(s.device)}) x {BATCH_PER_GPU} images; loss {got['loss']:.5f} "
                  f"vs {loss:.5f}; layer {got['layer']}")
        checks.append(held(name, what, figure, detail))
    return checks
