"""EvoNorm-B0 (Liu et al., NeurIPS 2020, arXiv:2004.02967): ``evonorm_b0``, batch statistics per modelled GPU.

A norm+activation layer (registry ``replaces_activation``); per channel γ, β and v::

    apply_act=True:   y = x / max(sqrt(var_{N,H,W}(x) + ε), v · x + sqrt(var_{H,W}(x) + ε)) · γ + β
    apply_act=False:  y = x / sqrt(var_{N,H,W}(x) + ε) · γ + β

The max(...) denominator is B0's nonlinearity; the linear form (a ResNet-v1 block's last norm before the
residual add, the downsample) keeps the batch-variance division and drops only the max and v. timm's
``EvoNorm2dB0(apply_act=False)`` is affine only (x γ + β), which would leave those convolutions with no
normalization at all; here every norm position normalizes, as for evonorm_s0. No mean is subtracted.

var_{N,H,W} is the biased variance over one modelled GPU's ``batch_per_gpu`` images (H, W included), in
training; var_{H,W} the biased variance of each image's channel. γ = 1, β = 0, v = 1 at init.

Definition choices: ε = ``norm.eps``, the paper's 1e-5 (timm uses 1e-3). The running variance used in
evaluation is a moving average (rate ``norm.momentum``) of exactly the batch variance the training
forward divides by: biased, no Bessel correction (the paper's "moving average of the batch variance";
timm multiplies by n/(n−1)). It is also what PreciseBN averages (ablation.norms.precise), so the moving
average and PreciseBN estimate one quantity, and at large n·H·W the two definitions agree anyway.

Running variance across modelled GPUs: the training forward never reads it, so it follows the
``running_stats`` rule lazily exactly like per-GPU BN (ablation.norms.batch.PerGPURunningStats):
``gpu_running_var`` holds every modelled GPU's chain (not in the state_dict), ``running_var`` the rule's
result (in the state_dict), folded on going to eval and when saved, synced across processes by
sync_running_stats.
"""

from __future__ import annotations

import torch
from torch import nn

from ablation.norms.batch import PerGPURunningStats
from ablation.norms.factory import NormSpec


class EvoNormB0(PerGPURunningStats, nn.Module):
    """EvoNorm-B0 (apply_act=True) or its linear form (apply_act=False), batch variance per modelled GPU."""

    running_buffers = ("running_var",)
    track_running_stats = True

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        apply_act: bool = True,
        gpus_per_process: int = 1,
        running_stats: str = "rank0",
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.apply_act = num_features, eps, momentum, apply_act
        self.gpus_per_process, self.running_stats = gpus_per_process, running_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_features))
        self._register_gpu_buffers()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, apply_act={self.apply_act}, "
            f"gpus_per_process={self.gpus_per_process}, running_stats={self.running_stats}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch variance per modelled GPU in training (updating every GPU's running variance); the running variance in eval."""
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (N, C, H, W), got {x.dim()}-D")
        n, c, h, w = x.shape
        k = self.gpus_per_process if self.training else 1
        if n % k:
            raise ValueError(f"a batch of {n} images cannot be split over {k} modelled GPUs")
        fmt = None
        if k > 1 and not x.is_contiguous():  # channels-last: the interleaved view needs NCHW
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = x.contiguous()
        dtype = x.dtype
        xf = x.to(torch.promote_types(dtype, torch.float32))
        xv = xf.view(n // k, k * c, h, w)  # channel i*C + j: channel j of modelled GPU i (rows interleaved)
        if self.training:
            var = xv.var(dim=(0, 2, 3), unbiased=False)  # k*C: each modelled GPU's own, differentiable
            with torch.no_grad():
                self._gpu_buffers()[0].lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            var = self.running_var.to(xf.dtype)
        shape = (1, k * c, 1, 1)
        den = (var + self.eps).sqrt().view(shape)
        if self.apply_act:
            instance_std = (xv.var(dim=(2, 3), unbiased=False, keepdim=True) + self.eps).sqrt()
            den = torch.maximum(den, xv * self.v.to(xf.dtype).repeat(k).view(shape) + instance_std)
        y = xv / den * self.weight.to(xf.dtype).repeat(k).view(shape) + self.bias.to(xf.dtype).repeat(k).view(shape)
        y = y.view(n, c, h, w).to(dtype)
        return y if fmt is None else y.contiguous(memory_format=fmt)


def make_evonorm_b0(num_channels: int, spec: NormSpec) -> nn.Module:
    """EvoNorm-B0, batch variance per modelled GPU; its nonlinearity where spec.apply_act (registry: evonorm_b0)."""
    c = spec.cfg
    return EvoNormB0(
        num_channels,
        eps=c.eps,
        momentum=c.momentum,
        apply_act=spec.apply_act,
        gpus_per_process=spec.norm_batches_per_process,  # each normalization batch is a modelled GPU (grouping rule)
        running_stats=c.running_stats,
    )
