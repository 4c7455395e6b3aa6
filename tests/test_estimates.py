"""GPU-hour estimates: throughput by per-GPU batch size, from measured runs, the GPU benchmark's records or the profile."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from ablation import config
from ablation.config import IMAGENET_TRAIN_IMAGES, ConfigError
from ablation.sweep import estimates
from ablation.sweep import spec as sweep
from ablation.sweep.cluster import Profile, interpolate, load_profile

TABLE = {32: 400, 16: 380, 8: 330, 4: 250, 2: 150}


def profile_file(tmp_path: Path, throughput: object, **extra: object) -> Path:
    p = tmp_path / "profile.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "executor": "slurm", "gpus_per_node": 8, "throughput_images_per_s": throughput, **extra}))
    return p


def test_profile_table_interpolates_in_log_batch_and_says_when_it_extrapolates(tmp_path: Path) -> None:
    prof = load_profile(profile_file(tmp_path, TABLE))
    assert prof.throughput_images_per_s == {2: 150.0, 4: 250.0, 8: 330.0, 16: 380.0, 32: 400.0}
    assert prof.throughput_at(32) == (400.0, "") and prof.throughput_at(2) == (150.0, "")
    thr, how = prof.throughput_at(11)
    assert how == "interpolated" and thr == pytest.approx(330 + (380 - 330) * math.log(11 / 8) / math.log(2))
    assert prof.throughput_at(3) == (pytest.approx(150 + 100 * math.log(1.5) / math.log(2)), "interpolated")
    assert prof.throughput_at(64) == (400.0, "extrapolated")  # above the table: the largest's figure
    assert prof.throughput_at(1) == (75.0, "extrapolated")  # below: the smallest step's time, for fewer images
    one = load_profile(profile_file(tmp_path, 400))
    assert one.throughput_at(2) == (400.0, "") and one.throughput_at(32) == (400.0, "")
    assert load_profile(profile_file(tmp_path, None)).throughput_at(8) is None
    assert load_profile(profile_file(tmp_path, {"8": "300"})).throughput_at(8) == (300.0, "")
    assert interpolate({4: 100.0}, 16) == (100.0, "extrapolated")


@pytest.mark.parametrize(
    ("value", "message"),
    [({}, "an empty table"), ({0: 10}, "batch sizes"), ({"x": 10}, "batch sizes"), ({8: -1}, r"\[8\]: expected a positive number"),
     ({8: "fast"}, "positive number"), (-5, "positive number"), (True, "positive number"), ([400], "positive number")],
)
def test_bad_throughput_tables_are_one_line_errors(tmp_path: Path, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"throughput_images_per_s.*{message}"):
        load_profile(profile_file(tmp_path, value))


def write_measured(runs_root: Path, batch: int, images_per_s: float, processes: int = 8, model: str = "resnet50", image_size: int = 224,
                   seed: int = 0) -> None:
    """A run folder with measured epochs (images_per_s over all processes), as the trainer writes it."""
    cfg = config.load(None, [f"batch_per_gpu={batch}", f"model.name={model}", f"data.image_size={image_size}", f"seed={seed}"])
    folder = runs_root / config.run_id(cfg)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"run_id": config.run_id(cfg), **config.to_dict(cfg)}, sort_keys=False))
    (folder / "env.json").write_text(json.dumps({"processes": processes, "gpus_per_process": cfg.gpus // processes}))
    rows = [{"epoch": e, "images_per_s": images_per_s * (1 + 0.01 * e)} for e in range(3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def cfg_at(batch: int, *extra: str) -> config.RunConfig:
    return config.load(None, [f"batch_per_gpu={batch}", *extra])


def test_measured_runs_are_matched_by_model_image_size_and_batch(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_measured(runs, 32, 8 * 1000)
    write_measured(runs, 2, 8 * 100)
    write_measured(runs, 2, 8 * 999, model="resnet101")
    write_measured(runs, 2, 8 * 999, image_size=112)
    write_measured(runs, 2, 999, processes=1, seed=1)  # one process standing in for 8 GPUs: another layout
    assert measured(runs, cfg_at(32)) == "32: 1010"  # median of 1000, 1010 and 1020 per process
    assert measured(runs, cfg_at(2)) == "2: 101"  # not the batch-32 figure
    assert measured(runs, cfg_at(2), gpus_per_process=8) == "2: 1009"  # 999 x 1.01
    assert measured(runs, cfg_at(8)) is None


def measured(runs: Path, cfg: config.RunConfig, gpus_per_process: int = 1) -> str | None:
    """'<per-GPU batch>: <images/s per process>' as the estimates print a figure measured on earlier runs, else None."""
    prof = Profile(name="p", stand_in=gpus_per_process > 1, processes_per_job=cfg.gpus // gpus_per_process)
    hours, source = estimates.estimate_hours([cfg], prof, runs, gpu_records=runs / "none.jsonl")
    if hours is None:
        return None
    assert source.endswith(" (measured on 1 run(s))"), source
    return source.removeprefix("images/s per process by per-GPU batch: ").removesuffix(" (measured on 1 run(s))")


def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def record(batch: int, thr: float, device: str = "NVIDIA A100-SXM4-80GB", **extra: object) -> dict:
    return {"model": "resnet50", "image_size": 224, "batch_per_gpu": batch, "images_per_s_per_gpu": thr, "device": device, **extra}


def test_gpu_benchmark_records_are_a_source(tmp_path: Path) -> None:
    records = write_records(tmp_path / "gpu.jsonl", [
        record(32, 1200), record(32, 1300), record(2, 300), record(8, 9999, model="resnet101"),
        record(32, 500, device="Tesla V100-SXM2-32GB"), record(2, 50, device="Tesla V100-SXM2-32GB"),
        record(8, 1, norm="gn"), {"not": "a record"},
    ])
    prof = Profile(name="p", executor="slurm", gpus_per_node=8)
    hours, source = estimates.estimate_hours([cfg_at(32)], prof, tmp_path / "runs", gpu_records=records)
    assert hours == pytest.approx(100 * IMAGENET_TRAIN_IMAGES / 1200 / 3600)  # the median of the A100 and V100 records at 32
    assert "32: 1200 (GPU benchmark (NVIDIA A100-SXM4-80GB, Tesla V100-SXM2-32GB))" in source
    a100 = Profile(name="p", executor="slurm", gpus_per_node=8, gpu="a100")
    _, source = estimates.estimate_hours([cfg_at(32), cfg_at(8)], a100, tmp_path / "runs", gpu_records=records)
    assert "32: 1300, 8: 800 interpolated (GPU benchmark (NVIDIA A100-SXM4-80GB))" in source  # the A100's, not gn's, records
    _, source = estimates.estimate_hours([cfg_at(8, "norm.name=gn")], a100, tmp_path / "runs", gpu_records=records)
    assert "8: 1 (GPU benchmark" in source  # the run's norm's records first


def test_sources_in_order_measured_then_records_then_profile(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_measured(runs, 32, 8 * 1000)
    records = write_records(tmp_path / "gpu.jsonl", [record(32, 700), record(16, 600)])
    prof = load_profile(profile_file(tmp_path, TABLE))
    cfgs = [cfg_at(b) for b in (32, 16, 8, 2, 64)]
    measured = estimates._measured(runs, {("resnet50", 224)})
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    got = {c.batch_per_gpu: estimates.throughput(c, prof, measured, recs) for c in cfgs}
    assert got[32][:2] == (pytest.approx(1010), "measured on 1 run(s)")
    assert got[16] == (600.0, "GPU benchmark (NVIDIA A100-SXM4-80GB)", "")
    assert got[8] == (330.0, "profile p's table", "")  # the records would only extrapolate below 16
    assert got[2] == (150.0, "profile p's table", "")
    assert got[64] == (700.0, "GPU benchmark (NVIDIA A100-SXM4-80GB)", "extrapolated")  # every source extrapolates: the first
    hours, source = estimates.estimate_hours(cfgs, prof, runs, gpu_records=records)
    assert "measured on 1 run(s)" in source and "GPU benchmark" in source and "profile p's table" in source and "extrapolated" in source
    assert hours == pytest.approx(sum(100 * IMAGENET_TRAIN_IMAGES / t[0] / 3600 for t in got.values()))


def test_a_sweep_from_32_to_2_images_per_gpu_costs_more_hours_at_2(tmp_path: Path) -> None:
    prof = load_profile(ROOT / "slurm" / "profiles" / "example-cluster.yaml")
    runs = [r.config for r in sweep.load(ROOT / "sweeps" / "paper" / "fig1_batch_size.yaml").runs]
    by_batch = {b: estimates.estimate_hours([c for c in runs if c.batch_per_gpu == b], prof, tmp_path / "runs",
                                            gpu_records=tmp_path / "none.jsonl")[0] for b in (32, 16, 8, 4, 2)}
    assert by_batch[2] > by_batch[4] > by_batch[8] > by_batch[16] > by_batch[32]
    assert by_batch[2] / by_batch[32] == pytest.approx(400 / 150)


def test_no_figure_for_a_batch_is_unknown_hours(tmp_path: Path) -> None:
    hours, why = estimates.estimate_hours([cfg_at(4)], Profile(name="p"), tmp_path / "runs", gpu_records=tmp_path / "none.jsonl")
    assert hours is None and "at 4 images per GPU" in why and "throughput_images_per_s" in why
