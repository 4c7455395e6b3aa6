"""Batch statistics per modelled GPU (bn), over the global batch (syncbn), and their running statistics.

One process may stand in for k GPUs (``gpus_per_process``): every norm here that uses batch
statistics computes them per modelled GPU's ``batch_per_gpu`` images, never over the process batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ablation.norms.factory import NormSpec

T = TypeVar("T")


def interleave(per_gpu: Sequence[Sequence[T]]) -> list[T]:
    """The rows of a process batch from its modelled GPUs' batches: row j*k + i is item j of GPU i.

    The layout every per-GPU norm reads (split_per_gpu, PerGPUBatchNorm2d): rows are interleaved, so a
    contiguous (k*b, C, H, W) batch viewed as (b, k*C, H, W) gives each (GPU, channel) pair a channel
    of its own. The trainer's GlobalBatchSampler lays every process batch out this way.
    """
    k = len(per_gpu)
    b = len(per_gpu[0]) if k else 0
    if any(len(items) != b for items in per_gpu):
        raise ValueError(f"modelled GPUs hold different numbers of images: {[len(items) for items in per_gpu]}")
    return [per_gpu[i][j] for j in range(b) for i in range(k)]


def split_per_gpu(x: torch.Tensor, gpus_per_process: int) -> torch.Tensor:
    """View a process batch as (gpus, batch_per_gpu, ...): entry i is what modelled GPU i sees.

    Rows are interleaved (see ``interleave``): modelled GPU i owns rows i, i+k, i+2k, ...
    """
    k = gpus_per_process
    if x.shape[0] % k:
        raise ValueError(f"a batch of {x.shape[0]} images cannot be split over {k} modelled GPUs")
    return x.view(x.shape[0] // k, k, *x.shape[1:]).transpose(0, 1)


class PerGPURunningStats:
    """Mixin: running statistics kept per modelled GPU and combined by the ``running_stats`` rule (rank0 | mean).

    For layers whose training forward updates population statistics from each modelled GPU's batch
    statistics and never reads them back (per-GPU BN; EvoNorm-B0's running variance), so the rule can be
    applied lazily (see PerGPUBatchNorm2d). For each name in ``running_buffers`` the layer has ``<name>``
    (C long, in the state_dict: the rule's result) and, when it stands in for k > 1 GPUs, ``gpu_<name>``
    (k*C long, not in the state_dict: every modelled GPU's own chain). ``fold_running_stats`` brings the
    C-long buffers up to date (on going to eval mode and when the state_dict is taken),
    ``sync_running_stats`` across processes; loading a state_dict spreads the loaded values to every
    modelled GPU. The layer sets ``num_features``, ``gpus_per_process``, ``running_stats`` and
    ``track_running_stats``. (Batch Renormalization reads its running statistics in training, so it
    cannot fold lazily: it applies the rule every step and needs none of this, see renorm.py.)
    """

    running_buffers: tuple[str, ...] = ("running_mean", "running_var")

    def _register_gpu_buffers(self) -> None:
        """Every modelled GPU's chain, starting from the layer's own buffers (none when k == 1)."""
        k = self.gpus_per_process
        if k > 1:
            for name in self.running_buffers:
                self.register_buffer(f"gpu_{name}", getattr(self, name).repeat(k), persistent=False)

    def _gpu_buffers(self) -> tuple[torch.Tensor, ...]:
        """Every modelled GPU's running statistics, k*C long; the state_dict's buffers themselves when k == 1."""
        if self.gpus_per_process == 1:
            return tuple(getattr(self, name) for name in self.running_buffers)
        return tuple(getattr(self, f"gpu_{name}") for name in self.running_buffers)

    @torch.no_grad()
    def fold_running_stats(self) -> None:
        """The state_dict's buffers := the rule over this process's modelled GPUs (no collective; idempotent)."""
        k, c = self.gpus_per_process, self.num_features
        if k == 1 or not self.track_running_stats:
            return
        for name, gpus in zip(self.running_buffers, self._gpu_buffers()):
            getattr(self, name).copy_(gpus[:c] if self.running_stats == "rank0" else gpus.view(k, c).mean(0))

    def train(self, mode: bool = True):  # noqa: ANN201
        """Switch modes; going to eval brings the running statistics up to date first."""
        if not mode:
            self.fold_running_stats()
        return super().train(mode)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        self.fold_running_stats()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.spread_running_stats()

    @torch.no_grad()
    def spread_running_stats(self) -> None:
        """Every modelled GPU starts from the state_dict's buffers (after a load, a reset or PreciseBN)."""
        k, c = self.gpus_per_process, self.num_features
        if k > 1 and self.track_running_stats:
            for name, gpus in zip(self.running_buffers, self._gpu_buffers()):
                gpus.view(k, c).copy_(getattr(self, name))


class PerGPUBatchNorm2d(PerGPURunningStats, nn.BatchNorm2d):
    """BatchNorm with statistics per modelled GPU (never synced), as in the paper.

    One process may stand in for k GPUs: each GPU's ``batch_per_gpu`` images ("ghost" batch) are
    normalized with their own mean and variance, exactly as the GPUs would. The process batch is laid
    out interleaved (row r belongs to modelled GPU r mod k, see ``interleave``), so a contiguous NCHW
    batch viewed as (b, k*C, H, W) holds each (GPU, channel) pair in a channel of its own and ONE
    ``F.batch_norm`` over it, with gamma and beta repeated k times, is per-GPU BN: the same few ops per
    layer whatever k (a loop over the k chunks issues k times more; the 5-D ``var_mean`` form is as
    exact but issues more eager ops still; benchmarks/norm_speed.py measures all three). In a model
    built by create_model, ``share_affine_repeats`` repeats gamma and beta of all layers at once. A
    channels-last batch cannot be viewed so: it is copied to NCHW and the result back to channels-last.

    Running statistics follow ``running_stats``:

    - ``rank0``: GPU 0's, updated only from its own images. Real DDP with PyTorch's default
      ``broadcast_buffers=True`` (and Caffe2's broadcast of computed params) does the same: every
      step starts from rank 0's buffers, so rank 0's chain of updates is what gets evaluated and saved.
    - ``mean``: every GPU updates from its own images and the buffers are averaged over GPUs, which
      equals one update with the mean of the GPUs' statistics.

    Each modelled GPU's running statistics are kept in ``gpu_running_mean`` / ``gpu_running_var``
    (k*C long, updated by that one batch_norm call; not in the state_dict) and the rule is applied
    lazily: the EMA is linear, so applying it once at the end equals applying it after every step
    (``rank0`` exactly; ``mean`` to float rounding). ``running_mean`` / ``running_var`` (C long, the
    state_dict's, as for any BN: checkpoints are unchanged) hold the rule's result, brought up to date
    by ``fold_running_stats`` when the layer goes to eval mode and when the state_dict is taken, and
    across processes by ``sync_running_stats``, which the trainer calls before evaluating and before
    saving. Loading a state_dict sets every modelled GPU's statistics to the loaded ones.
    """

    def __init__(self, num_features: int, *, eps: float, momentum: float, gpus_per_process: int, running_stats: str):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.gpus_per_process = gpus_per_process
        self.running_stats = running_stats
        self._register_gpu_buffers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each modelled GPU's images by their own statistics in training; running stats in eval."""
        k = self.gpus_per_process
        if not self.training or k == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c, h, w = x.shape
        if n % k:
            raise ValueError(f"a batch of {n} images cannot be split over {k} modelled GPUs")
        if (n // k) * h * w == 1:
            raise ValueError(
                f"per-GPU batch norm needs more than one value per channel on each modelled GPU; got {n // k} image(s) "
                f"of {h}x{w} per GPU (batch_per_gpu=1 cannot reach a 1x1 feature map in training)"
            )
        counted = False if torch.compiler.is_compiling() else self.__dict__.pop("_counted", False)
        if not counted:  # else share_affine_repeats counted a whole model's layers at once
            self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        fmt = None
        if not x.is_contiguous():  # channels-last: the view below needs NCHW
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = x.contiguous()
        shared = None if torch.compiler.is_compiling() else self.__dict__.pop("_affine_repeats", None)
        weight, bias = shared or self._repeat_affine()
        y = F.batch_norm(x.view(n // k, k * c, h, w), self.gpu_running_mean, self.gpu_running_var, weight, bias, True, factor, self.eps)
        # Not y.view: the next ReLU is in place, and an in-place op on an autograd view makes the
        # backward rebuild the base (as_strided, clone, copy_: ~6 more ops per layer). No one else holds
        # y and batch_norm's backward does not save it, so an alias autograd does not track is safe.
        y = torch.ops.aten._unsafe_view(y, (n, c, h, w))
        return y if fmt is None else y.contiguous(memory_format=fmt)

    def _repeat_affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """gamma and beta repeated once per modelled GPU (share_affine_repeats does it for a whole model at once)."""
        k = self.gpus_per_process
        return (self.weight.repeat(k), self.bias.repeat(k)) if self.affine else (None, None)

    def reset_running_stats(self) -> None:
        """Reset the running statistics, every modelled GPU's included."""
        super().reset_running_stats()
        if hasattr(self, "gpu_running_mean"):  # nn.BatchNorm2d.__init__ calls this before ours exist
            self.spread_running_stats()


_AFFINE_GROUPS = "_per_gpu_affine_groups"
_COUNTED = "_per_gpu_counted_layers"
_TILE_INDEX = "_per_gpu_tile_index"


class _TileEach(torch.autograd.Function):
    """Gather each layer's gamma or beta, tiled k times, out of their concatenation; backward sums the k copies.

    Forward is one gather and backward one gather and one sum over a (k, S) view, both deterministic
    (autograd's own backward of an index with repeats would scatter-add, which on a GPU adds in a
    varying order unless deterministic algorithms are on).
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(inverse)
        return flat.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse.view(-1)).view(inverse.shape).sum(0), None, None


def _tile_index(layers: list[PerGPUBatchNorm2d], k: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Where _TileEach reads and sums: for the concatenated (gamma, beta) of `layers`, S long, the gather index
    (k*S: each parameter's block tiled k times, as ``weight.repeat(k)``), its inverse (k, S: where copy i of
    element s went) and the tiled blocks' lengths."""
    index, inverse, sizes = [], [], []
    offset = 0
    for m in layers:
        for p in (m.weight, m.bias):
            c = p.numel()
            block = torch.arange(offset, offset + c)
            out = k * offset  # tiled blocks follow each other in the order of the parameters
            index.append(block.repeat(k))
            inverse.append(out + torch.arange(k).unsqueeze(1) * c + torch.arange(c))
            sizes.append(k * c)
            offset += c
    return torch.cat(index), torch.cat(inverse, 1), sizes


def share_affine_repeats(model: nn.Module) -> nn.Module:
    """Repeat gamma and beta, and count the steps, of every per-GPU BN layer of `model` in a few ops per forward.

    Each layer would repeat its own (2 ops forward, 2 reductions backward, per layer: on a GPU at small
    batches, ~200 small kernels per ResNet-50 step). Here a forward pre-hook on `model` concatenates the
    parameters of all layers, tiles each k times in one gather (_TileEach) and hands each layer its pair,
    split out as views, for this forward: 3 ops forward and 3 kernels backward for the whole model, and
    the gradients reach every parameter deterministically. A forward hook drops what a layer left unused.
    The same hooks add 1 to every layer's ``num_batches_tracked`` in one ``_foreach_add_`` (53 small ops
    fewer per ResNet-50 step) and take it back from a layer this forward did not call. Under
    torch.compile the hooks stand aside: the compiler fuses the per-layer ops anyway. Returns `model`.
    """
    per_gpu = [m for m in model.modules() if isinstance(m, PerGPUBatchNorm2d) and m.gpus_per_process > 1]
    groups: dict[int, list[PerGPUBatchNorm2d]] = {}
    for m in per_gpu:
        if m.affine:
            groups.setdefault(m.gpus_per_process, []).append(m)
    counted = [m for m in per_gpu if m.track_running_stats]
    if not per_gpu or hasattr(model, _AFFINE_GROUPS):
        return model
    setattr(model, _AFFINE_GROUPS, list(groups.values()))  # on the module: a deepcopy's hook finds its own layers
    setattr(model, _COUNTED, counted)
    model.register_forward_pre_hook(_hand_out_affine_repeats)
    model.register_forward_hook(_drop_affine_repeats)
    return model


def count_steps_per_layer(model: nn.Module) -> None:
    """Leave each per-GPU BN layer of `model` to count its own steps (for torch.compile, whose graphs
    may call a layer's forward without the model's eager hooks around it)."""
    if hasattr(model, _COUNTED):
        setattr(model, _COUNTED, [])


def _hand_out_affine_repeats(model: nn.Module, args: object) -> None:
    """Forward pre-hook: every per-GPU BN layer's repeated (gamma, beta), and its step counted, for this training forward."""
    if not model.training or torch.compiler.is_compiling():
        return
    cache = model.__dict__.setdefault(_TILE_INDEX, {})  # not buffers: DDP would broadcast them every step
    for g, layers in enumerate(getattr(model, _AFFINE_GROUPS)):
        flat = torch.cat([p for m in layers for p in (m.weight, m.bias)])
        if (g, flat.device) not in cache:
            index, inverse, sizes = _tile_index(layers, layers[0].gpus_per_process)
            cache[g, flat.device] = (index.to(flat.device), inverse.to(flat.device), sizes)
        index, inverse, sizes = cache[g, flat.device]
        tiled = _TileEach.apply(flat, index, inverse).split(sizes)
        for i, m in enumerate(layers):
            m.__dict__["_affine_repeats"] = (tiled[2 * i], tiled[2 * i + 1])
    counted = [m for m in getattr(model, _COUNTED) if m.training]
    if counted:
        torch._foreach_add_([m.num_batches_tracked for m in counted], 1)
        for m in counted:
            m.__dict__["_counted"] = True


def _drop_affine_repeats(model: nn.Module, args: object, output: object) -> None:
    """Forward hook: a layer this forward did not call keeps no repeats of parameters that will change, nor the count."""
    if torch.compiler.is_compiling():
        return
    for layers in getattr(model, _AFFINE_GROUPS):
        for m in layers:
            m.__dict__.pop("_affine_repeats", None)
    for m in getattr(model, _COUNTED):
        if m.__dict__.pop("_counted", False):
            m.num_batches_tracked.sub_(1)


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in `group` (the default group when None); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def global_batch_moments(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    if world_size(group) > 1:
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

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1, process_group: dist.ProcessGroup | None = None
    ):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics over every process's batch in training; running statistics in eval."""
        if not self.training or world_size(self.process_group) == 1:
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


def _running_stat_modules(model: nn.Module) -> Iterator[PerGPURunningStats]:
    """The layers whose per-GPU running statistics must follow the cross-GPU rule (per-GPU BN, EvoNorm-B0)."""
    return (m for m in model.modules() if isinstance(m, PerGPURunningStats) and m.track_running_stats)


@torch.no_grad()
def sync_running_stats(model: nn.Module) -> None:
    """Apply each per-GPU BN layer's running-statistics rule over every modelled GPU of every process.

    A collective when distributed: every rank must call it, at the same point. Afterwards each layer's
    running_mean/var are what syncing after every step would have left (``rank0``: global GPU 0's;
    ``mean``: the average over all GPUs, to float rounding). Cheap enough for every evaluation and
    checkpoint; the trainer calls it there and not after each step.
    """
    layers = list(_running_stat_modules(model))
    if world_size() > 1:
        for rule in ("rank0", "mean"):
            # rank0: only GPU 0's statistics matter, so rank 0's first C values go to every rank;
            # mean: every GPU's, summed over processes here and over this process's GPUs by the fold.
            bufs = [
                b[: m.num_features] if rule == "rank0" else b
                for m in layers
                if m.running_stats == rule
                for b in m._gpu_buffers()
            ]
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
    for m in layers:
        m.fold_running_stats()


# ---------------------------------------------------------------- factories (registry: bn, syncbn)


def make_bn(num_channels: int, spec: NormSpec) -> nn.Module:
    """BatchNorm, statistics per modelled GPU."""
    c = spec.cfg
    return PerGPUBatchNorm2d(
        num_channels,
        eps=c.eps,
        momentum=c.momentum,
        gpus_per_process=spec.norm_batches_per_process,  # each normalization batch is a modelled GPU (grouping rule)
        running_stats=c.running_stats,
    )


def make_syncbn(num_channels: int, spec: NormSpec) -> nn.Module:
    """BatchNorm, statistics over the global batch: torch's nn.SyncBatchNorm on GPUs (NCCL), our own on CPUs.

    The model is built after the process group is set up, so its backend says where the model will run.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return nn.SyncBatchNorm(num_channels, eps=spec.cfg.eps, momentum=spec.cfg.momentum)
    return SyncBatchNorm2d(num_channels, eps=spec.cfg.eps, momentum=spec.cfg.momentum)
