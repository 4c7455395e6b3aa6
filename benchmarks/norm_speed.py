"""Norm-layer and whole-model training-step speed, per norm and per-GPU chunking.

Prints a table and appends one JSON record (figures plus the machine they ran on) to
benchmarks/results/norm_speed.jsonl. Run:  python benchmarks/norm_speed.py [--device cuda] [--quick]

Questions it answers:
- what does standing in for k GPUs cost BN (k chunks, each normalized separately) vs plain BN?
- how do GN/LN/IN compare with BN per step (GN's channels-last path is slow in some torch versions)?
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import time
from pathlib import Path

import torch

from ablation import config
from ablation.models import create_model
from ablation.norms import NormSpec, create_norm

OUT = Path(__file__).resolve().parent / "results" / "norm_speed.jsonl"


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def layer_bench(device: str, repeats: int, channels_last: bool) -> list[dict]:
    """Forward+backward of one norm layer on a ResNet-50 layer1-sized activation."""
    rows = []
    x0 = torch.randn(64, 256, 28, 28, device=device)
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    for name, k in [("bn", 1), ("bn", 8), ("bn", 32), ("syncbn", 1), ("gn", 1), ("ln", 1), ("in", 1)]:
        cfg = config.load(None, [f"norm.name={name}"]).norm
        layer = create_norm(256, NormSpec(cfg, k)).to(device)
        x = x0.clone().requires_grad_(True)

        def step() -> None:
            layer(x).sum().backward()

        rows.append({"what": "layer", "norm": name, "gpus_per_process": k, "channels_last": channels_last, "ms": 1000 * timed(step, repeats, device)})
    return rows


def model_bench(device: str, repeats: int, image: int, batch: int, model: str) -> list[dict]:
    """One SGD training step of the model at `batch` images, per norm and chunking."""
    rows = []
    for name, k in [("bn", 1), ("bn", 8), ("gn", 1)]:
        cfg = config.load(None, [f"norm.name={name}", f"model.name={model}"])
        net = create_model(cfg, 1000, gpus_per_process=k).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, image, image, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        s = timed(step, repeats, device)
        rows.append({"what": f"{model} step", "norm": name, "gpus_per_process": k, "image": image, "batch": batch, "ms": 1000 * s, "images_per_s": batch / s})
    return rows


def machine(device: str) -> dict:
    """The machine the figures come from."""
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }


def main() -> None:
    """Run the benchmarks, print a table, record a JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller model step")
    args = p.parse_args()
    repeats = 3 if args.quick else 10
    rows = layer_bench(args.device, repeats, False)
    if args.device.startswith("cuda"):
        rows += layer_bench(args.device, repeats, True)
    if args.device.startswith("cuda"):
        rows += model_bench(args.device, repeats, 224, 256, "resnet50")
    else:
        rows += model_bench(args.device, repeats, 64 if args.quick else 112, 32, "resnet50")
    for r in rows:
        extra = f"  {r['images_per_s']:.0f} img/s" if "images_per_s" in r else ""
        print(f"{r['what']:16s} {r['norm']:7s} k={r['gpus_per_process']:<3d} {r['ms']:9.2f} ms{extra}")
    OUT.parent.mkdir(exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(args.device), "rows": rows}) + "\n")
    print(f"recorded in {OUT}")


if __name__ == "__main__":
    main()
