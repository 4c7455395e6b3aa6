"""PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576): population statistics
recomputed on the current weights as the true average over training batches, for every layer that keeps
population statistics for evaluation (registry ``running_stats``: bn, syncbn, brn, evonorm_b0).

``precise_bn(model, batches)`` runs the model in training mode over the given batches (no autograd, no
optimizer), records each such layer's input moments per batch with forward pre-hooks, puts back every
buffer the training forwards moved (moving averages, per-GPU chains, step counters: the pass leaves no
trace but the result), averages across processes, and sets

    μ_pop = mean over batches of μ_B
    σ²_pop = mean over batches of (σ²_B + μ_B²) − μ_pop²

with σ²_B the biased variance of batch B (Wu & Johnson's definition). fvcore's ``update_bn_stats``
instead averages Bessel-corrected batch variances (PyTorch's running_var convention), which is larger by
a factor n/(n − 1) of the within-batch part: visible at tiny per-GPU batches on small feature maps.

A batch is one modelled GPU's ``batch_per_gpu`` images (a stand-in's k modelled GPUs are k batches, its
rows interleaved as everywhere, see ablation.norms.batch), which is what each layer normalized with in
the forward. With equal batch sizes the two formulas above are the mean and biased variance of all the
layer's inputs, so their value does not depend on how the images are grouped into batches (the
grouping matters through what the layers upstream output); syncbn's global batches are covered as well.
Sums are kept in float64 (per-batch moments in float32 at least); the variance of the batch means is
computed as E[μ_B²] − μ_pop², whose cancellation is ~1e-16 · μ² in float64: negligible.

What is set: bn/syncbn ``running_mean`` = μ_pop and ``running_var`` = σ²_pop (every modelled GPU's chain
too); evonorm_b0 ``running_var`` = σ²_pop (its var_{N,H,W} has the same definition); brn ``running_mean``
= μ_pop and ``running_std`` = sqrt(σ²_pop + ε) (σ_B's definition, so a batch at the population statistics
gets r = 1, d = 0). Training continues from these values, as with detectron2's PreciseBN hook.

Resume: the result must be a function of the training state only. It is for bn, syncbn and evonorm_b0,
whose training forward never reads its population statistics. brn's does (r and d), so recomputing
from already precise μ, σ would give other numbers: brn marks them (``stats_precise``, cleared by its next
training step) and a pass over a model whose layers are all marked does nothing (a run stopped during
its evaluation and resumed there).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ablation.norms.batch import PerGPURunningStats, world_size


def running_stat_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` whose population statistics PreciseBN recomputes, in module order."""
    from ablation.norms.evonorm_b0 import EvoNormB0
    from ablation.norms.renorm import BatchRenorm2d

    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out.append(m)
        elif isinstance(m, (BatchRenorm2d, EvoNormB0)) or getattr(m, "keeps_population_stats", False):
            out.append(m)
    return out


class _Moments:
    """Per-channel float64 sums over batches of one layer's input: [batches, Σμ_B, Σμ_B², Σσ²_B]."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        # a user's layer names its normalization batches; a built-in's stand-in GPUs are them (the grouping rule)
        k = getattr(module, "norm_batches_per_process", getattr(module, "gpus_per_process", 1)) if module.training else 1
        chunks = x.view(x.shape[0] // k, k, *x.shape[1:]).transpose(0, 1)  # (k, b, C, ...): modelled GPU i's rows i, i+k, ...
        dims = (1, *range(3, chunks.dim()))
        var, mean = torch.var_mean(chunks.to(torch.promote_types(x.dtype, torch.float32)), dim=dims, unbiased=False)  # (k, C)
        mean, var = mean.double(), var.double()
        batch = torch.stack([mean.sum(0), (mean * mean).sum(0), var.sum(0)])
        count = torch.full((1, batch.shape[1]), float(k), dtype=torch.float64, device=batch.device)
        step = torch.cat([count, batch])
        self.sums = step if self.sums is None else self.sums + step


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every running-statistics layer's population statistics over `batches` (training-mode forwards).

    A collective when distributed (every rank calls it with the same number of batches). Returns the
    number of batches this process ran (0 when there is nothing to do).
    """
    layers = running_stat_layers(model)
    if not layers or all(bool(getattr(m, "stats_precise", 0)) for m in layers):
        return 0
    saved = [{name: b.clone() for name, b in m._buffers.items() if b is not None} for m in layers]
    moments = [_Moments() for _ in layers]
    handles = [m.register_forward_pre_hook(h) for m, h in zip(layers, moments)]
    was_training, ran = model.training, 0
    try:
        model.train()
        for x in batches:
            model(x)
            ran += 1
    finally:
        for h in handles:
            h.remove()
        for m, bufs in zip(layers, saved):
            for name, b in bufs.items():
                m._buffers[name].copy_(b)
        model.train(was_training)
    if any(mo.sums is None for mo in moments):
        raise RuntimeError("PreciseBN: no batches reached a layer with running statistics")
    flat = torch.cat([mo.sums.reshape(-1) for mo in moments])
    if world_size() > 1:
        dist.all_reduce(flat)
    offset = 0
    for m, mo in zip(layers, moments):
        sums = flat[offset : offset + mo.sums.numel()].view_as(mo.sums)
        offset += mo.sums.numel()
        n, s_mean, s_sq, s_var = sums
        mean = s_mean / n
        var = (s_var / n + (s_sq / n - mean * mean).clamp_min(0)).clamp_min(0)
        _set_population(m, mean, var)
    return ran


def _set_population(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write the population statistics into the layer's buffers (see the module docstring)."""
    if hasattr(layer, "set_population_stats"):  # brn: μ and σ
        layer.set_population_stats(mean, var)
        return
    if getattr(layer, "running_mean", None) is not None:
        layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)
    if isinstance(layer, PerGPURunningStats):
        layer.spread_running_stats()
