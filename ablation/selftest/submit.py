"""`ablation selftest --profile P --submit`: the self-test as one job through submitit, on the nodes a sweep's profile gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ablation.sweep.cluster import Profile, placement_parameters

TIME_MIN = 15  # the self-test takes at most ~3 minutes; room for a slow start (compile caches, a cold file system)


class SelfTestJob:
    """The job: run the self-test there and return whether it passed (submitit pickles this object and the arguments)."""

    def __call__(self, options: dict[str, Any], out: str, gpu_records: str | None) -> bool:
        from ablation.selftest import run

        s = run.settings(**options)
        return bool(run.run(s, Path(out), Path(gpu_records) if gpu_records else None)["passed"])


def parameters(profile: Profile, gpus: int) -> dict[str, Any]:
    """submitit parameters of the one job: one node, one task (the self-test starts its own processes), the profile's placement."""
    params: dict[str, Any] = {
        "name": "ablation-selftest", "timeout_min": TIME_MIN, "nodes": 1, "tasks_per_node": 1,
        "cpus_per_task": profile.cpus_per_task * max(gpus, 1), "mem_gb": profile.mem_gb, "slurm_setup": list(profile.setup),
    }
    return {**params, **placement_parameters(profile, gpus)}


def submit(profile: Profile, options: dict[str, Any], out: Path, gpu_records: Path | None) -> str:
    """Submit the job (its logs under out/slurm/); its id."""
    import submitit

    cluster = "slurm" if profile.executor == "slurm" else profile.executor  # local | debug
    ex = submitit.AutoExecutor(folder=out / "slurm", cluster=cluster)
    ex.update_parameters(**({k: v for k, v in parameters(profile, options["gpus"] or 0).items()
                             if cluster == "slurm" or not k.startswith("slurm_")}))
    job = ex.submit(SelfTestJob(), options, str(out), str(gpu_records) if gpu_records else None)
    return str(job.job_id)
