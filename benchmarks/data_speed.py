"""Training data path speed: every CPU second each pipeline costs per image, loader and training process together.

Prints a table and appends one JSON record (figures plus the machine they ran on) to
benchmarks/results/data_speed.jsonl. Run:  python benchmarks/data_speed.py [--size 448 --size 896] [--quick]
[--device cuda] (--tiny: seconds, a smoke test; --out FILE: record elsewhere).

Questions it answers, per source image size (synthetic JPEGs from ablation.data.synth, the paper's
augmentation at 224 px), through ablation.data.bench (the figures `ablation data bench` prints):
- per pipeline (reference, split, device-decode): the loader worker's CPU ms per image, the training
  process's CPU ms per image (its device side: split's photometric steps; device-decode's decode, crop,
  resize and the same steps; reference's copy), their sum, and images per CPU-second with all of it counted;
- on a GPU (--device cuda), the device's ms per image beside them (its time, not the CPU's);
- decoding alone (PIL, full size), and how often split decodes at reduced JPEG scale (draft mode).
Records before 2026-12-06 counted the loader side only (device-decode's "per core" figure left its decode,
crop and resize out); those records carry a "correction" field saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import PIL
import torchvision
from common import append, machine, results_file, stamp
from PIL import features

from ablation import config
from ablation.data import bench as databench
from ablation.data.synth import SynthSpec, write_synth

OUT = results_file("data_speed")


def dataset(size: int, images: int, noise: float, quality: int, classes: int = 10, parent: Path | None = None) -> Path:
    """A synthetic dataset of size-px JPEGs (4:4:4; synth's defaults: noise 0.05, quality 95), cached under
    parent (default: the system's temp dir)."""
    root = Path(parent or tempfile.gettempdir()) / f"ablation-data-speed-{size}px-{images}-n{noise}-q{quality}"
    spec = SynthSpec(classes=classes, train_per_class=-(-images // classes), val_per_class=1, size=size, noise=noise, quality=quality)
    write_synth(root, spec)
    return root


def main() -> None:
    """Run the benchmark, print a table, record a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, action="append", help="source image side in px (repeatable; default 448)")
    p.add_argument("--images", type=int, default=200, help="training images timed per size")
    p.add_argument("--noise", type=float, default=0.05, help="synthetic pixel noise: it sets the JPEG's bits per pixel, "
                   "which decides how much decoding at reduced scale saves (0.05: ~9 bits/px; 0.01: photo-like)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--repeats", type=int, default=3, help="passes over the images; each figure is the median")
    p.add_argument("--device", default="cpu", help="the training device: where each pipeline's device side runs (cpu | cuda)")
    p.add_argument("--note", default="", help="stored with the record, e.g. 'shared machine'")
    p.add_argument("--quick", action="store_true", help="40 images, one pass")
    p.add_argument("--tiny", action="store_true", help="8 images of 64 px to 32 px, one pass, data in a temporary folder: "
                   "a smoke test that keeps this script working")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON-lines record (default {OUT})")
    args = p.parse_args()
    images, repeats = (8, 1) if args.tiny else (40, 1) if args.quick else (args.images, args.repeats)
    data_cfg = config.RunConfig().data  # the paper's augmentation at 224 px
    data_cfg = dataclasses.replace(data_cfg, eval_resize=config.derive(config.RunConfig()).eval_resize)
    if args.tiny:
        data_cfg = dataclasses.replace(data_cfg, image_size=32, eval_resize=36)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, data_cfg, images, repeats, Path(tmp) if args.tiny else None)
    print_table(rows, args.device)
    record = {"time": stamp(), "machine": machine(args.device, torchvision=torchvision.__version__, pillow=PIL.__version__,
                                                  libjpeg_turbo=features.version("jpg")),
              "note": args.note, "tiny": args.tiny, "rows": rows}
    append(args.out, [record])
    print(f"recorded in {args.out}")


def measure(args: argparse.Namespace, data_cfg: config.DataConfig, images: int, repeats: int, parent: Path | None) -> list[dict]:
    """One row per source size: each pipeline's loader and training-process CPU per image, their sum, the device's time."""
    rows = []
    for size in ([64] if args.tiny else args.size or [448]):
        root = dataset(size, images, args.noise, args.quality, classes=4 if args.tiny else 10, parent=parent)
        jpegs = list((root / "train").rglob("*.JPEG"))
        bits = 8 * sum(f.stat().st_size for f in jpegs) / (len(jpegs) * size * size)
        r = databench.run(root, data_cfg, images, repeats=repeats, device=args.device)
        row = {"source_px": size, "output_px": data_cfg.image_size, "noise": args.noise, "quality": args.quality, "bits_per_px": bits,
               "images": r.images, "repeats": repeats, "device": r.device, "accounting": "all CPU: loader + training process",
               "decode_per_core": r.rates["decode"], "reduced_scale_fraction": r.reduced}
        for p in ("reference", "split", "device-decode"):
            key = p.replace("-", "_")
            row[f"{key}_loader_per_core"] = r.rates[p]
            row[f"{key}_loader_ms"] = 1000 / r.rates[p]
            row[f"{key}_process_ms"] = r.process_ms[p]
            row[f"{key}_cpu_ms"] = r.cpu_ms(p)
            row[f"{key}_per_core"] = r.per_core(p)
            row[f"{key}_device_ms"] = r.device_ms.get(p)
        row["split_vs_reference"] = row["split_per_core"] / row["reference_per_core"]
        row["device_decode_vs_reference"] = row["device_decode_per_core"] / row["reference_per_core"]
        row["split_vs_decode"] = row["split_per_core"] / row["decode_per_core"]
        row["best"] = r.best()
        rows.append(row)
    return rows


def print_table(rows: list[dict], device: str) -> None:
    """The figures, one block per source size: CPU ms per image (loader + training process) and images/s per core."""
    for row in rows:
        print(f"{row['source_px']}px JPEGs, {row['bits_per_px']:.2f} bits/px, to {row['output_px']} px; decode only (PIL, full size) "
              f"{row['decode_per_core']:.1f} images/s per core; split decoded {100 * row['reduced_scale_fraction']:.0f}% at reduced scale")
        print(f"  {'pipeline':<14s} {'loader ms':>9s} {'process ms':>10s} {'CPU ms':>8s} {'per core':>9s} {'vs ref':>7s} "
              f"{'GPU ms':>9s}")
        for p in ("reference", "split", "device_decode"):
            dev = row[f"{p}_device_ms"]
            print(f"  {p:<14s} {row[f'{p}_loader_ms']:9.2f} {row[f'{p}_process_ms']:10.2f} {row[f'{p}_cpu_ms']:8.2f} "
                  f"{row[f'{p}_per_core']:9.1f} {row[f'{p}_per_core'] / row['reference_per_core']:6.2f}x "
                  f"{'-' if dev is None else f'{dev:.2f}':>9s}")
        print(f"  fewest CPU seconds per image on {row['device']}: {row['best']}")
    print("images/s per core: training images per CPU-second of the loader and the training process together "
          "(one torch thread, files in the page cache)")


if __name__ == "__main__":
    main()
