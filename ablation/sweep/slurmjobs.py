"""SLURM through submitit: a run as a submitit job (TrainJob: checkpoint and requeue on SLURM's stop signals),
job arrays per job geometry, and the sbatch script --print-sbatch shows."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ablation import config, sweepdir
from ablation.config import RunConfig
from ablation.sweep import status
from ablation.sweep.cluster import Profile, check_run_fits, executor_parameters


class TrainJob:
    """One run as a submitit job: DDP under srun, checkpoint-and-requeue on SLURM's stop signals.

    SLURM sends SIGUSR2 before the time limit and SIGTERM on preemption. submitit's own SIGUSR2 handler
    would checkpoint by interrupting the main thread anywhere, possibly in the middle of an optimizer
    step, and it ignores SIGTERM. So the job routes both signals to a flag; the trainer checkpoints at
    its next step boundary (all ranks agree on which), and then SIGUSR2 is handed back to submitit,
    which calls checkpoint() and requeues the job. The requeued job resumes from that checkpoint.

    A run that fails (set-up or training) is requeued the same way up to `retries` times; after that
    it stays failed. The count travels with the requeued job, and failures.jsonl keeps the history.
    """

    def __init__(self, retries: int = 0, failures: int = 0) -> None:
        self.retries, self.failures = retries, failures
        self._retry = False

    def __call__(self, config_path: str, runs_root: str) -> dict[str, Any]:
        """Train the run described by config_path under runs_root."""
        from ablation.signals import StopRequest
        from ablation.train.trainer import run_training

        cfg = config.load(config_path)
        stop = StopRequest().install()
        submitit_handler = stop.previous(signal.SIGUSR2)
        try:
            final = run_training(cfg, runs_root, stop)
        except Exception as e:
            if callable(submitit_handler) and self.failures < self.retries and status.is_failed(Path(runs_root) / config.run_id(cfg)):
                print(f"ablation: run failed ({type(e).__name__}: {e}); requeueing, retry {self.failures + 1} of {self.retries}",
                      file=sys.stderr, flush=True)
                self._retry = True
                _hand_to(submitit_handler, stop)  # the process group is already left
            raise
        if final.get("status") == "interrupted" and callable(submitit_handler):
            _hand_to(submitit_handler, stop)
        return final

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the trainer has already saved its state, so requeue the same call."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.retries, self.failures + self._retry), *args, **kwargs)


def _hand_to(submitit_handler: Any, stop: Any) -> None:
    """Give SIGUSR2 back to submitit and raise it: its handler calls checkpoint(), requeues and exits."""
    stop.restore()
    signal.signal(signal.SIGUSR2, submitit_handler)
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(30)  # the handler runs at the next bytecode and exits; never reached on rank 0


def _slurm_parameters(profile: Profile, cfg: RunConfig, name: str, array_size: int, after: str | None) -> dict[str, Any]:
    """submitit AutoExecutor parameters of one job array; `after`: an array job id to wait for."""
    params = executor_parameters(profile, cfg, name)
    params["slurm_array_parallelism"] = min(profile.array_parallelism, array_size)
    if after:
        params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}), "dependency": f"afterany:{after}"}
    return params


def slurm_executor(sweep_dir: Path, profile: Profile, cfg: RunConfig, name: str, array_size: int, after: str | None = None) -> Any:
    """A submitit SLURM executor set up for one run's job geometry; `after`: an array job id to wait for."""
    import submitit

    ex = submitit.AutoExecutor(folder=sweepdir.slurm_folder(sweep_dir), cluster="slurm", slurm_max_num_timeout=profile.max_requeues)
    ex.update_parameters(**_slurm_parameters(profile, cfg, name, array_size, after))
    return ex


def submit_slurm(sweep_dir: Path, run_ids: list[str], paths: list[str], runs_root: str,
                 profile: Profile, name: str, on_line: Callable[[str], None]) -> None:
    """One job array per job geometry, split at the cluster's maximum array size.

    Each array after the first waits for the one before it (afterany), so the profile's
    array_parallelism bounds the whole sweep, not each piece of it.
    """
    groups: dict[tuple[int, int], list[tuple[str, str, RunConfig]]] = {}
    for rid, path in zip(run_ids, paths):
        cfg = config.load(path)
        check_run_fits(profile, cfg, rid)
        groups.setdefault(profile.geometry(cfg), []).append((rid, path, cfg))
    previous: str | None = None
    for (nodes, tasks), items in groups.items():
        for start in range(0, len(items), profile.max_array_size):
            chunk = items[start : start + profile.max_array_size]
            ex = slurm_executor(sweep_dir, profile, chunk[0][2], f"ablation-{name}", len(chunk), after=previous)
            jobs = ex.map_array(TrainJob(profile.retries), [p for _, p, _ in chunk], [runs_root] * len(chunk))
            sweepdir.record_jobs(sweep_dir, [{"run_id": rid, "executor": "slurm", "job_id": j.job_id, "submitted_at": sweepdir.now()}
                                             for (rid, _, _), j in zip(chunk, jobs)])
            array_id = jobs[0].job_id.split("_")[0]
            waits = f", after array {previous}" if previous else ""
            on_line(f"submitted array {array_id}: {len(chunk)} jobs x {nodes} node(s) x {tasks} task(s) "
                    f"(throttle {min(profile.array_parallelism, len(chunk))}{waits})")
            previous = array_id


def sbatch_script(sweep_dir: Path, profile: Profile, cfg: RunConfig, name: str) -> str:
    """The sbatch script submitit would write for one job (for --print-sbatch); needs no SLURM here.

    Planning happens before logging into the cluster, but submitit's SlurmExecutor (and so the
    AutoExecutor that submits) refuses to exist where `srun` is not on PATH: its constructor checks
    affinity(). So the script comes from a SlurmExecutor whose affinity() says "available" without
    looking, given the parameters slurm_executor's AutoExecutor would hand it. submitit (1.5) has no
    public way to render a script; the three private names used here are pinned by
    tests/test_sweep.py, which checks this text against the file submitit writes when it submits.
    """
    import submitit

    class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
        """Renders sbatch scripts; never asked to submit (sbatch would be looked up only then)."""

        @classmethod
        def affinity(cls) -> int:
            return 2  # what SlurmExecutor.affinity() returns when it finds srun

    ex = ScriptOnlySlurmExecutor(folder=sweepdir.slurm_folder(sweep_dir), max_num_timeout=profile.max_requeues)
    params = {k: v for k, v in _slurm_parameters(profile, cfg, f"ablation-{name}", 1, None).items() if v is not None}
    # As AutoExecutor.update_parameters does: generic names translated (timeout_min -> time, ...), the
    # slurm_ prefix dropped from the others.
    native = ex._convert_parameters({k: v for k, v in params.items() if not k.startswith("slurm_")})
    native.update({k.removeprefix("slurm_"): v for k, v in params.items() if k.startswith("slurm_")})
    ex.update_parameters(**native)
    return ex._make_submission_file_text(ex._submitit_command_str, "<uid>")
