"""Batch Renormalization (Ioffe, NIPS 2017, arXiv:1702.03275): ``brn``, batch statistics per modelled GPU.

Training, per modelled GPU's ``batch_per_gpu`` images (the interleaved stand-in of per-GPU BN)::

    σ_B = sqrt(var_B + ε)                     (var_B biased, over N, H, W)
    r   = clip(σ_B / σ, 1/r_max, r_max)        (stop-gradient)
    d   = clip((μ_B − μ) / σ, −d_max, d_max)   (stop-gradient)
    y   = γ ((x − μ_B) / σ_B · r + d) + β

and inference y = γ (x − μ) / σ + β. μ and σ are moving averages of μ_B and σ_B (the paper averages
σ, not the variance), rate ``norm.momentum`` (PyTorch convention, 0.1; the BR paper's α is 0.01).
``norm.r_max`` = 1.5 and ``norm.d_max`` = 0.5 by default (the GN paper's BR setting, §4.1). With
``norm.renorm_warmup_steps`` = W > 0 the limits ramp linearly from plain BN (r_max = 1, d_max = 0) at the
layer's first training step to (r_max, d_max) at step W; W = 0 (default, as in the GN paper) means no ramp.

State (the state_dict): ``weight`` γ, ``bias`` β; ``running_mean`` μ; ``running_std`` σ itself, the
moving average of sqrt(var_B + ε), not a variance: inference divides by it with no second ε, and a plain
BN cannot load it (the key differs on purpose); ``num_batches_tracked``, the training steps the layer took,
which is also the warm-up ramp's step counter (persistent, so a resumed run continues the ramp exactly);
``stats_precise``, 1 while μ and σ are PreciseBN's population statistics and no training step has moved
them since (ablation.norms.precise: a run resumed in its evaluation does not recompute them from
themselves).

Running statistics across modelled GPUs. Unlike BN, BRN's training forward *reads* μ and σ (in r and d),
so per-GPU chains folded only before evaluation (PerGPUBatchNorm2d's lazy rule) would be a different
experiment: each GPU would renormalize against its own chain, and a checkpoint's sync (which comes on a
timer) would change training. So the ``running_stats`` rule is applied at every training step, exactly as
its name describes for real GPUs, and every modelled GPU renormalizes with the same μ, σ:

- ``rank0``: the update uses GPU 0's (μ_B, σ_B) only: DDP's default ``broadcast_buffers=True``, where every
  step starts from rank 0's buffers, so rank 0's chain of updates is the one every GPU uses;
- ``mean``: the update uses the average over all modelled GPUs of (μ_B, σ_B): every GPU updates from its
  own batch and the buffers are averaged after each step (the EMA is linear, so that is the same).

In one process this costs nothing (the k GPUs' statistics are at hand); across processes it is one small
collective per layer and training step (a broadcast of 2C values from rank 0, or an all_reduce), outside
autograd. μ and σ are then the same on every process at every step, so sync_running_stats and the fold
have nothing to do for BRN (it is not a PerGPURunningStats layer), and the state_dict needs no per-GPU copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ablation.norms.batch import world_size
from ablation.norms.factory import NormSpec


class BatchRenorm2d(nn.Module):
    """Batch Renormalization with statistics per modelled GPU and the running_stats rule applied every step."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        r_max: float = 1.5,
        d_max: float = 0.5,
        warmup_steps: int = 0,
        gpus_per_process: int = 1,
        running_stats: str = "rank0",
    ) -> None:
        super().__init__()
        if r_max < 1 or d_max < 0 or warmup_steps < 0:
            raise ValueError(f"BatchRenorm2d needs r_max >= 1, d_max >= 0, warmup_steps >= 0; got {r_max}, {d_max}, {warmup_steps}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps
        self.gpus_per_process, self.running_stats = gpus_per_process, running_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("stats_precise", torch.tensor(0, dtype=torch.uint8))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, gpus_per_process={self.gpus_per_process}, running_stats={self.running_stats}"
        )

    def limits(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(r_max, d_max) at this training step: the warm-up ramp from (1, 0), as tensors when ramping (no host sync)."""
        if not self.warmup_steps:
            return self.r_max, self.d_max
        f = (self.num_batches_tracked.to(self.running_std.dtype) / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.r_max - 1.0) * f, self.d_max * f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Renormalized per-GPU batch statistics in training; y = γ (x − μ) / σ + β in eval."""
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (N, C, H, W), got {x.dim()}-D")
        if not self.training:
            scale = self.weight / self.running_std
            shift = self.bias - self.running_mean * scale
            return (x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype))
        k = self.gpus_per_process
        n, c, h, w = x.shape
        if n % k:
            raise ValueError(f"a batch of {n} images cannot be split over {k} modelled GPUs")
        if (n // k) * h * w == 1:
            raise ValueError(
                "batch renormalization needs more than one value per channel on each modelled GPU; "
                f"got {n // k} image(s) of {h}x{w} per GPU"
            )
        fmt = None
        if not x.is_contiguous():  # channels-last: the interleaved view needs NCHW
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = x.contiguous()
        xv = x.view(n // k, k * c, h, w)  # channel i*C + j: channel j of modelled GPU i (rows interleaved)
        with torch.no_grad():
            stat_dtype = torch.promote_types(x.dtype, torch.float32)
            var, mean = torch.var_mean(xv.to(stat_dtype), dim=(0, 2, 3), unbiased=False)
            std = (var + self.eps).sqrt()
            mu, sigma = self.running_mean.to(stat_dtype).repeat(k), self.running_std.to(stat_dtype).repeat(k)
            r_max, d_max = self.limits()  # floats, or 0-dim tensors while ramping
            r = torch.clamp(std / sigma, min=1.0 / r_max, max=r_max)
            d = torch.clamp((mean - mu) / sigma, min=-d_max, max=d_max)
            self._update(mean.view(k, c), std.view(k, c))
        # γ((x − μ_B)/σ_B · r + d) + β is batch norm with weight γr and bias β + γd, r and d constants:
        # one fused batch_norm over the (b, k*C, H, W) view computes every GPU's statistics (and their gradient).
        gamma = self.weight.repeat(k)
        y = F.batch_norm(xv, None, None, gamma * r.to(gamma.dtype), self.bias.repeat(k) + gamma * d.to(gamma.dtype), True, 0.0, self.eps)
        y = y.view(n, c, h, w)
        return y if fmt is None else y.contiguous(memory_format=fmt)

    @torch.no_grad()
    def _update(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """One step of μ, σ from the (k, C) per-GPU batch statistics, by the rule over every modelled GPU of every process."""
        world = world_size()
        if self.running_stats == "rank0":
            stat = torch.stack([mean[0], std[0]])
            if world > 1:
                dist.broadcast(stat, src=0)  # global GPU 0 is rank 0's first
        else:
            stat = torch.stack([mean.sum(0), std.sum(0)])
            if world > 1:
                dist.all_reduce(stat)
            stat = stat / (self.gpus_per_process * world)
        self.running_mean.lerp_(stat[0].to(self.running_mean.dtype), self.momentum)
        self.running_std.lerp_(stat[1].to(self.running_std.dtype), self.momentum)
        self.num_batches_tracked.add_(1)
        self.stats_precise.zero_()

    @torch.no_grad()
    def set_population_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """PreciseBN: μ := mean, σ := sqrt(var + ε) (σ_B's definition, so r = 1, d = 0 at the population)."""
        self.running_mean.copy_(mean)
        self.running_std.copy_((var + self.eps).sqrt())
        self.stats_precise.fill_(1)


def make_brn(num_channels: int, spec: NormSpec) -> nn.Module:
    """Batch Renormalization, statistics per modelled GPU (registry: brn)."""
    c = spec.cfg
    return BatchRenorm2d(
        num_channels,
        eps=c.eps,
        momentum=c.momentum,
        r_max=c.r_max,
        d_max=c.d_max,
        warmup_steps=c.renorm_warmup_steps,
        gpus_per_process=spec.norm_batches_per_process,  # each normalization batch is a modelled GPU (grouping rule)
        running_stats=c.running_stats,
    )
