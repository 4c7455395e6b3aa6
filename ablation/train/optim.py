"""The optimizer and its learning-rate schedule: SGD as the paper sets it up, and the rate at each step.

The schedule (warm-up, then steps at the milestones or a cosine) reads the derived step counts
(config.derive); the loop asks lr_at for every step's rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ablation.config import Derived, RunConfig


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov by default) with decay on every parameter, or not on 1-D ones if asked."""
    o = cfg.optim
    params = list(model.parameters())
    if o.no_decay_1d:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": o.weight_decay}]
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def lr_at(cfg: RunConfig, d: Derived, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < d.warmup_steps:
        return d.lr * (step + 1) / d.warmup_steps
    if cfg.optim.schedule == "cosine":
        t = (step - d.warmup_steps) / max(1, d.total_steps - d.warmup_steps)
        return d.lr * 0.5 * (1 + math.cos(math.pi * t))
    return d.lr * cfg.optim.gamma ** sum(step >= m for m in d.milestone_steps)
