"""The benchmark scripts keep working: each runs at tiny sizes on the CPU and records what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_the_cpu_and_records_every_case(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "gpu.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu", "--out", str(out)],
                          env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = {(r["case"], r["global_batch"], r["compile"], r["data"]) for r in rows}
    assert cases == {(c, g * b, k, d) for c, g in (("per_gpu", 1), ("stand_in", 8)) for b in (32, 2) for k in ("off", "aot_eager") for d in ("excluded", "included")}
    assert all(r["images_per_s"] > 0 and r["machine"]["device"] == "cpu" and r["tiny"] for r in rows)
    assert not any("images_per_s_per_gpu" in r for r in rows)  # tiny figures never feed GPU-hour estimates
