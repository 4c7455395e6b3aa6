"""Cost estimates for a sweep's runs: device-hours from measured runs, GPU benchmark records or the profile,
and whether the pre-timeout signal leaves time for a checkpoint. Torch-free; reads run folders, writes nothing."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ablation import rundir
from ablation.config import IMAGENET_TRAIN_IMAGES, RunConfig
from ablation.errors import AblationError
from ablation.sweep.cluster import Profile, interpolate


def train_images(cfg: RunConfig) -> int:
    """Training images for estimates: counted when the dataset is here, else ImageNet's."""
    train = Path(cfg.data.root) / "train"
    if not train.is_dir():
        return IMAGENET_TRAIN_IMAGES
    return sum(1 for d in os.scandir(train) if d.is_dir() for f in os.scandir(d.path) if f.is_file())


def _run_docs(runs_root: Path) -> Iterator[tuple[dict[str, Any], rundir.RunDir]]:
    """(config.yaml, run folder) of each run folder under runs_root (unreadable configs skipped)."""
    for folder in sorted(runs_root.glob("*/")):
        rd = rundir.RunDir(folder)
        try:
            doc = rundir.read_config(rd.config) if rd.config.is_file() else None
        except (OSError, yaml.YAMLError, AblationError):
            continue
        if isinstance(doc, dict):
            yield doc, rd


def _same_model(doc: dict[str, Any], model: str, image_size: int) -> bool:
    """True when a run's config.yaml has this model and image size."""
    m, d = doc.get("model"), doc.get("data")
    return isinstance(m, dict) and isinstance(d, dict) and m.get("name") == model and d.get("image_size") == image_size


def _runs_like(runs_root: Path, cfg: RunConfig) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(env.json, metrics rows) of the run folders under runs_root with the same model and image size (damaged ones skipped)."""
    for doc, rd in _run_docs(runs_root):
        if not _same_model(doc, cfg.model.name, cfg.data.image_size):
            continue
        try:
            yield rundir.read_json(rd.env) or {}, rundir.read_jsonl(rd.metrics)
        except (OSError, AblationError):
            continue


def _measured(runs_root: Path, models: set[tuple[str, int]]) -> dict[tuple[str, int, int, int], tuple[list[float], int]]:
    """Per-process images/s of every finished epoch of the runs of these (model, image size), by
    (model, image size, batch_per_gpu, GPUs per process): (the figures, how many runs gave them)."""
    out: dict[tuple[str, int, int, int], tuple[list[float], int]] = {}
    if not runs_root.is_dir():
        return out
    for doc, rd in _run_docs(runs_root):
        key = next(((m, i) for m, i in models if _same_model(doc, m, i)), None)
        batch = doc.get("batch_per_gpu")
        if key is None or not isinstance(batch, int):
            continue
        try:
            env, rows = rundir.read_json(rd.env) or {}, rundir.read_jsonl(rd.metrics)
        except (OSError, AblationError):
            continue
        procs = env.get("processes") or 1
        gpp = env.get("gpus_per_process") or max(1, (doc.get("gpus") or procs) // procs)
        figures = [r["images_per_s"] / procs for r in rows if isinstance(r.get("images_per_s"), (int, float)) and r["images_per_s"] > 0]
        if figures:
            old, n = out.get((*key, batch, gpp), ([], 0))
            out[(*key, batch, gpp)] = (old + figures, n + 1)
    return out


def _median(xs: list[float]) -> float:
    """The median (upper middle for an even count, as the estimates always took it)."""
    return sorted(xs)[len(xs) // 2]


# The GPU benchmark's records (benchmarks/gpu.jsonl appends them): one JSON line per measurement, of which
# the estimates read {"model": "resnet50", "image_size": 224, "batch_per_gpu": 32, "images_per_s_per_gpu": 1210.0,
# "device": "NVIDIA A100-SXM4-80GB"}, and "norm" ("bn", "gn", ...) where the record has one: the run's norm's
# records when there are any, else those without a norm. Found in ./benchmarks/results/ or in the repository's.
GPU_RECORDS = Path("benchmarks") / "results" / "gpu.jsonl"


def gpu_records_path() -> Path | None:
    """The GPU benchmark's records here (./benchmarks/results/gpu.jsonl) or in the repository, else None."""
    for p in (GPU_RECORDS, Path(__file__).resolve().parents[2] / GPU_RECORDS):
        if p.is_file():
            return p
    return None


def gpu_benchmark_table(records: list[dict[str, Any]], cfg: RunConfig, gpu: str | None = None) -> tuple[dict[int, float], str]:
    """The records' images/s per GPU by per-GPU batch for this run's model and image size (median per batch),
    and the devices they come from; only records of `gpu` (a substring of the device name) when given."""
    like = []
    for r in records:
        thr, batch = r.get("images_per_s_per_gpu"), r.get("batch_per_gpu")
        if r.get("model") != cfg.model.name or r.get("image_size") != cfg.data.image_size:
            continue
        if not isinstance(batch, int) or batch < 1 or not isinstance(thr, (int, float)) or not thr > 0:
            continue
        if gpu and gpu.lower() not in str(r.get("device", "")).lower():
            continue
        like.append(r)
    same_norm = [r for r in like if r.get("norm") == cfg.norm.name]
    like = same_norm or [r for r in like if r.get("norm") is None]  # another norm's records never stand in
    by_batch: dict[int, list[float]] = {}
    for r in like:
        by_batch.setdefault(r["batch_per_gpu"], []).append(float(r["images_per_s_per_gpu"]))
    devices = sorted({str(r.get("device", "?")) for r in like})
    return {b: _median(v) for b, v in sorted(by_batch.items())}, ", ".join(devices)


def throughput(cfg: RunConfig, profile: Profile, measured: dict[tuple[str, int, int, int], tuple[list[float], int]],
               records: list[dict[str, Any]]) -> tuple[float, str, str] | None:
    """(images/s per process, where it came from, '' | 'interpolated' | 'extrapolated') for one run, or None.

    Measured runs of the same model, image size, per-GPU batch and GPUs per process come first, then the
    GPU benchmark's records, then the profile's figure; a table (records, profile) is interpolated in log
    batch between its sizes, and a source that could only extrapolate gives way to one that need not.
    A process standing in for k GPUs runs k x batch_per_gpu images per step: the tables are read at that batch.
    """
    gpp = cfg.gpus // profile.processes(cfg)
    batch = cfg.batch_per_gpu * gpp
    figures, n = measured.get((cfg.model.name, cfg.data.image_size, cfg.batch_per_gpu, gpp), ([], 0))
    if figures:
        return _median(figures), f"measured on {n} run(s)", ""
    found = []
    table, devices = gpu_benchmark_table(records, cfg, profile.gpu)
    if table:
        thr, how = interpolate(table, batch)
        found.append((thr, f"GPU benchmark ({devices})", how))
    at = profile.throughput_at(batch)
    if at:
        what = "table" if isinstance(profile.throughput_images_per_s, Mapping) else "figure"
        found.append((at[0], f"profile {profile.name}'s {what}", at[1]))
    return next((f for f in found if f[2] != "extrapolated"), found[0] if found else None)


def estimate_hours(runs: list[RunConfig], profile: Profile, runs_root: Path, gpu_records: Path | None = None) -> tuple[float | None, str]:
    """Device-hours (GPU-hours on GPU profiles) for these runs, and the throughput each per-GPU batch size used with its source.

    gpu_records: the GPU benchmark's records (default: gpu_records_path()).
    """
    if not runs:
        return 0.0, "nothing to run"
    measured = _measured(runs_root, {(c.model.name, c.data.image_size) for c in runs})
    path = gpu_records or gpu_records_path()
    try:
        records = rundir.read_jsonl(path) if path else []
    except (OSError, AblationError) as e:
        print(f"warning: GPU benchmark records left out: {e}", file=sys.stderr)
        records = []
    images: dict[str, int] = {}
    hours = 0.0
    used: dict[tuple[str, int, int], tuple[float, str, str]] = {}
    for cfg in runs:
        got = throughput(cfg, profile, measured, records)
        if got is None:
            return None, (
                f"no throughput figure for {cfg.model.name} at {cfg.batch_per_gpu} images per GPU: "
                "set throughput_images_per_s in the profile "
                "(a number, or a table by per-GPU batch size), record GPU benchmarks (benchmarks/results/gpu.jsonl) or run one job first"
            )
        if cfg.data.root not in images:
            images[cfg.data.root] = train_images(cfg)
        hours += cfg.epochs * images[cfg.data.root] / got[0] / 3600
        used[(cfg.model.name, cfg.data.image_size, cfg.batch_per_gpu)] = got
    return hours, describe_throughputs(used, "GPU" if profile.gpus_per_node else "process")


def describe_throughputs(used: dict[tuple[str, int, int], tuple[float, str, str]], per: str) -> str:
    """'images/s per GPU by per-GPU batch: 32: 400, 2: 150 (profile x's table); 8: 330 (measured on 2 run(s))'."""
    models = len({(m, i) for m, i, _ in used})
    groups: dict[str, list[str]] = {}
    for (model, image, batch), (thr, source, how) in sorted(used.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        label = f"{model}@{image} " if models > 1 else ""
        groups.setdefault(source, []).append(f"{label}{batch}: {thr:.0f}" + (f" {how}" if how else ""))
    return f"images/s per {per} by per-GPU batch: " + "; ".join(f"{', '.join(items)} ({source})" for source, items in groups.items())


# Write speed assumed for a checkpoint before any run has measured one: a busy shared file system.
ASSUMED_WRITE_MB_S = 50.0


def stop_seconds(runs_root: Path, cfg: RunConfig, checkpoint_bytes: int) -> tuple[float, str]:
    """Seconds from a stop signal to a written checkpoint: the slowest measured on like runs, else from the checkpoint's size."""
    measured = [s["signal_to_checkpoint_s"] for env, _ in _runs_like(runs_root, cfg)
                for s in env.get("starts", []) if s.get("signal_to_checkpoint_s")]
    if measured:
        return max(measured), f"measured on {len(measured)} earlier stop(s) of {cfg.model.name}"
    mb = checkpoint_bytes / 1e6
    return mb / ASSUMED_WRITE_MB_S, f"a {cfg.model.name} checkpoint is ~{mb:.0f} MB; at an assumed {ASSUMED_WRITE_MB_S:.0f} MB/s"


def signal_delay_warning(profile: Profile, cfgs: list[RunConfig], runs_root: Path,
                         checkpoint_bytes: Callable[[RunConfig], int]) -> str | None:
    """A warning when the profile's pre-timeout signal comes too late for a checkpoint to be written, else None."""
    if profile.executor != "slurm" or not cfgs:
        return None
    by_model = {(c.model.name, c.data.image_size): c for c in cfgs}
    seconds, why = max(stop_seconds(runs_root, c, checkpoint_bytes(c)) for c in by_model.values())
    if profile.signal_delay_s >= seconds:
        return None
    return (
        f"warning: profile {profile.name}: signal_delay_s={profile.signal_delay_s} is shorter than the ~{seconds:.1f} s a checkpoint takes "
        f"({why}); a job at its time limit may be killed before it saves: raise signal_delay_s"
    )
