"""The command line: entry points, help, the placeholder demo, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_demo_quick_trains_the_sweep_and_writes_the_figure_and_table(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = run(["demo", "--quick", "--out", str(tmp_path / "demo")], cli_env)
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "demo" / "report"
    assert (report / "fig_error_vs_batch.png").stat().st_size > 0 and (report / "table_batch_size.md").is_file()
    assert "4 runs: 4 ok" in proc.stdout and "| BN | " in proc.stdout and "| GN (G=8) | " in proc.stdout
    runs = list((tmp_path / "demo" / "results" / "runs").iterdir())
    assert len(runs) == 4 and all(json.loads((r / rundir.FINAL).read_text())["status"] == "ok" for r in runs)
    started = [row["run_id"] for row in rundir.read_jsonl(tmp_path / "demo" / "results" / "demo_quick" / "jobs.jsonl")]
    assert ["_b2x8_" in rid for rid in started] == [True, True, False, False]  # longest runs (most steps) first
    again = run(["demo", "--quick", "--out", str(tmp_path / "demo")], cli_env)
    assert "4 runs (4 already done)" in again.stdout  # data and runs are cached


def test_the_readme_figure_comes_from_the_current_demo_settings() -> None:
    from ablation import demo

    docs = Path(__file__).resolve().parents[1] / "docs"
    meta = json.loads((docs / "demo.json").read_text())
    assert meta["fingerprint"] == demo.fingerprint(), (
        "the demo's settings changed: regenerate the README figure with `ablation demo --docs docs` and commit docs/"
    )
    assert (docs / "demo_error_vs_batch.png").stat().st_size > 10_000
