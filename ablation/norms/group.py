"""Batch-independent norms over groups of channels: gn, ln (G=1), in (one channel per group), and none."""

from __future__ import annotations

from timm.layers import GroupNorm
from torch import nn

from ablation.norms.factory import NormSpec
from ablation.norms.registry import check_channels, resolved_groups


def make_group_norm(num_channels: int, spec: NormSpec) -> nn.Module:
    """GroupNorm with per-channel affine: gn (G or channels per group), ln (G=1), in (G=C)."""
    check_channels(spec.cfg, num_channels)
    return GroupNorm(num_channels, num_groups=resolved_groups(spec.cfg, num_channels), eps=spec.cfg.eps, affine=True)


def make_identity(num_channels: int, spec: NormSpec) -> nn.Module:
    """No normalization."""
    return nn.Identity()
