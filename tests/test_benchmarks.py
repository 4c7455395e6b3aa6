"""The benchmark scripts keep working: each runs at tiny sizes on the CPU and records what it promises.

Every run writes its record into the test's temporary folder (--out, and ABLATION_BENCH_OUT for anything
else), never into benchmarks/results/.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

MACHINE_KEYS = {"host", "platform", "cpu", "cores", "python"}
TORCH_MACHINE_KEYS = MACHINE_KEYS | {"threads", "device", "torch"}


def bench(script: str, tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 120) -> tuple[str, list[dict]]:
    """Run benchmarks/<script> --tiny --out <tmp>/<script>.jsonl; its stdout and the records it appended."""
    out = tmp_path / f"{Path(script).stem}.jsonl"
    before = {p: p.stat().st_size for p in (ROOT / "benchmarks" / "results").glob("*.jsonl")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *args],
                          env={**env, "ABLATION_BENCH_OUT": str(tmp_path / "elsewhere")}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_size for p in (ROOT / "benchmarks" / "results").glob("*.jsonl")} == before  # nothing recorded there
    assert not (tmp_path / "elsewhere").exists()  # --out wins over the environment
    return proc.stdout, [json.loads(line) for line in out.read_text().splitlines()]


def positive(*values: object) -> bool:
    """Every value a finite number above zero."""
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_common_records_the_machine_and_appends_json_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common

    monkeypatch.setenv(common.OUT_ENV, str(tmp_path / "res"))
    assert common.results_file("x") == tmp_path / "res" / "x.jsonl"
    monkeypatch.delenv(common.OUT_ENV)
    assert common.results_file("x") == ROOT / "benchmarks" / "results" / "x.jsonl"
    m = common.machine()
    assert set(m) == MACHINE_KEYS and m["cores"] >= 1
    assert set(common.machine("cpu", pillow="1")) == TORCH_MACHINE_KEYS | {"pillow"}
    path = tmp_path / "new" / "r.jsonl"
    common.append(path, [{"a": 1}])
    common.append(path, [{"b": 2}, {"c": 3}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": 2}, {"c": 3}]


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_the_cpu_and_records_every_case(tmp_path: Path, cli_env: dict[str, str]) -> None:
    _, rows = bench("gpu.py", tmp_path, cli_env, "--device", "cpu", timeout=600)
    cases = {(r["case"], r["global_batch"], r["compile"], r["data"]) for r in rows}
    assert cases == {(c, g * b, k, d) for c, g in (("per_gpu", 1), ("stand_in", 8)) for b in (32, 2)
                     for k in (("off", "aot_eager") if c == "per_gpu" else ("off",)) for d in ("excluded", "included")}  # stand-in: eager
    assert all(r["images_per_s"] > 0 and r["machine"]["device"] == "cpu" and r["tiny"] for r in rows)
    assert not any("images_per_s_per_gpu" in r for r in rows)  # tiny figures never feed GPU-hour estimates


def test_data_speed_runs_tiny_and_records_every_pipelines_rate(tmp_path: Path, cli_env: dict[str, str]) -> None:
    stdout, records = bench("data_speed.py", tmp_path, cli_env)
    (record,) = records
    assert record["tiny"] and set(record["machine"]) >= TORCH_MACHINE_KEYS | {"torchvision", "pillow", "libjpeg_turbo"}
    (row,) = record["rows"]
    assert row["source_px"] == 64 and row["output_px"] == 32 and row["images"] == 8
    rates = [row[f"{k}_per_core"] for k in ("decode", "reference", "split", "device_decode")]
    assert positive(*rates, row["bits_per_px"], row["split_process_ms"], row["device_decode_process_ms"])
    for p in ("reference", "split", "device_decode"):  # every CPU millisecond: the loader's and the training process's
        assert row[f"{p}_cpu_ms"] == pytest.approx(row[f"{p}_loader_ms"] + row[f"{p}_process_ms"])
        assert row[f"{p}_per_core"] == pytest.approx(1000 / row[f"{p}_cpu_ms"]) and row[f"{p}_device_ms"] is None  # a CPU device
    assert row["device_decode_process_ms"] > row["split_process_ms"]  # on a CPU device its decode runs in the training process
    assert row["split_vs_reference"] == pytest.approx(row["split_per_core"] / row["reference_per_core"])
    assert row["device"] == "cpu" and row["best"] in ("reference", "split")  # device-decode is never best on a CPU device
    assert 0 <= row["reduced_scale_fraction"] <= 1
    assert "images/s per core" in stdout and "64px JPEGs" in stdout and "device_decode" in stdout


def test_harness_overhead_runs_tiny_and_records_both_ratios(tmp_path: Path, cli_env: dict[str, str]) -> None:
    stdout, records = bench("harness_overhead.py", tmp_path, cli_env)
    (record,) = records
    assert record["tiny"] and set(record["machine"]) >= TORCH_MACHINE_KEYS
    assert set(record["seconds"]) == {f"{k}_{e}ep" for k in ("harness", "bare") for e in (1, 3)}
    assert all(len(v) == 1 and positive(*v) for v in record["seconds"].values())
    assert record["steps_per_epoch"] == 4  # 4 classes x 8 images, global batch 8
    assert positive(record["ratio_with_startup"]) and math.isfinite(record["ratio_steady"])
    assert "harness / bare" in stdout


def test_norm_speed_runs_tiny_and_records_layer_and_step_figures(tmp_path: Path, cli_env: dict[str, str]) -> None:
    stdout, records = bench("norm_speed.py", tmp_path, cli_env)
    (record,) = records
    assert record["tiny"] and record["repeats"] == 1 and set(record["machine"]) >= TORCH_MACHINE_KEYS
    layers = [r for r in record["rows"] if r["what"] == "layer"]
    steps = [r for r in record["rows"] if r["what"] == "resnet18 step"]
    assert {r["norm"] for r in layers} == {"bn", "syncbn", "gn", "ln", "in"} and {r["channels_last"] for r in layers} == {False, True}
    assert all(positive(r["ms"], r["ms_min"]) for r in layers)
    assert {(r["norm"], r["gpus_per_process"]) for r in steps} == {("bn", 1), ("bn", 2), ("gn", 1), ("ln", 1), ("in", 1)}
    assert all(positive(r["ms"], r["images_per_s"], r["top_level_ops"], r["dispatched_ops"], r["non_view_ops"], r["backward_nodes"])
               for r in steps)
    assert next(r for r in steps if r["gpus_per_process"] == 1 and r["norm"] == "bn")["ops_vs_plain_bn"] == 1
    assert "top-level ops" in stdout


def test_report_speed_runs_tiny_and_records_cold_warm_and_changed_times(tmp_path: Path, cli_env: dict[str, str]) -> None:
    stdout, records = bench("report_speed.py", tmp_path, cli_env)
    (record,) = records
    assert record["tiny"] and set(record["machine"]) >= MACHINE_KEYS | {"pandas", "libyaml"} and "torch" not in record["machine"]
    assert record["runs"] == record["runs_rows"] == 40 and record["epochs"] == 5 and record["changed_runs"] == 2
    assert record["curve_rows"] > 0 and record["folders_walked"] > 40
    phases = {"find", "read", "frames", "csv", "tables", "figures"}
    assert set(record["phases"]) == set(record["changed_phases"]) == phases
    assert set(record["warm_phases"]) == {"find", "read"}  # nothing changed: the inputs surveyed, the outputs checked, nothing made
    assert positive(record["seconds"], record["warm_seconds"], record["changed_seconds"], *record["all_seconds"])
    assert "report over 40 runs" in stdout


def test_index_scale_runs_tiny_and_records_build_and_start_figures(tmp_path: Path, cli_env: dict[str, str]) -> None:
    stdout, records = bench("index_scale.py", tmp_path, cli_env)
    (record,) = records
    assert record["tiny"] and set(record["machine"]) >= MACHINE_KEYS
    assert record["build_members"] == 4 * 10 + 4 and record["members"] == 10 * 5 + 10 * 2  # train + val members, as asked
    assert positive(record["build_seconds"], record["build_members_per_s"], record["index_bytes"], record["load_seconds"],
                    record["scan_seconds"], record["start_seconds"])
    assert "run start over 70 members" in stdout
