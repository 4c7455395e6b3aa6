"""Sweeps through real SLURM (slurm/local-cluster.sh): arrays, DDP over tasks, time-limit requeue.

Skipped where SLURM is absent, except in CI (CI set), where a missing cluster is a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import require_slurm
from helpers import ROOT, TIME_KEYS, ablation_ok

from ablation import rundir

pytestmark = pytest.mark.slow

require_slurm()

REQUEUE_SETTLE_S = 3  # seconds a requeued job is left pending before the test lets it start
TINY_BASE = {
    "gpus": 4,
    "batch_per_gpu": 8,
    "device": "cpu",
    "model": {"name": "resnet18", "widths": [8, 16, 16, 16], "stem_width": 8, "stem": "small"},
    "data": {"image_size": 16, "eval_resize": 16, "workers": 0, "eval_batch": 64},
    "log_every_steps": 2,
}


def profile(tmp_path: Path, **changes: object) -> Path:
    """slurm/profiles/local.yaml with changes, written to tmp_path."""
    doc = yaml.safe_load((ROOT / "slurm" / "profiles" / "local.yaml").read_text())
    doc.update(changes)
    path = tmp_path / f"profile-{abs(hash(json.dumps(changes, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def spec(tmp_path: Path, name: str, data: Path, **base: object) -> Path:
    """A one-run sweep spec: BN on the tiny model."""
    doc = {"name": name, "base": {**TINY_BASE, **base, "data": {**TINY_BASE["data"], "root": str(data)}}, "grid": {"norm.name": ["bn"]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def wait_for(sweep_dir: Path, env: dict[str, str], timeout: float, *, hurry_requeues: bool = False) -> list[str]:
    """Poll `ablation status` until every run has ended; return the status outputs seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    hurry_at = None
    while time.monotonic() < deadline:
        out = ablation_ok(["status", str(sweep_dir)], env).stdout
        if not seen or out != seen[-1]:
            seen.append(out)
        last = out.strip().splitlines()[-1]
        if not any(k in last for k in ("running", "pending", "requeued", "stopped", "new")):
            return seen
        if hurry_requeues and "requeued" in out:
            # SLURM holds a requeued job ~2 minutes (BeginTime); let it start sooner to keep the test short, but
            # not at once: slurmd revokes the job's credential at the requeue, to the second, and kills a start
            # within that second as "non-startable batch job: Job credential revoked" (seen in CI).
            hurry_at = hurry_at or time.monotonic() + REQUEUE_SETTLE_S
            if time.monotonic() >= hurry_at:
                for job in {json.loads(line)["job_id"] for line in (sweep_dir / "jobs.jsonl").read_text().splitlines()}:
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        else:
            hurry_at = None
        time.sleep(2)
    raise AssertionError("sweep did not finish in time:\n" + "\n".join(seen[-3:]) + job_logs(sweep_dir))


def job_logs(sweep_dir: Path, lines: int = 8) -> str:
    """The last lines of each job's submitit logs, for a failure message."""
    out = []
    for log in sorted((sweep_dir / "slurm").glob("*/*_log.*")):
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
        out.append(f"\n--- {log.relative_to(sweep_dir)}\n" + "\n".join(tail))
    return "".join(out)


def metrics(folder: Path) -> list[dict]:
    """metrics.jsonl rows without timing fields."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rundir.read_jsonl(folder / "metrics.jsonl")]


def test_tiny_sweep_through_slurm_matches_in_process_runs(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    sweep = ROOT / "sweeps" / "tiny.yaml"
    # 4 runs, arrays of at most 3, 2 at a time: the sweep is split in two arrays, the second waiting for the first.
    prof = profile(tmp_path, max_array_size=3, array_parallelism=2)
    slurm = ablation_ok(["sweep", str(sweep), f"data.root={tiny_data}", "--results", str(tmp_path / "slurm"), "--profile", str(prof)],
                        cli_env)
    first, _ = [line.split()[2].rstrip(":") for line in slurm.stdout.splitlines() if line.startswith("submitted array")]
    assert f"after array {first})" in slurm.stdout
    wait_for(tmp_path / "slurm" / "tiny", cli_env, 300)
    spans = {}
    for row in rundir.read_jsonl(tmp_path / "slurm" / "tiny" / "jobs.jsonl"):
        link = tmp_path / "slurm" / "tiny" / "runs" / row["run_id"]
        started = json.loads((link / "env.json").read_text())["starts"][0]["time"]
        spans[row["job_id"]] = (started, json.loads((link / "final.json").read_text())["finished_at"])
    firsts = [span for job, span in spans.items() if job.startswith(first + "_")]
    (later,) = [span for job, span in spans.items() if not job.startswith(first + "_")]
    assert len(firsts) == 3 and later[0] >= max(end for _, end in firsts)  # afterany: the second array waited
    assert max(start for start, _ in firsts) >= min(end for _, end in firsts)  # never all 3 at once: the throttle held
    ablation_ok(["sweep", str(sweep), f"data.root={tiny_data}", "--results", str(tmp_path / "debug"), "--executor", "debug"], cli_env)
    for link in sorted((tmp_path / "slurm" / "tiny" / "runs").iterdir()):
        final = json.loads((link / "final.json").read_text())
        assert final["status"] == "ok", final
        assert json.loads((link / "env.json").read_text())["slurm"]["SLURM_JOB_ID"]  # a one-job array is submitted as a plain job
        assert metrics(link) == metrics(tmp_path / "debug" / "runs" / link.name)
    again = ablation_ok(["sweep", str(sweep), f"data.root={tiny_data}", "--results", str(tmp_path / "slurm"), "--profile",
                         str(profile(tmp_path))], cli_env)
    assert "nothing to submit" in again.stdout


def test_ddp_over_two_slurm_tasks(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    s = spec(tmp_path, "ddp", tiny_data, epochs=2)
    ablation_ok(["sweep", str(s), "--results", str(tmp_path / "slurm"), "--profile", str(profile(tmp_path, processes_per_job=2))], cli_env)
    wait_for(tmp_path / "slurm" / "ddp", cli_env, 300)
    ablation_ok(["sweep", str(s), "--results", str(tmp_path / "one"), "--executor", "debug"], cli_env)
    (link,) = (tmp_path / "slurm" / "ddp" / "runs").iterdir()
    assert json.loads((link / "final.json").read_text())["status"] == "ok"
    env = json.loads((link / "env.json").read_text())
    assert env["processes"] == 2 and env["gpus_per_process"] == 2 and env["slurm"]["SLURM_NTASKS"] == "2"
    two, one = metrics(link), metrics(tmp_path / "one" / "runs" / link.name)
    for a, b in zip(two, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def assert_stopped_requeued_and_as_if_uninterrupted(link: Path, signal: str, spec_path: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """The run stopped on `signal` (its checkpoint timed), resumed where it stopped, ended ok and equals an uninterrupted run."""
    starts = json.loads((link / "env.json").read_text())["starts"]
    assert len(starts) >= 2 and all(s["resumed_from_step"] > 0 for s in starts[1:])
    assert starts[0]["stop_signal"] == signal and starts[1]["resumed_from_step"] == starts[0]["stopped_at_step"]
    print(f"\n{signal} -> checkpoint written in {starts[0]['signal_to_checkpoint_s']} s (step {starts[0]['stopped_at_step']})",
          file=sys.stderr)
    assert 0 <= starts[0]["signal_to_checkpoint_s"] < 30
    assert json.loads((link / "final.json").read_text())["status"] == "ok"
    ablation_ok(["sweep", str(spec_path), "--results", str(tmp_path / "whole"), "--executor", "debug"], env)
    whole = tmp_path / "whole" / "runs" / link.name
    assert metrics(link) == metrics(whole)
    a = torch.load(link / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_limit_requeues_and_the_run_ends_as_if_uninterrupted(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    # A 1-minute limit with the signal 45 s early stops each start after ~15 s; 200 epochs take longer
    # than that on any machine (about 40 s here: 60 epochs, once enough, now fit in one start).
    s = spec(tmp_path, "requeue", tiny_data, epochs=200)
    prof = profile(tmp_path, time_min=1, signal_delay_s=45, max_requeues=12)
    ablation_ok(["sweep", str(s), "--results", str(tmp_path / "slurm"), "--profile", str(prof)], cli_env)
    seen = wait_for(tmp_path / "slurm" / "requeue", cli_env, 480, hurry_requeues=True)
    (link,) = (tmp_path / "slurm" / "requeue" / "runs").iterdir()
    assert len(json.loads((link / "env.json").read_text())["starts"]) >= 2, f"no requeue happened: {seen}"
    assert_stopped_requeued_and_as_if_uninterrupted(link, "SIGUSR2", s, tmp_path, cli_env)


def test_sigterm_preemption_checkpoints_requeues_and_the_run_ends_as_if_uninterrupted(tiny_data: Path, tmp_path: Path,
                                                                                     cli_env: dict[str, str]) -> None:
    """SIGTERM (preemption; also what scancel sends first) is handled like the time-limit signal."""
    s = spec(tmp_path, "preempt", tiny_data, epochs=40)
    ablation_ok(["sweep", str(s), "--results", str(tmp_path / "slurm"), "--profile", str(profile(tmp_path))], cli_env)
    sweep_dir = tmp_path / "slurm" / "preempt"
    (job,) = {json.loads(line)["job_id"] for line in (sweep_dir / "jobs.jsonl").read_text().splitlines()}
    (link,) = (sweep_dir / "runs").iterdir()
    deadline = time.monotonic() + 240
    while len(rundir.read_jsonl(link / "metrics.jsonl")) < 3:  # well into the run
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # signal the job's steps; nothing is cancelled
    wait_for(sweep_dir, cli_env, 480, hurry_requeues=True)
    assert_stopped_requeued_and_as_if_uninterrupted(link, "SIGTERM", s, tmp_path, cli_env)


def test_a_failing_run_is_requeued_retries_times_then_stays_failed(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    s = spec(tmp_path, "failing", tiny_data, epochs=1)
    env = {**cli_env, "ABLATION_FAULT": "step:2:raise"}  # sbatch exports the environment to the job
    ablation_ok(["sweep", str(s), "--results", str(tmp_path / "slurm"), "--profile", str(profile(tmp_path, retries=1))], env)
    seen = wait_for(tmp_path / "slurm" / "failing", cli_env, 480, hurry_requeues=True)
    (link,) = (tmp_path / "slurm" / "failing" / "runs").iterdir()
    final = json.loads((link / "final.json").read_text())
    assert final["status"] == "failed" and final["stage"] == "train" and "injected fault at step #2" in final["reason"]
    assert len(rundir.read_jsonl(link / "failures.jsonl")) == 2, seen  # the first start and one retry
    assert "failed (x2 starts, 2 failures)" in seen[-1]


def test_the_cpu_selftest_runs_as_one_job_with_a_sweeps_profile(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """`ablation selftest --profile P --submit`: one job on the profile's nodes, its record where it said, its table in the log."""
    out = tmp_path / "selftest"
    proc = ablation_ok(["selftest", "--device", "cpu", "--batches", "2", "--profile", str(profile(tmp_path, cpus_per_task=2)),
                        "--submit", "--out", str(out)], cli_env)
    assert proc.stdout.startswith("submitted self-test job ") and str(out / "selftest.json") in proc.stdout
    deadline = time.monotonic() + 300
    while not (out / "selftest.json").exists() and time.monotonic() < deadline:
        time.sleep(2)
    assert (out / "selftest.json").exists(), "the self-test job wrote no record:\n" + "".join(
        p.read_text() for p in (out / "slurm").glob("*.err"))
    doc = json.loads((out / "selftest.json").read_text())
    assert doc["passed"] and doc["device"] == "cpu" and doc["machine"]["slurm_job_id"]  # it ran inside a SLURM job
    assert all(c["status"] == "pass" for c in doc["checks"])
    (log,) = (out / "slurm").glob("*_0_log.out")
    assert "bn_stand_in      pass" in log.read_text() and "PASSED: 9 pass" in log.read_text()
