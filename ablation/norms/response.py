"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, CVPR 2020): ``frn``.

Per image and channel, over the spatial positions (no mean subtraction, no batch statistics)::

    ν² = mean_{H,W}(x²);   x̂ = x / sqrt(ν² + |ε|);   y = γ x̂ + β;   z = max(y, τ)

γ = 1, β = 0 and τ = 0 at init (τ learned per channel); ε = 1e-6 fixed (the paper's default; its learnable
ε is suggested for 1×1 maps only, which a ResNet at ImageNet sizes does not have).

The layer is timm's ``FilterResponseNormTlu2d``, configured to that definition: timm's default ε (1e-5) is
replaced by the run's ``norm.eps`` (registry default 1e-6), and it has no learnable ε, which the
definition above does not use. It computes ν² in float32 under mixed precision. ``spec.apply_act``
chooses the TLU: True gives FRN+TLU (a position followed by the network's activation, which the layer
replaces: see ``ablation.train.models``); False gives FRN alone, y = γ x̂ + β, with no τ parameter (a position
that stays linear: a block's last norm before the residual add, the downsample's norm).
"""

from __future__ import annotations

from timm.layers import FilterResponseNormTlu2d
from torch import nn

from ablation.norms.factory import NormSpec


def make_frn(num_channels: int, spec: NormSpec) -> nn.Module:
    """FRN (+ TLU where spec.apply_act), ε = norm.eps (1e-6 by default), fixed."""
    return FilterResponseNormTlu2d(num_channels, apply_act=spec.apply_act, eps=spec.cfg.eps)


__all__ = ["FilterResponseNormTlu2d", "make_frn"]
