"""The data side of one run: which images each process gets at each step, loaders, and batches on the device.

The data a modelled GPU sees depends only on (seed, epoch, step), never on the process count, the
loader workers or where a run was resumed: every global batch is a fixed slice of a per-epoch permutation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from ablation.config import Derived, RunConfig, norm_batch, norm_batches_per_gpu
from ablation.cpus import cpu_budget
from ablation.data.layout import DatasetScan, scan_layout
from ablation.data.pipelines import SeededImageFolder, collate, finish_on_device
from ablation.errors import DataError
from ablation.norms import interleave
from ablation.train.distributed import DistEnv

log = logging.getLogger("ablation")


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of every global batch of one epoch, as (epoch, index) pairs.

    The global batch of step s is slice s of a per-epoch permutation; modelled GPU g takes the g-th
    chunk of batch_per_gpu images, and process p stands in for GPUs p*k ... p*k+k-1. Its batch holds
    their images interleaved (ablation.norms.interleave: row j*k + i is image j of its GPU i), the
    layout per-GPU BN reads; every modelled GPU sees the same images whatever the process count.

    With norm.batch below batch_per_gpu, each GPU's chunk is cut further into consecutive normalization
    batches of norm.batch images, and those are interleaved instead (the grouping rule, docs/norms.md): the
    batch of gpus=g, batch_per_gpu=b, norm.batch=n is, row for row, that of gpus=g*b/n, batch_per_gpu=n.
    """

    def __init__(self, num_images: int, d: Derived, cfg: RunConfig, rank: int, world: int):
        self.num_images, self.d, self.seed = num_images, d, cfg.seed
        self.per_process = d.global_batch // world
        self.norm_batches_per_process = cfg.gpus // world * norm_batches_per_gpu(cfg)
        self.offset = rank * self.per_process
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch and the first step to yield (a resumed epoch skips what was done)."""
        self.epoch, self.start = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_images, generator=g)
        for s in range(self.start, self.d.steps_per_epoch):
            base = s * self.d.global_batch + self.offset
            mine = perm[base : base + self.per_process].tolist()
            n = len(mine) // self.norm_batches_per_process  # norm.batch
            yield [(self.epoch, i) for i in interleave([mine[j * n : j * n + n] for j in range(self.norm_batches_per_process)])]

    def __len__(self) -> int:
        return self.d.steps_per_epoch - self.start


class MiniBatchValSampler(Sampler[list[int]]):
    """Validation in normalization batches (eval.modes batch), the same at every epoch, start and process count.

    The validation set, in one fixed random order drawn from the run's seed (its own order is by class: batches of
    consecutive images would each hold one class, unlike any training batch), is cut into normalization batches of
    norm.batch images; the last N mod norm.batch images make no whole batch and are left out. Process r of W takes
    batches r, r + W, ... and runs k of them per forward laid out as a training batch (interleaved: row j*k + i is
    image j of batch i), k being the normalization batches a training batch of this process holds. A last forward with
    fewer than k batches repeats its own to fill k; ``real(step)`` says which rows count (batches are normalized
    apart, so the repeats change nothing in the others).
    """

    def __init__(self, num_images: int, cfg: RunConfig, rank: int = 0, world: int = 1):
        self.nb = norm_batch(cfg)
        self.k = cfg.gpus // world * norm_batches_per_gpu(cfg)
        order = torch.randperm(num_images, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        self.batches = [order[b * self.nb : b * self.nb + self.nb] for b in range(num_images // self.nb)][rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        for first in range(0, len(self.batches), self.k):
            chunks = self.batches[first : first + self.k]
            chunks = chunks + [chunks[i % len(chunks)] for i in range(self.k - len(chunks))]
            yield interleave(chunks)

    def __len__(self) -> int:
        return -(-len(self.batches) // self.k)

    def real(self, step: int) -> torch.Tensor:
        """Which rows of forward `step` are images of their own (not repeats filling the last forward)."""
        have = min(self.k, len(self.batches) - step * self.k)
        return (torch.arange(self.k * self.nb) % self.k) < have

    @property
    def images(self) -> int:
        """Images the mode evaluates on this process."""
        return len(self.batches) * self.nb


class EpochIndexed(Dataset):
    """Takes (epoch, index) keys so persistent workers see the epoch that seeds the augmentation."""

    def __init__(self, ds: SeededImageFolder):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        self.ds.set_epoch(epoch)
        return self.ds[index]


def scan_dataset(root: str, env: DistEnv) -> DatasetScan:
    """Check the dataset and list its files once per start: rank 0 walks the folders, the other ranks
    receive the lists (1.3M ImageNet paths walked once, not twice on every rank)."""
    if env.world_size == 1:
        return scan_layout(root, log.info)
    box: list[Any] = [None]
    if env.is_main:
        try:
            box[0] = scan_layout(root, log.info)
        except DataError as e:
            box[0] = str(e)  # every rank raises it: none is left waiting for a list that never comes
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise DataError(box[0])
    return box[0]


def val_shard(num_images: int, env: DistEnv) -> range:
    """The validation images this process evaluates: every world_size-th from its rank (the one process standing in
    for all GPUs evaluates them all). Its j-th is image rank + j * world_size: loop.gather_topk puts them back in order."""
    return range(env.rank, num_images, env.world_size)


def make_loader(ds: Dataset, cfg: RunConfig, env: DistEnv, **kw: Any) -> DataLoader:
    """A DataLoader with the run's worker settings, capped by this process's CPU budget (ablation.cpus.cpu_budget)."""
    # More workers than cores only adds contention; the images do not depend on the worker count.
    workers = cpu_budget(env.local_world_size, env.device, cfg.data.workers).workers
    return DataLoader(
        ds,
        num_workers=workers,
        pin_memory=env.device.startswith("cuda"),
        persistent_workers=workers > 0,
        collate_fn=collate,  # default_collate, but device-decode batches keep their JPEG bytes as lists
        **kw,
    )


def to_device(x: torch.Tensor | Any, y: torch.Tensor, env: DistEnv, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the device (channels-last on GPU when asked).

    A data.pipeline=split batch (uint8 pixels, with their augmentation parameters when training) gets
    its photometric steps there, batched: the float batch the reference pipeline would have made.
    """
    fmt = torch.channels_last if cfg.channels_last and env.device != "cpu" else torch.contiguous_format
    if not isinstance(x, torch.Tensor) or x.dtype == torch.uint8:
        return finish_on_device(x, cfg.data, env.device, fmt), y.to(env.device, non_blocking=True)
    if env.device == "cpu":
        return x, y
    return x.to(env.device, non_blocking=True, memory_format=fmt), y.to(env.device, non_blocking=True)


def eval_data_cfg(cfg: RunConfig, d: Derived) -> Any:
    """The data config with the derived eval resize filled in."""
    import dataclasses

    return dataclasses.replace(cfg.data, eval_resize=d.eval_resize)
