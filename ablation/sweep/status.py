"""Sweep and run states from the files on disk (and SLURM when reachable). Torch-free.

A run's state, from what its folder and the scheduler say:
  ok | diverged | failed        final.json
  running (epoch k of n)        its folder lock is held, or SLURM says RUNNING
  requeued                      SLURM has it pending again after it ran (preemption or time limit)
  pending                       submitted, SLURM has it pending, nothing written yet
  stopped                       started, no final status, nothing running it: resubmitting resumes it
  new                           never started
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation import provenance, rundir, sweepdir
from ablation.sweep.cluster import squeue_states

log = logging.getLogger("ablation")
SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


@dataclass(frozen=True)
class RunState:
    """What is known of one run of a sweep."""

    run_id: str
    axes: dict[str, Any]
    state: str
    epochs_done: int
    epochs: int
    val_err1: float | None
    job_id: str | None
    starts: int
    epoch_seconds: float | None
    failures: int = 0  # failed starts recorded in failures.jsonl (automatic retries included)


def _read(reader: Callable[[Path], Any], path: Path, default: Any) -> Any:
    """A file through rundir's reader (which ignores a torn last line); a damaged one is named and read as missing."""
    try:
        return reader(path)
    except rundir.CorruptFile as e:
        log.warning(f"{e}; read as missing")
        return default


def run_state(folder: Path, epochs: int, job: dict[str, Any] | None,
              slurm: dict[str, str] | None) -> tuple[str, int, float | None, int, float | None]:
    """(state, epochs done, latest val error, starts, mean epoch seconds) of one run folder."""
    rd = rundir.RunDir(folder)
    rows = _read(rundir.read_jsonl, rd.metrics, [])
    env = _read(rundir.read_json, rd.env, None) or {}
    starts = len(env.get("starts", []))
    err = rows[-1]["val_err1"] if rows else None
    secs = statistics.mean(r["epoch_seconds"] for r in rows) if rows else None
    final = rd.final_status()  # a damaged final.json reads as failed, and is named
    sstate = None
    if job and job.get("executor") == "slurm" and slurm is not None:
        sstate = slurm.get(str(job.get("job_id")))
    # A failed run whose job is alive again is being retried: show what the job does, not the old failure.
    retrying = final and final.get("status") == "failed" and (sstate in SLURM_ACTIVE or rundir.is_locked(rd))
    if final and not retrying:
        return final["status"], len(rows), final.get("val_err1", err), starts, secs
    if rundir.is_locked(rd) or sstate in ("RUNNING", "COMPLETING", "CONFIGURING"):
        return "running", len(rows), err, starts, secs
    if sstate in SLURM_ACTIVE:
        return ("requeued" if starts or sstate.startswith("REQUEUE") else "pending"), len(rows), err, starts, secs
    if job and job.get("executor") == "slurm" and slurm is None and not starts:
        return "pending", 0, None, 0, None  # SLURM unreachable from here: trust the submission record
    if starts or rd.checkpoint.exists():
        return "stopped", len(rows), err, starts, secs
    return "new", 0, None, 0, None


def states(runs: list[dict[str, Any]], folder_of: Callable[[str], Path], jobs: dict[str, dict[str, Any]]) -> list[RunState]:
    """The state of each run ({run_id, axes, epochs}) whose folder folder_of(run_id) gives."""
    slurm_ids = [str(j["job_id"]) for j in jobs.values() if j.get("executor") == "slurm"]
    slurm = squeue_states(slurm_ids) if slurm_ids else None
    out = []
    for run in runs:
        rid = run["run_id"]
        job = jobs.get(rid)
        state, done, err, starts, secs = run_state(folder_of(rid), run["epochs"], job, slurm)
        failures = len(_read(rundir.read_jsonl, rundir.RunDir(folder_of(rid)).failures, []))
        out.append(RunState(rid, run["axes"], state, done, run["epochs"], err, str(job["job_id"]) if job else None, starts, secs, failures))
    return out


def sweep_states(sweep_dir: Path) -> list[RunState]:
    """The state of every run in a sweep folder."""
    manifest = sweepdir.load_manifest(sweep_dir)
    return states(manifest["runs"], lambda rid: sweepdir.run_link(sweep_dir, rid), sweepdir.latest_jobs(sweep_dir))


def eta_seconds(states: list[RunState], parallel: int) -> float | None:
    """Rough time left: remaining epochs x typical epoch time, spread over the runs that can run at once."""
    per_epoch = [s.epoch_seconds for s in states if s.epoch_seconds]
    if not per_epoch:
        return None
    typical = statistics.median(per_epoch)
    left = sum((s.epochs - s.epochs_done) * (s.epoch_seconds or typical) for s in states if s.state not in ("ok", "diverged", "failed"))
    return left / max(1, parallel)


def _fmt_duration(seconds: float) -> str:
    """1h05m, 3m20s, 42s."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_table(states: list[RunState], axes: list[str]) -> str:
    """A plain-text table: one row per run."""
    head = [*axes, "state", "epoch", "val err", "job", "run id"]
    rows = []
    for s in states:
        notes = (([f"x{s.starts} starts"] if s.starts > 1 else [])
                 + ([f"{s.failures} failure{'s' * (s.failures > 1)}"] if s.failures else []))
        state = s.state + (f" ({', '.join(notes)})" if notes else "")
        epoch = f"{s.epochs_done}/{s.epochs}"
        err = f"{s.val_err1:.2f}" if s.val_err1 is not None else "-"
        rows.append([*(str(s.axes.get(a, "")) for a in axes), state, epoch, err, s.job_id or "-", s.run_id])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)


def summary(states: list[RunState], parallel: int = 1) -> str:
    """'10 runs: 4 ok, 1 running, 5 pending; ETA ~1h05m'."""
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    order = ["ok", "running", "requeued", "pending", "stopped", "new", "diverged", "failed"]
    parts = [f"{counts[k]} {k}" for k in order if k in counts]
    line = f"{len(states)} runs: " + ", ".join(parts)
    eta = eta_seconds(states, parallel)
    if eta and any(s.state not in ("ok", "diverged", "failed") for s in states):
        line += f"; ETA ~{_fmt_duration(eta)}"
    return line


def is_failed(folder: Path) -> bool:
    """True when the run folder says the run failed (not a full disk, not a stop): a retry may start it again."""
    try:
        return (rundir.RunDir(folder).final_status() or {}).get("status") == "failed"
    except rundir.CorruptFile:
        return False


def version_drift(sweep_dir: Path, run_ids: list[str]) -> str | None:
    """One line naming the runs whose env.json records library versions other than the sweep's constraints.txt."""
    path = sweep_dir / sweepdir.CONSTRAINTS
    pins = provenance.parse_constraints(path.read_text()) if path.is_file() else None
    if not pins:
        return None
    drift: dict[str, dict[tuple[str, str], list[str]]] = {}
    for run_id in run_ids:
        env = _read(rundir.read_json, sweep_dir / sweepdir.RUNS_LINKS / run_id / rundir.ENV, None)
        if isinstance(env, dict):
            for name, pair in provenance.differences(provenance.recorded_versions(env), pins).items():
                drift.setdefault(name, {}).setdefault(pair, []).append(run_id)
    if not drift:
        return None
    parts = [f"{name} {got} in {len(ids)} run{'s' * (len(ids) > 1)} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
             for name, pairs in drift.items() for (got, _), ids in pairs.items()]
    pinned = ", ".join(f"{name} {pins[name]}" for name in drift)
    return f"versions: {'; '.join(parts)}, not the sweep's {sweepdir.CONSTRAINTS} ({pinned}): their numbers may differ in the last digits"


def counts(states: list[RunState]) -> dict[str, int]:
    """Runs per state, in the order summary() names them."""
    order = ["ok", "running", "requeued", "pending", "stopped", "new", "diverged", "failed"]
    got = {k: sum(s.state == k for s in states) for k in order}
    return {k: n for k, n in got.items() if n}


def sweep_folders(root: Path) -> list[Path]:
    """The sweep folders directly under a results root (the folders with a manifest), by name."""
    return sorted((p for p in Path(root).iterdir() if p.is_dir() and sweepdir.is_sweep_folder(p)), key=lambda p: p.name)


def as_json(sweep_dir: Path, manifest: dict[str, Any], states: list[RunState], parallel: int = 1) -> dict[str, Any]:
    """One sweep's status as plain data (ablation status --json): its runs, the counts by state and the ETA."""
    eta = eta_seconds(states, parallel)
    return {
        "sweep": manifest["name"], "folder": str(sweep_dir), "axes": list(manifest["axes"]),
        "counts": counts(states), "eta_seconds": round(eta, 1) if eta else None,
        "runs": [dataclasses.asdict(s) for s in states],
    }
