"""The CPUs one training process may use: its cores (affinity mask, SLURM task, local executor's share) and their split
between threads and loader workers. Torch-free.

Shared below the stages: the trainer's processes size their threads and workers with it, the local executor gives
each run its share of the cores (CPUS_ENV), and the collector sizes its worker pool.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Set by the local executor for the processes it starts: the cores each of them may use.
CPUS_ENV = "ABLATION_CPUS"


def compact_cpus(cpus: Iterable[int]) -> str:
    """A CPU set as a compact list, as taskset and cgroups write it: {0,1,2,3,8,9} -> '0-3,8-9'."""
    ids, out, i = sorted(set(cpus)), [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(f"{ids[i]}-{ids[j]}" if j > i else f"{ids[i]}")
        i = j + 1
    return ",".join(out)


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs one training process may use, and how they are split between its threads and its loader workers."""

    cores_usable: int  # cores this process may keep busy (its threads and its loader workers together)
    workers: int  # data-loading worker processes
    threads: int  # intra-op threads of the training process (torch.set_num_threads)
    affinity: str  # the CPUs the process may run on (sched_getaffinity), e.g. '0-9'
    source: str  # why cores_usable is what it is

    def as_dict(self) -> dict[str, Any]:
        """The record kept in env.json."""
        return {"cores_usable": self.cores_usable, "workers": self.workers, "threads": self.threads,
                "affinity": self.affinity, "source": self.source}


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    """A positive integer environment variable, else None."""
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def usable_cores(local_processes: int = 1, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(cores this process may use, why) when `local_processes` processes of one run share this node.

    The affinity mask (sched_getaffinity) is what the kernel lets the process run on; whether the other
    local processes share it decides whether it is divided:
    - ABLATION_CPUS (set by the local executor for its children): that many, at most the mask;
    - under torchrun the processes are children of one launcher and inherit its mask (the node's, or one
      SLURM task's): divided by the local processes (a SLURM task's mask is first bounded by its CPUs per task);
    - a SLURM task with SLURM_CPUS_PER_TASK: SLURM gave the task that many CPUs. With task binding
      (srun's default where the task/affinity or task/cgroup plugin binds) the mask already holds only
      this task's CPUs, so dividing it again by the tasks on the node would starve the task (10 CPUs
      per task, 8 tasks: 1 core); without binding the mask holds the whole node (or job) and the task
      still gets its CPUs per task. Either way: min(mask, CPUs per task), never divided;
    - otherwise (no SLURM, or SLURM tasks without --cpus-per-task): the mask divided by the local processes.
    """
    env = os.environ if environ is None else environ
    mask = os.sched_getaffinity(0)
    n = len(mask)
    local = max(1, local_processes)
    cpt = _env_int(env, "SLURM_CPUS_PER_TASK")
    given = _env_int(env, CPUS_ENV)
    if given:
        return min(given, n), (f"{CPUS_ENV}={given} (the local executor's share of its cores)"
                               + (f", bounded by the {n}-CPU affinity mask" if given > n else ""))
    if "TORCHELASTIC_RUN_ID" in env:
        base = min(n, cpt) if cpt else n
        where = f"the {n}-CPU affinity mask" + (f" bounded by SLURM_CPUS_PER_TASK={cpt}" if cpt and cpt < n else "")
        return max(1, base // local), f"torchrun: {where}, shared by {local} local process(es)"
    if cpt and "SLURM_JOB_ID" in env:
        if n <= cpt:
            return n, f"SLURM task: the {n}-CPU affinity mask is this task's own (SLURM_CPUS_PER_TASK={cpt}; task binding), not divided"
        return cpt, f"SLURM task: SLURM_CPUS_PER_TASK={cpt} of a {n}-CPU affinity mask shared with the node's other tasks (no task binding)"
    return max(1, n // local), f"the {n}-CPU affinity mask, shared by {local} local process(es)"


def cpu_budget(local_processes: int = 1, device: str = "cpu", workers: int = 0, environ: Mapping[str, str] | None = None) -> CpuBudget:
    """The CPU budget of one training process: cores (usable_cores), loader workers and threads.

    `workers` is what the config asks for (data.workers); OMP_NUM_THREADS, when set, fixes the threads.
    - On a CPU device the training step is the work: it gets every usable core as threads, and the
      workers (which prefetch while a step runs) are capped at the same count.
    - On a GPU the CPUs' work is loading: 1 thread for the training process (as torchrun sets it; its
      CPU work is launching kernels) and the workers get the other cores: 10 cores give up to 9
      workers (data.workers=8: 8 workers and 1 thread; data.workers=16: 9 and 1); 1 core, 1 worker.
    """
    env = os.environ if environ is None else environ
    cores, source = usable_cores(local_processes, env)
    omp = _env_int(env, "OMP_NUM_THREADS")
    want = max(0, workers)
    if device.startswith("cuda"):
        n_workers = min(want, max(1, cores - 1))
        threads = omp or 1
    else:
        n_workers = min(want, cores)
        threads = omp or cores
    if omp:
        source += f"; threads from OMP_NUM_THREADS={omp}"
    return CpuBudget(cores, n_workers, threads, compact_cpus(os.sched_getaffinity(0)), source)
