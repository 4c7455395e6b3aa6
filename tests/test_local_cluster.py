"""slurm/local-cluster.sh: the single-node SLURM cluster that CI starts before pytest.

Exercises the real cluster: skipped where SLURM is not installed, except in CI (CI set), where a
missing cluster is a failure. The cluster is left running: other tests submit jobs to it.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import require_slurm
from helpers import ROOT

SCRIPT = ROOT / "slurm" / "local-cluster.sh"
JOB_TIMEOUT_S = 60
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster() -> None:
    """The running local cluster; skip without one (not installed, or not started) unless in CI."""
    require_slurm()


def sbatch(*args: str) -> str:
    """Submit; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
    return proc.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str | None:
    """JobState from scontrol (finished jobs stay visible for MinJobAge=300 s); None if unknown."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    match = re.search(r"\bJobState=(\S+)", proc.stdout)
    return match.group(1) if match else None


def wait_finished(job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Poll until the job leaves the queue; its final state."""
    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in FINISHED:
            return state
        time.sleep(0.5)
    squeue = subprocess.run(["squeue"], capture_output=True, text=True, timeout=30).stdout
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    pytest.fail(f"job {job_id} not finished after {timeout_s:.0f}s (state {state}); squeue:\n{squeue}")


def read_when_written(path: Path, timeout_s: float = 10) -> str:
    """The job's output file (written by slurmstepd, may lag the state change a little)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.read_text()


def test_bad_argument_exits_2() -> None:
    proc = script("bogus")
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_status_says_the_cluster_is_up(cluster: None) -> None:
    proc = script("status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for daemon in ("munged", "slurmctld", "slurmd"):
        assert f"{daemon}: running" in proc.stdout
    assert "debug" in proc.stdout  # sinfo lists the partition


def test_batch_job_and_srun_tasks_complete(cluster: None, tmp_path: Path) -> None:
    marker = f"hello-{uuid.uuid4().hex[:8]}"
    simple_out, srun_out = tmp_path / "simple.out", tmp_path / "srun.out"
    # both submitted first: they run side by side on the node's cores
    simple = sbatch("--job-name=lc-test", "--time=2", "-o", str(simple_out), "--wrap", f"echo {marker}; hostname")
    tasks = sbatch(
        "--job-name=lc-test-srun", "--time=2", "-n", "2", "-o", str(srun_out), "--wrap", "srun -n 2 bash -c 'echo task-$SLURM_PROCID'"
    )

    assert wait_finished(simple) == "COMPLETED"
    assert read_when_written(simple_out).splitlines()[0] == marker

    assert wait_finished(tasks) == "COMPLETED"
    lines = read_when_written(srun_out).splitlines()
    assert sorted(lines) == ["task-0", "task-1"], lines
