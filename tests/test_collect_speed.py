"""The fast paths of the collector give exactly what the plain ones give: YAML, JSON lines, CSV, parallel reads."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ablation import config, fastyaml, rundir
from ablation.results import collect
from ablation.results import report
from test_report import curve, write_run


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


def _safe_load(text: str) -> tuple[str, object]:
    try:
        return "ok", yaml.safe_load(text)
    except yaml.YAMLError:
        return "error", None


def _fast_load(text: str) -> tuple[str, object]:
    try:
        return "ok", fastyaml.load(text)
    except yaml.YAMLError:
        return "error", None


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
def test_fastyaml_reads_what_safe_load_reads(text: str) -> None:
    want, got = _safe_load(text), _fast_load(text)
    assert want[0] == got[0] and _same(want[1], got[1]), (text, want, got)


def test_fastyaml_agrees_on_random_block_yaml() -> None:
    rng = random.Random(0)
    values = ["1", "1.5", "-2", "yes", "No", "null", "~", "[]", "{}", "'a''b'", "''", "a b", "1:30", "0x10", "1e5", "x:", "- y", "#c", "a #c", "@x", "'x"]
    for _ in range(3000):
        lines = []
        for _ in range(rng.randint(1, 8)):
            indent = " " * rng.choice([0, 0, 2, 2, 4, 1])
            kind = rng.random()
            if kind < 0.5:
                lines.append(f"{indent}{rng.choice(['a', 'b', 'on', 'null', 'k_1'])}: {rng.choice(values)}")
            elif kind < 0.75:
                lines.append(f"{indent}{rng.choice(['a', 'b', 'c'])}:")
            else:
                lines.append(f"{indent}- {rng.choice(values)}")
        text = "\n".join(lines) + rng.choice(["\n", ""])
        want, got = _safe_load(text), _fast_load(text)
        assert want[0] == got[0] and _same(want[1], got[1]), (text, want, got)


def test_fastyaml_reads_a_run_config_without_pyyaml() -> None:
    """A config.yaml as the trainer writes it takes the line-by-line path (that is the speed) and equals safe_load."""
    cfg = config.load(None, ["norm.name=gn", "norm.options={alpha: 0.5, beta: yes}", "data.root=/data/a b"])
    text = yaml.safe_dump({"run_id": config.run_id(cfg), **config.to_dict(cfg), "derived": {"milestone_steps": [1, 2]}}, sort_keys=False)
    assert _same(fastyaml._parse(text), yaml.safe_load(text))


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


def test_write_csv_is_to_csv_byte_for_byte(tmp_path: Path) -> None:
    floats = [0.1, 1e-5, 1e16, 9999999999999998.0, 1e-4, -0.0, 5e-324, 1.7976931348623157e308, float("nan"), float("inf"), -float("inf"), 123456789.123, 2.5]
    strings = ["plain", "with, comma", 'with "quote"', "new\nline", "carriage\rreturn", "", None, "  spaced ", "é", "a;b", float("nan"), "'single'", "GN (G=32)"]
    df = pd.DataFrame({
        "s": strings,
        "f": floats,
        "i": list(range(-6, 7)),
        "o": pd.Series(strings, dtype=object),
        "with,comma": floats[::-1],
    })
    for frame in (df, df[["f", "i"]], df.iloc[:0], df[["s"]], df.assign(b=[True] * 13), df.assign(c=pd.Categorical(["x"] * 13))):
        collect.write_csv(frame, tmp_path / "fast.csv")
        frame.to_csv(tmp_path / "pandas.csv", index=False)
        assert (tmp_path / "fast.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


def test_repr_is_what_numpy_writes_for_a_float64() -> None:
    """curves.csv's text is made with repr(); pandas makes it with numpy's str(): the same for every float64."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.random(20000) * 100, 10.0 ** rng.uniform(-30, 30, 20000), rng.standard_normal(20000), np.nextafter(1e16, [0, 2e16]), np.nextafter(1e-4, [0, 1])])
    assert values.astype(str).tolist() == list(map(repr, values.tolist()))
    assert collect._repr_is_numpy_str()


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
    sweeps = collect._sweep_index(roots)
    runs, curves = [], []
    for folder in folders:
        run, c = collect.read_run(folder)
        run["sweeps"] = sweeps(folder.name)
        runs.append(run)
        curves += c
    runs = collect._one_per_run_id(runs)
    collect._label_settings(runs)
    runs_df = pd.DataFrame(runs, columns=collect.RUN_COLUMNS)
    setting = dict(zip(runs_df["run_id"], runs_df["setting"]))
    for c in curves:
        c["setting"] = setting[c["run_id"]]
    return runs_df, pd.DataFrame(curves, columns=collect.CURVE_COLUMNS)


@pytest.mark.parametrize("workers", [1, 2])
def test_chunked_and_parallel_collect_equal_the_plain_construction(many: Path, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect, "_CHUNK", 4)  # several pieces, runs with and without NaN in different ones
    assert collect._workers(workers, 31) == workers  # a single-threaded process on Linux forks its readers
    roots = [many / "results", many / "other"]
    runs, curves, text = collect.collect_with_text(roots, workers=workers)
    want_runs, want_curves = _reference(roots)
    pd.testing.assert_frame_equal(runs, want_runs)
    pd.testing.assert_frame_equal(curves, want_curves)
    assert len(runs) == 30 and len(curves) == sum(len(c) for c in [want_curves]) and text is not None
    assert collect.csv_header(collect.CURVE_COLUMNS) + "".join(text) == want_curves.to_csv(index=False)
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
        runs, curves, text = collect.collect_with_text([base], workers=2)
        want_runs, want_curves = _reference([base])
        pd.testing.assert_frame_equal(runs, want_runs)
        pd.testing.assert_frame_equal(curves, want_curves)
        assert text is None
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


def test_curves_lines_cut_from_the_metrics_text_equal_the_encoded_ones(tmp_path: Path) -> None:
    """runfiles takes a folder's curves.csv lines from its metrics.jsonl text only where that text is json.dumps'
    of the rows with the keys in order; anything else (another key order, spacing, an extra key, a torn last
    line) is encoded from the values. Either way the lines are _metric_block's, NaN and infinities included."""
    from ablation.results import runfiles

    keys = rundir.METRIC_KEYS
    rng = random.Random(0)

    def row(epoch: int) -> dict:
        r = {k: rng.choice([rng.random() * 10 ** rng.randint(-8, 8), 1e16, 0.1, -0.0, 1e-05]) for k in keys}
        r["epoch"] = epoch
        return r

    plain = [row(i + 1) for i in range(6)]
    odd = [dict(r) for r in plain]
    odd[2]["train_loss"], odd[3]["val_err5"], odd[4]["lr"] = math.nan, math.inf, -math.inf
    line = lambda r: json.dumps(r) + "\n"  # noqa: E731 - what rundir.write_jsonl writes
    cases = {
        "plain": ("".join(map(line, plain)), True),
        "nan and infinities": ("".join(map(line, odd)), True),
        "keys reordered": ("".join(json.dumps(dict(reversed(list(r.items())))) + "\n" for r in plain), False),
        "second key swapped": ("".join(json.dumps({"epoch": r["epoch"], "train_loss": r["train_loss"], **r}) + "\n" for r in plain), False),
        "compact separators": ("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in plain), False),
        "extra key": ("".join(json.dumps({**r, "note": 1.5}) + "\n" for r in plain), False),
        "torn last line": ("".join(map(line, plain)) + line(plain[0])[:20], False),
    }
    for name, (text, from_text) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / rundir.METRICS).write_text(text)
        rows, data = rundir.read_jsonl_and_text(folder / rundir.METRICS)
        values = [tuple(r[k] for k in keys) for r in rows]
        chunk = runfiles.read_chunk([str(folder)])
        assert chunk.blocks == [runfiles._metric_block(values)], name
        cut = runfiles._text_block(data, values) if all(list(r) == list(keys) for r in rows) else None
        assert (cut is not None) == from_text, name
        if cut is not None:
            assert cut == runfiles._metric_block(values), name
    lines = runfiles._metric_block([tuple(r[k] for k in keys) for r in odd]).splitlines()
    assert ",," in lines[2] and ",inf," in lines[3] and ",-inf," in lines[4]  # pandas' NaN, inf, -inf
