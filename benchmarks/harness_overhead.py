"""What the harness costs over a bare PyTorch loop doing the same training.

    python benchmarks/harness_overhead.py [--repeats 3] [--device cpu]

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
import json
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ablation import config
from ablation.config import derive
from ablation.data.layout import SeededImageFolder, pipeline_transforms, scan_layout
from ablation.train.distributed import DistEnv
from ablation.train.loaders import EpochIndexed, GlobalBatchSampler, eval_data_cfg, make_loader, to_device
from ablation.train.optim import build_optimizer
from ablation.train.models import create_model
from ablation.data.synth import SynthSpec, write_synth
from ablation.train.trainer import train

OUT = Path(__file__).resolve().parent / "results" / "harness_overhead.jsonl"
RUN = ["model.name=resnet18", "data.image_size=64", "data.eval_resize=64", "data.workers=0", "gpus=2", "batch_per_gpu=16", "log_every_steps=10"]
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
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    env = DistEnv(device=args.device)
    times: dict[tuple[str, int], list[float]] = {(k, e): [] for k in ("harness", "bare") for e in EPOCHS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_synth(root, SynthSpec(classes=10, train_per_class=32, val_per_class=8, size=64))
        for i in range(args.repeats):
            for epochs in EPOCHS:
                cfg = config.load(None, RUN + [f"epochs={epochs}", f"data.root={root}", f"device={args.device}"])
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
    steps = derive(cfg, 320).steps_per_epoch
    print(f"{hi} epochs ({hi * steps} steps): harness {med['harness', hi]:.2f} s, bare {med['bare', hi]:.2f} s: {total:.3f}x with the start-up")
    print(f"steady state ({hi - lo} epochs, start-up excluded): harness / bare = {steady:.3f} (target <= 1.03)")
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"host": socket.gethostname(), "platform": platform.platform(), "threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__},
        "run": RUN, "steps_per_epoch": steps, "seconds": {f"{k}_{e}ep": v for (k, e), v in times.items()},
        "ratio_with_startup": round(total, 4), "ratio_steady": round(steady, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
