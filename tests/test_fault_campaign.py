"""The fault campaign: SIGKILL a tiny run at many points, resume each, and lose nothing.

Each chain trains one run folder; every start is killed at a random point until one start runs
to the end. The kill points: random steps, inside checkpoint writes, inside evaluation, inside the
metrics.jsonl rewrite (at start and at each epoch end), inside the writes of the per-image results
(predictions/), inside the env.json, config.yaml and final.json writes, and right after the folder lock.
After every kill the folder must read cleanly through `status` and the report's collector (every 6th kill
the whole report), with no epoch line twice; at the end of each chain the run must
equal an uninterrupted one bit for bit. Starts are forked from this process (torch imported once),
so 30+ kills take about two minutes of CPU. The test runs the campaign in a fresh interpreter,
which never runs autograd itself (autograd refuses to work in a child forked after it did).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import FAULT_ARGS as ARGS
from helpers import assert_same_run

from ablation import config, faults, rundir
from ablation.results import collect, runfiles
from ablation.results.report import build
from ablation.sweep import status
from ablation.train.distributed import DistEnv

CFG_ARGS = [a for a in ARGS[1:]] + ["checkpoint_every_steps=4"]  # 36 steps, a checkpoint every 4
TOTAL_STEPS, EPOCHS = 36, 3
MIN_KILLS = 30  # with at least 7 kinds of kill point: each start costs ~4 CPU-s, so 30 kills take ~2.5 CPU-minutes


def start(cfg: config.RunConfig, folder: Path, fault: str | None) -> int:
    """One start of the run in a forked child, with this fault armed; its exit code (-9: killed)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 1
        try:
            os.environ.pop(faults.FAULT_ENV, None)
            if fault:
                os.environ[faults.FAULT_ENV] = fault
            faults._counts.clear()
            torch.set_num_threads(1)  # as DataLoader workers do after a fork
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from ablation.train.trainer import train

            code = 0 if train(cfg, folder, DistEnv()).get("status") == "ok" else 3
        finally:
            os._exit(code)
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status)


def checkpoint_step(folder: Path) -> int:
    """The step the run would resume from."""
    path = folder / rundir.CHECKPOINT
    return torch.load(path, weights_only=True)["state"]["step"] if path.exists() else 0


def pick_fault(rng: random.Random, folder: Path) -> tuple[str, str]:
    """(kind, ABLATION_FAULT value) for the next start, given where the run stands."""
    kinds = ["step", "step", "step", "checkpoint", "checkpoint", "eval", "metrics", "predictions", "env", "final", "setup"]
    first = not (folder / rundir.CONFIG).exists()  # config.yaml is written by a run's first start only
    kind = "config" if first and rng.random() < 0.4 else rng.choice(kinds)
    if kind == "step":
        return kind, f"step:{min(TOTAL_STEPS, checkpoint_step(folder) + rng.randint(1, 9))}"
    if kind == "predictions":  # inside the write of the per-image results of an epoch this start evaluates, or of the labels
        first = not (folder / rundir.PREDICTIONS / rundir.LABELS).exists()  # written at the run's first evaluation
        epoch = rng.randint(min(checkpoint_step(folder) // (TOTAL_STEPS // EPOCHS) + 1, EPOCHS), EPOCHS)
        return kind, f"write:{rundir.LABELS if first and rng.random() < 0.5 else rundir.predictions_file(epoch)}:1"
    n = {"checkpoint": rng.randint(1, 3), "eval": rng.randint(1, 2), "metrics": rng.randint(1, 3)}.get(kind, 1)
    # metrics: inside the write of metrics.jsonl, or of its twin metrics.npy (the lines written, the twin not yet)
    metrics = f"write:{rng.choice([rundir.METRICS, rundir.METRICS_COLUMNS])}"
    point = {"checkpoint": "write:checkpoint.pt", "eval": "eval", "metrics": metrics, "env": "write:env.json",
             "final": "write:final.json", "setup": "setup", "config": "write:config.yaml"}[kind]
    return kind, f"{point}:{n}"


def check_readable(folder: Path, root: Path) -> None:
    """What status and report read of a killed run: no crash, no epoch twice, no unknown status."""
    state, done, *_ = status.run_state(folder, EPOCHS, None, None)
    assert state in ("new", "stopped", "ok"), state
    rows = rundir.read_jsonl(folder / rundir.METRICS)
    epochs = [r["epoch"] for r in rows]
    assert epochs == list(range(1, len(epochs) + 1)) and done == len(epochs)
    if (folder / rundir.CONFIG).exists():  # a run folder to the collector: its rows are the lines, twin or none
        assert runfiles.metric_rows(runfiles.read_folder(str(folder))) == rows
    # per-image results: the epochs listed, and at most the next one (killed between its results and its checkpoint)
    assert rundir.predictions_epochs(folder)[: len(epochs)] == epochs and len(rundir.predictions_epochs(folder)) <= len(epochs) + 1
    runs, _ = collect.collect([root])
    assert len(runs) <= len(list(root.iterdir()))


def campaign(data_root: Path, work: Path) -> dict:
    """Run the campaign in this process (which must not have run autograd: the starts are forked)."""
    cfg = config.load(None, CFG_ARGS + [f"data.root={data_root}"])
    whole = work / "whole" / config.run_id(cfg)
    assert start(cfg, whole, None) == 0

    rng = random.Random(0)
    tried: Counter[str] = Counter()
    unreached, lost, chains = 0, 0, 0
    root = work / "chains"
    while sum(tried.values()) < MIN_KILLS or len(tried) < 7:
        chains += 1
        folder = root / f"chain{chains:02d}" / config.run_id(cfg)
        for _ in range(40):
            kind, fault = pick_fault(rng, folder)
            code = start(cfg, folder, fault)
            if code == 0:
                unreached += 1  # the point lay beyond this start's work: the run finished
                break
            assert code == -9, f"{fault}: exit {code}"
            tried[kind] += 1
            check_readable(folder, root)
            if sum(tried.values()) % 6 == 0:  # the whole report too (figures take seconds, so not every time)
                assert len(build([root], work / "report").runs) == 1
        else:
            raise AssertionError(f"chain {chains} never finished")
        assert rundir.RunDir(folder).final_status()["status"] == "ok"
        try:
            assert_same_run(whole, folder)
        except AssertionError:
            lost += 1
    report = build([root], work / "report")  # every chain is the same run id: one row, ok
    assert list(report.runs["status"]) == ["ok"]
    return {"kills": sum(tried.values()), "by_kind": dict(sorted(tried.items())), "runs": chains, "unreached": unreached, "lost": lost}


@pytest.mark.slow
def test_kill_anywhere_and_resume_loses_nothing(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    # A fresh interpreter drives it: forking this pytest process, where other tests ran autograd's
    # threads, is refused by autograd in the children.
    proc = subprocess.run([sys.executable, __file__, str(tiny_data), str(tmp_path)], env=cli_env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nfault campaign: {result['kills']} kill points tried in {result['runs']} runs ({result['by_kind']}), "
          f"{result['unreached']} starts ran to the end, runs lost = {result['lost']}", file=sys.stderr)
    assert result["kills"] >= MIN_KILLS and result["lost"] == 0 and len(result["by_kind"]) >= 7


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(campaign(Path(sys.argv[1]), Path(sys.argv[2]))))
