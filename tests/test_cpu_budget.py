"""The CPU budget: cores a training process may use (affinity mask, SLURM, torchrun), its workers and threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ablation import cpus
from ablation.sweep import cluster

LAUNCH_VARS = ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID",
               "OMP_NUM_THREADS", cpus.CPUS_ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch):
    """Set this process's affinity mask and launch environment: node(cpus, **env)."""
    def set_node(cpus: range | set[int], **env: str) -> None:
        for var in LAUNCH_VARS:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    return set_node


SLURM_TASK = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "10", "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}


def test_slurm_task_binding_is_not_divided_again(node) -> None:
    """The example profile: 8 tasks of 10 CPUs; with binding each task's mask holds its own 10 CPUs."""
    node(range(30, 40), **SLURM_TASK)
    b = cpus.cpu_budget(8, "cuda:3", workers=8)
    assert (b.cores_usable, b.workers, b.threads, b.affinity) == (10, 8, 1, "30-39")
    assert "this task's own" in b.source
    assert cpus.cpu_budget(8, "cuda:3", workers=16).workers == 9  # one core stays with the training process
    cpu = cpus.cpu_budget(8, "cpu", workers=8)
    assert (cpu.cores_usable, cpu.workers, cpu.threads) == (10, 8, 10)


def test_slurm_without_binding_takes_cpus_per_task_of_the_shared_mask(node) -> None:
    node(range(80), **SLURM_TASK)
    assert cpus.usable_cores(8)[0] == 10
    node(range(96), **SLURM_TASK)  # an exclusive node: still what SLURM gave the task
    assert cpus.usable_cores(8)[0] == 10
    node(range(6), **SLURM_TASK)  # a mask smaller than the CPUs per task: the mask
    assert cpus.usable_cores(8)[0] == 6


def test_torchrun_and_plain_processes_divide_the_shared_mask(node) -> None:
    node(range(80), TORCHELASTIC_RUN_ID="r", LOCAL_WORLD_SIZE="8")
    b = cpus.cpu_budget(8, "cuda:0", workers=8)
    assert (b.cores_usable, b.workers, b.threads, b.affinity) == (10, 8, 1, "0-79") and "torchrun" in b.source
    node(range(80), TORCHELASTIC_RUN_ID="r", SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="40")  # torchrun in one SLURM task of 40 CPUs
    assert cpus.usable_cores(8)[0] == 5
    node(range(80))
    assert cpus.usable_cores(8) == (10, "the 80-CPU affinity mask, shared by 8 local process(es)")
    assert cpus.usable_cores(1)[0] == 80 and cpus.usable_cores(200)[0] == 1


def test_omp_threads_and_the_local_executors_share_are_honoured(node) -> None:
    node(range(16), OMP_NUM_THREADS="3", **{cpus.CPUS_ENV: "4"})
    b = cpus.cpu_budget(1, "cpu", workers=8)
    assert (b.cores_usable, b.workers, b.threads) == (4, 4, 3) and "OMP_NUM_THREADS=3" in b.source


def test_compact_cpu_lists() -> None:
    assert cpus.compact_cpus([]) == ""
    assert cpus.compact_cpus({5}) == "5"
    assert cpus.compact_cpus([9, 8, 0, 1, 2, 3, 11]) == "0-3,8-9,11"


def test_threads_and_loader_workers_follow_the_budget(node) -> None:
    from ablation import config
    from ablation.train import loaders
    from ablation.train.distributed import DistEnv, cpu_threads

    node(range(10), **SLURM_TASK)
    assert cpu_threads(8) == 10
    cfg = config.load(None, ["data.workers=8"])
    loader = loaders.make_loader(list(range(4)), cfg, DistEnv(rank=3, world_size=8, local_rank=3, local_world_size=8, device="cpu"),
                                 batch_size=2)
    assert loader.num_workers == 8  # was 10 // 8 = 1


def test_env_json_records_the_cpu_budget(node) -> None:
    from ablation import config
    from ablation.train import bookkeeping
    from ablation.train.distributed import DistEnv

    node(range(10), **SLURM_TASK)
    cfg = config.load(None, ["data.workers=8"])
    info = bookkeeping.environment(DistEnv(rank=3, world_size=8, local_rank=3, local_world_size=8, device="cpu"), cfg)
    assert info["cpu_budget"] == {"cores_usable": 10, "workers": 8, "threads": 10, "affinity": "0-9",
                                  "source": cpus.cpu_budget(8, "cpu", 8).source}


class _DoneChild:
    """A run the local executor started that has already exited 0; it keeps the environment it was given."""

    envs: list[dict[str, str]] = []
    returncode = 0
    pid = 4242

    def __init__(self, config_path: str, runs_root: str, env: dict[str, str], *rest: object) -> None:
        self.envs.append(env)

    def poll(self) -> int:
        return 0

    def finish(self) -> None:
        pass


def test_local_executor_gives_each_child_its_share(node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run inside a SLURM task of 10 CPUs, two local runs at a time get 5 cores each, as threads and as their budget."""
    from ablation.sweep import local

    node(range(10), **SLURM_TASK)
    envs = _DoneChild.envs = []
    monkeypatch.setattr(local, "_Child", _DoneChild)
    monkeypatch.setattr(local.time, "sleep", lambda s: None)
    paths = []
    for i in range(2):
        (tmp_path / f"c{i}.yaml").write_text(f"seed: {i}\n")
        paths.append(str(tmp_path / f"c{i}.yaml"))
    profile = cluster.Profile(executor="local", array_parallelism=2)
    assert local.run_local(tmp_path, ["a", "b"], paths, str(tmp_path / "runs"), profile, lambda line: None) == 0
    assert [(e["OMP_NUM_THREADS"], e[cpus.CPUS_ENV]) for e in envs] == [("5", "5"), ("5", "5")]
    monkeypatch.setenv(cpus.CPUS_ENV, "5")
    assert cpus.cpu_budget(1, "cpu", 8).cores_usable == 5  # the child's view, under the same SLURM variables


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("sched_getaffinity is Linux's")
