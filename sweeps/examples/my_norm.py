"""A worked example of your own norm: written outside the package, put on the paper's curve by a sweep.

GroupRMSNorm2d normalizes each image by the root mean square of each group of channels (no mean
subtraction, no batch statistics: it is batch-independent, like GN), then scales and shifts each
channel with a learnable gamma and beta:

    y = gamma * x / sqrt(mean over (channels of the group, H, W) of x^2 + eps) + beta

The factory ``my_norm`` is what ``norm.name`` names; it is called once per norm position with the
position's channel count and an ``ablation.norms.NormSpec``. Its options come from the sweep or the
command line as ``norm.options`` (``spec.cfg.options``):

    groups  groups of channels per layer (default 32, as GN); must divide every layer's width
    affine  learn gamma and beta (default true); false gives a fixed normalization

``spec.cfg.eps`` is ``norm.eps`` (1e-5 unless set).

A second factory, ``my_batch_norm``, is a batch-dependent norm of your own on the mechanism decomposition
(docs/norms.md, "Evaluation modes"): BatchRMSNorm2d divides each channel by the root mean square over its
normalization batch (``norm.batch`` images; ``spec.norm_batches_per_process`` of them per process batch, rows
interleaved) in training and by a population RMS in evaluation. It declares ``batch_dependent = True`` (so
``eval.modes`` batch applies) and ``keeps_population_stats = True`` with ``set_population_stats`` (so PreciseBN
recomputes its population statistics and ``eval.modes`` precise applies). It keeps the EMA of one process; the
cross-process rule of the built-in BN (``norm.running_stats``) is not implemented here.

Python finds this file as the module ``my_norm`` when its folder is on the path:

    PYTHONPATH=$PWD/sweeps/examples ablation sweep sweeps/examples/my_norm.yaml data.root=/datasets/imagenet
"""

from __future__ import annotations

import torch
from torch import nn

OPTIONS = ("groups", "affine")


class GroupRMSNorm2d(nn.Module):
    """Per image and group of channels: x / RMS(x) over (group channels, H, W), then a per-channel affine."""

    def __init__(self, num_channels: int, groups: int, eps: float, affine: bool = True):
        super().__init__()
        self.groups, self.eps, self.affine = groups, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))  # gamma (zeroed in each block's last norm by the model, as for BN and GN)
            self.bias = nn.Parameter(torch.zeros(num_channels))  # beta
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = x.reshape(n, self.groups, -1)
        y = (g * g.pow(2).mean(dim=-1, keepdim=True).add(self.eps).rsqrt()).reshape(n, c, h, w)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"groups={self.groups}, eps={self.eps}, affine={self.affine}"


class BatchRMSNorm2d(nn.Module):
    """Per channel, x / RMS(x) over each normalization batch's (N, H, W) in training, x / population RMS in evaluation."""

    batch_dependent = True  # training output depends on batch mates: eval.modes batch applies
    keeps_population_stats = True  # evaluates with a population statistic: eval.modes precise (PreciseBN) applies

    def __init__(self, num_channels: int, eps: float, momentum: float, norm_batches_per_process: int):
        super().__init__()
        self.eps, self.momentum, self.norm_batches_per_process = eps, momentum, norm_batches_per_process
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("running_ms", torch.ones(num_channels))  # population mean square, an EMA of the batches'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.norm_batches_per_process if self.training else 1
        n, c, h, w = x.shape
        if self.training:
            chunks = x.view(n // k, k, c, h, w)  # rows interleaved: normalization batch i holds rows i, i+k, ...
            ms = chunks.pow(2).mean(dim=(0, 3, 4), keepdim=True)  # (1, k, C, 1, 1): each batch's own
            with torch.no_grad():
                self.running_ms.lerp_(ms.mean(dim=(0, 1)).view(-1), self.momentum)  # the mean over this process's batches
            y = (chunks * (ms + self.eps).rsqrt()).view(n, c, h, w)
        else:
            y = x * (self.running_ms.view(1, -1, 1, 1) + self.eps).rsqrt()
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def set_population_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """PreciseBN's population moments (ablation.norms.precise): the mean square is var + mean^2."""
        self.running_ms.copy_(var + mean * mean)


def my_batch_norm(num_channels: int, spec) -> nn.Module:  # spec: ablation.norms.NormSpec
    """The factory of the batch-dependent example: one BatchRMSNorm2d per position, split by normalization batches."""
    if spec.cfg.options:
        raise ValueError(f"norm.options: my_batch_norm takes none, got {', '.join(spec.cfg.options)}")
    return BatchRMSNorm2d(num_channels, spec.cfg.eps, spec.cfg.momentum, spec.norm_batches_per_process)


def my_norm(num_channels: int, spec) -> nn.Module:  # spec: ablation.norms.NormSpec
    """The factory: one GroupRMSNorm2d for a position with num_channels channels, options from norm.options."""
    options = dict(spec.cfg.options)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:  # raised while the sweep is checked: one line, before anything is queued
        raise ValueError(f"norm.options: unknown option(s) {', '.join(unknown)}; my_norm takes {', '.join(OPTIONS)}")
    groups = int(options.get("groups", 32))
    if groups < 1 or num_channels % groups:
        raise ValueError(f"norm.options.groups={groups} does not divide a layer's {num_channels} channels")
    return GroupRMSNorm2d(num_channels, groups, spec.cfg.eps, bool(options.get("affine", True)))
