"""`ablation data bench`: can the loader's CPU cores feed the GPUs, on the user's own files?

It times, on one core, what a DataLoader worker does per training image: decoding alone (PIL at full
size, the reference pipeline's first step), the reference pipeline (the whole augmentation in float)
the split pipeline (parameters, decode at the scale the crop needs, crop, resize to uint8; the
photometric steps it leaves to the GPU are not CPU work) and the device-decode pipeline (read the file,
draw the parameters; decoding, crop and resize are the GPU's work, which benchmarks/gpu.py measures).
Figures are images per CPU-second of this process with one torch thread, so a busy machine slows the
wall clock more than the figure; the files are read once beforehand, so disk or network speed is not
part of it (reading the bytes from the page cache is: its own row, which tells a tree of files from archives
read in place by offset, `ablation data index`). A DataLoader adds its own overhead (collate, inter-process transfer: ~150 KB per uint8
224-px image, 4x that in float).
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
from ablation.data.pipelines import SeededImageFolder, pipeline_transforms
from ablation.errors import DataError

# ResNet-50 training at 224 px in bfloat16 on one H100: ~2,500 images/s (the speed issue: an 8 x H100
# node needs ~20,000). A guess to size the loader against; pass --gpu-images-per-s with your own figure.
GPU_IMAGES_PER_S = 2500.0


@dataclass(frozen=True)
class BenchResult:
    """Images per CPU-second for each measured path, and what the images were."""

    root: str
    images: int
    classes: int
    median_size: tuple[int, int]
    rates: dict[str, float]  # "read", "decode", "reference", "split", "device-decode" -> images/s per core
    reduced: float  # fraction of split-pipeline images decoded at reduced JPEG scale
    layout: str = "imagefolder"  # where the bytes came from: DatasetInfo.layout


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


def run(root: str | Path, data_cfg: Any, images: int, seed: int = 0, repeats: int = 1) -> BenchResult:
    """Measure decode-only and both pipelines on up to `images` training images of root, on one core.

    With repeats > 1 the three are measured in turn that many times and each figure is the median.
    """
    scan = pick_images(root, images)
    samples = scan.samples("train")
    sizes = []
    for path, _ in samples:
        read_source(path)  # into the page cache: the figures are CPU work, not disk speed
        with open_image(path) as img:
            sizes.append(img.size)
    paths: dict[str, Callable[[int], Any]] = {"read": lambda i: read_source(samples[i][0]),
                                              "decode": lambda i: load_rgb(samples[i][0])}
    split = None
    for pipeline in PIPELINES:
        cfg = dataclasses.replace(data_cfg, pipeline=pipeline, eval_resize=data_cfg.eval_resize or data_cfg.image_size)
        tf, _ = pipeline_transforms(cfg)
        paths[pipeline] = SeededImageFolder(scan.info.root, "train", tf, seed, scan=scan).__getitem__
        split = tf if pipeline == "split" else split
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, fn in paths.items():
                runs[name].append(per_core_rate(fn, len(samples)))
    finally:
        torch.set_num_threads(threads)
    rates = {name: statistics.median(r) for name, r in runs.items()}
    median = (int(statistics.median(w for w, _ in sizes)), int(statistics.median(h for _, h in sizes)))
    return BenchResult(scan.info.root, len(samples), len(scan.info.classes), median, rates, split.reduced / max(split.images, 1),
                       scan.info.layout)


def _source(layout: str) -> str:
    """What the read row read."""
    return "files" if layout == "imagefolder" else "archive members"


def report(result: BenchResult, pipeline: str, image_size: int, gpus: int, gpu_images_per_s: float) -> list[str]:
    """The lines `ablation data bench` prints; the last ends with '<number> images/s per core'."""
    r = result.rates
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    need = gpus * gpu_images_per_s

    def cores_for(name: str) -> int:
        return math.ceil(need / r[name])

    alternative = "split" if pipeline == "reference" else "reference"
    lines = [
        f"data bench: {result.images} training images of {result.root} ({result.classes} classes, median "
        f"{result.median_size[0]}x{result.median_size[1]} px), crops to {image_size} px, one core (CPU time), files cached",
        f"{'  read only (' + _source(result.layout) + ')':32s}{r['read']:8.1f} images/s per core",
        f"  decode only (PIL, full size)  {r['decode']:8.1f} images/s per core",
        f"  reference pipeline            {r['reference']:8.1f} images/s per core",
        f"  split pipeline                {r['split']:8.1f} images/s per core "
        f"({100 * result.reduced:.0f}% of images decoded at reduced JPEG scale)",
        f"  device-decode pipeline        {r['device-decode']:8.1f} images/s per core "
        "(loader side only: the JPEG decode, crop and resize run on the GPU)",
        f"feeding {gpus} GPU(s) x {gpu_images_per_s:,.0f} images/s = {need:,.0f} images/s takes {cores_for(pipeline)} loader "
        f"cores with the {pipeline} pipeline ({cores_for(alternative)} with {alternative}); this machine has {cores}",
    ]
    best = max(("split", "device-decode"), key=lambda name: r[name])
    if pipeline != best and r[best] > r[pipeline]:
        lines.append(f"data.pipeline={best} would need {r[best] / r[pipeline]:.1f}x fewer loader cores (it changes the run id)")
    lines.append(f"{pipeline} pipeline: {r[pipeline]:.1f} images/s per core")
    return lines
