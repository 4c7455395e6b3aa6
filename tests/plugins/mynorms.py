"""A user's own norm, plugged in by import path in the tests (no edit to the package)."""

import torch
from torch import nn

from ablation.norms import NormSpec


class RMSNorm2d(nn.Module):
    """Per-sample RMS over (C, H, W) with per-channel gain: batch-independent by construction."""

    def __init__(self, num_channels: int, eps: float, scale: float):
        super().__init__()
        self.eps, self.scale = eps, scale
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(self.eps).sqrt()
        return self.scale * x / rms * self.weight.view(1, -1, 1, 1)


def rms_norm(num_channels: int, spec: NormSpec) -> nn.Module:
    """Factory with the registry's signature; reads an option from norm.options."""
    return RMSNorm2d(num_channels, spec.cfg.eps, float(spec.cfg.options.get("scale", 1.0)))


def not_a_module(num_channels: int, spec: NormSpec):
    """A broken factory: returns something that is not a module."""
    return 42
