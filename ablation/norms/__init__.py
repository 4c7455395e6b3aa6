"""Normalization layers, by name: the registry (torch-free), per-GPU BN, group norms and the variants.

- ``ablation.norms.registry``: the one list of built-in names and what each one is (no torch);
- ``ablation.norms.factory``: ``create_norm`` / ``norm_layer`` build a layer from a name or a user's
  ``package.module:factory``;
- ``ablation.norms.batch``: per-GPU BN (exact stand-in for k GPUs), SyncBN, running statistics;
- ``ablation.norms.group``: GN, LN, IN;
- the variants: ``renorm`` (BRN), ``evonorm`` (EvoNorm-S0), ``evonorm_b0``, ``response`` (FRN+TLU),
  ``weight_std`` (WS convolutions), ``precise`` (PreciseBN); ``checks``: what a user's norm is checked for.

This package's ``__init__`` imports no torch, so torch-free modules (config, sweep, report) can ask the
registry; the layer API below is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "NormSpec": "factory", "NormFactory": "factory", "create_norm": "factory", "norm_layer": "factory",
    "resolve_factory": "factory",
    "PerGPUBatchNorm2d": "batch", "SyncBatchNorm2d": "batch", "interleave": "batch", "split_per_gpu": "batch",
    "share_affine_repeats": "batch", "count_steps_per_layer": "batch", "sync_running_stats": "batch", "global_batch_moments": "batch",
    "PerGPURunningStats": "batch", "BatchRenorm2d": "renorm", "EvoNormS0": "evonorm", "EvoNormB0": "evonorm_b0",
    "WSConv2d": "weight_std", "precise_bn": "precise",
}


def registered_norms() -> tuple[str, ...]:
    """Every built-in norm name (the registry's)."""
    from ablation.norms import registry

    return registry.names()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"ablation.norms.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ablation.norms' has no attribute {name!r}")


__all__ = ["registered_norms", *_LAZY]
