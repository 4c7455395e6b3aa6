"""The fast paths of the collector give exactly what the plain ones give: config.json, JSON lines, CSV, parallel reads, the index."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ablation, curve, write_run

from ablation import config, rundir
from ablation.results import collect, report, runfiles


def _same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN, and of the same types all the way down."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return a == b


YAML_CASES = [
    "a: 1\nb: yes\nc: on\nd: ~\ne: null\nf: 1:30\ng: 0x1F\nh: 1_000\ni: .inf\nj: -.inf\nk: .nan\nl: 1e5\nm: 1.0e-05\n",
    "a: '1'\nb: 'it''s'\nc: ''\nd: it's\ne: a#b\nf: -1\ng: +1\nh: 0o17\ni: 017\nj: 2026-01-02\n",
    "on: 1\nyes: 2\nnull: 3\n",
    "a:\n- 1\n- x\nb:\n  - 2\nc:\n  d:\n  - 3\n  e: {}\nf: []\ng:\nh: 1\n",
    "a: 1 # comment\n",
    "# comment\na: 1\n",
    "a: [1, 2]\nb: {c: 3}\n",
    "a: very long text\n  continued here\n",
    "a: \"quoted\\tescape\"\n",
    "--- \na: 1\n",
    "a: &x 1\nb: *x\n",
    "a: !!str 1\n",
    "a:\tb\n",
    "a: b\r\nc: d\r\n",
    "a: é\n",
    "- 1\n- 2\n",
    "a: 1\n  b: 2\n",
    "a: b: c\n",
    "a:\n- b: 1\n  c: 2\n",
    "",
    "   \n",
    "a: 1\na: 2\n",
    "a: |\n  text\n",
    "a: =\n",
    "<<: {b: 1}\n",
]


@pytest.mark.parametrize("text", YAML_CASES)
def test_config_json_holds_the_yaml_values_or_is_not_written(text: str) -> None:
    """config.json is written only where JSON gives back exactly what yaml.safe_load reads from config.yaml."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    if not isinstance(doc, dict):
        return
    twin = rundir.config_json_text(doc)
    assert (twin is not None) == _jsonable(doc), (text, twin)
    if twin is not None:
        assert _same(json.loads(twin), doc), (text, twin)


def _jsonable(v: object) -> bool:
    """True where JSON holds exactly this value: string keys, finite floats, no dates."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    if isinstance(v, list):
        return all(map(_jsonable, v))
    if isinstance(v, float):
        return math.isfinite(v)
    return v is None or isinstance(v, (str, int, bool))


def test_a_run_config_has_a_json_twin() -> None:
    cfg = config.load(None, ["norm.name=gn", "norm.options={alpha: 0.5, beta: yes}", "data.root=/data/a b"])
    written = {"run_id": config.run_id(cfg), **config.to_dict(cfg), "derived": {"milestone_steps": [1, 2]}}
    doc = yaml.safe_load(yaml.safe_dump(written, sort_keys=False))
    twin = rundir.config_json_text(doc)
    assert twin is not None and _same(json.loads(twin), doc)


def _reference_read_jsonl(data: bytes) -> list[dict] | str:
    """read_jsonl's line-by-line rule, written out: rows, or 'corrupt'."""
    lines = [line for line in data.split(b"\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except ValueError:
            if i == len(lines) - 1:
                break
            return "corrupt"
        rows.append(row)
    return rows


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1}\n{"a": 2.5}\n',
        b'{"a": 1}\n{"a": NaN}\n{"b": Infinity}\n',
        b'{"a": 1}\n{"a": 2',
        b'{"a": 1}\n{"a": 2}',
        b'{"a": 1}\n\n{"a": 2}\n',
        b'{"a": 1}\n  \n{"a": 2}\n',
        b'{"a": 1}, {"a": 2}\n{"a": 3}\n',
        b'{"a": 1}\n{"a": 2}, {"a": 3}\n',
        b'{"a": 1}\n[1]\n',
        b'[1]\n{"a": 1}\n',
        b'1\n',
        b'{"a": 1}\r\n{"a": 2}\r\n',
        b'\xef\xbb\xbf{"a": 1}\n{"a": 2}\n',
        b'{"a": 1}\n\xef\xbb\xbf{"a": 2}\n{"a": 3}\n',
        b'{"a": "\xff"}\n{"a": 2}\n',
        b'{"a": 1}\ngarbage\n{"a": 3}\n',
        b'{"a": 1}\n{"a": {"b": [1, 2]}}\n',
    ],
)
def test_read_jsonl_fast_path_reads_what_lines_read(data: bytes, tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_bytes(data)
    want = _reference_read_jsonl(data)
    if want == "corrupt":
        with pytest.raises(rundir.CorruptFile):
            rundir.read_jsonl(p)
    else:
        assert _same(rundir.read_jsonl(p), want)


def test_write_csv_is_to_csv_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    floats = [0.1, 1e-5, 1e16, 9999999999999998.0, 1e-4, -0.0, 5e-324, 1.7976931348623157e308, float("nan"), float("inf"), -float("inf"),
              123456789.123, 2.5]
    strings = ["plain", "with, comma", 'with "quote"', "new\nline", "carriage\rreturn", "", None, "  spaced ", "é", "a;b", float("nan"),
               "'single'", "GN (G=32)"]
    df = pd.DataFrame({
        "s": strings,
        "f": floats,
        "i": list(range(-6, 7)),
        "o": pd.Series(strings, dtype=object),
        "with,comma": floats[::-1],
    })
    monkeypatch.setattr(report, "CSV_PARALLEL_ROWS", 2)  # pieces of 1 to 4 rows, made by two processes
    frames = (df, df[["f", "i"]], df.iloc[:0], df[["s"]], df.assign(b=[True] * 13), df.assign(c=pd.Categorical(["x"] * 13)))
    frames += (pd.concat([df] * 50),)
    for frame in frames:
        report.write_csv(frame, tmp_path / "fast.csv", workers=2)
        frame.to_csv(tmp_path / "pandas.csv", index=False)
        assert (tmp_path / "fast.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 runs under runs/ and a sweep folder linking to some (one link dangling), plus a copy of one run under a second root."""
    base = tmp_path_factory.mktemp("many")
    root = base / "results" / "runs"
    for i, norm in enumerate(["bn", "gn", "ln"] * 10):
        val = curve(24.0 + i / 10) if i % 7 else [80.0, float("nan")]
        write_run(root, [f"norm.name={norm}", f"batch_per_gpu={2 ** (i % 5 + 1)}", f"seed={i}"], val, status="ok" if i % 7 else "diverged")
    sweep = base / "results" / "sweep_a"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "manifest.json").write_text("{}")
    for p in sorted(root.iterdir())[:12]:
        (sweep / "runs" / p.name).symlink_to(Path("..") / ".." / "runs" / p.name)
    (sweep / "runs" / "gone").symlink_to(base / "nowhere")
    first = sorted(root.iterdir())[0]
    shutil.copytree(first, base / "other" / first.name)
    return base


def _reference(roots: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The collector's tables built the plain way: read_run per folder, a frame from the row dicts."""
    folders = collect.find_run_folders(roots)
    sweeps = collect._sweep_index(collect.sweep_links(roots))
    runs, curves = [], []
    for folder in folders:
        run, c = collect.read_run(folder)
        run["sweeps"] = sweeps(folder.name)
        runs.append(run)
        curves += c
    runs = collect.one_per_run_id(runs)
    collect.label_settings(runs)
    runs_df = pd.DataFrame(runs, columns=collect.RUN_COLUMNS)
    setting = dict(zip(runs_df["run_id"], runs_df["setting"]))
    for c in curves:
        c["setting"] = setting[c["run_id"]]
    return runs_df, pd.DataFrame(curves, columns=collect.CURVE_COLUMNS)


@pytest.mark.parametrize("workers", [1, 2])
def test_chunked_and_parallel_collect_equal_the_plain_construction(many: Path, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect, "_CHUNK", 4)  # several pieces, runs with and without NaN in different ones
    assert collect.reader_count(workers, 31) == workers  # a single-threaded process on Linux forks its readers
    roots = [many / "results", many / "other"]
    runs, curves = collect.collect(roots, workers=workers)
    want_runs, want_curves = _reference(roots)
    pd.testing.assert_frame_equal(runs, want_runs)
    pd.testing.assert_frame_equal(curves, want_curves)
    assert len(runs) == 30 and len(curves) == len(want_curves)
    assert runs["sweeps"].str.contains("sweep_a").sum() == 12


def test_irregular_metrics_fall_back_to_the_row_dicts(many: Path, tmp_path: Path) -> None:
    """A row without a metric, an int among floats, a run-level key in a row: the table is the plain one."""
    base = tmp_path / "copy"
    shutil.copytree(many / "results", base, symlinks=True)
    folders = sorted((base / "runs").iterdir())
    for folder, change in zip(folders, ("drop_lr", "int_lr", "seed_key")):
        rows = rundir.read_jsonl(folder / "metrics.jsonl")
        if change == "drop_lr":
            del rows[1]["lr"]
        elif change == "int_lr":
            rows[1]["lr"] = 1
        else:
            rows[1]["seed"] = 99
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs, curves = collect.collect([base], workers=2)
        want_runs, want_curves = _reference([base])
        pd.testing.assert_frame_equal(runs, want_runs)
        pd.testing.assert_frame_equal(curves, want_curves)
        assert runfiles.read_folder(str(folder))["rows"] is not None  # kept as rows: not one float or int per metric
        if change != "seed_key":
            rows = rundir.read_jsonl(folder / "metrics.jsonl")
            (folder / "metrics.jsonl").write_text("".join(json.dumps({k: r.get(k, 0.1) for k in rundir.METRIC_KEYS}) + "\n" for r in rows))


def test_report_writes_curves_csv_as_pandas_would(many: Path, tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    rep = report.build([many / "results", many / "other"], tmp_path / "out", timings=timings)
    assert (tmp_path / "out" / "curves.csv").read_text() == rep.curves.to_csv(index=False)
    assert (tmp_path / "out" / "runs.csv").read_text() == rep.runs.to_csv(index=False)
    assert set(timings) == {"find", "read", "frames", "csv", "tables", "figures"}


def test_result_fields_memo_equals_the_plain_computation() -> None:
    docs = [
        {"seed": 3, "norm": {"name": "gn", "groups": 16}, "optim": {"weight_decay": 5e-5}},
        {"seed": 4, "norm": {"name": "gn", "groups": 16}, "optim": {"weight_decay": 5e-5}, "run_id": "x"},
        {"seed": -1, "norm": {"name": "bn"}},
        {"seed": True, "norm": {"name": "bn"}},
        {"seed": "7", "norm": {"name": "bn"}},
        {"norm": {"name": "nonexistent-norm"}, "gpus": 0},
        {"norm": {"name": "bn"}},
        {"norm": {"name": "gn", "groups": 1}, "seed": 2},
    ]
    for doc in docs * 2:
        assert collect._fields(doc) == collect.result_fields(doc)


def test_each_run_folder_is_found_once_through_links(many: Path) -> None:
    folders = collect.find_run_folders([many / "results", many / "other"])
    assert len(folders) == 31 and len({f.resolve() for f in folders}) == 31
    assert [f.name for f in folders] == sorted(f.name for f in folders)


def _tables(roots: list[Path], **kw: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    return collect.collect(roots, workers=1, **kw)  # type: ignore[arg-type]


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folders runfiles.read_folder reads from now on (in this process: workers=1)."""
    seen: list[str] = []
    real = runfiles.read_folder

    def counted(folder: str) -> dict:
        seen.append(folder)
        return real(folder)

    monkeypatch.setattr(runfiles, "read_folder", counted)
    return seen


def _assert_same(a: tuple[pd.DataFrame, pd.DataFrame], b: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


@pytest.mark.parametrize("change", ["metrics rewritten", "final mtime only", "config.json replaced", "config.json removed"])
def test_index_rereads_only_the_folders_whose_files_changed(many: Path, tmp_path: Path, change: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "copy"
    shutil.copytree(many / "results", base, symlinks=True)
    index = tmp_path / "out" / runfiles.INDEX_NAME
    cold = _tables([base], index=index)
    _assert_same(cold, _tables([base]))  # the index changes nothing in the tables
    seen = _count_reads(monkeypatch)
    _assert_same(_tables([base], index=index), cold)
    assert seen == []  # nothing changed: nothing read
    folder = sorted((base / "runs").iterdir())[3]
    if change == "metrics rewritten":
        rows = rundir.read_jsonl(folder / rundir.METRICS)[:-1]
        rundir.write_jsonl(folder / rundir.METRICS, rows)
    elif change == "final mtime only":
        st = (folder / rundir.FINAL).stat()
        os.utime(folder / rundir.FINAL, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "config.json replaced":
        doc = json.loads((folder / rundir.CONFIG_JSON).read_text())
        rundir.write_text(folder / rundir.CONFIG_JSON, json.dumps({**doc, "epochs": 11}))
    else:
        (folder / rundir.CONFIG_JSON).unlink()
    warm = _tables([base], index=index)
    assert [Path(s).name for s in seen] == [folder.name]
    _assert_same(warm, _tables([base]))
    if change == "metrics rewritten":
        assert len(warm[1]) == len(cold[1]) - 1
    elif change == "config.json replaced":
        assert (warm[0]["epochs"] == 11).sum() == 1
    else:
        _assert_same(warm, cold)


@pytest.mark.parametrize("damage", ["garbage", "cut", "a class", "a class outside the pieces", "no pieces", "another version"])
def test_a_damaged_or_foreign_index_is_rebuilt_with_one_warning(many: Path, tmp_path: Path, damage: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    index = tmp_path / runfiles.INDEX_NAME
    roots = [many / "results", many / "other"]
    want = _tables(roots, index=index)
    data = index.read_bytes()
    index.write_bytes({
        "garbage": b"not a pickle at all",
        "cut": data[: len(data) // 2],
        "a class": pickle.dumps({"version": runfiles.INDEX_VERSION, "pieces": [pickle.dumps({"x": Path("/")})]}),
        "a class outside the pieces": pickle.dumps({"version": runfiles.INDEX_VERSION, "pieces": [], "x": Path("/")}),
        "no pieces": pickle.dumps({"version": runfiles.INDEX_VERSION, "pieces": {"x": b""}}),
        "another version": pickle.dumps({"version": runfiles.INDEX_VERSION + 1, "pieces": []}),
    }[damage])
    with caplog.at_level("WARNING", logger="ablation"):
        _assert_same(_tables(roots, index=index), want)
    warned = [r.getMessage() for r in caplog.records if "collect index" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "read again" in warned[0]
    assert runfiles.load_index(index)  # rebuilt whole


def test_old_folders_without_config_json_collect_to_the_same_tables(many: Path, tmp_path: Path) -> None:
    base = tmp_path / "old" / "results"  # the same folder name: a root with a manifest names a sweep
    shutil.copytree(many / "results", base, symlinks=True)
    for p in base.glob(f"runs/*/{rundir.CONFIG_JSON}"):
        p.unlink()
    assert not list(base.glob(f"runs/*/{rundir.CONFIG_JSON}"))
    _assert_same(_tables([base, many / "other"]), _tables([many / "results", many / "other"]))
    assert runfiles.read_folder(str(next((base / "runs").iterdir())))["identity"][0] == rundir.CONFIG


def test_concurrent_reports_leave_a_whole_index(many: Path, tmp_path: Path) -> None:
    """Two collectors writing one index at once: each renames a whole file into place; the last one's stays."""
    import multiprocessing

    index = tmp_path / runfiles.INDEX_NAME
    roots = [many / "results", many / "other"]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=collect.collect, args=(roots,), kwargs={"workers": 1, "index": index}) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    entries = runfiles.load_index(index)
    assert len(entries) == 31 and not list(tmp_path.glob("*.tmp"))
    _assert_same(_tables(roots, index=index), _tables(roots))


def test_report_cold_and_warm_are_byte_identical(many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second report into the same folder reads nothing and leaves unchanged outputs as they are; a deleted or edited
    output is made again; every file is the bytes a fresh report writes (PDFs: their creation time aside)."""
    roots = [many / "results", many / "other"]
    out = tmp_path / "out"
    report.build(roots, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    seen = _count_reads(monkeypatch)
    (out / "fig_curves.png").write_bytes(b"edited")
    (out / "runs.csv").unlink()
    rep = report.build(roots, out)
    assert seen == []
    assert (out / "curves.csv").stat().st_mtime_ns == stamps["curves.csv"]  # unchanged: not written again
    fresh = tmp_path / "fresh"
    report.build(roots, fresh)
    for p in fresh.iterdir():
        if p.name.startswith("."):
            continue
        data = (out / p.name).read_bytes()
        assert data == p.read_bytes() or p.suffix == ".pdf" and data.startswith(b"%PDF"), p.name
    assert (out / "curves.csv").read_text() == rep.curves.to_csv(index=False)
    assert (out / "runs.csv").read_text() == rep.runs.to_csv(index=False)
    assert [p.name for p in rep.files] == [p.name for p in report.build(roots, fresh).files]


def test_a_damaged_outputs_record_makes_every_output_again(many: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    roots = [many / "results"]
    out = tmp_path / "out"
    report.build(roots, out)
    before = (out / "curves.csv").read_bytes()
    (out / report.OUTPUTS_NAME).write_text("[1, 2")
    (out / "curves.csv").write_bytes(before)  # the same bytes, but not the file recorded: made again
    stamp = (out / "curves.csv").stat().st_ino
    with caplog.at_level("WARNING", logger="ablation"):
        report.build(roots, out)
    assert sum(report.OUTPUTS_NAME in r.getMessage() for r in caplog.records) == 1, [r.getMessage() for r in caplog.records]
    assert (out / "curves.csv").read_bytes() == before and (out / "curves.csv").stat().st_ino != stamp  # renamed into place anew
    assert json.loads((out / report.OUTPUTS_NAME).read_text())["version"] == report.OUTPUTS_VERSION


@pytest.mark.parametrize("change", ["one run's metrics", "a run added", "a run removed", "an output edited"])
def test_curves_csv_pieces_not_changed_are_copied_and_the_file_is_to_csv(many: Path, tmp_path: Path, change: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A report into a folder with an earlier report's curves.csv copies the pieces of rows that are the same and makes
    the others with pandas: the file is what to_csv writes for the whole table (also with 2 processes making pieces)."""
    monkeypatch.setattr(report, "CSV_PARALLEL_ROWS", 10)
    monkeypatch.setattr(report, "PIECE_RUNS", 3)
    base = tmp_path / "copy" / "results"
    shutil.copytree(many / "results", base, symlinks=True)
    out = tmp_path / "out"
    first = report.build([base], out)
    assert (out / "curves.csv").read_text() == first.curves.to_csv(index=False)
    assert len(report.piece_bounds(first.curves)) > 3
    made: list[int] = []
    real = report.csv_pieces

    def counted(df: pd.DataFrame, bounds: list, workers: int | None = None) -> list[str]:
        made.append(sum(b - a for a, b in bounds))
        return real(df, bounds, 2)

    monkeypatch.setattr(report, "csv_pieces", counted)
    folders = sorted((base / "runs").iterdir())
    if change == "one run's metrics":
        rows = rundir.read_jsonl(folders[5] / rundir.METRICS)
        rundir.write_jsonl(folders[5] / rundir.METRICS, [{**r, "lr": r["lr"] / 3} for r in rows])
    elif change == "a run added":
        write_run(base / "runs", ["norm.name=gn", "batch_per_gpu=4", "seed=77"], curve(30.0))
    elif change == "a run removed":
        shutil.rmtree(folders[7])
    else:
        with open(out / "curves.csv", "r+b") as f:
            f.seek(200)
            f.write(b"X")
    second = report.build([base], out)
    assert (out / "curves.csv").read_text() == second.curves.to_csv(index=False)
    if change == "an output edited":
        assert made == [len(second.curves)]  # not the recorded file: nothing copied from it
    else:
        assert made and 0 < made[0] < len(second.curves)  # some pieces copied, the changed ones made
    made.clear()
    report.build([base], out)
    assert made == []  # nothing changed: the file is left as it is


def test_a_damaged_config_json_is_read_from_config_yaml_with_a_warning(many: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / "copy" / "results"
    shutil.copytree(many / "results", base, symlinks=True)
    folder = sorted((base / "runs").iterdir())[2]
    (folder / rundir.CONFIG_JSON).write_text('{"run_id": ')
    entry = runfiles.read_folder(str(folder))
    assert entry["config"] == yaml.safe_load((folder / rundir.CONFIG).read_text())
    assert len(entry["warnings"]) == 1 and rundir.CONFIG_JSON in entry["warnings"][0]
    with caplog.at_level("WARNING", logger="ablation"):
        _assert_same(_tables([base]), _tables([many / "results"]))
    assert sum(rundir.CONFIG_JSON in r.getMessage() for r in caplog.records) == 1
    assert rundir.read_config(folder / rundir.CONFIG) == entry["config"]  # what the launcher reads too


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    """Each file of a report folder: (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}


def test_a_report_of_unchanged_inputs_reads_and_writes_nothing(many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture, cli_env: dict[str, str]) -> None:
    """Nothing that makes the outputs changed (run files, sweep links, reference, options, versions) and the outputs are as
    left: no run folder is read and no file written; the tables behind the files are made on first use, equal to a fresh
    report's, and the warnings of the report that made the files are said again."""
    roots = [many / "results", many / "other"]  # the copy of a run under `other`: a warning
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="ablation"):
        first = report.build(roots, out)
    said = [r.getMessage() for r in caplog.records]
    assert any("copies of a run" in m for m in said)
    stamps = _stamps(out)
    seen = _count_reads(monkeypatch)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ablation"):
        again = report.build(roots, out)
    assert seen == [] and _stamps(out) == stamps  # not read, not written
    assert [r.getMessage() for r in caplog.records] == said
    assert [p.name for p in again.files] == [p.name for p in first.files]
    assert again.status_counts() == first.status_counts() and again.main_table() == (out / "table_batch_size.md").read_text()
    assert seen == []  # the counts and the main table come from the files
    pd.testing.assert_frame_equal(again.runs, first.runs)
    pd.testing.assert_frame_equal(again.curves, first.curves)
    assert [t.markdown() for t in again.tables] == [t.markdown() for t in first.tables]
    cold = ablation(["report", *map(str, roots), "--out", str(tmp_path / "cli")], cli_env)
    warm = ablation(["report", *map(str, roots), "--out", str(tmp_path / "cli")], cli_env)
    assert cold.returncode == warm.returncode == 0 and warm.stdout == cold.stdout and warm.stderr == cold.stderr


@pytest.mark.parametrize("change", ["a run's final status", "a sweep link", "the reference numbers", "the baselines", "an output removed"])
def test_a_report_remakes_its_outputs_when_an_input_changed(many: Path, tmp_path: Path, change: str) -> None:
    base = tmp_path / "copy"
    shutil.copytree(many / "results", base / "results", symlinks=True)
    ref = tmp_path / "reference"
    shutil.copytree(report.reference_dir(), ref)
    roots, out = [base / "results"], tmp_path / "out"
    report.build(roots, out, ["bn", "gn"], ref)
    before = (out / "runs.csv").read_text()
    folder = sorted((base / "results" / "runs").iterdir())[20]
    baselines = ["bn", "gn"]
    if change == "a run's final status":
        rundir.write_json(folder / rundir.FINAL, {**rundir.read_json(folder / rundir.FINAL), "status": "failed", "reason": "x"})
    elif change == "a sweep link":
        (base / "results" / "sweep_a" / "runs" / folder.name).symlink_to(folder)
    elif change == "the reference numbers":
        table = next(ref.glob("wu_he*.csv"))
        table.write_text(table.read_text().replace("34.7", "34.6"))
    elif change == "the baselines":
        baselines = ["gn"]
    else:
        (out / "table_norms.tex").unlink()
    stamps = _stamps(out)
    rep = report.build(roots, out, baselines, ref)
    assert rep._made is not None  # made, not taken from the files
    changed = {n for n, s in _stamps(out).items() if stamps.get(n) != s}
    assert report.OUTPUTS_NAME in changed
    if change == "a run's final status":
        assert (out / "runs.csv").read_text() != before and "runs.csv" in changed
    elif change == "a sweep link":
        assert "sweep_a" in rep.runs.set_index("run_id").loc[folder.name, "sweeps"] and "runs.csv" in changed
    elif change == "the reference numbers":
        assert "34.6" in (out / "table_batch_size.md").read_text() or "34.6" in (out / "table_batch_size.csv").read_text()
    elif change == "the baselines":
        assert "fig_delta_vs_batch.png" in changed
    else:
        assert (out / "table_norms.tex").is_file()


def _odd_floats(n: int, seed: int) -> list[float]:
    """Doubles of every magnitude (exponent notation both ways, subnormals, the largest), NaN, ±inf and -0.0, n of them."""
    import random

    rng = random.Random(seed)
    special = [0.1, 1e-5, 1e-4, 1e15, 1e16, 9999999999999998.0, 5e-324, 1.7976931348623157e308, -0.0, 0.0, float("nan"),
               float("inf"), -float("inf"), 1 / 3, 123456789.123]
    return [special[i % len(special)] if i % 3 == 0 else rng.uniform(-1, 1) * 10.0 ** rng.randint(-320, 300) for i in range(n)]


def test_curves_csv_made_in_pieces_by_processes_is_plain_to_csv_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimised writer (pieces of rows by two forked processes, while the caller goes on; float64 columns through the
    csv module's repr) writes the bytes pandas' plain to_csv writes, for curves.csv's columns and one more float column
    of the kind a run with extra evaluation modes adds (mostly empty)."""
    n = 3000
    ids = [f"run{i // 30:03d}" for i in range(n)]
    df = pd.DataFrame({
        "run_id": pd.Series(ids, dtype="str"),
        "variant": pd.Series(["GN (G=32)", "BN", 'with "quote", comma'][i % 3] for i in range(n)),
        "setting": pd.Series("" if i % 2 else "epochs=10, optim.wd=0.0001" for i in range(n)),
        "batch_per_gpu": [2 ** (i % 5) for i in range(n)],
        "epoch": list(range(n)),
        "lr": _odd_floats(n, 0),
        "val_err1": _odd_floats(n, 1),
        "val_err1_precise": [float("nan") if i % 4 else v for i, v in enumerate(_odd_floats(n, 2))],
        "flag": [i % 2 == 0 for i in range(n)],
    })
    plain = df.to_csv(index=False).encode()
    monkeypatch.setattr(report, "CSV_PARALLEL_ROWS", 100)
    monkeypatch.setattr(report, "PIECE_RUNS", 4)
    bounds = report.piece_bounds(df)
    assert len(bounds) > 4
    assert b"".join(report.csv_pieces(df, bounds, workers=2)) == plain[len(df.iloc[:0].to_csv(index=False)):]
    report.write_csv(df, tmp_path / "fast.csv", workers=2)
    assert (tmp_path / "fast.csv").read_bytes() == plain
    outputs = report._Outputs(tmp_path)
    finish = report._start_csv_output(df, tmp_path, "curves.csv", outputs, ("v",))
    assert (tmp_path / "curves.csv").exists() is False  # nothing written until asked: the caller went on meanwhile
    finish()
    assert (tmp_path / "curves.csv").read_bytes() == plain
    assert report._floats_as_objects(df[["epoch"]].astype("float32"))["epoch"].dtype == "float32"  # its shortest text is not a double's


def test_only_folders_with_extra_metrics_are_read_for_the_mechanism_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report reads again only the run folders whose metrics rows hold keys beside METRIC_KEYS (recorded in the collect
    index), and its mechanism table is the one made from every folder."""
    root = tmp_path / "results" / "runs"
    for seed in (0, 1):
        write_run(root, ["norm.name=gn", f"seed={seed}"], curve(25.0))
        made = write_run(root, ["gpus=8", "batch_per_gpu=32", "norm.batch=2", f"seed={seed}", "eval.modes=[ema,precise,batch]",
                                "eval.precise_images=100"], curve(30.0))
        rows = rundir.read_jsonl(made["folder"] / rundir.METRICS)
        rundir.write_jsonl(made["folder"] / rundir.METRICS, [{**r, "val_err1_precise": r["val_err1"] - 1, "val_err5_precise": 1.0,
                                                              "val_err1_batch": r["val_err1"] - 3, "val_err5_batch": 1.0} for r in rows])
    folders = sorted(root.iterdir())
    extra = {f.name: runfiles.read_folder(str(f))["extra"] for f in folders}
    assert sorted(map(len, extra.values())) == [0, 0, 4, 4]
    read: list[list[Path]] = []
    real = report.mechanism.read_runs
    monkeypatch.setattr(report.mechanism, "read_runs", lambda fs: read.append(list(fs)) or real(fs))
    report.build([tmp_path / "results"], tmp_path / "out")
    assert [f.name for f in read[0]] == [name for name, keys in extra.items() if keys]
    report.write_mechanism(folders, tmp_path / "every")
    for name in ("table_mechanism.md", "table_mechanism.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "every" / name).read_bytes()


# ---------------------------------------------------------------- metrics.npy, metrics.jsonl's twin


def _lines_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The metrics.jsonl files rundir.read_jsonl parses from now on (in this process)."""
    seen: list[str] = []
    real = rundir.read_jsonl

    def counted(path: str | Path) -> list[dict]:
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(rundir, "read_jsonl", counted)
    return seen


def _plain(entry: dict) -> str:
    """An entry less its files' identities, comparable where NaN is (repr: NaN reads as nan on both sides)."""
    return repr(sorted((k, v) for k, v in entry.items() if k != "identity"))


@pytest.mark.parametrize("val", [curve(24.0), [80.0, float("nan")], [30, 20, 10]], ids=["floats", "nan", "int errors"])
def test_a_twin_that_mirrors_metrics_jsonl_is_read_instead_of_its_lines(val: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_run(tmp_path, ["norm.name=gn"], val, status="ok" if val[-1] == val[-1] else "diverged")["folder"]
    twin = np.load(folder / rundir.METRICS_COLUMNS)
    assert twin.dtype.names == rundir.METRIC_KEYS and twin.dtype["val_err1"].kind == ("i" if type(val[0]) is int else "f")
    seen = _lines_read(monkeypatch)
    loads: list[object] = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    entry = runfiles.read_folder(str(folder))
    assert seen == [] and entry["n"] == len(val)  # no line parsed
    assert len(loads) == (1 if type(val[0]) is int else 0)  # the trainer's dtype (an int epoch, float metrics): no header parsed
    (folder / rundir.METRICS_COLUMNS).unlink()
    plain = runfiles.read_folder(str(folder))
    assert seen == [str(folder / rundir.METRICS)] and _plain(entry) == _plain(plain)


def test_a_twin_with_another_header_is_read_by_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .npy of the same array with a 2.0 header (another numpy's np.save may write one): read through np.load, the same entry."""
    folder = write_run(tmp_path, ["norm.name=gn"], curve(24.0))["folder"]
    fast = runfiles.read_folder(str(folder))
    array = np.load(folder / rundir.METRICS_COLUMNS)
    with open(folder / rundir.METRICS_COLUMNS, "wb") as f:
        np.lib.format.write_array(f, array, version=(2, 0))
    assert not (folder / rundir.METRICS_COLUMNS).read_bytes().startswith(rundir._twin_head(len(array)))
    loads: list[object] = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    seen = _lines_read(monkeypatch)
    again = runfiles.read_folder(str(folder))
    assert seen == [] and len(loads) == 1 and _plain(again) == _plain(fast)


def _stale(folder: Path, how: str) -> None:
    """Make the folder's metrics.npy not mirror its metrics.jsonl (or be no twin at all) in one way."""
    rows = rundir.read_jsonl(folder / rundir.METRICS)
    twin = folder / rundir.METRICS_COLUMNS

    def save(array: np.ndarray) -> None:
        twin.write_bytes(rundir.npy_bytes(array))

    if how == "older than the lines":
        st = (folder / rundir.METRICS).stat()
        os.utime(twin, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_000))
    elif how == "a row fewer":
        save(rundir.metric_array(rows[:-1]))
    elif how == "another last value":
        save(rundir.metric_array([*rows[:-1], {**rows[-1], "val_err1": rows[-1]["val_err1"] + 1}]))
    elif how == "an int for a float":
        save(rundir.metric_array([{**r, "lr": 1} for r in rows]))
    elif how == "a torn last line":
        with open(folder / rundir.METRICS, "ab") as f:
            f.write(b'{"epoch": 11, "lr"')
        os.utime(twin)  # the twin still the newer file: the line count tells
    elif how == "lines rewritten after":
        rundir.write_jsonl(folder / rundir.METRICS, [{**rows[0], "train_loss": 9.0}, *rows[1:]])  # same count, same last line
        st = twin.stat()
        os.utime(folder / rundir.METRICS, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif how == "garbage":
        twin.write_bytes(b"not an array")
    elif how == "other fields":
        save(np.zeros(len(rows), dtype=[(k, "<f8") for k in ("epoch", "val_err1")]))
    elif how == "float32 fields":
        save(rundir.metric_array(rows).astype([(k, "<f4") for k in rundir.METRIC_KEYS]))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["older than the lines", "a row fewer", "another last value", "an int for a float", "a torn last line",
                                 "lines rewritten after", "garbage", "other fields", "float32 fields"])
def test_a_twin_that_does_not_mirror_metrics_jsonl_is_passed_over_for_the_lines(how: str, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_run(tmp_path, ["norm.name=gn"], curve(24.0))["folder"]
    _stale(folder, how)
    seen = _lines_read(monkeypatch)
    entry = runfiles.read_folder(str(folder))
    assert seen == [str(folder / rundir.METRICS)]  # the lines are the record
    (folder / rundir.METRICS_COLUMNS).unlink()
    assert _plain(entry) == _plain(runfiles.read_folder(str(folder)))


def test_write_metrics_writes_a_twin_only_for_regular_rows(tmp_path: Path) -> None:
    row = {"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_err1": 50.0, "val_err1": 40.0, "val_err5": 20.0, "images_per_s": 9.5,
           "epoch_seconds": 1.5, "wall_seconds": 1.5}
    rundir.write_metrics(tmp_path, [row])
    assert (tmp_path / rundir.METRICS_COLUMNS).exists()
    assert (tmp_path / rundir.METRICS_COLUMNS).stat().st_mtime_ns >= (tmp_path / rundir.METRICS).stat().st_mtime_ns
    irregular = {
        "an extra mode's key": [row, {**row, "epoch": 2, "val_err1_precise": 39.0}],
        "a key missing": [{k: v for k, v in row.items() if k != "lr"}],
        "ints and floats": [row, {**row, "epoch": 2, "lr": 1}],
        "a boolean": [{**row, "epoch": True}],
        "a null": [{**row, "val_err1": None}],
        "an int past int64": [{**row, "epoch": 2**63}],
        "no rows": [],
    }
    for name, rows in irregular.items():
        rundir.write_metrics(tmp_path, [row])
        rundir.write_metrics(tmp_path, rows)  # the twin of the row before is gone with it
        assert rundir.metric_array(rows) is None, name
        assert not (tmp_path / rundir.METRICS_COLUMNS).exists(), name
        assert rundir.read_jsonl(tmp_path / rundir.METRICS) == rows


def test_folders_with_and_without_twins_collect_to_the_same_tables(many: Path, tmp_path: Path) -> None:
    base = tmp_path / "lines" / "results"  # the same folder name: a root with a manifest names a sweep
    shutil.copytree(many / "results", base, symlinks=True)
    twins = list(base.glob(f"runs/*/{rundir.METRICS_COLUMNS}"))
    assert len(twins) == 30  # write_run writes them, as the trainer does
    for p in twins[::2]:
        p.unlink()
    with_twins = _tables([many / "results", many / "other"])
    _assert_same(_tables([base, many / "other"]), with_twins)
    for p in base.glob(f"runs/*/{rundir.METRICS_COLUMNS}"):
        p.unlink()
    _assert_same(_tables([base, many / "other"]), with_twins)


def test_a_survey_without_stats_takes_the_readers_identities_and_the_same_digest(many: Path) -> None:
    roots = [many / "results", many / "other"]
    full = collect.survey(roots)
    bare = collect.survey(roots, stats=False)
    assert bare.identities is None and bare.folders == full.folders
    with pytest.raises(ValueError, match="identities"):
        bare.digest()
    identities: list = []
    _assert_same(collect.collect(roots, workers=2, surveyed=bare, identities=identities), collect.collect(roots, surveyed=full))
    assert identities == full.identities and bare.with_identities(identities).digest() == full.digest()


def test_a_first_collect_by_processes_keeps_their_pieces_as_the_index(many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every folder read by the reader processes: their pickled pieces are the index as they are; it loads to each folder's
    entry, and a collect after it reads nothing."""
    roots = [many / "results", many / "other"]
    index = tmp_path / runfiles.INDEX_NAME
    cold = collect.collect(roots, workers=2, index=index)
    doc = pickle.loads(index.read_bytes())
    assert doc["version"] == runfiles.INDEX_VERSION and len(doc["pieces"]) >= 1 and all(isinstance(p, bytes) for p in doc["pieces"])
    entries = runfiles.load_index(index)
    folders = [str(f) for f in collect.find_run_folders(roots)]
    assert list(entries) == folders
    assert all(_plain(entries[f]) == _plain(runfiles.read_folder(f)) and entries[f]["identity"] == runfiles.identity(f) for f in folders)
    seen = _count_reads(monkeypatch)
    _assert_same(_tables(roots, index=index), cold)
    assert seen == []


def test_piece_digests_are_the_digests_of_the_slices() -> None:
    """The columns hashed once and sliced give each piece the digest of its own rows (numbers, strings, NaN, None, -0.0,
    nullable ints, mixed objects)."""
    n = 3000
    df = pd.DataFrame({"run_id": [f"r{i // 7}" for i in range(n)], "x": np.linspace(-1, 1, n), "z": np.where(np.arange(n) % 2, -0.0, 0.0),
                       "k": pd.array([1, None, 3] * (n // 3), dtype="Int64"), "o": [None, "a,b", 1.5, float("nan")] * (n // 4),
                       "s": pd.array(["x", None] * (n // 2), dtype="string")})
    bounds = report.piece_bounds(df)
    assert len(bounds) > 3
    assert report._piece_digests(df, bounds, ("2.0", "1.0")) == [report._digest(df.iloc[a:b], ("2.0", "1.0")) for a, b in bounds]
    other = df.assign(x=df["x"].where(df.index != 5, 9.0))
    changed = [i for i, (a, b) in enumerate(zip(report._piece_digests(df, bounds), report._piece_digests(other, bounds))) if a != b]
    assert changed == [next(i for i, (a, b) in enumerate(bounds) if a <= 5 < b)]
