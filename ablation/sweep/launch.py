"""Launch a sweep: write its folder (laid out as ablation.sweepdir says), decide what runs, submit through an executor.

Executors: `slurm` (ablation.sweep.slurmjobs: submitit job arrays, one DDP job per run, checkpoint-and-requeue
on the pre-timeout signal), `local` (ablation.sweep.local: this machine, N runs at a time, in the foreground,
each forked from a server that imported torch once), `debug` (in this process, one after another).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from ablation import config, provenance, rundir, sweepdir
from ablation.config import RunConfig
from ablation.sweep import local, slurmjobs, status
from ablation.sweep.cluster import Profile
from ablation.sweep.spec import Sweep

# What re-running a sweep does with a run in each state.
ACTIONS = {
    "new": "submit",
    "stopped": "resume",
    "failed": "retry",  # only with --retry-failed
    "ok": "skip",
    "diverged": "skip",
    "running": "skip",
    "pending": "skip",
    "requeued": "skip",
}


def prepare(sweep: Sweep, results: Path, overrides: list[str]) -> Path:
    """Write the sweep folder (spec, manifest, run configs, links to the shared run folders)."""
    sweep_dir = results / sweep.name
    (sweep_dir / sweepdir.CONFIGS).mkdir(parents=True, exist_ok=True)
    (sweep_dir / sweepdir.RUNS_LINKS).mkdir(exist_ok=True)
    sweepdir.runs_root(results).mkdir(parents=True, exist_ok=True)
    rundir.write_text(sweep_dir / sweepdir.SPEC, yaml.safe_dump({"spec": dict(sweep.spec), "overrides": overrides}, sort_keys=False))
    runs = []
    for run in sweep.runs:
        cfg_path = sweep_dir / sweepdir.config_file(run.run_id)
        rundir.write_text(cfg_path, yaml.safe_dump({"run_id": run.run_id, **config.to_dict(run.config)}, sort_keys=False))
        link = sweepdir.run_link(sweep_dir, run.run_id)
        if not link.is_symlink():
            link.symlink_to(sweepdir.link_target(run.run_id))
        runs.append({"run_id": run.run_id, "axes": dict(run.axes), "epochs": run.config.epochs, "config": sweepdir.config_file(run.run_id)})
    keep = {r["run_id"] for r in runs}
    for link in (sweep_dir / sweepdir.RUNS_LINKS).iterdir():
        if link.is_symlink() and link.name not in keep:
            link.unlink()  # a run no longer in the spec; its shared folder stays
    manifest = {"name": sweep.name, "description": sweep.description, "axes": list(sweep.axes), "runs": runs}
    rundir.write_json(sweep_dir / sweepdir.MANIFEST, manifest)
    pin_versions(sweep_dir)
    return sweep_dir


def pin_versions(sweep_dir: Path) -> None:
    """Write the sweep's constraints.txt at its first submission; later, warn where this environment differs from it."""
    path = sweep_dir / sweepdir.CONSTRAINTS
    here = provenance.package_versions()
    if not path.is_file():
        header = (f"The library versions sweep {sweep_dir.name} was first submitted with, {sweepdir.now()}.\n"
                  f"To run it again with them: python3 -m pip install -c {sweepdir.CONSTRAINTS} -e .")
        rundir.write_text(path, provenance.constraints_text(here, header))
        return
    pinned = provenance.parse_constraints(path.read_text())
    changed = provenance.differences({k: v for k, v in here.items() if v}, pinned)
    if changed:
        said = ", ".join(f"{name} {now} (pinned {then})" for name, (now, then) in changed.items())
        print(f"warning: this environment differs from {path}: {said}; runs started now record it (ablation status shows them)",
              file=sys.stderr)


def plan(sweep: Sweep, results: Path, retry_failed: bool) -> list[tuple[status.RunState, str]]:
    """Each run's state and what launching the sweep does with it (reads files only; writes nothing)."""
    runs = [{"run_id": r.run_id, "axes": dict(r.axes), "epochs": r.config.epochs} for r in sweep.runs]
    jobs = sweepdir.latest_jobs(results / sweep.name)
    out = []
    for s in status.states(runs, lambda rid: sweepdir.runs_root(results) / rid, jobs):
        action = ACTIONS[s.state]
        if action == "retry" and not retry_failed:
            action = "skip (failed: use --retry-failed)"
        out.append((s, action))
    return out


def to_submit(planned: list[tuple[status.RunState, str]]) -> list[str]:
    """The run ids of a plan that launching submits: new runs, stopped ones (resumed) and failed ones being retried."""
    return [s.run_id for s, action in planned if action in ("submit", "resume", "retry")]


def launch_sweep(sweep: Sweep, results: Path, overrides: list[str], profile: Profile, todo: list[str],
                 *, on_line: Callable[[str], None] = print) -> tuple[Path, int]:
    """Write the sweep folder and submit the runs `todo` through the profile's executor (nothing when empty):
    (the sweep folder, how many runs failed locally)."""
    sweep_dir = prepare(sweep, results, overrides)
    failed = submit(sweep_dir, todo, profile, results, on_line=on_line) if todo else 0
    return sweep_dir, failed


def submit(sweep_dir: Path, run_ids: list[str], profile: Profile, results: Path, *, on_line: Callable[[str], None] = print) -> int:
    """Submit these runs of the sweep through the profile's executor; returns how many failed locally."""
    manifest = sweepdir.load_manifest(sweep_dir)
    by_id = {r["run_id"]: r for r in manifest["runs"]}
    paths = [str(sweep_dir / by_id[r]["config"]) for r in run_ids]
    runs_root = str(sweepdir.runs_root(results))
    if profile.executor == "slurm":
        slurmjobs.submit_slurm(sweep_dir, run_ids, paths, runs_root, profile, manifest["name"], on_line)
        return 0
    if profile.executor == "debug":
        return _run_debug(sweep_dir, run_ids, paths, runs_root, profile, on_line)
    return local.run_local(sweep_dir, run_ids, paths, runs_root, profile, on_line)


def _run_debug(sweep_dir: Path, run_ids: list[str], paths: list[str], runs_root: str, profile: Profile,
               on_line: Callable[[str], None]) -> int:
    """Train each run in this process, one after another (a failed run again, up to profile.retries times)."""
    failed = 0
    for i, (rid, path) in enumerate(zip(run_ids, paths), 1):
        sweepdir.record_jobs(sweep_dir, [{"run_id": rid, "executor": "debug", "job_id": f"debug-{os.getpid()}-{i}",
                                          "submitted_at": sweepdir.now()}])
        on_line(f"[{i}/{len(run_ids)}] {rid}")
        for attempt in range(profile.retries + 1):
            try:
                slurmjobs.TrainJob()(path, runs_root)
                break
            except Exception as e:  # recorded as 'failed' in the run folder
                on_line(f"[{i}/{len(run_ids)}] {rid} failed: {type(e).__name__}: {e}")
                if attempt == profile.retries or not status.is_failed(Path(runs_root) / rid):
                    failed += 1
                    break
                on_line(f"[{i}/{len(run_ids)}] {rid}: retry {attempt + 1} of {profile.retries}")
    return failed


def describe_profile(profile: Profile, cfg: RunConfig) -> str:
    """'8 GPUs per job (1 node x 8 tasks)' or '1 process per job standing in for 8 GPUs (CPU)'."""
    nodes, tasks = profile.geometry(cfg)
    procs = nodes * tasks
    where = f"{nodes} node(s) x {tasks} task(s)"
    if profile.gpus_per_node:
        return f"{procs} GPU(s) per job ({where})" + (f", standing in for {cfg.gpus}" if procs != cfg.gpus else "")
    return f"{procs} CPU process(es) per job ({where}), standing in for {cfg.gpus} GPUs"
