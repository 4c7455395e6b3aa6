"""The command line: entry points, help, the placeholder demo, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ablation import rundir


def run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m ablation ARGS`, captured."""
    return subprocess.run([sys.executable, "-m", "ablation", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_help_lists_the_commands(cli_env: dict[str, str]) -> None:
    proc = run(["--help"], cli_env)
    assert proc.returncode == 0
    for command in ("train", "config", "data", "demo"):
        assert command in proc.stdout


def test_config_prints_the_resolved_config_and_derived_values(cli_env: dict[str, str]) -> None:
    import yaml

    proc = run(["config", "norm.name=gn", "batch_per_gpu=2"], cli_env)
    doc = yaml.safe_load(proc.stdout)
    assert doc["run_id"].startswith("resnet50_gn32_b2x8_s0_")
    assert doc["derived"]["global_batch"] == 16 and doc["derived"]["steps_per_epoch"] == 1_281_167 // 16


def test_bad_override_is_one_line_and_exit_2(cli_env: dict[str, str]) -> None:
    proc = run(["config", "norm.grups=4"], cli_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'norm.grups' (did you mean 'groups'?); valid: name, groups, channels_per_group, eps, momentum, running_stats, options"
    ]


def test_data_synth_and_check(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = tmp_path / "tiny"
    args = ["data", "synth", str(root), "--classes", "3", "--train-per-class", "4", "--val-per-class", "2", "--size", "16"]
    assert run(args, cli_env).stdout.startswith("wrote")
    assert "cached" in run(args, cli_env).stdout
    check = run(["data", "check", str(root)], cli_env)
    assert "3 classes, 12 train / 6 val images" in check.stdout
    (root / "val" / "01_ring").rename(root / "val" / "01_rings")
    bad = run(["data", "check", str(root)], cli_env)
    assert bad.returncode == 2 and "01_ring" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_demo_placeholder_trains_one_tiny_run(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = run(["demo", "--out", str(tmp_path / "demo")], cli_env)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert json.loads((folder / rundir.FINAL).read_text())["status"] == "ok"
