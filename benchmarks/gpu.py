"""Training throughput on one device: what a GPU owner runs to put real figures on the speed claims.

    python benchmarks/gpu.py                      # CUDA: ResNet-50 at 224 px, bf16 + channels-last
    python benchmarks/gpu.py --tiny --device cpu  # what CI runs: a tiny model, a few steps, on the CPU

Cases, each eager and compiled (torch.compile):
- per_gpu      one GPU at batch_per_gpu = 32 and 2 (no stand-in): the per-GPU figure GPU-hour estimates read;
- stand_in     one GPU standing in for 8 at 32 (global batch 256) and at 2 (global 16, per-GPU BN over 8 groups);
each with the data path excluded (one synthetic batch on the device) and included (the harness's own
loader over generated JPEGs: decode, augmentation, host-to-device copy; data.pipeline as given).
Prints a table and appends one JSON line per case to benchmarks/results/gpu.jsonl, with the machine;
the per_gpu, data-excluded, eager rows carry images_per_s_per_gpu, which `ablation sweep --dry-run`
uses when no measured run of the setting exists.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from common import append, machine, results_file, stamp

from ablation import config
from ablation.config import derive
from ablation.data.layout import scan_layout
from ablation.data.pipelines import SeededImageFolder, pipeline_transforms
from ablation.data.synth import SynthSpec, write_synth
from ablation.selftest.speed import timed_steps
from ablation.train.distributed import DistEnv
from ablation.train.loaders import EpochIndexed, GlobalBatchSampler, eval_data_cfg, make_loader, to_device
from ablation.train.models import create_model
from ablation.train.optim import build_optimizer

OUT = results_file("gpu")
TINY = ["model.name=resnet18", "model.widths=[8,16,16,16]", "model.stem_width=8", "model.stem=small",
        "data.image_size=32", "data.eval_resize=32"]


def batches(cfg: config.RunConfig, env: DistEnv, data_root: Path | None, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` training batches on the device: the same synthetic one, or the harness's loader over real JPEGs."""
    d = derive(cfg, 1_000)
    if data_root is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(d.global_batch, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
        y = torch.randint(0, 1000, (d.global_batch,), generator=g)
        x, y = to_device(x, y, env, cfg)
        for _ in range(steps):
            yield x, y
        return
    scan = scan_layout(data_root)
    train_tf, _ = pipeline_transforms(eval_data_cfg(cfg, derive(cfg, scan.info.train_images)))
    ds = SeededImageFolder(str(data_root), "train", train_tf, cfg.seed, scan=scan)
    sampler = GlobalBatchSampler(len(ds), derive(cfg, len(ds)), cfg, 0, 1)
    done = 0
    for epoch in range(10**6):
        sampler.set_epoch(epoch)
        for x, y in make_loader(EpochIndexed(ds), cfg, env, batch_sampler=sampler):
            yield to_device(x, y, env, cfg)
            done += 1
            if done == steps:
                return


def trainable(cfg: config.RunConfig, env: DistEnv) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module]:
    """(model, optimizer, the forward to time: the model, or it compiled) for one case."""
    model = create_model(cfg, 1000, gpus_per_process=cfg.gpus).to(env.device)  # one process stands in for every modelled GPU
    if cfg.channels_last and env.device != "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model, build_optimizer(cfg, model), torch.compile(model, backend=cfg.compile) if cfg.compile != "off" else model


def measure(cfg: config.RunConfig, env: DistEnv, built: tuple, data_root: Path | None, warmup: int, steps: int) -> float:
    """Training images per second over `steps` steps after `warmup` (compile included in the first case's warm-up)."""
    model, opt, fwd = built
    return timed_steps(model, opt, batches(cfg, env, data_root, warmup + steps), cfg, env, warmup, steps, forward=fwd)[0]


def main() -> None:
    """Run every case, print the table, record the rows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model at 32 px, 1+2 steps, the stand-in cases eager only: a smoke test that keeps this script working")
    p.add_argument("--steps", type=int, help="timed steps per case (default 30; tiny 3)")
    p.add_argument("--compile-backend", help="backend of the compiled cases (default inductor; tiny: aot_eager, which compiles in seconds)")
    p.add_argument("--pipeline", default="split", choices=list(config.PIPELINES), help="data.pipeline of the data-included cases")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON-lines record (default {OUT})")
    args = p.parse_args()
    steps = args.steps or (2 if args.tiny else 30)
    warmup = 1 if args.tiny else 10
    backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    gpu = args.device.startswith("cuda")
    base = (TINY if args.tiny else []) + [f"device={args.device}", f"data.pipeline={args.pipeline}",
                                           "data.workers=8" if gpu else "data.workers=0"]
    if gpu:
        base += ["amp=true", "channels_last=true"]
    env = DistEnv(device=args.device)
    if gpu:
        torch.backends.cudnn.benchmark = True
    rows, m = [], machine(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        size = 32 if args.tiny else 448  # ImageNet-like JPEGs: about twice the crop on a side
        per_class = 32 if args.tiny else 64  # enough for one global batch of 256
        data_root = Path(tmp) / "jpegs"
        write_synth(data_root, SynthSpec(classes=10, train_per_class=per_class, val_per_class=1, size=size))
        for case, gpus in (("per_gpu", 1), ("stand_in", 8)):
            for b in (32, 2):
                # --tiny compiles the per-GPU cases only: the stand-in's graph takes ~30 CPU-s to compile on a CPU, and
                # keeping the script working needs one compiled case, not every one (a GPU owner's run has them all).
                for compiled in ("off",) if args.tiny and gpus > 1 else ("off", backend):
                    cfg = config.load(None, base + [f"gpus={gpus}", f"batch_per_gpu={b}", f"compile={compiled}"])
                    built = trainable(cfg, env)  # compiled once for both data cases: the second times the same graphs
                    for data in ("excluded", "included"):
                        ips = measure(cfg, env, built, data_root if data == "included" else None, warmup, steps)
                        row = {
                            "case": case, "model": cfg.model.name, "norm": cfg.norm.name, "image_size": cfg.data.image_size,
                            "gpus": gpus, "batch_per_gpu": b, "global_batch": gpus * b, "compile": compiled, "data": data,
                            "pipeline": args.pipeline if data == "included" else None, "amp": cfg.amp, "channels_last": cfg.channels_last,
                            "images_per_s": round(ips, 2), "device": m["device"], "tiny": args.tiny,
                        }
                        if case == "per_gpu" and data == "excluded" and compiled == "off" and not args.tiny:
                            row["images_per_s_per_gpu"] = row["images_per_s"]
                        rows.append(row)
                        print(f"{case:9s} gpus={gpus} b={b:<3d} global={gpus * b:<4d} compile={compiled:9s} data {data:9s} "
                              f"{ips:10.1f} images/s", flush=True)
    now = stamp()
    append(args.out, [{"time": now, "machine": m, **row} for row in rows])
    print(f"recorded {len(rows)} rows in {args.out}")


if __name__ == "__main__":
    main()
