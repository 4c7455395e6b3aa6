"""Shared fixtures: tiny synthetic datasets, the subprocess environment, SLURM availability (helpers.py: shared functions)."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/plugins is importable as `plugins`

from helpers import ROOT  # noqa: E402  (tests/ on the path first)


def pytest_configure(config) -> None:
    """The tests see no user defaults: no $ABLATION_PROFILE, an empty user config folder (in-process and in subprocesses)."""
    import tempfile

    os.environ.pop("ABLATION_PROFILE", None)
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="ablation-test-config-")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # -n N: each worker's torch gets its share of the cores, not all of them (N x cores threads spin otherwise)
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 4-class synthetic ImageFolder of 16x16 JPEGs (48 train / 8 val per class)."""
    from ablation.data.synth import SynthSpec, write_synth

    root = tmp_path_factory.mktemp("data") / "tiny"
    write_synth(root, SynthSpec(classes=4, train_per_class=48, val_per_class=8, size=16))
    return root


def subprocess_env() -> dict[str, str]:
    """Environment for subprocesses: the repo and tests on the path, one thread, no torchrun leftovers."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def cli_env() -> dict[str, str]:
    """subprocess_env() for one test."""
    return subprocess_env()


_LOGGER = logging.getLogger("ablation")
_PRISTINE_LOGGER = (_LOGGER.level, _LOGGER.propagate, list(_LOGGER.handlers))


@pytest.fixture(autouse=True)
def _restore_the_ablation_logger():
    """Give every test the `ablation` logger as it found it: an in-process trainer run turns its propagation
    off and installs its own handlers (right for a run, wrong for a later test's caplog)."""
    import logging

    logger = logging.getLogger("ablation")
    # As the session found it, not as the test found it: a module- or session-scoped fixture that trained in-process
    # (set up before this fixture) would otherwise have its logger state kept for every later test of the process.
    saved = _PRISTINE_LOGGER
    yield
    for handler in [h for h in logger.handlers if h not in saved[2]]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    for handler in saved[2]:
        if handler not in logger.handlers:
            logger.addHandler(handler)


@functools.cache
def slurm_missing() -> str | None:
    """Why the real-SLURM tests cannot run here, or None when a cluster answers (asked once per session).

    Outside CI they skip with this reason; in CI (CI set) it is a failure: .ci/run starts the cluster.
    SLURM installed but not started (a reboot, a new container) is the same as no SLURM for them.
    """
    hint = "start it with `bash slurm/local-cluster.sh start`"
    if shutil.which("sbatch") is None:
        return f"SLURM is not installed (no sbatch on PATH); {hint}"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"SLURM is installed but sinfo fails ({e}); {hint}"
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"SLURM is installed but its controller does not answer ({said}); {hint}"
    return None


def require_slurm() -> None:
    """Skip (or, in CI, fail) unless a SLURM cluster answers; in a fixture or at a test module's top."""
    why = slurm_missing()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {why}: .ci/run must start the cluster before pytest", pytrace=False)
    pytest.skip(why, allow_module_level=True)


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first (a stable sort): with -n auto, the longest ones start while the quick ones fill the gaps,
    so the last worker does not end on a two-minute test that began late."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
