"""Process layout: one process, torchrun, or SLURM tasks; the device each process trains on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ablation.cpus import cpu_budget


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on the process that writes the run folder."""
        return self.rank == 0


def _launch_env() -> tuple[int, int, int, int] | None:
    """(rank, world, local_rank, local_world) from torchrun or multi-task SLURM, else None."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), local_world
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        # srun with several tasks: submitit's helper derives MASTER_ADDR/PORT from the node list.
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export()
        return env.rank, env.world_size, env.local_rank, env.local_world_size
    return None


def pick_device(preference: str, local_rank: int) -> str:
    """cuda:<local_rank> when asked for or available ('auto'), else cpu."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available")
    return f"cuda:{local_rank}"


def cpu_threads(local_world: int) -> int:
    """Threads for one CPU process: OMP_NUM_THREADS, else the cores it may use (ablation.cpus.usable_cores:
    SLURM's CPUs per task under SLURM, never divided again; else its share of the affinity mask).

    Oversubscribed cores make OpenMP's spin-waits collapse throughput (60x seen with two jobs on two cores).
    """
    return cpu_budget(local_world, "cpu").threads


def setup(preference: str = "auto") -> DistEnv:
    """Initialize the process group when launched with several processes; set device and threads."""
    launch = _launch_env()
    rank, world, local_rank, local_world = launch or (0, 1, 0, 1)
    device = pick_device(preference, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.set_num_threads(cpu_budget(local_world, device).threads)  # the loader's workers get the rest (loaders.make_loader)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistEnv(rank, world, local_rank, local_world, device)


def teardown() -> None:
    """Leave the process group cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
