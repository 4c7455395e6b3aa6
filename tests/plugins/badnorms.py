"""Users' norms that are wrong in the ways users get them wrong: each must be a one-line error before any work is queued."""

import torch
from torch import nn

from ablation.norms import NormSpec


def returns_none(num_channels: int, spec: NormSpec):
    """Forgot the return statement."""
    nn.GroupNorm(1, num_channels)


class Halve(nn.Module):
    """Drops half the channels: the next convolution would get the wrong width."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.shape[1] // 2] * self.weight.view(1, -1, 1, 1)


def changes_shape(num_channels: int, spec: NormSpec) -> nn.Module:
    return Halve(num_channels)


class Pooled(nn.Module):
    """Normalizes over (H, W) and forgets to keep them: returns (N, C, 1, 1)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True) * self.weight.view(1, -1, 1, 1)


def pools(num_channels: int, spec: NormSpec) -> nn.Module:
    return Pooled(num_channels)


class PlainTensorGamma(nn.Module):
    """gamma as a plain tensor attribute: never trained, saved or moved to the GPU."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = torch.ones(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


def plain_tensor(num_channels: int, spec: NormSpec) -> nn.Module:
    return PlainTensorGamma(num_channels)


class ClaimsAffine(nn.Module):
    """Says affine=True (torch's convention) but registers no parameter."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.affine = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.std(dim=(1, 2, 3), keepdim=True).add(1e-5)


def claims_affine(num_channels: int, spec: NormSpec) -> nn.Module:
    return ClaimsAffine(num_channels)


class Fixed(nn.Module):
    """A fixed per-image standardization: no learnable parameters, and it says none. Legal."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True).add(1e-5)


def fixed(num_channels: int, spec: NormSpec) -> nn.Module:
    """Ignores norm.options: with options {affine: true} that is an error, without them a warning."""
    return Fixed()


class BreaksInForward(nn.Module):
    """Builds fine, fails on the first batch."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


def breaks_in_forward(num_channels: int, spec: NormSpec) -> nn.Module:
    return BreaksInForward(num_channels)


class NaNs(nn.Module):
    """Divides by a variance without eps over a single value per group."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.mean(dim=(0, 1, 2, 3), keepdim=True).mul(0) * self.weight.view(1, -1, 1, 1)


def nans(num_channels: int, spec: NormSpec) -> nn.Module:
    return NaNs(num_channels)
