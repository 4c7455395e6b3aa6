"""Building norm layers: a registry name or a user's 'package.module:factory', called once per position.

A user's own norm plugs in as ``norm.name=package.module:factory`` with no edit to the package. The
factory is called once per norm position::

    def factory(num_channels: int, spec: ablation.norms.NormSpec) -> torch.nn.Module

``spec.cfg`` is the run's ``NormConfig`` with every default resolved (``eps``, ``momentum``, ``groups``,
``options`` ...) and ``spec.gpus_per_process`` says how many modelled GPUs this process stands in for:
a norm that uses batch statistics must compute them per modelled GPU's ``batch_per_gpu`` images
(``ablation.norms.split_per_gpu`` gives them; rows are interleaved, see ``interleave``), or it silently
becomes a different experiment when one device stands in for several GPUs. With ``norm.batch`` set below
``batch_per_gpu``, each GPU's batch holds several normalization batches: such a norm splits by
``spec.norm_batches_per_process`` instead (the grouping rule, docs/norms.md: a normalization batch is
exactly a modelled GPU of ``norm.batch`` images, so splitting the process batch that many ways is right).

A user's layer declares what it is with two class attributes, which decide the evaluation modes it gets
(``eval.modes``, docs/norms.md): ``batch_dependent`` (its training output depends on batch mates: mini-batch
evaluation applies) and ``keeps_population_stats`` (it evaluates with ``running_mean``/``running_var`` buffers,
or a ``set_population_stats(mean, var)`` method: PreciseBN applies).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ablation.errors import NormError
from ablation.norms import registry


@dataclass(frozen=True)
class NormSpec:
    """What a norm factory is told: the run's norm config and how many GPUs this process models."""

    cfg: Any  # the run's NormConfig (a frozen dataclass), typed loosely: norms/ stands below the config, which imports the registry
    gpus_per_process: int = 1
    norm_batches_per_gpu: int = 1  # batch_per_gpu // norm.batch: normalization batches in each modelled GPU's batch
    # For norm+activation layers (registry: replaces_activation): True where the position is followed by
    # the network's activation, which the layer then replaces (FRN's TLU, EvoNorm's nonlinearity); False
    # where the position stays linear (a block's last norm before the residual add, the downsample).
    apply_act: bool = False

    @property
    def norm_batches_per_process(self) -> int:
        """Normalization batches in this process's batch: what a BN-like norm splits it into (rows interleaved)."""
        return self.gpus_per_process * self.norm_batches_per_gpu

    def __post_init__(self) -> None:
        # Factories always see resolved values (eps, brn's r_max ...), however the spec was made.
        filled = registry.resolved_defaults(self.cfg)
        if filled:
            object.__setattr__(self, "cfg", dataclasses.replace(self.cfg, **filled))


NormFactory = Callable[[int, NormSpec], nn.Module]


def _import(path: str, what: str) -> NormFactory:
    """The callable at 'package.module:function', or a one-line NormError naming what is wrong."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise NormError(f"{what}: cannot import module '{module_name}' ({e}); is it installed or on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise NormError(f"{what}: module '{module_name}' has no callable '{attr}'")
    return factory


@functools.cache
def resolve_factory(name: str) -> NormFactory:
    """The factory for a registry name or a 'package.module:function' import path."""
    try:
        info = registry.lookup(name)
    except Exception as e:  # ConfigError: an unknown name
        raise NormError(str(e)) from None
    return _import(info.factory if info else name, "norm.name")


def create_norm(num_channels: int, spec: NormSpec, **_factory_kwargs: object) -> nn.Module:
    """One norm layer for a position with num_channels channels (timm's device/dtype kwargs are ignored)."""
    layer = resolve_factory(spec.cfg.name)(num_channels, spec)
    if not isinstance(layer, nn.Module):
        raise NormError(f"norm.name: factory '{spec.cfg.name}' returned {type(layer).__name__}, not a torch.nn.Module")
    return layer


def norm_layer(spec: NormSpec) -> Callable[..., nn.Module]:
    """A timm-compatible norm_layer (a partial, which timm's get_norm_layer accepts)."""
    return functools.partial(create_norm, spec=spec)
