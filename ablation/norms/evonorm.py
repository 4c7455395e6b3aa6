"""EvoNorm-S0 (Liu et al., NeurIPS 2020, arXiv:2004.02967): ``evonorm_s0``, batch-free.

With G groups of channels (``norm.groups``, 32 by default) and per-channel γ, β, v::

    apply_act=True:   y = x · sigmoid(v · x) / sqrt(var_group(x) + ε) · γ + β
    apply_act=False:  y = x / sqrt(var_group(x) + ε) · γ + β

var_group is the biased variance of x over (C/G channels, H, W) of one image's group (as GN's); ε = 1e-5
(``norm.eps``); γ = 1, β = 0, v = 1 at init.

Our own layer, not timm's ``EvoNorm2dS0``, for the linear positions: with ``apply_act=False`` timm (like
the official TF code, "if False, apply an affine transform only") returns x · γ + β, which leaves a
ResNet-v1 block's last conv and its downsample conv with no normalization at all. The official code never
builds that case: it refuses ResNet-v1 ("Evonorms require the pre-activation form"), and in its ResNet-v2
every norm is followed by its nonlinearity. In this harness every norm position normalizes, so the
linear form keeps the group-std division and drops only the sigmoid gate (and v).

Groups: the official code lowers G until it divides C; timm asserts. Here G must divide every layer's
width, exactly as for ``gn`` (``registry.check_channels``: a one-line ConfigError naming norm.groups), so a
run's G is one number in every layer and EvoNorm-S0 at G is comparable with GN at G. With ResNet-50/101/18
widths and G = 32 both rules give the same network.
"""

from __future__ import annotations

import torch
from torch import nn

from ablation.norms.factory import NormSpec
from ablation.norms.registry import check_channels, resolved_groups


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (apply_act=True) or its linear form, group-std normalization + affine (apply_act=False)."""

    def __init__(self, num_features: int, groups: int = 32, eps: float = 1e-5, apply_act: bool = True) -> None:
        super().__init__()
        if num_features % groups:
            raise ValueError(f"EvoNormS0: {groups} groups do not divide {num_features} channels")
        self.num_features, self.groups, self.eps, self.apply_act = num_features, groups, eps, apply_act
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features))
        self.v = nn.Parameter(torch.empty(num_features)) if apply_act else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def group_std(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(biased variance over each image's group of channels and all positions + ε), shaped like x."""
        n, c, h, w = x.shape
        grouped = x.float().reshape(n, self.groups, -1)
        std = (grouped.var(dim=2, unbiased=False, keepdim=True) + self.eps).sqrt()
        return std.to(x.dtype).expand(n, self.groups, (c // self.groups) * h * w).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        num = x * torch.sigmoid(self.v.view(shape).to(x.dtype) * x) if self.v is not None else x
        return num / self.group_std(x) * self.weight.view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, apply_act={self.apply_act}"


def make_evonorm_s0(num_channels: int, spec: NormSpec) -> nn.Module:
    """EvoNorm-S0 with G = norm.groups (32 by default) dividing num_channels, ε = norm.eps (1e-5)."""
    check_channels(spec.cfg, num_channels)
    return EvoNormS0(num_channels, groups=resolved_groups(spec.cfg, num_channels), eps=spec.cfg.eps, apply_act=spec.apply_act)
