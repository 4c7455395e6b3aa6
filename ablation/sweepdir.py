"""The sweep folder's layout: where each file of results/<sweep>/ lives, and its small readers and writers. Torch-free.

As ablation.rundir is for one run's folder, this module is the one place that names a sweep folder's files:

  results/runs/<run id>/    the run folders themselves (ablation.rundir), shared between sweeps by config hash
  results/<sweep>/
    sweep.yaml              the spec and the overrides it was launched with
    manifest.json           the expanded runs: run id, axis values, epochs, config path
    configs/<id>.yaml       each run's config: what the job reads
    runs/<id>               link to the shared run folder ../../runs/<id> (relative: the results tree can move)
    jobs.jsonl              one line per submission: run id, executor, job id, time
    slurm/                  submitit's job files and logs
    logs/<id>.out           local executor: each run's output
    constraints.txt         pip pins of the library versions of the first submission (ablation.provenance)
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

from ablation import rundir
from ablation.errors import AblationError

SPEC = "sweep.yaml"
MANIFEST = "manifest.json"
CONFIGS = "configs"
RUNS_LINKS = "runs"
JOBS = "jobs.jsonl"
SLURM = "slurm"
LOGS = "logs"
RUNS = "runs"  # under the results root: the shared run folders
CONSTRAINTS = "constraints.txt"
log = logging.getLogger("ablation")


def runs_root(results: Path) -> Path:
    """The folder of the shared run folders under a results root."""
    return Path(results) / RUNS


def config_file(run_id: str) -> str:
    """A run's config file, relative to its sweep folder (as the manifest records it)."""
    return f"{CONFIGS}/{run_id}.yaml"


def run_link(sweep_dir: Path, run_id: str) -> Path:
    """The sweep folder's link to a run's shared folder."""
    return Path(sweep_dir) / RUNS_LINKS / run_id


def link_target(run_id: str) -> Path:
    """Where a run's link points, relative to the link."""
    return Path("..") / ".." / RUNS / run_id


def slurm_folder(sweep_dir: Path) -> Path:
    """submitit's folder for SLURM jobs (%j: the job id)."""
    return Path(sweep_dir) / SLURM / "%j"


def logs_folder(sweep_dir: Path) -> Path:
    """The local executor's folder of run logs (<run id>.out)."""
    return Path(sweep_dir) / LOGS


def is_sweep_folder(path: Path) -> bool:
    """True when the folder has a manifest."""
    return (Path(path) / MANIFEST).exists()


def require_sweep_folder(sweep_dir: Path) -> None:
    """Refuse a results/<name> folder that exists and is not a sweep folder of ours."""
    if sweep_dir.exists() and any(sweep_dir.iterdir()) and not is_sweep_folder(sweep_dir):
        raise AblationError(f"{sweep_dir} exists and is not a sweep folder; pick another --results root or sweep name")


def load_manifest(sweep_dir: Path) -> dict[str, Any]:
    """manifest.json of a sweep folder, with a clear error when it is not one."""
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise AblationError(f"{sweep_dir} is not a sweep folder (no {MANIFEST}); pass <results root>/<sweep name>, "
                            "e.g. results/fig1_batch_size, or demo/results/demo for the demo")
    return rundir.read_json(path)  # written atomically; a damaged one is a one-line CorruptFile naming it


def latest_jobs(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest submission record of each run id in jobs.jsonl (a damaged file is named and read as empty)."""
    try:
        rows = rundir.read_jsonl(Path(sweep_dir) / JOBS)  # a torn last line is ignored
    except rundir.CorruptFile as e:
        log.warning(f"{e}; read as missing")
        rows = []
    return {r["run_id"]: r for r in rows if "run_id" in r}


def now() -> str:
    """UTC time for the submission records (submitted_at)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def record_jobs(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Append submission records to jobs.jsonl (whole lines in one write, fsynced: rare, and worth keeping)."""
    rundir.append_jsonl(Path(sweep_dir) / JOBS, rows, fsync=True)
