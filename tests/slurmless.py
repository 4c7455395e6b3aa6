"""A PATH on which SLURM's commands are not found, as on a laptop where SLURM was never installed.

Tests use it to run the command line as a user would before logging into the cluster; .ci/run
uses it for the pass of the suite with SLURM hidden:

    PATH="$(python3 tests/slurmless.py /tmp/slurmless)" python3 -m pytest ...

SLURM's commands usually sit in /usr/bin beside python3 and everything else, so a directory of the
PATH that holds any of them is replaced by a folder of links to its other entries; the rest of the
PATH is kept as it is. (Only lookups through PATH are hidden, which is how submitit and ablation
find sbatch, srun and squeue.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# SLURM's client commands and daemons (slurm-client, slurmctld, slurmd, slurmdbd, slurmrestd packages).
SLURM_COMMANDS = frozenset(
    "sacct sacctmgr sackd salloc sattach sbatch sbcast scancel scontrol scrontab sdiag sh5util sinfo sprio squeue sreport srun "
    "sshare sstat strigger sview".split()
)


def is_slurm(name: str) -> bool:
    """Whether a command name is one of SLURM's."""
    return name in SLURM_COMMANDS or name.startswith("slurm")


def path_without_slurm(farm: Path, path: str | None = None) -> str:
    """`path` (default: this process's PATH) with SLURM's commands hidden; link folders go under `farm`."""
    dirs = []
    for i, entry in enumerate((os.environ.get("PATH", "") if path is None else path).split(os.pathsep)):
        d = Path(entry)
        try:
            names = sorted(os.listdir(d)) if entry else []
        except OSError:  # not a directory, or not readable: nothing can be found there anyway
            names = []
        if not any(is_slurm(n) for n in names):
            dirs.append(entry)
            continue
        links = farm / f"{i:02d}{str(d.resolve()).replace(os.sep, '_')}"
        links.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not is_slurm(n) and not (links / n).is_symlink():
                (links / n).symlink_to(d.resolve() / n)
        dirs.append(str(links))
    return os.pathsep.join(dirs)


def env_without_slurm(env: dict[str, str], farm: Path) -> dict[str, str]:
    """A copy of a subprocess environment whose PATH hides SLURM's commands."""
    return {**env, "PATH": path_without_slurm(farm, env.get("PATH", os.environ.get("PATH", "")))}


def write_fake_slurm(bin_dir: Path, job_id: int = 4242) -> Path:
    """Stand-ins for `srun` (prints nothing) and `sbatch` (accepts any script, reports job `job_id`)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", f'echo "Submitted batch job {job_id}"'), ("srun", "exit 0")):
        exe = bin_dir / name
        exe.write_text(f"#!/bin/sh\n{body}\n")
        exe.chmod(0o755)
    return bin_dir


if __name__ == "__main__":  # python3 tests/slurmless.py FARM_DIR: print the PATH
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/slurmless.py FARM_DIR  (prints this PATH with SLURM's commands hidden)")
    print(path_without_slurm(Path(sys.argv[1])))
