"""Training data path speed: the split and device-decode pipelines vs the reference pipeline vs decoding alone.

Prints a table and appends one JSON record (figures plus the machine they ran on) to
benchmarks/results/data_speed.jsonl. Run:  python benchmarks/data_speed.py [--size 448 --size 896] [--quick]
(--tiny: seconds, a smoke test; --out FILE: record elsewhere).

Questions it answers, per source image size (synthetic JPEGs from ablation.data.synth, the paper's
augmentation at 224 px):
- images/s per core of a loader worker: decode only (PIL, full size), reference, split, device-decode
  (whose worker only reads the file and draws the parameters);
- how often the split pipeline decodes at reduced JPEG scale (draft mode), which only pays when a
  crop is at least twice the output on both sides;
- what the split pipeline's photometric steps cost on the training device, per image, and what the
  device-decode pipeline's decode + crop + resize + photometric steps cost there (on a GPU: batched
  nvJPEG; on a CPU the same libjpeg-turbo decode a worker would do, so only the loader side is a gain).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import PIL
import torch
import torchvision
from common import append, machine, results_file, stamp
from PIL import features

from ablation import config
from ablation.data import bench as databench
from ablation.data.pipelines import DeviceDecodeTrainTransform, SeededImageFolder, SplitTrainTransform, collate, finish_on_device
from ablation.data.synth import SynthSpec, write_synth

OUT = results_file("data_speed")


def dataset(size: int, images: int, noise: float, quality: int, classes: int = 10, parent: Path | None = None) -> Path:
    """A synthetic dataset of size-px JPEGs (4:4:4; synth's defaults: noise 0.05, quality 95), cached under
    parent (default: the system's temp dir)."""
    root = Path(parent or tempfile.gettempdir()) / f"ablation-data-speed-{size}px-{images}-n{noise}-q{quality}"
    spec = SynthSpec(classes=classes, train_per_class=-(-images // classes), val_per_class=1, size=size, noise=noise, quality=quality)
    write_synth(root, spec)
    return root


def device_cost(root: Path, data_cfg: config.DataConfig, device: str, batch: int, repeats: int, decode: bool = False) -> float:
    """Milliseconds per image of finish_on_device (jitter, lighting, normalize, flip) on `device`;
    with `decode`, the device-decode pipeline's (JPEG decode, crop and resize first)."""
    tf = DeviceDecodeTrainTransform(data_cfg) if decode else SplitTrainTransform(data_cfg)
    ds = SeededImageFolder(root, "train", tf, seed=0)
    x, _ = collate([(ds[i % len(ds)][0], 0) for i in range(batch)])
    if device.startswith("cuda"):
        x = torch.utils.data._utils.pin_memory.pin_memory(x)
    times = []
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        finish_on_device(x, data_cfg, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times[1:])[len(times[1:]) // 2] / batch


def main() -> None:
    """Run the benchmark, print a table, record a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, action="append", help="source image side in px (repeatable; default 448)")
    p.add_argument("--images", type=int, default=200, help="training images timed per size")
    p.add_argument("--noise", type=float, default=0.05, help="synthetic pixel noise: it sets the JPEG's bits per pixel, "
                   "which decides how much decoding at reduced scale saves (0.05: ~9 bits/px; 0.01: photo-like)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--repeats", type=int, default=3, help="passes over the images; each figure is the median")
    p.add_argument("--device", default="cpu", help="where the split pipeline's photometric steps are timed")
    p.add_argument("--note", default="", help="stored with the record, e.g. 'shared machine'")
    p.add_argument("--quick", action="store_true", help="40 images, one pass")
    p.add_argument("--tiny", action="store_true", help="8 images of 64 px to 32 px, one pass, data in a temporary folder: "
                   "a smoke test that keeps this script working")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON-lines record (default {OUT})")
    args = p.parse_args()
    images, repeats = (8, 1) if args.tiny else (40, 1) if args.quick else (args.images, args.repeats)
    data_cfg = config.RunConfig().data  # the paper's augmentation at 224 px
    data_cfg = dataclasses.replace(data_cfg, eval_resize=config.derive(config.RunConfig()).eval_resize)
    device_batch = 64
    if args.tiny:
        data_cfg = dataclasses.replace(data_cfg, image_size=32, eval_resize=36)
        device_batch = 8
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, data_cfg, images, repeats, device_batch, Path(tmp) if args.tiny else None)
    print_table(rows, args.device)
    record = {"time": stamp(), "machine": machine(args.device, torchvision=torchvision.__version__, pillow=PIL.__version__,
                                                  libjpeg_turbo=features.version("jpg")),
              "note": args.note, "tiny": args.tiny, "rows": rows}
    append(args.out, [record])
    print(f"recorded in {args.out}")


def measure(args: argparse.Namespace, data_cfg: config.DataConfig, images: int, repeats: int, device_batch: int,
            parent: Path | None) -> list[dict]:
    """One row per source size: images/s per core of each pipeline, the reduced-scale fraction, device costs."""
    rows = []
    for size in ([64] if args.tiny else args.size or [448]):
        root = dataset(size, images, args.noise, args.quality, classes=4 if args.tiny else 10, parent=parent)
        jpegs = list((root / "train").rglob("*.JPEG"))
        bits = 8 * sum(f.stat().st_size for f in jpegs) / (len(jpegs) * size * size)
        r = databench.run(root, data_cfg, images, repeats=repeats)
        rows.append({
            "source_px": size, "output_px": data_cfg.image_size, "noise": args.noise, "quality": args.quality, "bits_per_px": bits,
            "images": r.images, "repeats": repeats,
            "decode_per_core": r.rates["decode"], "reference_per_core": r.rates["reference"], "split_per_core": r.rates["split"],
            "split_vs_reference": r.rates["split"] / r.rates["reference"], "split_vs_decode": r.rates["split"] / r.rates["decode"],
            "device_decode_per_core": r.rates["device-decode"],
            "device_decode_vs_reference": r.rates["device-decode"] / r.rates["reference"],
            "reduced_scale_fraction": r.reduced,
            "device_ms_per_image": device_cost(root, data_cfg, args.device, device_batch, max(repeats, 3)),
            "device_decode_device_ms_per_image": device_cost(root, data_cfg, args.device, device_batch, max(repeats, 3), decode=True),
        })
    return rows


def print_table(rows: list[dict], device: str) -> None:
    """The figures, one line per source size."""
    print(f"{'source':>7s} {'bits/px':>7s} {'decode':>8s} {'reference':>10s} {'split':>8s} {'split/ref':>10s} {'split/dec':>10s} "
          f"{'reduced':>8s} {device + ' ms/img':>12s} {'dev-dec':>8s} {'dev-dec/ref':>11s} {'dd ' + device + ' ms/img':>15s}")
    for row in rows:
        print(f"{row['source_px']:5d}px {row['bits_per_px']:7.2f} {row['decode_per_core']:8.1f} {row['reference_per_core']:10.1f} "
              f"{row['split_per_core']:8.1f} "
              f"{row['split_vs_reference']:9.2f}x {row['split_vs_decode']:9.2f}x {100 * row['reduced_scale_fraction']:7.0f}% "
              f"{row['device_ms_per_image']:12.3f} {row['device_decode_per_core']:8.1f} {row['device_decode_vs_reference']:10.1f}x "
              f"{row['device_decode_device_ms_per_image']:15.3f}")
    print("images/s per core (CPU time of one process, one torch thread, files in the page cache)")


if __name__ == "__main__":
    main()
