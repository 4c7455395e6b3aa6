"""What several test files share: the tiny run settings, the `python -m ablation` runner, run-folder checks, NormSpecs,
run folders written as the trainer writes them (for the report tests)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import warm
import yaml

from ablation import config, rundir
from ablation.norms import NormSpec

ROOT = Path(__file__).resolve().parents[1]

# A tiny ResNet-18-shaped model on 16-pixel images: seconds per run on a CPU.
TINY = [
    "model.name=resnet18",
    "model.widths=[8,16,16,16]",
    "model.stem_width=8",
    "model.stem=small",
    "data.image_size=16",
    "data.eval_resize=16",
    "data.workers=0",
    "data.eval_batch=64",
    "device=cpu",
    "log_every_steps=2",
]

# 4 modelled GPUs x 4 images = global batch 16; 192 training images (tiny_data) = 12 steps per epoch.
RUN = TINY + ["gpus=4", "batch_per_gpu=4", "epochs=2"]

# metrics.jsonl fields that legitimately differ between two otherwise equal runs.
TIME_KEYS = {"images_per_s", "epoch_seconds", "wall_seconds"}


def ablation(args: list[str], env: dict[str, str], *, cwd: Path | None = None, launcher: list[str] | None = None,
             ranks: int = 0, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m ablation ARGS` (or under a launcher such as torchrun) and capture its output.

    The command runs in a process forked from a server that imported torch once (warm.py), as a process of its own all
    the same: the ~3 s of imports it would spend first are most of a tiny run's (or a sweep's model check's) time.
    Tests of what a command imports run `python -c` themselves.
    ranks: run `torchrun --standalone --nproc_per_node RANKS -m ablation ARGS`; its ranks are forked from that server too,
    each with the environment torchrun gives it (warm.torchrun_env), and without torchrun's agent (tests of what the
    agent does, such as ending every rank when one fails, keep the real torchrun as their launcher).
    check: raise AssertionError, with the command and its output, when it exits non-zero.
    """
    if ranks:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m"]
    cmd = (launcher or [sys.executable, "-m"]) + ["ablation", *args]
    if launcher is None and warm.available():
        proc = warm.run(cmd, args, env, cwd=cwd, timeout=timeout)
    elif ranks and warm.available():
        proc = warm.run_ranks(cmd, args, warm.torchrun_env(env, ranks, warm.free_port()), cwd=cwd, timeout=timeout)
    else:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def ablation_ok(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess:
    """ablation(..., check=True): the command must succeed."""
    return ablation(args, env, check=True, **kw)


def run_folder(proc: subprocess.CompletedProcess) -> Path:
    """The run folder path the train command prints as its last line."""
    return Path(proc.stdout.strip().splitlines()[-1])


def metrics_without_time(folder: Path) -> list[dict]:
    """metrics.jsonl rows without the timing fields, which legitimately differ between runs."""
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in rundir.read_jsonl(folder / rundir.METRICS)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model state (weights and BN running statistics) in a run's checkpoint."""
    return torch.load(folder / rundir.CHECKPOINT, weights_only=False)["model"]


def predictions(folder: Path) -> dict[str, bytes]:
    """The files of a run's predictions/ (per-image results) by name, with their bytes ({} where there is none)."""
    d = folder / rundir.PREDICTIONS
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.is_dir() else {}


def assert_same_predictions(a: Path, b: Path) -> list[str]:
    """The two runs' predictions/ hold the same files, byte for byte, one per epoch metrics.jsonl lists; their names."""
    pa, pb = predictions(a), predictions(b)
    assert sorted(pa) == sorted(pb)
    assert [name for name in pa if pa[name] != pb[name]] == []
    epochs = [r["epoch"] for r in rundir.read_jsonl(a / rundir.METRICS)]
    assert rundir.predictions_epochs(a) == epochs and (rundir.LABELS in pa) == bool(epochs)
    return sorted(pa)


def assert_twin_mirrors(folder: Path) -> None:
    """metrics.npy holds metrics.jsonl's rows (values and types) where they have an array (rundir.metric_array); else it is absent."""
    rows = rundir.read_jsonl(folder / rundir.METRICS)
    path = folder / rundir.METRICS
    twin = rundir.metric_twin(folder, path.read_bytes(), path.stat().st_mtime_ns)
    if rundir.metric_array(rows) is None:
        assert not (folder / rundir.METRICS_COLUMNS).exists()
        return
    assert twin is not None
    got = [dict(zip(rundir.METRIC_KEYS, r)) for r in twin.tolist()]
    assert got == rows and [list(map(type, r.values())) for r in got] == [list(map(type, r.values())) for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Metrics (less timings), per-step losses, every tensor of the final checkpoint and the per-image results are equal;
    each folder's metrics.npy mirrors its metrics.jsonl."""
    assert metrics_without_time(a) == metrics_without_time(b)
    assert_twin_mirrors(a)
    assert_twin_mirrors(b)
    assert rundir.read_jsonl(a / "steps.jsonl") == rundir.read_jsonl(b / "steps.jsonl")
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert_same_predictions(a, b)


def norm_spec(name: str, gpus_per_process: int = 1, apply_act: bool = False, **norm: object) -> NormSpec:
    """A NormSpec for a norm name, its norm.* options (validated as a run config would be) and apply_act."""
    cfg = config.replace(config.RunConfig(), **{"norm.name": name, **{f"norm.{k}": v for k, v in norm.items()}})
    return NormSpec(cfg.norm, gpus_per_process, apply_act=apply_act)


# ---------------------------------------------------------------- run folders for the report tests

PAPER_BN = {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7}
PAPER_GN = {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1}


IMAGENET_VAL_IMAGES = 50_000
IMAGENET_CLASSES = 1000


def imagenet_counts(train_images: int | None = config.IMAGENET_TRAIN_IMAGES, val_images: int | None = IMAGENET_VAL_IMAGES,
                    num_classes: int | None = IMAGENET_CLASSES) -> dict:
    """The dataset counts the trainer records in config.yaml's `derived` (ImageNet-1k's unless told; None: not recorded,
    as an older run folder)."""
    counts = {"train_images": train_images, "val_images": val_images, "num_classes": num_classes}
    return {k: v for k, v in counts.items() if v is not None}


def write_run(root: Path, overrides: list[str], val: list[float], status: str | None = "ok", reason: str | None = None,
              train_images: int | None = config.IMAGENET_TRAIN_IMAGES, *, paper: bool = False, val_images: int | None = IMAGENET_VAL_IMAGES,
              num_classes: int | None = IMAGENET_CLASSES) -> dict:
    """A run folder as the trainer writes it: config.yaml, config.json, env.json, metrics.jsonl and .npy, final.json (trained on
    ImageNet-1k's counts unless told). 10 epochs, not the paper's 100, so not in the paper's setting, unless `paper`: the
    paper's recipe (100 epochs; the overrides still apply)."""
    cfg = config.load(None, [*([] if paper else ["epochs=10"]), *overrides])
    rid = config.run_id(cfg)
    folder = root / rid
    folder.mkdir(parents=True)
    doc = {"run_id": rid, "config_hash": config.config_hash(cfg), **config.to_dict(cfg),
           "derived": {"global_batch": cfg.gpus * cfg.batch_per_gpu, **imagenet_counts(train_images, val_images, num_classes)}}
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    (folder / "config.json").write_text(rundir.config_json_text(doc))
    (folder / "env.json").write_text(json.dumps({"processes": 1, "starts": [{"resumed_from_step": 0}]}))
    rows = [
        {"epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "train_err1": v + 1, "val_err1": v, "val_err5": v / 3, "images_per_s": 100.0,
         "epoch_seconds": 1.0, "wall_seconds": i + 1.0}
        for i, v in enumerate(val)
    ]
    rundir.write_metrics(folder, rows)
    if status:
        final = {"status": status, "reason": reason, "val_err1": statistics.median(val[-5:]) if status == "ok" else None, "val_err5": 1.0,
                 "gpu_hours": 0.5, "wall_seconds": 3.0}
        rundir.write_json(folder / "final.json", final)
    return {"run_id": rid, "folder": folder, "val": val}


def curve(end: float, n: int = 10) -> list[float]:
    """A falling val-error curve whose last five epochs are end+0.4, end+0.2, end, end-0.2, end+0.1."""
    return [end + 30 - i for i in range(n - 5)] + [end + 0.4, end + 0.2, end, end - 0.2, end + 0.1]


def med(end: float) -> float:
    """The paper metric of curve(end), computed independently."""
    return statistics.median([end + 0.4, end + 0.2, end, end - 0.2, end + 0.1])


def make_cfg(**overrides: object) -> SimpleNamespace:
    """A DataConfig stand-in with the paper's defaults scaled to tiny images."""
    fields = dict(root="", image_size=28, eval_resize=32, crop_scale=(0.08, 1.0),
                  crop_ratio=(0.75, 4 / 3), color_jitter=0.4, lighting=0.1, hflip=True,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    fields.update(overrides)
    return SimpleNamespace(**fields)


def split_cfg(**overrides: object) -> SimpleNamespace:
    """The paper's augmentation at 24 px, split pipeline."""
    return make_cfg(**{"image_size": 24, "eval_resize": 28, "pipeline": "split", **overrides})


# A tiny run with mid-epoch checkpoints and per-step logs: what the fault tests kill and resume.
FAULT_ARGS = ["train", *RUN, "epochs=3", "checkpoint_every_steps=5", "log_steps=true"]
