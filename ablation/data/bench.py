"""`ablation data bench`: how many CPU cores does each data pipeline cost per training image, on the user's own files?

Every CPU second a pipeline costs is counted, wherever it is spent: in a DataLoader worker (the loader
side: decode, crop, resize for reference and split; reading the file and drawing the parameters for
device-decode) and in the training process (the device side: split's photometric steps, device-decode's
JPEG decode, crop and resize and the same photometric steps). On a CPU device the device side IS CPU
work of the training process; on a GPU its host part (launches, copies, nvJPEG's host stage) is CPU time
and the rest is the GPU's, reported beside it as device milliseconds per image. device-decode moves the
decode off the CPU only where the device is a GPU, so it is recommended only there.

Figures are CPU-seconds of this process with one torch thread (a busy machine slows the wall clock more
than the figure); files are read once beforehand, so disk or network speed is not part of it. A
DataLoader adds its own overhead (collate, inter-process transfer: ~150 KB per uint8 224-px image, 4x
that in float), not counted here. Reading the bytes from the page cache has its own row, which tells a tree of
files from archives read in place by offset (`ablation data index`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ablation.config import PIPELINES
from ablation.data.archives import archive_kind
from ablation.data.layout import (
    DatasetInfo,
    DatasetScan,
    check_splits,
    class_folders,
    class_images,
    load_rgb,
    open_image,
    scan_layout,
)
from ablation.data.members import Member, read_source
from ablation.data.pipelines import SeededImageFolder, collate, finish_on_device, pipeline_transforms
from ablation.errors import DataError

# ResNet-50 training at 224 px in bfloat16 on one H100: ~2,500 images/s (the speed issue: an 8 x H100
# node needs ~20,000). A guess to size the loader against; pass --gpu-images-per-s with your own figure.
GPU_IMAGES_PER_S = 2500.0


# Pipelines whose device side (finish_on_device in the training process) is timed: reference has none
# beyond the host-to-device copy, which is timed too.
DEVICE_BATCH = 32  # images per timed device-side batch (at most the images measured)


@dataclass(frozen=True)
class BenchResult:
    """Per training image: the loader's CPU, the training process's CPU and the device's time, per pipeline."""

    root: str
    images: int
    classes: int
    median_size: tuple[int, int]
    rates: dict[str, float]  # "read", "decode", "reference", "split", "device-decode" -> loader-side images per CPU-second
    reduced: float  # fraction of split-pipeline images decoded at reduced JPEG scale
    device: str = "cpu"  # where the device side ran: "cpu" or "cuda[:i]"
    process_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # pipeline -> training-process CPU ms per image
    device_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # pipeline -> device wall ms per image (GPU only)
    layout: str = "imagefolder"  # where the bytes came from: DatasetInfo.layout

    def cpu_ms(self, pipeline: str) -> float:
        """Every CPU millisecond one image costs with this pipeline: loader worker plus training process."""
        return 1000 / self.rates[pipeline] + self.process_ms.get(pipeline, 0.0)

    def per_core(self, pipeline: str) -> float:
        """Training images per CPU-second with this pipeline, all CPU work counted."""
        return 1000 / self.cpu_ms(pipeline)

    def allowed(self) -> tuple[str, ...]:
        """The pipelines worth recommending on this device: device-decode only where the device is a GPU."""
        return tuple(p for p in PIPELINES if p != "device-decode" or self.device.startswith("cuda"))

    def best(self) -> str:
        """The allowed pipeline with the fewest CPU-seconds per image."""
        return min(self.allowed(), key=self.cpu_ms)


def pick_images(root: str | Path, n: int) -> DatasetScan:
    """Up to n training images spread over the classes, without walking the whole split.

    Evenly spaced classes, the first few images of each: enough to see the typical image sizes and
    crops, in seconds on ImageNet's 1.3M files. A folder of archives is read through its index: the same
    images as its extracted tree's.
    """
    root = Path(root).expanduser()
    check_splits(root)
    full = scan_layout(root) if archive_kind(root) else None
    classes = list(full.info.classes) if full else class_folders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders; put each class's images in its own sub-folder")
    picks = [round(i * len(classes) / n) for i in range(n)] if len(classes) > n else list(range(len(classes)))
    per_class = math.ceil(n / len(picks))
    files: list[tuple[str, ...]] = []
    members: list[tuple[Member, ...]] = []
    for c in picks:
        names = full.files["train"][c] if full else class_images(root / "train" / classes[c])
        files.append(tuple(names[:per_class]))
        if full and full.members:
            members.append(full.members["train"][c][:per_class])
    while sum(map(len, files)) > n:  # trim the overshoot from the last classes
        last = max(i for i, f in enumerate(files) if f)
        files[last] = files[last][:-1]
        members[last:last + 1] = [members[last][:-1]] if members else []
    total = sum(map(len, files))
    if total == 0:
        raise DataError(f"no image files under {root / 'train'}; put the training images in its class folders")
    chosen = tuple(classes[c] for c in picks)
    info = DatasetInfo(root=str(root), classes=chosen, train_images=total, val_images=0, fingerprint="",
                       layout=full.info.layout if full else "imagefolder")
    empty = tuple(() for _ in chosen)
    return DatasetScan(info, {"train": tuple(files), "val": empty},
                       {"train": tuple(members), "val": empty} if members else None)


def per_core_rate(fn: Callable[[int], Any], n: int) -> float:
    """fn(0) ... fn(n-1) once, after one warm-up call: items per CPU-second of this process."""
    fn(0)
    start = time.process_time()
    for i in range(n):
        fn(i)
    return n / max(time.process_time() - start, 1e-9)


def resolve_device(device: str) -> str:
    """The device the training process would use: 'auto' is cuda where one is available (as the trainer picks it)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("device=cuda was asked for but no CUDA device is available; pass device=cpu")
    return "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def device_side(outputs: list[Any], data_cfg: Any, device: str, repeats: int = 3) -> tuple[float, float | None]:
    """(training-process CPU ms, device wall ms or None on a CPU) per image of finish_on_device over these loader outputs.

    The reference pipeline's outputs (float tensors) only travel to the device; the others are finished there.
    """
    batch = collate([(x, 0) for x in outputs])[0]
    gpu = device.startswith("cuda")

    def once() -> None:
        if isinstance(batch, torch.Tensor) and batch.dtype != torch.uint8:
            batch.to(device)
        else:
            finish_on_device(batch, data_cfg, device)
        if gpu:
            torch.cuda.synchronize()

    once()  # warm-up: kernels, nvJPEG's handles
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        once()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    n = len(outputs)
    return 1000 * statistics.median(cpu) / n, (1000 * statistics.median(wall) / n if gpu else None)


def run(root: str | Path, data_cfg: Any, images: int, seed: int = 0, repeats: int = 1, device: str = "cpu") -> BenchResult:
    """Measure decode-only and every pipeline on up to `images` training images of root, on one core: the loader
    side per image, then each pipeline's device side on `device` (the training process's CPU, and a GPU's time).

    With repeats > 1 the loader sides are measured in turn that many times and each figure is the median.
    """
    device = resolve_device(device)
    scan = pick_images(root, images)
    samples = scan.samples("train")
    sizes = []
    for path, _ in samples:
        read_source(path)  # into the page cache: the figures are CPU work, not disk speed
        with open_image(path) as img:
            sizes.append(img.size)
    paths: dict[str, Callable[[int], Any]] = {"read": lambda i: read_source(samples[i][0]),
                                              "decode": lambda i: load_rgb(samples[i][0])}
    cfgs, split = {}, None
    for pipeline in PIPELINES:
        cfg = dataclasses.replace(data_cfg, pipeline=pipeline, eval_resize=data_cfg.eval_resize or data_cfg.image_size)
        tf, _ = pipeline_transforms(cfg)
        cfgs[pipeline] = cfg
        paths[pipeline] = SeededImageFolder(scan.info.root, "train", tf, seed, scan=scan).__getitem__
        split = tf if pipeline == "split" else split
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, fn in paths.items():
                runs[name].append(per_core_rate(fn, len(samples)))
        reduced = split.reduced / max(split.images, 1)  # before the device side draws more
        process_ms, device_ms = {}, {}
        for pipeline in PIPELINES:
            outputs = [paths[pipeline](i)[0] for i in range(min(DEVICE_BATCH, len(samples)))]
            process_ms[pipeline], dev = device_side(outputs, cfgs[pipeline], device, max(repeats, 3))
            if dev is not None:
                device_ms[pipeline] = dev
    finally:
        torch.set_num_threads(threads)
    rates = {name: statistics.median(r) for name, r in runs.items()}
    median = (int(statistics.median(w for w, _ in sizes)), int(statistics.median(h for _, h in sizes)))
    return BenchResult(scan.info.root, len(samples), len(scan.info.classes), median, rates, reduced, device, process_ms, device_ms,
                       layout=scan.info.layout)


def _source(layout: str) -> str:
    """What the read row read."""
    return "files" if layout == "imagefolder" else "archive members"


def report(result: BenchResult, pipeline: str, image_size: int, gpus: int, gpu_images_per_s: float) -> list[str]:
    """The lines `ablation data bench` prints; the last ends with '<number> images/s per core' (every CPU second counted)."""
    r = result
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    need = gpus * gpu_images_per_s
    gpu = r.device.startswith("cuda")

    def cores_for(name: str) -> int:
        return math.ceil(need * r.cpu_ms(name) / 1000)

    def row(label: str, name: str) -> str:
        dev = f"  {r.device_ms[name]:9.2f}" if name in r.device_ms else ""
        return (f"  {label:<24s} {1000 / r.rates[name]:7.2f} + {r.process_ms[name]:7.2f} = {r.cpu_ms(name):7.2f}  "
                f"{r.per_core(name):9.1f}{dev}")

    lines = [
        f"data bench: {result.images} training images of {result.root} ({result.classes} classes, median "
        f"{result.median_size[0]}x{result.median_size[1]} px), crops to {image_size} px, one core (CPU time), files cached; "
        f"device side on {r.device}",
        f"  {'CPU ms per image':<24s}  loader + process =   total  images/s per core" + ("  device ms" if gpu else "")
        + ("" if gpu else "   (device side on the CPU: in 'process')"),
        f"  {'read only (' + _source(r.layout) + ')':<24s} {1000 / r.rates['read']:7.2f}",
        f"  {'decode only (PIL, full)':<24s} {1000 / r.rates['decode']:7.2f}",
        row("reference pipeline", "reference"),
        row("split pipeline", "split") + f"  ({100 * result.reduced:.0f}% decoded at reduced JPEG scale)",
        row("device-decode pipeline", "device-decode") + ("" if gpu else "  (decodes in the training process on a CPU device)"),
        f"feeding {gpus} GPU(s) x {gpu_images_per_s:,.0f} images/s = {need:,.0f} images/s takes {cores_for(pipeline)} CPU cores "
        f"(loader workers and training processes together) with the {pipeline} pipeline; this machine has {cores}",
    ]
    best = r.best()
    if pipeline == "device-decode" and not gpu:
        lines.append(f"data.pipeline=device-decode saves no CPU on a CPU device (the decode runs in the training process): "
                     f"use {best} (it changes the run id)")
    elif pipeline != best and r.cpu_ms(best) < r.cpu_ms(pipeline):
        lines.append(f"data.pipeline={best} would need {r.cpu_ms(pipeline) / r.cpu_ms(best):.1f}x fewer CPU cores "
                     f"({cores_for(best)}; it changes the run id)")
    lines.append(f"{pipeline} pipeline: {r.per_core(pipeline):.1f} images/s per core")
    return lines
