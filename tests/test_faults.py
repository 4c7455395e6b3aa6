"""Field faults: set-up failures, failing ranks, stop signals, crafted checkpoints and full disks."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env
from helpers import FAULT_ARGS, ROOT, RUN, TINY, ablation, ablation_ok, assert_same_run, run_folder

from ablation import config, rundir
from ablation.faults import FAULT_ENV, FAULT_RANK_ENV

# 3 epochs of 12 steps, a checkpoint every 5 steps, one line per step: every kind of resume point.
ARGS = FAULT_ARGS


@pytest.fixture(scope="module")
def whole(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must equal, bit for bit."""
    return run_folder(ablation_ok([*ARGS, f"data.root={tiny_data}", "--results", str(tmp_path_factory.mktemp("whole"))], subprocess_env()))


def final(folder: Path) -> dict:
    """final.json of a run folder."""
    return json.loads((folder / "final.json").read_text())


# ---------------------------------------------------------------- set-up failures and retries


def test_a_setup_failure_is_failed_with_its_cause_and_counted(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    args = [*ARGS, f"data.root={tiny_data}", "--results", str(tmp_path)]
    for n in (1, 2):
        proc = ablation(args, {**cli_env, FAULT_ENV: "setup:1:raise"})
        assert proc.returncode == 1 and "injected fault at setup" in proc.stderr
        folder = run_folder(proc)
        doc = final(folder)
        assert doc["status"] == "failed" and doc["stage"] == "setup" and "injected fault at setup" in doc["reason"]
        assert doc["failures"] == n and len(rundir.read_jsonl(folder / "failures.jsonl")) == n
    assert final(run_folder(ablation_ok(args, cli_env)))["status"] == "ok"  # the cause went away: the run completes
    assert len(rundir.read_jsonl(folder / "failures.jsonl")) == 2  # the history stays


def test_a_local_sweep_retries_a_failing_run_then_leaves_it_failed(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    spec = tmp_path / "one.yaml"
    base = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in [*TINY, "gpus=2", "batch_per_gpu=4", "epochs=1"])}
    spec.write_text(yaml.safe_dump({"name": "one", "base": base, "grid": {"norm.name": ["bn"]}}))
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"name": "here", "executor": "local", "stand_in": True, "array_parallelism": 1, "retries": 2}))
    sweep = ["sweep", str(spec), f"data.root={tiny_data}", "--profile", str(profile), "--results", str(tmp_path / "res")]
    proc = ablation(sweep, {**cli_env, FAULT_ENV: "step:3:raise"})
    assert proc.returncode == 1
    assert "retry 1 of 2" in proc.stdout and "retry 2 of 2" in proc.stdout and "retry 3" not in proc.stdout
    (folder,) = (tmp_path / "res" / "one" / "runs").iterdir()
    assert len(rundir.read_jsonl(folder / "failures.jsonl")) == 3 and final(folder)["stage"] == "train"
    status = ablation_ok(["status", str(tmp_path / "res" / "one")], cli_env)
    assert "failed (x3 starts, 3 failures)" in status.stdout and "1 runs: 1 failed" in status.stdout
    again = ablation_ok(sweep, cli_env)  # a failed run stays failed until the user asks for it
    assert "skip (failed: use --retry-failed)" in again.stdout or "nothing to submit" in again.stdout
    assert final(folder)["status"] == "failed"


# ---------------------------------------------------------------- checkpoints and disks


class _Evil:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_never_runs_code(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    cfg = config.load(None, ARGS[1:] + [f"data.root={tiny_data}"])
    folder = tmp_path / config.run_id(cfg)
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"state": _Evil(marker)}, folder / "checkpoint.pt")
    assert pickle.loads(pickle.dumps(_Evil(tmp_path / "probe"))) == 0 and (tmp_path / "probe").exists()  # the payload works
    proc = ablation([*ARGS, f"data.root={tiny_data}", "--results", str(tmp_path)], cli_env)
    assert proc.returncode == 2 and not marker.exists()
    assert len(proc.stderr.strip().splitlines()) == 1 and "checkpoint.pt: cannot load checkpoint" in proc.stderr
    assert final(folder)["status"] == "failed" and "checkpoint.pt" in final(folder)["reason"]


def test_a_full_disk_keeps_the_last_checkpoint_and_resumes(whole: Path, tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    args = [*ARGS, f"data.root={tiny_data}", "--results", str(tmp_path)]
    proc = ablation(args, {**cli_env, FAULT_ENV: "write:checkpoint.pt:2:enospc"})  # the 2nd save (step 10) fails
    assert proc.returncode == 75, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "disk full" in proc.stderr and "previous checkpoint is intact" in proc.stderr
    folder = tmp_path / whole.name
    assert not (folder / "final.json").exists() and not (folder / "failures.jsonl").exists()  # not a failure of the run
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["state"]["step"] == 5
    assert not list(folder.glob(".*.tmp"))
    resumed = run_folder(ablation_ok(args, cli_env))
    assert [s["resumed_from_step"] for s in json.loads((resumed / "env.json").read_text())["starts"]] == [0, 5]
    assert_same_run(whole, resumed)


# ---------------------------------------------------------------- stop signals


@pytest.mark.parametrize(
    "fault, step, stage",
    [("step:7:term", 7, "train"), ("step:7:usr2", 7, "train"), ("eval:1:term", 12, "eval"), ("write:checkpoint.pt:1:term", 6, "train")],
)
def test_a_stop_signal_checkpoints_at_the_next_boundary_and_resumes_bitwise(
    fault: str, step: int, stage: str, whole: Path, tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    args = [*ARGS, f"data.root={tiny_data}", "--results", str(tmp_path)]
    proc = ablation(args, {**cli_env, FAULT_ENV: fault})
    assert proc.returncode == 4, proc.stderr  # interrupted: checkpointed, not failed
    folder = run_folder(proc)
    start = json.loads((folder / "env.json").read_text())["starts"][0]
    assert (start["stopped_at_step"], start["stopped_in"]) == (step, stage)
    assert start["stop_signal"] == ("SIGUSR2" if fault.endswith("usr2") else "SIGTERM") and 0 <= start["signal_to_checkpoint_s"] < 30
    assert f"checkpoint written {start['signal_to_checkpoint_s']:.2f}s after" in proc.stdout
    assert not (folder / "final.json").exists() and torch.load(folder / "checkpoint.pt", weights_only=True)["state"]["step"] == step
    resumed = run_folder(ablation_ok(args, cli_env))
    assert_same_run(whole, resumed)


def test_sigterm_to_a_running_trainer_stops_it_cleanly(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A real signal from outside, at whatever step it lands (epochs long enough that it lands mid-run)."""
    args = ["train", *RUN, "epochs=40", f"data.root={tiny_data}", "--results", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "ablation", *args], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    folder = tmp_path / config.run_id(config.load(None, args[1:-2]))
    deadline = time.monotonic() + 120
    while not rundir.read_jsonl(folder / "metrics.jsonl") and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.terminate()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    start = json.loads((folder / "env.json").read_text())["starts"][0]
    assert start["stop_signal"] == "SIGTERM" and start["signal_to_checkpoint_s"] < 30
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["state"]["step"] == start["stopped_at_step"]


def test_a_sweep_warns_when_the_signal_comes_too_late_for_a_checkpoint(tmp_path: Path, cli_env: dict[str, str]) -> None:
    doc = yaml.safe_load((ROOT / "slurm" / "profiles" / "example-cluster.yaml").read_text())
    for delay, warned in ((1, True), (90, False)):
        profile = tmp_path / f"p{delay}.yaml"
        profile.write_text(yaml.safe_dump({**doc, "signal_delay_s": delay}))
        proc = ablation_ok(["sweep", str(ROOT / "sweeps" / "paper" / "table1_norms.yaml"), "--dry-run", "--no-data-check", "--profile",
                            str(profile), "--results", str(tmp_path)], cli_env)
        assert ("signal_delay_s=1 is shorter than" in proc.stderr) is warned, proc.stderr
        assert ("a resnet50 checkpoint is ~204 MB" in proc.stderr) is warned


# ---------------------------------------------------------------- one failing rank


@pytest.mark.slow
@pytest.mark.parametrize("rank", [3, 0])
def test_one_failing_rank_ends_every_rank_with_its_cause(rank: int, tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    env = {**cli_env, FAULT_ENV: "step:5:raise", FAULT_RANK_ENV: str(rank), "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    t0 = time.monotonic()
    proc = ablation([*ARGS, f"data.root={tiny_data}", "--results", str(tmp_path)], env, launcher=torchrun)
    took = time.monotonic() - t0
    assert proc.returncode != 0 and took < 120, (took, proc.stderr[-2000:])
    (folder,) = tmp_path.iterdir()
    doc = final(folder)
    assert doc["status"] == "failed" and doc["failed_rank"] == rank and doc["stage"] == "train"
    assert doc["reason"] == f"rank {rank}: RuntimeError: injected fault at step #5"
    assert len(rundir.read_jsonl(folder / "failures.jsonl")) == 1
