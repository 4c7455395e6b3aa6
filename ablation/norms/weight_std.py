"""Weight Standardization (Qiao et al. 2019, arXiv:1903.10520): ``model.weight_std=true``.

Every convolution of the network (stem, blocks, downsample; not the FC layer) convolves with its
weight standardized per output channel over (C_in, kH, kW)::

    Ŵ = (W − mean(W)) / (std(W) + ε),   std unbiased (Bessel-corrected),   ε = 1e-5 added to the std

This is the WS authors' official code (joe-siyuan-qiao/WeightStandardization: ``weight.std(dim=1) +
1e-5``), from which the confirmed GN+WS numbers (ResNet-50 23.72 %, ResNet-101 22.10 %) come. timm's
``StdConv2d`` is a different layer: biased variance, ε inside the square root (``(var + 1e-6).sqrt()``).
The two differ by the factor sqrt(n / (n − 1)) (n = C_in·kH·kW: 1.7 % for the small stem's 27, 0.2 % for
a 3×3×64 conv) and in how ε enters; a rerun of the published numbers takes the definition that made them.

The raw weight stays the parameter (He-initialized by ``ablation.train.models.init_weights``, weight-decayed,
saved under the same state-dict key); only the forward pass standardizes it, as in the official code.
"""

from __future__ import annotations

import torch
from torch import nn

from ablation.errors import ConfigError

WS_EPS = 1e-5  # the official code's ε, added to the (unbiased) std


def standardize(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """(W − mean) / (unbiased std + eps), per output channel (dim 0) over all other dims."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)  # unbiased, as the official code's torch default
    return ((flat - mean) / (std + eps)).reshape(weight.shape)


class WSConv2d(nn.Conv2d):
    """nn.Conv2d whose forward convolves with the standardized weight (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize(self.weight), self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> WSConv2d:
        """A WSConv2d with conv's geometry that takes over conv's weight and bias parameters (no copy)."""
        if conv.weight[0].numel() < 2:
            raise ConfigError(f"model.weight_std: {conv} has one weight per output channel, which has no std")
        ws = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta",  # placeholders only: the parameters are conv's own
        )
        ws.weight = conv.weight
        ws.bias = conv.bias
        return ws


def standardize_convs(model: nn.Module) -> nn.Module:
    """Replace every nn.Conv2d in model (at any depth) by a WSConv2d holding the same parameters."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, name, WSConv2d.from_conv(child))
    return model


__all__ = ["WS_EPS", "WSConv2d", "standardize", "standardize_convs"]
