"""What the harness costs over a bare PyTorch loop doing the same training.

    python benchmarks/harness_overhead.py [--repeats 3] [--device cpu] [--out FILE] [--tiny]

Both train the same model on the same images (the harness's own dataset, sampler and loader, so the
data path is identical) for the same steps, evaluate after every epoch and save the model and
optimizer after every epoch. The harness adds what makes a run a result: the run folder (config,
env, metrics, steps, final), the stop vote and divergence checks, the fault points, partial-epoch
sums, the folder lock. Each is timed at 1 and at 3 epochs: the difference is the steady cost of two
epochs, without the one-off start (the dataset scan, git and env.json, which a real run of hours
amortizes); both ratios are reported. Runs alternate (harness, bare, ...) so drift hits both alike;
medians are printed and appended, with the machine, to benchmarks/results/harness_overhead.jsonl.
Target: harness <= 1.03 x the bare loop, in the steady state.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import append, machine, results_file, stamp

from ablation import config
from ablation.config import derive
from ablation.data.layout import scan_layout
from ablation.data.pipelines import SeededImageFolder, pipeline_transforms
from ablation.data.synth import SynthSpec, write_synth
from ablation.train.distributed import DistEnv
from ablation.train.loaders import EpochIndexed, GlobalBatchSampler, eval_data_cfg, make_loader, to_device
from ablation.train.models import create_model
from ablation.train.optim import build_optimizer
from ablation.train.trainer import train

OUT = results_file("harness_overhead")
RUN = ["model.name=resnet18", "data.image_size=64", "data.eval_resize=64", "data.workers=0", "gpus=2", "batch_per_gpu=16",
       "log_every_steps=10"]
DATA = SynthSpec(classes=10, train_per_class=32, val_per_class=8, size=64)
# --tiny: a ResNet-18 of widths 8-16 on 16 px images, 4 classes x 8 images: seconds, to keep the script working.
TINY_RUN = ["model.name=resnet18", "model.widths=[8,16,16,16]", "model.stem_width=8", "model.stem=small", "data.image_size=16",
            "data.eval_resize=16", "data.workers=0", "gpus=2", "batch_per_gpu=4", "log_every_steps=2"]
TINY_DATA = SynthSpec(classes=4, train_per_class=8, val_per_class=2, size=16)
EPOCHS = (1, 3)


def bare(cfg: config.RunConfig, root: Path, out: Path, env: DistEnv) -> None:
    """The same training with nothing but PyTorch: steps, an evaluation and a torch.save per epoch."""
    scan = scan_layout(root)
    d = derive(cfg, scan.info.train_images)
    train_tf, val_tf = pipeline_transforms(eval_data_cfg(cfg, d))
    train_ds = SeededImageFolder(str(root), "train", train_tf, cfg.seed, scan=scan)
    val_ds = SeededImageFolder(str(root), "val", val_tf, cfg.seed, scan=scan)
    sampler = GlobalBatchSampler(len(train_ds), d, cfg, 0, 1)
    train_loader = make_loader(EpochIndexed(train_ds), cfg, env, batch_sampler=sampler)
    val_loader = make_loader(val_ds, cfg, env, batch_size=cfg.data.eval_batch)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg, len(scan.info.classes), gpus_per_process=cfg.gpus).to(env.device)
    opt = build_optimizer(cfg, model)
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in train_loader:
            x, y = to_device(x, y, env, cfg)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = to_device(x, y, env, cfg)
                correct += int((model(x).argmax(1) == y).sum())
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / "checkpoint.pt")


def main() -> None:
    """Alternate harness and bare runs; print and record the ratio of the medians."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON-lines record (default {OUT})")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model on 16 px images, one repeat: a smoke test that keeps this script working")
    args = p.parse_args()
    run, data = (TINY_RUN, TINY_DATA) if args.tiny else (RUN, DATA)
    repeats = 1 if args.tiny else args.repeats
    env = DistEnv(device=args.device)
    times: dict[tuple[str, int], list[float]] = {(k, e): [] for k in ("harness", "bare") for e in EPOCHS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_synth(root, data)
        for i in range(repeats):
            for epochs in EPOCHS:
                cfg = config.load(None, run + [f"epochs={epochs}", f"data.root={root}", f"device={args.device}"])
                for kind in ("harness", "bare"):
                    folder = Path(tmp) / f"{kind}{epochs}-{i}"
                    folder.mkdir()
                    t0 = time.perf_counter()
                    if kind == "harness":
                        assert train(cfg, folder / "run", env)["status"] == "ok"
                    else:
                        bare(cfg, root, folder, env)
                    times[kind, epochs].append(time.perf_counter() - t0)
                    print(f"{kind:8s} {epochs} epoch(s), run {i + 1}: {times[kind, epochs][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lo, hi = EPOCHS
    total = med["harness", hi] / med["bare", hi]
    steady = (med["harness", hi] - med["harness", lo]) / (med["bare", hi] - med["bare", lo])
    steps = derive(cfg, data.classes * data.train_per_class).steps_per_epoch
    print(f"{hi} epochs ({hi * steps} steps): harness {med['harness', hi]:.2f} s, bare {med['bare', hi]:.2f} s: "
          f"{total:.3f}x with the start-up")
    print(f"steady state ({hi - lo} epochs, start-up excluded): harness / bare = {steady:.3f} (target <= 1.03)")
    record = {
        "time": stamp(),
        "machine": machine(args.device),
        "run": run, "steps_per_epoch": steps, "seconds": {f"{k}_{e}ep": v for (k, e), v in times.items()},
        "ratio_with_startup": round(total, 4), "ratio_steady": round(steady, 4), "tiny": args.tiny,
    }
    append(args.out, [record])
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
