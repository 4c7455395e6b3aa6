"""One process of the SyncBN test: `torchrun --nproc_per_node 4 tests/syncbn_worker.py OUT_DIR`.

Each process takes its quarter of a fixed global batch (see `global_batch`), runs SyncBatchNorm2d
forward and backward for a few steps (float64, then float32) over gloo and saves what the test
compares with one process running plain batch norm over the whole global batch: outputs, input
gradients, weight/bias gradients, running statistics and an eval-mode output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ablation.norms import SyncBatchNorm2d

CHANNELS, BATCH, STEPS = 5, 8, 3


def global_batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, loss weights) of one step. Channel 0 has mean 1e4 and std 1: E[x^2]-E[x]^2 cancels there."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, CHANNELS, 3, 4, generator=g, dtype=torch.float64)
    x[:, 0] += 1e4
    x[:, 1] = x[:, 1] * 50 - 3
    w = torch.randn(BATCH, CHANNELS, 3, 4, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


def init_affine(layer: torch.nn.Module) -> torch.nn.Module:
    """The same gamma and beta, not ones and zeros, in every process and in the reference."""
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, CHANNELS))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, CHANNELS))
    return layer


def run(layer: torch.nn.Module, dtype: torch.dtype, part: int, parts: int) -> list[dict[str, torch.Tensor]]:
    """STEPS training steps on part `part` of `parts` of each global batch, then one eval forward."""
    out = []
    for step in range(STEPS):
        x, w = global_batch(step, dtype)
        xi = x.chunk(parts)[part].clone().requires_grad_()
        y = layer(xi)
        (y * w.chunk(parts)[part]).sum().backward()
        out.append(
            {
                "y": y.detach(),
                "dx": xi.grad,
                "dweight": layer.weight.grad.clone(),
                "dbias": layer.bias.grad.clone(),
                "running_mean": layer.running_mean.clone(),
                "running_var": layer.running_var.clone(),
            }
        )
        layer.zero_grad()
    layer.eval()
    out.append({"y": layer(global_batch(STEPS, dtype)[0].chunk(parts)[part]).detach()})
    return out


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for dtype in (torch.float64, torch.float32):
        layer = init_affine(SyncBatchNorm2d(CHANNELS, eps=1e-5, momentum=0.1).to(dtype)).train()
        results[str(dtype)] = run(layer, dtype, rank, world)
    torch.save(results, folder / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
