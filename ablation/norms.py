"""Norm registry: every norm position of the network is filled by name, like timm's create_norm.

A user's own norm plugs in as ``norm.name=package.module:factory`` with no edit here. The factory is
called once per norm position::

    def factory(num_channels: int, spec: ablation.norms.NormSpec) -> torch.nn.Module

``spec.cfg`` is the run's ``NormConfig`` (``eps``, ``momentum``, ``groups``, ``options`` ...) and
``spec.gpus_per_process`` says how many modelled GPUs this process stands in for: a norm that uses
batch statistics must compute them per chunk of ``batch_per_gpu`` images (``split_per_gpu`` does it),
or it silently becomes a different experiment when one device stands in for several GPUs.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import GroupNorm
from torch import nn

from ablation.config import NormConfig, check_channels, resolved_groups
from ablation.errors import NormError


@dataclass(frozen=True)
class NormSpec:
    """What a norm factory is told: the run's norm config and how many GPUs this process models."""

    cfg: NormConfig
    gpus_per_process: int = 1


NormFactory = Callable[[int, NormSpec], nn.Module]
_REGISTRY: dict[str, NormFactory] = {}


def register_norm(name: str) -> Callable[[NormFactory], NormFactory]:
    """Decorator adding a factory to the registry under `name`."""

    def add(factory: NormFactory) -> NormFactory:
        _REGISTRY[name] = factory
        return factory

    return add


def registered_norms() -> tuple[str, ...]:
    """Names in the registry."""
    return tuple(_REGISTRY)


def split_per_gpu(x: torch.Tensor, gpus_per_process: int) -> torch.Tensor:
    """View a process batch as (gpus, batch_per_gpu, ...): chunk i is what modelled GPU i sees."""
    if x.shape[0] % gpus_per_process:
        raise ValueError(
            f"a batch of {x.shape[0]} images cannot be split over {gpus_per_process} modelled GPUs"
        )
    return x.view(gpus_per_process, x.shape[0] // gpus_per_process, *x.shape[1:])


class PerGPUBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with statistics per modelled GPU (never synced), as in the paper.

    One process may stand in for several GPUs: its batch is then split into chunks of
    ``batch_per_gpu`` ("ghost" batches), each normalized with its own mean and variance, exactly as
    the GPUs would. Running statistics follow ``running_stats``:

    - ``rank0``: GPU 0's, updated only from its own chunk. Real DDP with PyTorch's default
      ``broadcast_buffers=True`` (and Caffe2's broadcast of computed params) does the same: every
      step starts from rank 0's buffers, so rank 0's chain of updates is what gets evaluated and saved.
    - ``mean``: every GPU updates from its own chunk and the buffers are averaged over GPUs,
      which equals one update with the mean of the chunk statistics.

    Across processes the trainer applies the same rule with ``sync_running_stats`` after each step.
    """

    def __init__(self, num_features: int, *, eps: float, momentum: float, gpus_per_process: int, running_stats: str):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.gpus_per_process = gpus_per_process
        self.running_stats = running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each modelled GPU's chunk by its own statistics in training; running stats in eval."""
        if not self.training or self.gpus_per_process == 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        chunks = split_per_gpu(x, self.gpus_per_process)
        if self.running_stats == "rank0":
            outs = [
                F.batch_norm(
                    c,
                    self.running_mean if i == 0 else None,
                    self.running_var if i == 0 else None,
                    self.weight,
                    self.bias,
                    True,
                    self.momentum,
                    self.eps,
                )
                for i, c in enumerate(chunks)
            ]
        else:
            means, vars_, outs = [], [], []
            for c in chunks:
                rm, rv = self.running_mean.clone(), self.running_var.clone()
                outs.append(F.batch_norm(c, rm, rv, self.weight, self.bias, True, self.momentum, self.eps))
                means.append(rm)
                vars_.append(rv)
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(vars_).mean(0))
        return torch.cat(outs)


def _world(group: dist.ProcessGroup | None) -> int:
    """Processes in `group` (the default group when None); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def global_batch_moments(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - mean, mean, biased variance, count) per channel over the global batch: every process's x.

    Two passes, each one differentiable all_reduce (torch.distributed.nn), so gradients flow to every
    process's input exactly: the sums and the count give the mean; then the sum of squared deviations
    from that mean gives the variance. E[x^2] - E[x]^2 in one pass would be one collective fewer but
    cancels catastrophically: a channel with mean 1e4 and std 1e-2 has E[x^2] = 1e8, where a float32
    step is 8, and its variance came out as noise, often negative (NaN after rsqrt). Computed in float32
    at least (float64 stays float64), clamped at 0 all the same.
    """
    dims = [0, *range(2, x.dim())]
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if _world(group) > 1:
        from torch.distributed.nn.functional import all_reduce

        reduce = functools.partial(all_reduce, group=group or dist.group.WORLD)
    else:
        reduce = lambda t: t  # noqa: E731
    sums = reduce(torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // x.shape[1]])]))
    n = sums[-1]
    mean = sums[:-1] / n
    centered = xf - mean.view(shape)
    var = (reduce((centered * centered).sum(dims)) / n).clamp_min(0)
    return centered, mean, var, n


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with statistics over the whole global batch (all modelled GPUs, all processes).

    Own implementation for CPU processes (gloo): torch's nn.SyncBatchNorm refuses CPU tensors and DDP
    refuses a CPU model holding one. The statistics are global_batch_moments' (stable two-pass, exact
    gradients); with NCCL (GPUs) the ``syncbn`` factory returns torch.nn.SyncBatchNorm instead.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1, process_group: dist.ProcessGroup | None = None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics over every process's batch in training; running statistics in eval."""
        if not self.training or _world(self.process_group) == 1:
            return super().forward(x)
        factor = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        centered, mean, var, n = global_batch_moments(x, self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var.detach() * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), factor)
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


@register_norm("bn")
def _bn(num_channels: int, spec: NormSpec) -> nn.Module:
    """BatchNorm, statistics per modelled GPU."""
    c = spec.cfg
    return PerGPUBatchNorm2d(
        num_channels,
        eps=c.eps,
        momentum=c.momentum,
        gpus_per_process=spec.gpus_per_process,
        running_stats=c.running_stats,
    )


@register_norm("syncbn")
def _syncbn(num_channels: int, spec: NormSpec) -> nn.Module:
    """BatchNorm, statistics over the global batch: torch's nn.SyncBatchNorm on GPUs (NCCL), our own on CPUs.

    The model is built after the process group is set up, so its backend says where the model will run.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return nn.SyncBatchNorm(num_channels, eps=spec.cfg.eps, momentum=spec.cfg.momentum)
    return SyncBatchNorm2d(num_channels, eps=spec.cfg.eps, momentum=spec.cfg.momentum)


def _group_norm(num_channels: int, spec: NormSpec) -> nn.Module:
    """GroupNorm with per-channel affine: gn (G or channels per group), ln (G=1), in (G=C)."""
    check_channels(spec.cfg, num_channels)
    return GroupNorm(num_channels, num_groups=resolved_groups(spec.cfg, num_channels), eps=spec.cfg.eps, affine=True)


for _name in ("gn", "ln", "in"):
    register_norm(_name)(_group_norm)


@register_norm("none")
def _none(num_channels: int, spec: NormSpec) -> nn.Module:
    """No normalization."""
    return nn.Identity()


@functools.lru_cache(maxsize=None)
def resolve_factory(name: str) -> NormFactory:
    """The factory for a registry name or a 'package.module:function' import path."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise NormError(f"norm.name: unknown norm '{name}'; valid: {', '.join(_REGISTRY)} or 'package.module:factory'")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise NormError(f"norm.name: cannot import module '{module_name}' ({e}); is it installed or on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise NormError(f"norm.name: module '{module_name}' has no callable '{attr}'")
    return factory


def create_norm(num_channels: int, spec: NormSpec, **_factory_kwargs: object) -> nn.Module:
    """One norm layer for a position with num_channels channels (timm's device/dtype kwargs are ignored)."""
    layer = resolve_factory(spec.cfg.name)(num_channels, spec)
    if not isinstance(layer, nn.Module):
        raise NormError(f"norm.name: factory '{spec.cfg.name}' returned {type(layer).__name__}, not a torch.nn.Module")
    return layer


def norm_layer(spec: NormSpec) -> Callable[..., nn.Module]:
    """A timm-compatible norm_layer (a partial, which timm's get_norm_layer accepts)."""
    return functools.partial(create_norm, spec=spec)


def _running_stat_modules(model: nn.Module) -> Iterator[PerGPUBatchNorm2d]:
    """The per-GPU BN layers whose running statistics must follow the cross-GPU rule."""
    return (m for m in model.modules() if isinstance(m, PerGPUBatchNorm2d))


@torch.no_grad()
def sync_running_stats(model: nn.Module) -> None:
    """Apply each per-GPU BN layer's running-statistics rule across processes (a collective)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for rule in ("rank0", "mean"):
        bufs = [b for m in _running_stat_modules(model) if m.running_stats == rule for b in (m.running_mean, m.running_var)]
        if not bufs:
            continue
        flat = torch.cat([b.reshape(-1) for b in bufs])
        if rule == "rank0":
            dist.broadcast(flat, src=0)
        else:
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()
