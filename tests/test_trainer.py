"""Trainer: the run folder contract, divergence and failure, exact resume, per-GPU semantics across processes."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    RUN,
    TINY,
    ablation,
    ablation_ok,
    assert_same_run,
    assert_twin_mirrors,
    metrics_without_time,
    predictions,
    run_folder,
    weights,
)

from ablation import config, rundir
from ablation.faults import FAULT_ENV
from ablation.train.distributed import DistEnv
from ablation.train.trainer import train


def test_config_json_twin_is_written_and_restored(tmp_path: Path) -> None:
    """write_config writes config.yaml and config.json with the same values; a restart of a folder without the twin
    (an older version's, or a crash between the two files) writes it; a config JSON cannot hold gets config.yaml alone."""
    from ablation.train import bookkeeping

    cfg = config.load(None, ["norm.name=gn", "norm.options={alpha: 0.5}"])
    rd = rundir.RunDir(tmp_path / "a")
    rd.root.mkdir()
    bookkeeping.write_config(rd, cfg, config.derive(cfg))
    written = yaml.safe_load(rd.config.read_text())
    assert json.loads(rd.config_json.read_text()) == written and written["run_id"] == config.run_id(cfg)
    rd.config_json.unlink()
    before = rd.config.read_bytes()
    bookkeeping.write_config(rd, cfg, config.derive(cfg))
    assert rd.config.read_bytes() == before and json.loads(rd.config_json.read_text()) == written
    odd = config.load(None, ["norm.options={x: .inf}"])  # JSON has no infinity (config_hash refuses dates and non-text keys)
    rd = rundir.RunDir(tmp_path / "b")
    rd.root.mkdir()
    bookkeeping.write_config(rd, odd, config.derive(odd))
    assert rd.config.exists() and not rd.config_json.exists()


def test_run_folder_contract(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation_ok(["train", *RUN, f"data.root={tiny_data}", "--results", str(tmp_path)], cli_env)
    folder = run_folder(proc)
    cfg = config.load(None, RUN + [f"data.root={tiny_data}"])
    assert folder == tmp_path / config.run_id(cfg)
    assert {p.name for p in folder.iterdir()} >= {"config.yaml", "env.json", "metrics.jsonl", "checkpoint.pt", "final.json", "train.log"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    written = yaml.safe_load((folder / "config.yaml").read_text())
    assert json.loads((folder / "config.json").read_text()) == written  # its JSON twin, what the aggregator reads
    # config.yaml holds the config with every default resolved (norm.eps null -> the norm's paper eps)
    assert written["run_id"] == folder.name and config.from_dict(written) == config.normalized(cfg)
    assert written["derived"] == {
        "global_batch": 16, "lr": pytest.approx(0.1 * 16 / 256), "eval_resize": 16, "train_images": 192,
        "steps_per_epoch": 12, "total_steps": 24, "milestone_steps": [7, 14, 22], "warmup_steps": 0,
        "num_classes": 4, "val_images": 32,  # the dataset's counts, what the report knows ImageNet-1k by
    }

    env = json.loads((folder / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["processes"] == 1 and env["gpus_per_process"] == 4
    assert env["data"]["train_images"] == 192 and len(env["starts"]) == 1
    assert set(env["torch_backends"]) == {"cudnn_benchmark", "matmul_fp32_precision", "conv_fp32_precision"}
    import PIL
    from PIL import features

    assert env["decode"]["pillow"] == PIL.__version__ and env["decode"]["pillow_jpeg"] == features.version("jpg")
    assert env["decode"]["pillow_libjpeg_turbo"] == features.version("libjpeg_turbo")
    assert env["decode"]["torchvision_image_backend"] == "PIL"

    rows = rundir.read_jsonl(folder / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all(tuple(r) == rundir.METRIC_KEYS for r in rows)
    assert all(0 <= r["val_err1"] <= 100 and r["val_err5"] <= r["val_err1"] and r["images_per_s"] > 0 for r in rows)
    assert rows[1]["lr"] == pytest.approx(0.1 * 16 / 256 * 0.001)  # all three drops passed by the last step
    assert_twin_mirrors(folder)  # metrics.npy: the same rows, values and types, for the aggregator
    assert (folder / rundir.METRICS_COLUMNS).exists()

    final = json.loads((folder / "final.json").read_text())
    assert final["status"] == "ok" and final["reason"] is None
    assert final["val_err1"] == statistics.median([r["val_err1"] for r in rows])  # last min(5, 2) epochs
    assert final["epochs_done"] == 2 and final["steps"] == 24 and final["gpu_hours"] == 0.0

    # Started again: nothing is trained and nothing is rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = ablation_ok(["train", *RUN, f"data.root={tiny_data}", "--results", str(tmp_path)], cli_env)
    assert "already finished (ok" in again.stdout and run_folder(again) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"}


def test_diverging_run_ends_as_diverged_with_the_step(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["train", *RUN, f"data.root={tiny_data}", "optim.lr=1e6", "--results", str(tmp_path)], cli_env)
    assert proc.returncode == 3, proc.stderr
    assert "error: run diverged: loss is" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    final = json.loads((run_folder(proc) / "final.json").read_text())
    assert final["status"] == "diverged" and final["diverged_step"] < 24 and "at step" in final["reason"]


def test_unreadable_image_fails_the_run_and_a_rerun_resumes(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "train").rglob("*.JPEG"))[5]
    good = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    args = ["train", *RUN, f"data.root={data}", "--results", str(tmp_path / "runs")]
    proc = ablation(args, cli_env)
    assert proc.returncode == 2 and victim.name in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    folder = run_folder(proc)
    final = json.loads((folder / "final.json").read_text())
    assert final["status"] == "failed" and victim.name in final["reason"]

    victim.write_bytes(good)  # the user fixes the file and starts the same run again
    proc = ablation_ok(args, cli_env)
    assert json.loads((folder / "final.json").read_text())["status"] == "ok"


def test_optimizer_decays_gamma_and_beta_unless_told_not_to() -> None:
    from ablation.train.models import create_model
    from ablation.train.optim import build_optimizer

    cfg = config.load(None, TINY)
    model = create_model(cfg, 4)
    opt = build_optimizer(cfg, model)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())
    timm_style = build_optimizer(config.replace(cfg, **{"optim.no_decay_1d": True}), model)
    decay, no_decay = timm_style.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert norm_params <= {id(p) for p in no_decay["params"]}


def test_a_locked_run_folder_is_refused(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    import fcntl

    cfg = config.load(None, RUN + [f"data.root={tiny_data}"])
    folder = tmp_path / config.run_id(cfg)
    folder.mkdir()
    with open(folder / ".lock", "w") as f:
        f.write("pid 12345 on somehost")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        proc = ablation(["train", *RUN, f"data.root={tiny_data}", "--results", str(tmp_path)], cli_env)
    assert proc.returncode == 2 and "is in use by pid 12345 on somehost" in proc.stderr
    assert not (folder / "final.json").exists()


def test_a_corrupt_checkpoint_is_a_clear_error(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    cfg = config.load(None, RUN + [f"data.root={tiny_data}"])
    folder = tmp_path / config.run_id(cfg)
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"garbage")
    proc = ablation(["train", *RUN, f"data.root={tiny_data}", "--results", str(tmp_path)], cli_env)
    assert proc.returncode == 2 and "checkpoint.pt: cannot load checkpoint" in proc.stderr


def test_gpus_must_be_a_multiple_of_the_processes(tiny_data: Path, tmp_path: Path) -> None:
    cfg = config.load(None, RUN + [f"data.root={tiny_data}"])
    with pytest.raises(config.ConfigError, match=r"gpus \(4\) must be a multiple of the number of processes \(3\)"):
        train(cfg, tmp_path / "run", env=DistEnv(rank=0, world_size=3))
    assert not (tmp_path / "run" / "final.json").exists()


def test_missing_dataset_is_a_clear_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["train", *RUN, f"data.root={tmp_path / 'nowhere'}", "--results", str(tmp_path)], cli_env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "nowhere" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [] and proc.stdout == ""  # no run folder for a run that never started


@pytest.mark.parametrize("pipeline", ["split", "device-decode"])
def test_split_pipelines_train_end_to_end(pipeline: str, tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    # Loader workers ship uint8 pixels (split) or JPEG bytes (device-decode) with their parameters;
    # decoding (device-decode) and the photometric steps run in the trainer.
    args = ["train", *RUN, f"data.root={tiny_data}", f"data.pipeline={pipeline}", "data.workers=2"]
    folder = run_folder(ablation_ok([*args, "--results", str(tmp_path)], cli_env))
    cfg = config.load(None, RUN + [f"data.root={tiny_data}", f"data.pipeline={pipeline}"])
    assert folder.name == config.run_id(cfg) != config.run_id(config.load(None, RUN + [f"data.root={tiny_data}"]))
    assert yaml.safe_load((folder / "config.yaml").read_text())["data"]["pipeline"] == pipeline
    rows = rundir.read_jsonl(folder / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 < r["train_loss"] < 10 and 0 <= r["val_err1"] <= 100 for r in rows)
    assert json.loads((folder / "final.json").read_text())["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["reference", "split"])
def test_killed_run_resumes_mid_epoch_and_matches_an_uninterrupted_run(pipeline: str, tiny_data: Path, tmp_path: Path,
                                                                        cli_env: dict[str, str]) -> None:
    args = ["train", *RUN, "epochs=3", f"data.root={tiny_data}", f"data.pipeline={pipeline}", "checkpoint_every_steps=5", "log_steps=true"]
    whole = run_folder(ablation_ok([*args, "--results", str(tmp_path / "whole")], cli_env))

    killed_env = {**cli_env, FAULT_ENV: "step:18:kill"}  # last checkpoint before the kill: step 15, mid epoch 2
    proc = ablation([*args, "--results", str(tmp_path / "resumed")], killed_env)
    assert proc.returncode == -9
    folder = tmp_path / "resumed" / whole.name
    assert not (folder / "final.json").exists() and len(rundir.read_jsonl(folder / "metrics.jsonl")) == 1
    assert_twin_mirrors(folder)  # the kill left the twin mirroring the record
    resumed = run_folder(ablation_ok([*args, "--results", str(tmp_path / "resumed")], cli_env))

    starts = json.loads((resumed / "env.json").read_text())["starts"]
    assert [s["resumed_from_step"] for s in starts] == [0, 15]
    assert_same_run(whole, resumed)
    fa, fb = (json.loads((f / "final.json").read_text()) for f in (whole, resumed))
    assert (fa["val_err1"], fa["steps"]) == (fb["val_err1"], fb["steps"])


PRECISE = "norm.precise_bn_images=20"  # PreciseBN on: its moments are averaged across processes


@pytest.mark.slow
@pytest.mark.parametrize(
    "norm",
    [
        ["norm.running_stats=rank0"],
        ["norm.running_stats=mean"],
        # the batch-dependent variants, with PreciseBN
        ["norm.name=brn", "norm.running_stats=rank0", PRECISE],
        ["norm.name=brn", "norm.running_stats=mean", PRECISE],
        ["norm.name=evonorm_b0", "norm.running_stats=rank0", PRECISE],
        ["norm.running_stats=mean", PRECISE],
    ],
    ids=["bn-rank0", "bn-mean", "brn-rank0-precise", "brn-mean-precise", "evonorm_b0-rank0-precise", "bn-mean-precise"],
)
def test_four_processes_equal_one_process_standing_in_for_four(norm: list[str], tiny_data: Path, tmp_path: Path,
                                                               cli_env: dict[str, str]) -> None:
    """Losses, weights, running statistics and metrics of 4 torchrun processes equal one process standing in for 4 GPUs."""
    args = ["train", *RUN, *norm, f"data.root={tiny_data}", "log_steps=true"]
    multi = run_folder(ablation_ok([*args, "--results", str(tmp_path / "multi")], cli_env, ranks=4))  # as torchrun's 4 workers
    single = run_folder(ablation_ok([*args, "--results", str(tmp_path / "single")], cli_env))
    assert multi.name == single.name
    assert json.loads((multi / "env.json").read_text())["processes"] == 4

    steps_m, steps_s = rundir.read_jsonl(multi / "steps.jsonl"), rundir.read_jsonl(single / "steps.jsonl")
    assert len(steps_m) == len(steps_s) == 24
    torch.testing.assert_close(torch.tensor([r["loss"] for r in steps_m]), torch.tensor([r["loss"] for r in steps_s]), rtol=1e-4, atol=1e-5)
    wm, ws = weights(multi), weights(single)
    assert wm.keys() == ws.keys()
    running = [k for k in wm if k.endswith(("running_mean", "running_var", "running_std"))]  # brn keeps sigma itself
    assert running
    for k in wm:
        torch.testing.assert_close(wm[k].float(), ws[k].float(), rtol=1e-4, atol=1e-5, msg=k)
    vm, vs = metrics_without_time(multi), metrics_without_time(single)
    for a, b in zip(vm, vs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert abs(a["val_err1"] - b["val_err1"]) <= 100 / 32  # at most one of 32 val images flips
    # Per-image results: the same images in the same (the dataset's) order whatever the sharding; the same top-k, but
    # for at most one image, since the weights agree to 1e-4 (test_predictions: byte for byte when the weights are equal).
    pm, ps = predictions(multi), predictions(single)
    assert sorted(pm) == sorted(ps) == ["epoch_001.npy", "epoch_002.npy", "labels.npy", "val.json"]
    assert (pm["labels.npy"], pm["val.json"]) == (ps["labels.npy"], ps["val.json"])
    for epoch in (1, 2):
        tm, ts = rundir.read_predictions(multi, epoch)[1], rundir.read_predictions(single, epoch)[1]
        assert tm.shape == ts.shape == (32, 4) and (tm != ts).any(1).sum() <= 1


def test_bn_stats_are_synced_before_evaluations_and_checkpoints_only_and_no_step_builds_host_tensors(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ablation.norms import PerGPUBatchNorm2d
    from ablation.train import loop

    synced_after: list[int] = []  # training steps done at each sync (a BN layer's batch count)
    real_sync = loop.sync_running_stats

    def sync(model: torch.nn.Module) -> None:
        synced_after.append(int(next(m for m in model.modules() if isinstance(m, PerGPUBatchNorm2d)).num_batches_tracked))
        real_sync(model)

    host_built: list[str] = []  # functions that built a device tensor from host values
    real_tensor = torch.tensor

    def tensor(*args, **kwargs):  # noqa: ANN002, ANN003
        if "device" in kwargs:
            host_built.append(sys._getframe(1).f_code.co_name)
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(loop, "sync_running_stats", sync)
    monkeypatch.setattr(torch, "tensor", tensor)
    cfg = config.load(None, RUN + [f"data.root={tiny_data}", "checkpoint_every_steps=5", "checkpoint_every_minutes=0",
                                   "log_every_steps=1000"])
    assert train(cfg, tmp_path / "run")["status"] == "ok"
    # 12 steps per epoch: checkpoints at steps 5, 10, 15, 20; evaluations (then epoch checkpoints) at 12 and 24.
    assert synced_after == [5, 10, 12, 15, 20, 24]
    assert not {"run_epoch", "evaluate"} & set(host_built), host_built


def test_cuda_backends_follow_the_config_and_are_recorded() -> None:
    from ablation.train.bookkeeping import backend_settings, configure_backends, set_backends

    before = backend_settings()
    assert set(before) == {"cudnn_benchmark", "matmul_fp32_precision", "conv_fp32_precision"}
    try:
        configure_backends(config.load(None, TINY + ["tf32=true"]), DistEnv(device="cpu"))
        assert backend_settings() == before  # nothing changes on the CPU
        configure_backends(config.load(None, TINY + ["tf32=true"]), DistEnv(device="cuda"))
        assert backend_settings() == {"cudnn_benchmark": True, "matmul_fp32_precision": "tf32", "conv_fp32_precision": "tf32"}
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # torch's own reading agrees
        configure_backends(config.load(None, TINY + ["tf32=false"]), DistEnv(device="cuda:0"))
        assert backend_settings() == {"cudnn_benchmark": True, "matmul_fp32_precision": "ieee", "conv_fp32_precision": "ieee"}
        set_backends({"matmul_fp32_precision": "ieee", "conv_fp32_precision": "tf32"})
        configure_backends(config.load(None, TINY), DistEnv(device="cuda"))  # tf32 unset: what torch had stays
        assert backend_settings() == {"cudnn_benchmark": True, "matmul_fp32_precision": "ieee", "conv_fp32_precision": "tf32"}
    finally:
        set_backends(before)
    assert backend_settings() == before  # restored through the same API, for the tests after this one


def test_every_modelled_gpu_sees_the_same_images_whatever_the_process_count() -> None:
    from ablation.norms import split_per_gpu
    from ablation.train.loaders import GlobalBatchSampler

    cfg = config.load(None, TINY + ["gpus=8", "batch_per_gpu=3"])
    d = config.derive(cfg, 200)

    def per_gpu(world: int) -> list[list[list[int]]]:
        """[step][modelled GPU] -> that GPU's image indices, read the way per-GPU BN reads a process batch."""
        steps: list[list[list[int]]] = [[] for _ in range(d.steps_per_epoch)]
        for rank in range(world):
            sampler = GlobalBatchSampler(200, d, cfg, rank, world)
            sampler.set_epoch(1)
            for s, batch in enumerate(sampler):
                rows = torch.tensor([i for _, i in batch])
                steps[s] += [chunk.tolist() for chunk in split_per_gpu(rows, 8 // world)]
        return steps

    real = per_gpu(8)  # one process per GPU
    assert len(real) == 8 and all(len(gpus) == 8 and all(len(g) == 3 for g in gpus) for gpus in real)
    for world in (1, 2, 4):
        assert per_gpu(world) == real


def test_device_decode_on_a_cpu_warns_once_and_records_where_it_decoded(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """device-decode on a CPU device saves no CPU and decodes with libjpeg-turbo, not nvJPEG: said once, recorded in env.json."""
    run = [*TINY, "gpus=1", "batch_per_gpu=16", "epochs=1", "data.pipeline=device-decode", "device=cpu"]
    proc = ablation_ok(["train", *run, f"data.root={tiny_data}", "--results", str(tmp_path)], cli_env)
    warned = [line for line in proc.stdout.splitlines() if "data.pipeline=device-decode on a CPU device" in line]  # the log
    assert len(warned) == 1 and "no CPU is saved" in warned[0]
    env = json.loads((run_folder(proc) / "env.json").read_text())
    assert env["decoded_on"] == "cpu" and [s["decoded_on"] for s in env["starts"]] == ["cpu"]
