"""Torn and damaged files: what a crash (or a reader racing a writer) can leave never crashes status, report or a resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import ROOT, TINY, ablation

from ablation import rundir
from ablation.faults import FAULT_ENV
from ablation.results import collect
from ablation.sweep import status

# --- rundir's readers and appender ------------------------------------------------------------------------


def test_read_jsonl_ignores_a_torn_last_line_and_names_a_damaged_middle_one(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3, "b')
    assert rundir.read_jsonl(p) == [{"a": 1}, {"a": 2}]  # cut mid-line: the last line is dropped
    p.write_bytes(b'{"a": 1}\n{"a": 2}')
    assert rundir.read_jsonl(p) == [{"a": 1}, {"a": 2}]  # a whole row that only lacks its newline is kept
    p.write_bytes(b'{"a": 1}\n' + b"\x00" * 40)
    assert rundir.read_jsonl(p) == [{"a": 1}]  # a tail a lost write left as zeros
    p.write_bytes(b'{"a": 1}\n{"a": 2, "\xc3')
    assert rundir.read_jsonl(p) == [{"a": 1}]  # cut inside a UTF-8 character
    p.write_bytes(b"")
    assert rundir.read_jsonl(p) == []
    p.write_bytes(b'{"a": 1}\n{"a": 2, "b\n{"a": 3}\n')
    with pytest.raises(rundir.CorruptFile, match=r"x\.jsonl: line 2 is not a JSON row") as e:
        rundir.read_jsonl(p)
    assert "\n" not in str(e.value)


def test_append_after_a_torn_tail_does_not_glue_onto_it(tmp_path: Path) -> None:
    p = tmp_path / "jobs.jsonl"
    rundir.append_jsonl(p, [{"i": 0}, {"i": 1}])
    with open(p, "ab") as f:
        f.write(b'{"i": 2, "job')  # a writer killed mid-line
    rundir.append_jsonl(p, [{"i": 3}])
    assert p.read_bytes() == b'{"i": 0}\n{"i": 1}\n{"i": 3}\n'
    with open(p, "ab") as f:
        f.write(b'{"i": 4}')  # only the newline missing: the row is kept, not cut
    rundir.append_jsonl(p, [{"i": 5}], fsync=True)
    assert rundir.read_jsonl(p) == [{"i": i} for i in (0, 1, 3, 4, 5)]
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~rundir._UMASK


def test_append_is_one_write_of_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (writes.append(bytes(data)), real(fd, data))[1])
    rundir.append_jsonl(tmp_path / "steps.jsonl", [{"step": s, "loss": 1.0 / (s + 1)} for s in range(50)])
    assert len(writes) == 1 and writes[0].endswith(b"\n") and writes[0].count(b"\n") == 50


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rundir.write_json(tmp_path / "final.json", {"status": "ok"})
    assert synced == ["file", "dir"]


def test_a_damaged_json_file_is_named_and_a_damaged_final_status_is_a_failure(tmp_path: Path) -> None:
    rd = rundir.RunDir(tmp_path)
    for content, words in ((b"", "is empty"), (b'{"status": "o', "is not valid JSON"), (b"[1]", "is not a JSON object")):
        rd.env.write_bytes(content)
        with pytest.raises(rundir.CorruptFile, match=words) as e:
            rundir.read_json(rd.env)
        assert str(rd.env) in str(e.value)
        rd.final.write_bytes(content)
        final = rd.final_status()
        assert final["status"] == "failed" and str(rd.final) in final["reason"] and not rd.is_finished()
    assert rundir.read_json(tmp_path / "missing.json") is None


# --- status, report and resume on torn files ---------------------------------------------------------------


def two_run_spec(tmp_path: Path, batches: str = "[8]") -> Path:
    """The tiny sweep cut to BN and GN at one per-GPU batch size: 2 runs."""
    text = (ROOT / "sweeps" / "tiny.yaml").read_text().replace("batch_per_gpu: [8, 2]", f"batch_per_gpu: {batches}")
    assert batches in text
    spec = tmp_path / "two.yaml"
    spec.write_text(text.replace("name: tiny", "name: two"))
    return spec


def cut_mid_last_line(path: Path) -> None:
    """Cut a JSON-lines file in the middle of its last line, as a crash during its write would."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])


@pytest.fixture(scope="module")
def finished_sweep(tiny_data: Path, tmp_path_factory) -> Path:
    """A results folder with the 2-run sweep trained (debug executor)."""
    tmp = tmp_path_factory.mktemp("torn")
    results = tmp / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = ablation(["sweep", str(two_run_spec(tmp)), f"data.root={tiny_data}", "--results", str(results), "--executor", "debug"], env)
    assert proc.returncode == 0, proc.stderr
    return results


@pytest.mark.slow
def test_status_report_and_resubmission_survive_torn_and_damaged_files(finished_sweep: Path, tiny_data: Path, tmp_path: Path,
                                                                       cli_env: dict[str, str]) -> None:
    results = tmp_path / "results"
    subprocess.run(["cp", "-a", str(finished_sweep), str(results)], check=True)
    sweep_dir = results / "two"
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    a, b = (r["run_id"] for r in manifest["runs"])
    jobs = sweep_dir / "jobs.jsonl"
    with open(jobs, "ab") as f:
        f.write(b'{"run_id": "' + a.encode() + b'", "executor": "lo')  # a submission torn by a crash
    cut_mid_last_line(results / "runs" / a / "metrics.jsonl")  # epoch 2 of 2 cut in half

    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0, st.stderr
    assert st.stdout.strip().splitlines()[-1] == "2 runs: 2 ok"
    rows = {line.split()[-1]: line.split() for line in st.stdout.splitlines() if line.startswith(("bn", "gn"))}
    assert "1/2" in rows[a] and "2/2" in rows[b] and "debug-" in " ".join(rows[a])  # the whole job record is read

    rep = ablation(["report", str(results), "--out", str(tmp_path / "rep")], cli_env)
    assert rep.returncode == 0, rep.stderr
    runs = pd.read_csv(tmp_path / "rep" / "runs.csv").set_index("run_id")
    assert runs.loc[a, "epochs_done"] == 1 and runs.loc[b, "epochs_done"] == 2 and set(runs["status"]) == {"ok"}
    assert len(pd.read_csv(tmp_path / "rep" / "curves.csv")) == 3

    # A damaged final.json (a disk that lost data) is a failed run, named; an empty env.json is named and ignored.
    (results / "runs" / b / "final.json").write_bytes(b"")
    (results / "runs" / b / "env.json").write_bytes(b'{"torch": "2.')
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0, st.stderr
    assert st.stdout.strip().splitlines()[-1] == "2 runs: 1 ok, 1 failed"
    assert str(results / "two" / "runs" / b / "final.json") in st.stderr and "env.json is not valid JSON" in st.stderr
    rep = ablation(["report", str(results), "--out", str(tmp_path / "rep")], cli_env)
    assert rep.returncode == 0, rep.stderr
    runs = pd.read_csv(tmp_path / "rep" / "runs.csv").set_index("run_id")
    assert runs.loc[b, "status"] == "failed" and "final.json is empty" in runs.loc[b, "reason"] and pd.isna(runs.loc[b, "val_err1"])

    # Resubmitting (which retries the failed run) appends to the torn jobs.jsonl: the new record is not glued onto the fragment.
    shutil.copy(finished_sweep / "runs" / b / "env.json", results / "runs" / b / "env.json")
    again = ablation(["sweep", str(two_run_spec(tmp_path)), f"data.root={tiny_data}", "--results", str(results), "--executor", "debug",
                      "--retry-failed"], cli_env)
    assert again.returncode == 0, again.stderr
    assert [r["run_id"] for r in rundir.read_jsonl(jobs)] == [a, b, b]
    assert all(json.loads(line) for line in jobs.read_text().splitlines())
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0 and st.stdout.strip().splitlines()[-1] == "2 runs: 2 ok", st.stdout + st.stderr


@pytest.mark.slow
def test_resume_after_a_torn_steps_file_leaves_no_fragment_and_no_duplicate(tiny_data: Path, tmp_path: Path,
                                                                            cli_env: dict[str, str]) -> None:
    # 4 modelled GPUs x 4 images = global batch 16: 12 steps per epoch, 24 in all; checkpoint at step 10, killed after 13.
    args = ["train", *TINY, "gpus=4", "batch_per_gpu=4", "epochs=2", f"data.root={tiny_data}", "log_steps=true", "checkpoint_every_steps=5",
            "--results", str(tmp_path)]
    killed = ablation(args, {**cli_env, FAULT_ENV: "step:13:kill"}, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (folder,) = tmp_path.iterdir()
    steps = folder / "steps.jsonl"
    assert [r["step"] for r in rundir.read_jsonl(steps)] == list(range(12))  # flushed every 2 steps
    with open(steps, "ab") as f:
        f.write(b'{"step": 12, "epoch": 2, "lr": 0.0')  # the kill landed in the middle of a write
    st = ablation(args, cli_env, timeout=300)
    assert st.returncode == 0, st.stderr
    lines = steps.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(isinstance(json.loads(line), dict) for line in lines[:-1])
    assert [r["step"] for r in rundir.read_jsonl(steps)] == list(range(24))
    assert json.loads((folder / "final.json").read_text())["status"] == "ok"


# --- readers during writes ---------------------------------------------------------------------------------


def _race(write, check, path: Path, seconds: float) -> tuple[int, int]:
    """Rewrite `path` in a tight loop in a thread while this thread reads it: (reads, reads of a partial document)."""
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            write(path, i)
            i += 1

    write(path, 0)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    reads = partial = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            reads += 1
            partial += not check(path.read_bytes())
    finally:
        stop.set()
        t.join()
    return reads, partial


def _rows(i: int) -> list[dict]:
    """A document whose size changes from one version to the next (1 to 400 rows, up to ~40 kB)."""
    n = 1 + (i * 37) % 400
    return [{"n": n, "k": k, "pad": "x" * 64} for k in range(n)]


def _whole_jsonl(data: bytes) -> bool:
    try:
        rows = [json.loads(line) for line in data.decode().splitlines()]
    except ValueError:
        return False
    return data.endswith(b"\n") and bool(rows) and len(rows) == rows[0]["n"] and [r["k"] for r in rows] == list(range(len(rows)))


def _whole_json(data: bytes) -> bool:
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return len(doc["rows"]) == doc["n"]


def test_a_reader_never_sees_a_half_rewritten_file(tmp_path: Path) -> None:
    reads, partial = _race(lambda p, i: rundir.write_jsonl(p, _rows(i)), _whole_jsonl, tmp_path / "metrics.jsonl", 4)
    reads2, partial2 = _race(lambda p, i: rundir.write_json(p, {"n": len(r := _rows(i)), "rows": r}), _whole_json,
                             tmp_path / "final.json", 4)
    # The same reader against a plain (non-atomic) rewrite: shows that it does catch half-written files.
    naive_reads, naive_partial = _race(lambda p, i: p.write_text("".join(json.dumps(r) + "\n" for r in _rows(i))), _whole_jsonl,
                                       tmp_path / "naive.jsonl", 2)
    print(f"\nwrite_jsonl: {reads} reads, {partial} partial; write_json: {reads2} reads, {partial2} partial; "
          f"plain write (control): {naive_reads} reads, {naive_partial} partial")
    assert reads > 50 and reads2 > 50 and partial == 0 and partial2 == 0
    assert naive_partial > 0


def test_a_reader_of_an_appended_file_sees_whole_rows_in_order(tmp_path: Path) -> None:
    p = tmp_path / "steps.jsonl"
    stop = threading.Event()
    written = [0]

    def writer() -> None:  # a few rows a write, as a flush of steps.jsonl; up to ~2 MB so reads stay quick
        while not stop.is_set() and written[0] < 10_000:
            s = written[0]
            rundir.append_jsonl(p, [{"step": s + k, "pad": "y" * 200} for k in range(5)])
            written[0] = s + 5
            time.sleep(0.0005)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    reads = torn = bad = 0
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline and t.is_alive():
            raw = p.read_bytes() if p.exists() else b""
            torn += bool(raw) and not raw.endswith(b"\n")
            rows = rundir.read_jsonl(p)
            reads += 1
            bad += [r["step"] for r in rows] != list(range(len(rows)))
    finally:
        stop.set()
        t.join()
    print(f"\nappend_jsonl: {reads} reads, {torn} saw an incomplete last line, {bad} bad; {written[0]} rows written")
    assert reads > 50 and bad == 0


@pytest.mark.slow
def test_status_and_report_in_a_loop_while_a_local_sweep_writes(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    results = tmp_path / "results"
    profile = tmp_path / "local2.yaml"
    profile.write_text("name: local2\nexecutor: local\narray_parallelism: 2\nstand_in: true\nprocesses_per_job: 1\n")
    spec = two_run_spec(tmp_path, "[2]")  # 24 steps per epoch: the runs write for a while
    extra = ["epochs=3", "log_steps=true", "log_every_steps=1", "checkpoint_every_steps=3"]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "ablation", "sweep", str(spec), f"data.root={tiny_data}", *extra, "--results", str(results), "--profile",
         str(profile)],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out = []
    pump = threading.Thread(target=lambda: out.extend(sweep.stdout), daemon=True)
    pump.start()
    sweep_dir = results / "two"
    calls = {"status": 0, "report": 0, "in-process reads": 0}
    states_seen: set[str] = set()
    errors: list[str] = []
    stop = threading.Event()

    def read_in_process() -> None:
        """Between the CLI calls, the same readers in this process as fast as they go (the steps files too)."""
        while not stop.is_set():
            try:
                assert all(0 <= s.epochs_done <= 3 for s in status.sweep_states(sweep_dir))
                runs, curves = collect.collect([results])
                assert runs["epochs_done"].between(0, 3).all() and curves["val_err1"].between(0, 100).all()
                for steps in results.glob("runs/*/steps.jsonl"):
                    got = [r["step"] for r in rundir.read_jsonl(steps)]
                    assert got == list(range(len(got))), f"{steps}: {got}"
                calls["in-process reads"] += 1
                time.sleep(0.02)  # leave the runs most of the 2 cores
            except Exception as e:  # noqa: BLE001 - reported by the test's thread
                errors.append(f"{type(e).__name__}: {e}")
                return

    t0 = time.monotonic()
    reader = threading.Thread(target=read_in_process, daemon=True)
    try:
        while not list((results / "runs").glob("*/env.json")) and sweep.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        reader.start()
        while sweep.poll() is None and time.monotonic() - t0 < 120:
            st = ablation(["status", str(sweep_dir)], cli_env, timeout=60)
            assert st.returncode == 0, st.stderr
            assert st.stderr == "" and st.stdout.strip().splitlines()[-1].startswith("2 runs: "), st.stdout + st.stderr
            table = [re.search(r" (ok|running|stopped|new)\S* .*?(\d+)/(\d+) ", line)
                     for line in st.stdout.splitlines() if "resnet18_" in line]
            assert len(table) == 2 and all(table), st.stdout
            assert all(0 <= int(m[2]) <= int(m[3]) == 3 for m in table), st.stdout
            states_seen.update(m[1] for m in table)
            calls["status"] += 1
            rep = ablation(["report", str(results), "--out", str(tmp_path / "rep")], cli_env, timeout=120)
            assert rep.returncode == 0, rep.stderr
            runs = pd.read_csv(tmp_path / "rep" / "runs.csv")
            curves = pd.read_csv(tmp_path / "rep" / "curves.csv")
            assert 1 <= len(runs) <= 2 and set(runs["status"]) <= {"ok", "unfinished"}
            assert runs["epochs_done"].between(0, 3).all() and (runs["val_err1"].isna() | runs["val_err1"].between(0, 100)).all()
            assert ((runs["status"] == "ok") == runs["val_err1"].notna()).all()
            assert curves["val_err1"].between(0, 100).all() and curves["epoch"].between(1, 3).all()
            calls["report"] += 1
        stop.set()
        assert sweep.wait(timeout=300) == 0, "".join(out)
    finally:
        stop.set()
        if reader.is_alive():
            reader.join()
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    print(f"\nwhile the sweep ran ({time.monotonic() - t0:.0f} s): {calls['status']} status and {calls['report']} report calls, "
          "all exit 0, "
          f"{calls['in-process reads']} in-process reads of status, collect and steps.jsonl; states seen {sorted(states_seen)}")
    assert not errors, errors
    assert calls["status"] >= 1 and calls["report"] >= 1 and calls["in-process reads"] >= 1
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0 and st.stdout.strip().splitlines()[-1] == "2 runs: 2 ok"
    for run in results.glob("runs/*"):
        assert [r["step"] for r in rundir.read_jsonl(run / "steps.jsonl")] == list(range(72))
    assert status.sweep_states(sweep_dir) and len(collect.collect([results])[0]) == 2


def test_a_sweep_pins_its_versions_and_status_names_runs_that_differ(finished_sweep: Path, tiny_data: Path, tmp_path: Path,
                                                                     cli_env: dict[str, str]) -> None:
    from ablation import provenance

    results = tmp_path / "results"
    subprocess.run(["cp", "-a", str(finished_sweep), str(results)], check=True)
    sweep_dir = results / "two"
    torch_version = provenance.package_versions()["torch"]
    pins = provenance.parse_constraints((sweep_dir / "constraints.txt").read_text())
    assert pins == {k: v for k, v in provenance.package_versions().items() if v} and pins["torch"] == torch_version
    a, b = (r["run_id"] for r in json.loads((sweep_dir / "manifest.json").read_text())["runs"])
    assert json.loads((results / "runs" / a / "env.json").read_text())["packages"] == provenance.package_versions()
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0 and "versions:" not in st.stdout, st.stdout
    env_a = (results / "runs" / a / "env.json").read_text()
    old_env = json.loads(env_a)
    old_env.pop("packages")  # a folder from before env.json recorded packages: only torch.__version__ and the like
    old_env["torch"] = "0.0.1+cu999"
    (results / "runs" / a / "env.json").write_text(json.dumps(old_env))
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0 and "versions:" not in st.stdout, st.stdout  # not compared, never reported
    (results / "runs" / a / "env.json").write_text(env_a)

    env = json.loads((results / "runs" / b / "env.json").read_text())
    env["packages"]["torch"] = "0.0.1"
    (results / "runs" / b / "env.json").write_text(json.dumps(env))
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0, st.stderr
    assert st.stdout.strip().splitlines()[-1] == (
        f"versions: torch 0.0.1 in 1 run ({b}), not the sweep's constraints.txt (torch {torch_version}): "
        "their numbers may differ in the last digits")

    # Submitted again from another environment: the pins stay the first submission's, and a warning says what differs.
    text = (sweep_dir / "constraints.txt").read_text().replace(f"torch=={torch_version}", "torch==0.0.1")
    (sweep_dir / "constraints.txt").write_text(text)
    (results / "runs" / b / "final.json").unlink()  # so that there is something to resume
    again = ablation(["sweep", str(two_run_spec(tmp_path)), f"data.root={tiny_data}", "--results", str(results), "--executor", "debug"],
                     cli_env)
    assert again.returncode == 0, again.stderr
    assert f"torch {torch_version} (pinned 0.0.1)" in again.stderr and (sweep_dir / "constraints.txt").read_text() == text
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.stdout.strip().splitlines()[-1].startswith(f"versions: torch {torch_version} in 2 runs ("), st.stdout
