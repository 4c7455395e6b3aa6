"""`ablation selftest`: the CPU self-test CI runs (its table and selftest.json's contract), checks that can fail, the
records a sweep looks for, the throughput rows the estimates read, and the list of CUDA-only calls in the docs."""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from helpers import ROOT

from ablation.selftest import checks, cuda, multi, records, speed
from ablation.selftest.checks import TOLERANCES, Settings

CHECKS = ["ddp_vs_stand_in", "syncbn", "bn_stand_in", "channels_last", "bf16", "compile", "decode", "throughput", "loaders"]


@pytest.fixture(scope="module")
def cpu_selftest(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`python -m ablation selftest --device cpu` as CI runs it, once for the module: (process, out folder, gpu records)."""
    tmp = tmp_path_factory.mktemp("selftest")
    out, rows = tmp / "out", tmp / "gpu.jsonl"
    proc = subprocess.run([sys.executable, "-m", "ablation", "selftest", "--device", "cpu", "--out", str(out), "--batches", "8,2",
                           "--gpu-records", str(rows)], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    return proc, out, rows


def test_the_cpu_selftest_passes_and_prints_its_table(cpu_selftest: tuple[subprocess.CompletedProcess, Path, Path]) -> None:
    proc, out, _ = cpu_selftest
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:4] == ["check", "status", "figure", "tolerance"]
    table = {line.split()[0]: line.split()[1] for line in lines[2:-1]}
    assert table == {name: "pass" for name in CHECKS}  # gloo processes stand in for the two GPUs on a CPU
    assert lines[-1].startswith("PASSED: 9 pass, 0 fail, 0 warn, 0 skipped in ") and str(out / "selftest.json") in lines[-1]


def test_selftest_json_holds_its_contract(cpu_selftest: tuple[subprocess.CompletedProcess, Path, Path]) -> None:
    """Every check with its figure, the tolerance it was held to and why; the machine and every version."""
    _, out, _ = cpu_selftest
    doc = json.loads((out / "selftest.json").read_text())
    assert doc["schema"] == 1 and doc["device"] == "cpu" and doc["passed"] is True
    assert doc["counts"] == {"pass": 9, "fail": 0, "warn": 0, "skipped": 0}
    assert set(doc["versions"]) >= {"gpu", "driver", "cuda", "cudnn", "torch", "packages", "ablation_code"}
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["packages"]["torch"]
    assert set(doc["machine"]) == {"host", "platform", "cpu", "python", "slurm_job_id"}
    assert doc["settings"]["tiny"] is True and doc["settings"]["gpus"] == 2 and doc["settings"]["batches"] == [8, 2]
    assert [c["name"] for c in doc["checks"]] == CHECKS
    for c in doc["checks"]:
        key = c["name"]  # on a CPU; on a GPU decode is held to decode_gpu
        assert c["status"] == "pass" and isinstance(c["figure"], float) and math.isfinite(c["figure"])
        assert c["tolerance"] == TOLERANCES[key][0] and c["unit"] == TOLERANCES[key][1] and c["why_tolerance"] == TOLERANCES[key][2]
        assert c["detail"] and c["seconds"] >= 0
    decode = next(c for c in doc["checks"] if c["name"] == "decode")
    assert decode["device_decoded_share"] == pytest.approx(10 / 12)  # the grayscale JPEG and the PNG go to the loader
    assert decode["progressive_files"] == 1
    assert 0 < doc["seconds"] < 300


def test_the_throughput_rows_are_the_gpu_benchmarks_records(cpu_selftest: tuple[subprocess.CompletedProcess, Path, Path]) -> None:
    """Appended where asked, in benchmarks/gpu.py's format; a tiny model's rows carry no images_per_s_per_gpu, so no estimate
    ever reads them."""
    from ablation.sweep import estimates

    _, out, rows_file = cpu_selftest
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["norm"], r["batch_per_gpu"]) for r in rows] == [("bn", 8), ("bn", 2), ("gn", 8), ("gn", 2)]
    gpu_py_keys = {"time", "machine", "case", "model", "norm", "image_size", "gpus", "batch_per_gpu", "global_batch", "compile", "data",
                   "pipeline", "amp", "channels_last", "images_per_s", "device", "tiny"}
    assert all(set(r) == gpu_py_keys | {"source"} and r["tiny"] and r["images_per_s"] > 0 for r in rows)
    cfg = checks.Settings("cpu", 2, ("device=cpu", *checks.TINY), (8,), 1, 1, "eager", 1, tiny=True).cfg()
    assert estimates.gpu_benchmark_table(rows, cfg) == ({}, "")
    assert json.loads((out / "selftest.json").read_text())["throughput_recorded_in"] == str(rows_file)


def test_a_full_size_throughput_row_is_what_the_estimates_read() -> None:
    """Rows measured at full settings (here the tiny model, marked full) feed --dry-run's GPU-hours."""
    from ablation.sweep import estimates

    s = Settings("cpu", 1, ("device=cpu", *checks.TINY), (4,), steps=1, warmup=1, compile_backend="eager", cpus_per_task=1, tiny=False)
    check, rows, by_batch = speed.throughput(s)
    assert check.status == "pass" and set(by_batch) == {4}
    table, devices = estimates.gpu_benchmark_table(rows, s.cfg("norm.name=bn"))
    assert table == {4: pytest.approx(rows[0]["images_per_s"])} and devices == "cpu"


def tiny(**changes: object) -> Settings:
    """The CPU self-test's settings."""
    fields = dict(device="cpu", gpus=2, overrides=("device=cpu", *checks.TINY), batches=(2,), steps=1, warmup=1,
                  compile_backend="eager", cpus_per_task=1, tiny=True)
    return Settings(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_bn_check_fails_when_the_stand_in_assigns_rows_to_the_wrong_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in whose GPU i owned rows i*b ... (contiguous, not interleaved) would be a different experiment: caught."""
    assert checks.bn_stand_in(tiny()).status == "pass"
    loop = checks.per_chunk_loop

    def contiguous(x, weight, bias, running, k, momentum, eps):  # noqa: ANN001, ANN202
        order = torch.arange(x.shape[0]).view(k, -1).t().flatten()  # row j*k+i <- row i*b+j
        return loop(x[order], weight, bias, running, k, momentum, eps)[order.argsort()]

    monkeypatch.setattr(checks, "per_chunk_loop", contiguous)
    check = checks.bn_stand_in(tiny())
    assert check.status == "fail" and check.figure > 0.1 and check.figure > 1000 * TOLERANCES["bn_stand_in"][0]


def test_the_decode_check_fails_on_a_wrong_crop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = checks.sample_jpegs(tmp_path / "jpegs", tiny=True)
    assert checks.decode(tiny(), root).status == "pass"
    right = checks.pil_crop
    monkeypatch.setattr(checks, "pil_crop", lambda img, box, size: right(img, box, size).flip(1))  # a mirrored reference
    check = checks.decode(tiny(), root)
    assert check.status == "fail" and check.figure > 20


def test_a_check_that_raises_fails_in_one_line_and_the_others_still_run() -> None:
    from ablation.selftest import run

    def broken() -> None:
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nat some/file.cpp:12")

    (check,) = run._timed(broken, "channels_last", "channels-last vs NCHW")
    assert check.status == "fail" and check.detail == "raised RuntimeError: at some/file.cpp:12"
    assert "fail" in run.table_line(check)


def test_multi_gpu_checks_say_they_need_two_gpus_on_one() -> None:
    """No CUDA is touched to say so: it runs on a CPU-only machine as on a one-GPU node."""
    got = multi.run(tiny(device="cuda", gpus=1))
    assert [(c.name, c.status, c.detail) for c in got] == [
        ("ddp_vs_stand_in", "skipped", "skipped: needs 2 GPUs"), ("syncbn", "skipped", "skipped: needs 2 GPUs")]
    assert [c.detail for c in multi.run(tiny(gpus=1))] == ["skipped: needs 2 processes (--gpus 2)"] * 2


def test_the_loader_check_warns_rather_than_fails_when_the_loaders_are_short(tmp_path: Path) -> None:
    """The node's capacity, not a fault: a warning naming what would do it."""
    root = checks.sample_jpegs(tmp_path / "jpegs", tiny=True)
    check = speed.loaders(tiny(), root, {32: 1e9})
    assert check.status == "warn" and check.figure < 1 and "none does: more CPUs per task" in check.detail
    assert "device-decode" not in check.extra["capacity_images_per_s"]  # never offered on a CPU device
    assert speed.loaders(tiny(), root, {32: 1.0}).status == "pass"


def _record(results: Path, name: str, **doc: object) -> None:
    folder = results / "selftest" / name
    folder.mkdir(parents=True)
    (folder / "selftest.json").write_text(json.dumps(doc))


def test_a_sweep_on_a_gpu_profile_warns_until_a_selftest_passed_on_its_gpu_type(tmp_path: Path) -> None:
    assert records.sweep_warning(0, None, "local.yaml", tmp_path) is None  # CPU profile: nothing to check
    warning = records.sweep_warning(8, "H100", "slurm/profiles/x.yaml", tmp_path)
    assert warning and warning.startswith("warning: no passing self-test for GPU type H100 under ")
    assert "ablation selftest --profile slurm/profiles/x.yaml --submit" in warning and len(warning.splitlines()) == 1
    _record(tmp_path, "a", passed=True, device="cpu", versions={"gpu": None})  # the CPU self-test proves nothing of a GPU
    _record(tmp_path, "b", passed=False, device="cuda", versions={"gpu": "NVIDIA H100 80GB HBM3"})
    _record(tmp_path, "c", passed=True, device="cuda", versions={"gpu": "NVIDIA A100-SXM4-80GB"})
    (tmp_path / "selftest" / "d").mkdir()
    (tmp_path / "selftest" / "d" / "selftest.json").write_text("{torn")  # unreadable: left out
    assert records.sweep_warning(8, "H100", "x.yaml", tmp_path) is not None
    assert records.sweep_warning(8, "a100", "x.yaml", tmp_path) is None
    assert records.sweep_warning(8, None, "x.yaml", tmp_path) is None  # no gpu: named in the profile: any GPU's record
    _record(tmp_path, "e", passed=True, device="cuda", versions={"gpu": "NVIDIA H100 80GB HBM3"})
    assert records.sweep_warning(8, "H100", "x.yaml", tmp_path) is None


def test_the_default_record_folder_is_where_the_sweep_looks(tmp_path: Path) -> None:
    out = records.default_out(tmp_path, "node7")
    assert out.parent == tmp_path / "selftest" and re.fullmatch(r"\d{8}T\d{6}Z-node7", out.name)


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    for args, words in ((["--batches", "8,x"], "--batches must be positive images per GPU"),
                        (["--batches", "0"], "--batches must be positive"),
                        (["--gpus", "0"], "--gpus must be at least 1"), (["--submit"], "--submit needs --profile")):
        proc = subprocess.run([sys.executable, "-m", "ablation", "selftest", "--device", "cpu", "--out", str(tmp_path), *args],
                              env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        assert words in proc.stderr
    assert not (tmp_path / "selftest.json").exists()


def test_only_the_cli_imports_the_selftest_and_its_records_never_import_torch() -> None:
    for path in (ROOT / "ablation").rglob("*.py"):
        if path.parent.name == "selftest" or path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("ablation.selftest") for n in names), path
    code = "import sys, ablation.selftest.records; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=subprocess_env()).returncode == 0


def test_the_docs_list_every_cuda_only_call_and_every_tolerance() -> None:
    page = (ROOT / "docs" / "selftest.md").read_text()
    for name in cuda.CUDA_ONLY:
        assert f"`cuda.{name}`" in page, name
    module = ast.parse((ROOT / "ablation" / "selftest" / "cuda.py").read_text())
    defined = {n.name for n in module.body if isinstance(n, ast.FunctionDef)}
    assert set(cuda.CUDA_ONLY) <= defined
    for name, (bound, _, _) in TOLERANCES.items():
        assert re.search(rf"`{name}`.*\|\s*{re.escape(f'{bound:g}')}\s*\|", page), name


def test_ci_runs_the_cpu_selftest_and_prints_its_table() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    line = next(x for x in ci.splitlines() if "-m ablation selftest" in x)
    assert line.startswith("python3 -m ablation selftest --device cpu --out ") and "set -euo pipefail" in ci  # a failure stops CI
    assert ci.index(line) < ci.index("== pass 1")
