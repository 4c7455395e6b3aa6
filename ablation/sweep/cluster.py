"""Cluster profiles (slurm/profiles/*.yaml) and the SLURM queries: the one module that knows SLURM.

Torch-free. Cluster specifics (partition, account, GPUs per node, time limit, setup lines) live in
profiles, never in sweeps, so one sweep runs unchanged on any cluster.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablation import config
from ablation.config import ConfigError, RunConfig

EXECUTORS = ("slurm", "local", "debug")


@dataclass(frozen=True)
class Profile:
    """Where and how a sweep's jobs run."""

    name: str = "local"
    executor: str = "local"  # slurm | local | debug
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_node: int = 0  # 0: CPU-only nodes (processes use gloo)
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    time_min: int = 60  # wall-clock limit per job; a job that hits it checkpoints and requeues
    max_array_size: int = 1000  # the cluster's MaxArraySize: larger sweeps are split into several arrays
    array_parallelism: int = 16  # at most this many jobs of one array run at once (local: runs at once)
    signal_delay_s: int = 90  # SLURM sends the pre-timeout signal this long before the limit
    max_requeues: int = 5  # bound on time-limit requeues per job
    retries: int = 2  # a run that fails (set-up or training error) is started again this many times, then stays failed
    setup: tuple[str, ...] = ()  # shell lines run before each job (module load, conda activate)
    # Training images/s per GPU for GPU-hour estimates: one number for every batch size, or a table by
    # per-GPU batch size ({32: 400, 2: 150}; interpolated in log batch between sizes). See throughput_at.
    throughput_images_per_s: float | Mapping[int, float] | None = None
    throughput_illustrative: bool = False  # the figures above are placeholders (the example profile's): estimates say so
    gpu: str | None = None  # the GPU model the jobs run on (e.g. A100): estimates use the GPU benchmark's records of that device
    stand_in: bool = False  # a job may run fewer processes than the run's modelled GPUs
    processes_per_job: int = 1  # with stand_in: processes (tasks) per job, each standing in for gpus/processes GPUs
    additional: Mapping[str, Any] = field(default_factory=dict)  # extra sbatch parameters, passed as they are

    def throughput_at(self, batch: int) -> tuple[float, str] | None:
        """(images/s per GPU, how: '' | 'interpolated' | 'extrapolated') at this per-GPU batch, or None without a figure."""
        thr = self.throughput_images_per_s
        if thr is None:
            return None
        if isinstance(thr, Mapping):
            return interpolate(thr, batch)
        return float(thr), ""

    def processes(self, cfg: RunConfig) -> int:
        """Processes (SLURM tasks) one run's job uses."""
        return self.processes_per_job if self.stand_in else cfg.gpus

    def geometry(self, cfg: RunConfig) -> tuple[int, int]:
        """(nodes, tasks per node) for one run: one task per GPU, several nodes when one is too small."""
        procs = self.processes(cfg)
        per_node = min(procs, self.gpus_per_node) if self.gpus_per_node else procs
        return math.ceil(procs / per_node), per_node


def interpolate(table: Mapping[int, float], batch: int) -> tuple[float, str]:
    """A throughput at `batch` from a table by batch size, and how it was found ('' when the table has it).

    Between two sizes: linear in log batch ('interpolated'). Outside ('extrapolated'): above the largest
    size, the largest's figure (a step of more images takes at least as long per image); below the
    smallest, the smallest's figure times batch/smallest (a step takes at least as long as the smallest
    measured step): both err towards more hours, never fewer.
    """
    sizes = sorted(table)
    if batch in table:
        return float(table[batch]), ""
    if batch > sizes[-1]:
        return float(table[sizes[-1]]), "extrapolated"
    if batch < sizes[0]:
        return float(table[sizes[0]]) * batch / sizes[0], "extrapolated"
    hi = next(b for b in sizes if b > batch)
    lo = sizes[sizes.index(hi) - 1]
    f = (math.log(batch) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return float(table[lo]) + f * (float(table[hi]) - float(table[lo])), "interpolated"


def _throughput(value: Any, where: str) -> float | dict[int, float] | None:
    """The profile's throughput_images_per_s: None, a positive number, or a table {per-GPU batch: images/s}."""
    key = f"{where}: throughput_images_per_s"

    def number(v: Any, what: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ConfigError(f"{key}{what}: expected a positive number of images/s, got {v!r}")
        try:
            f = float(v)
        except ValueError:
            raise ConfigError(f"{key}{what}: expected a positive number of images/s, got {v!r}") from None
        if not f > 0 or math.isinf(f):
            raise ConfigError(f"{key}{what}: expected a positive number of images/s, got {v!r}")
        return f

    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
        return None
    if not isinstance(value, Mapping):
        return number(value, "")
    if not value:
        raise ConfigError(f"{key}: an empty table; give images/s by per-GPU batch size, e.g. {{32: 400, 2: 150}}, or one number")
    table = {}
    for b, v in value.items():
        batch = int(b) if not isinstance(b, bool) and str(b).strip().isdigit() else 0
        if batch < 1:
            raise ConfigError(f"{key}: table keys are per-GPU batch sizes (integers >= 1), got {b!r}")
        table[batch] = number(v, f"[{batch}]")
    return dict(sorted(table.items()))


def load_profile(path: str | Path | None, executor: str | None = None) -> Profile:
    """A profile from YAML (strict keys), or the built-in default; `executor` overrides the file's."""
    data = dict(config.load_yaml(path)) if path else {}
    throughput = _throughput(data.pop("throughput_images_per_s", None), str(path or "profile"))
    try:
        profile = config.build_dataclass(Profile, data, "", what="profile key")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    profile = Profile(**{**profile.__dict__, "throughput_images_per_s": throughput})
    if executor:
        profile = Profile(**{**profile.__dict__, "executor": executor})
    if profile.executor not in EXECUTORS:
        raise ConfigError(f"{path or 'profile'}: executor must be one of {', '.join(EXECUTORS)}; got {profile.executor!r}")
    for key in ("cpus_per_task", "time_min", "max_array_size", "array_parallelism", "processes_per_job"):
        if getattr(profile, key) < 1:
            raise ConfigError(f"{path or 'profile'}: {key} must be >= 1, got {getattr(profile, key)}")
    for key in ("gpus_per_node", "max_requeues", "signal_delay_s", "retries"):
        if getattr(profile, key) < 0:
            raise ConfigError(f"{path or 'profile'}: {key} must be >= 0, got {getattr(profile, key)}")
    return profile


PROFILE_ENV = "ABLATION_PROFILE"  # a default --profile for `ablation sweep`
USER_CONFIG_KEYS = ("profile",)


def user_config_path() -> Path:
    """The user's defaults file: $XDG_CONFIG_HOME/ablation/config.yaml (~/.config/ablation/config.yaml)."""
    import os

    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ablation" / "config.yaml"


def default_profile() -> tuple[str | None, str]:
    """(the profile path used when --profile is not given, where that default comes from): $ABLATION_PROFILE, then
    the user config file's `profile:`, else (None, 'built-in'): this machine, one process per run."""
    import os

    if os.environ.get(PROFILE_ENV):
        return os.environ[PROFILE_ENV], f"${PROFILE_ENV}"
    path = user_config_path()
    if not path.is_file():
        return None, "built-in"
    data = config.load_yaml(path)
    unknown = sorted(str(k) for k in data if k not in USER_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(USER_CONFIG_KEYS)}")
    if data.get("profile") is None:
        return None, "built-in"
    return str(Path(str(data["profile"])).expanduser()), str(path)  # a relative path is read from where the command runs, as --profile


def check_run_fits(profile: Profile, cfg: RunConfig, run_id: str) -> None:
    """Raise ConfigError when a run cannot be laid out on the profile's processes."""
    procs = profile.processes(cfg)
    if cfg.gpus % procs:
        raise ConfigError(
            f"run {run_id}: gpus={cfg.gpus} is not a multiple of the profile's {procs} processes per job "
            f"(profile {profile.name}: stand_in={profile.stand_in}, processes_per_job={profile.processes_per_job})"
        )


def executor_parameters(profile: Profile, cfg: RunConfig, job_name: str) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one run's job."""
    nodes, tasks = profile.geometry(cfg)
    params: dict[str, Any] = {
        "name": job_name,
        "timeout_min": profile.time_min,
        "nodes": nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": profile.cpus_per_task,
        "mem_gb": profile.mem_gb,
        "slurm_array_parallelism": profile.array_parallelism,
        "slurm_signal_delay_s": profile.signal_delay_s,
        "slurm_setup": list(profile.setup),
    }
    return {**params, **placement_parameters(profile, tasks)}


def placement_parameters(profile: Profile, gpus_per_node: int) -> dict[str, Any]:
    """submitit parameters that place a job where the profile says: its GPUs per node, partition, account, QoS,
    constraint and additional sbatch options."""
    params: dict[str, Any] = {"gpus_per_node": gpus_per_node} if profile.gpus_per_node else {}
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(profile, key):
            params[f"slurm_{key}"] = getattr(profile, key)
    if profile.additional:
        params["slurm_additional_parameters"] = dict(profile.additional)
    return params


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """SLURM state of each job id still known to the controller; None when SLURM is not reachable.

    squeue works without the accounting daemon, unlike sacct (which submitit would use).
    """
    if not job_ids or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    states = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        states[jid] = state
    wanted = set(job_ids)
    return {j: s for j, s in states.items() if j in wanted}
