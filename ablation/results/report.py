"""Report: the paper's tables and figures from collected runs, with the paper's numbers beside ours.

Torch-free. Every number comes from runs.csv / curves.csv (ablation.collect), which come from run
folders; the paper's numbers come from results/reference/*.csv, one file per paper.

Two ways to put the paper beside a row, chosen per row and said in each table's caption:

- a row in the paper's setting (collect's ``paper_setting``: the paper's recipe, results/paper_recipe.yaml, in every
  result-affecting field but the axes the paper sweeps, on ImageNet-1k by its class, train and val image counts)
  reads "ours (paper, Δ)" with Δ = ours − paper;
- any other row (10 epochs, one GPU, synthetic data, a small model ...) cannot be compared level for level, and the
  caption names how it differs ("10 epochs, not 100; 1 GPU, not 8; cosine schedule, not step"): its cells read
  "ours (rise, paper rise)", the rise being ours minus the row's base (its first column with a number:
  the largest images per GPU, the largest G) and the paper's rise its number minus its number at the
  same base. The base cell reads "ours (base)".

ours is "mean ± std (n=k)" when several seeds finished; with one seed, a line under the table gives the binomial
noise floor of the validation set (√(e(1−e)/n): ±0.19 points at 24 % error on 50,000 images). A paper number marked
† is secondary (a third-party transcription), ‡ comes from another recipe (another schedule or batch; the reference
file's ``recipe`` says which). A cell whose runs did not finish says so (diverged, failed, unfinished
k/n) instead of showing a number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ablation import provenance, rundir
from ablation.gcpause import gc_paused
from ablation.norms import registry
from ablation.results import mechanism, recipe, runfiles
from ablation.results.collect import PARALLEL_MIN_FOLDERS, Survey, background, collect, reader_count, survey, variant
from ablation.rundir import atomic_path, write_text

log = logging.getLogger("ablation")

REFERENCE_DIRS = (Path("results/reference"), Path(__file__).resolve().parents[2] / "results" / "reference")
PAPER_MODELS = {"resnet50": "ResNet-50", "resnet101": "ResNet-101"}
REFERENCE_COLUMNS = ["paper", "table", "model", "norm", "batch_per_gpu", "groups", "channels_per_group", "val_error_pct", "status"]
# Optional columns of a reference file: `fields` (config fields the run must match, "norm.r_max=1.5;
# model.weight_std=true"; a row without model.weight_std is a run without WS), `recipe` (empty: the GN
# paper's recipe; else how it differs, shown as ‡), `source` (where the number was read).
REFERENCE_OPTIONAL = ["fields", "recipe", "source"]
SECONDARY, OTHER_RECIPE = "†", "‡"
BATCH_TABLES = ("table2_batch_size", "resnet101", "batch_renorm", "weight_standardization")
NORM_TABLES = ("table1_norm_methods", "footnote3_weightnorm", "table2_batch_size", "batch_renorm", "resnet101", "weight_standardization")


# ---------------------------------------------------------------- reference numbers


def reference_dir(explicit: str | Path | None = None) -> Path:
    """The folder of reference CSVs: explicit, ./results/reference, or the repository's."""
    if explicit:
        return Path(explicit)
    return next((d for d in REFERENCE_DIRS if d.is_dir()), REFERENCE_DIRS[-1])


def load_reference(folder: Path) -> pd.DataFrame:
    """All reference CSVs of a folder, each file one paper (its name in the `paper` column)."""
    cols = REFERENCE_COLUMNS + REFERENCE_OPTIONAL
    frames = [pd.read_csv(f, keep_default_na=False,
                          na_values={"batch_per_gpu": [""], "groups": [""], "channels_per_group": [""],
                                     "val_error_pct": [""]}).assign(paper=f.stem)
              for f in sorted(folder.glob("*.csv"))]
    if not frames:
        return pd.DataFrame(columns=cols)
    ref = pd.concat(frames, ignore_index=True)
    for c in REFERENCE_OPTIONAL:
        ref[c] = ref[c].fillna("").astype(str) if c in ref else ""
    return ref[cols]


def _num(v: Any) -> float | None:
    """A float, or None for empty/NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _fields(text: str) -> dict[str, str]:
    """A reference row's `fields`: 'norm.r_max=1.5; model.weight_std=true' -> {key: value text}."""
    out = {}
    for item in str(text or "").split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip().lower()
    return out


def _same(value: Any, text: str) -> bool:
    """A run's field value equals a reference row's written one (true/false as booleans, numbers as numbers)."""
    if text in ("true", "false"):
        return bool(value) == (text == "true")
    a, b = _num(value), _num(text)
    if b is not None:
        return a is not None and math.isclose(a, b)
    return str(value).lower() == text


@dataclass(frozen=True)
class Ref:
    """One paper number for a setting."""

    value: float
    secondary: bool  # a third-party transcription
    recipe: str  # '' = the GN paper's recipe; else how this number's recipe differs
    any_batch: bool  # the reference row holds for any images per GPU (a batch-independent result)
    source: str = ""


def reference_labels(norm: str) -> set[str]:
    """The norm column values (upper case) of reference rows for a norm name: the registry's spellings (BR for brn ...)."""
    return registry.spellings(str(norm))


def paper_ref(ref: pd.DataFrame, tables: tuple[str, ...], model: str | None, norm: str, batch: int, groups: Any = None, cpg: Any = None,
              run: dict[str, Any] | None = None, loose: bool = True) -> Ref | None:
    """The paper's number for this setting from the given tables, or None.

    run: the run's fields the reference's `fields` column names (weight_std, r_max, d_max). loose: for
    rows not in the paper's setting, compared by shape: a model the paper lacks takes its ResNet-50,
    and GN with another G its G=32 curve; strict (rows in the paper's setting): the same model and G.
    """
    run = run or {}
    rows = ref[(ref["table"].isin(tables)) & (ref["norm"].astype(str).str.upper().isin(reference_labels(norm)))]
    batches = rows["batch_per_gpu"].map(_num)
    rows = rows[(batches == batch) | batches.isna()]
    paper_model = PAPER_MODELS.get(str(model))
    if paper_model is not None and (rows["model"] == paper_model).any():
        rows = rows[rows["model"] == paper_model]
    elif loose:
        rows = rows[rows["model"] == "ResNet-50"]
    else:
        return None
    values = {"model.weight_std": bool(run.get("weight_std") or False), "norm.r_max": run.get("r_max"), "norm.d_max": run.get("d_max")}
    keep = []
    for _, row in rows.iterrows():
        want = {"model.weight_std": "false", **_fields(row["fields"])}
        keep.append(all(_same(values.get(k, run.get(k)), v) for k, v in want.items()))
    rows = rows[keep] if len(rows) else rows
    if norm == "gn":
        if _num(cpg) is not None:
            exact = rows[rows["channels_per_group"].map(_num) == _num(cpg)]
        else:
            exact = rows[rows["groups"].map(_num) == (_num(groups) or 32)]
        rows = exact if not exact.empty or not loose else rows[rows["groups"].map(_num) == 32]
    if rows.empty:
        return None
    rows = rows.assign(_any=rows["batch_per_gpu"].map(_num).isna()).sort_values("_any", kind="stable")  # a number at this batch first
    row = rows.iloc[0]
    return Ref(float(row["val_error_pct"]), row["status"] == "secondary", str(row["recipe"]), bool(row["_any"]), str(row["source"]))


def paper_number(ref: pd.DataFrame, tables: tuple[str, ...], model: str | None, norm: str, batch: int,
                 groups: Any = None, cpg: Any = None) -> tuple[float | None, bool]:
    """(the paper's error for this setting, is it secondary) from the given tables, or (None, False)."""
    r = paper_ref(ref, tables, model, norm, batch, groups, cpg)
    return (r.value, r.secondary) if r else (None, False)


def _run_fields(first: Any) -> dict[str, Any]:
    """The fields of a run row that reference rows may name."""
    return {k: (None if isinstance(first.get(k), float) and math.isnan(first.get(k)) else first.get(k))
            for k in ("weight_std", "r_max", "d_max")}


def _ref_for(ref: pd.DataFrame, tables: tuple[str, ...], first: Any, batch: int, loose: bool,
             groups: Any = "row", cpg: Any = "row", norm: str | None = None) -> Ref | None:
    """paper_ref for a run row (its model, norm, G and fields)."""
    return paper_ref(ref, tables, first["model"], norm or first["norm"], batch, first["groups"] if groups == "row" else groups,
                     first["channels_per_group"] if cpg == "row" else cpg, _run_fields(first), loose)


# ---------------------------------------------------------------- cells


def _paper_text(v: float) -> str:
    """A paper number as published: one decimal (24.1), two where it has them (23.72)."""
    return f"{v:.1f}" if round(v, 1) == round(v, 2) else f"{v:.2f}"


def _marks(secondary: bool, recipe: str, latex: bool) -> str:
    """† for a secondary number, ‡ for another recipe."""
    out = ""
    if secondary:
        out += r"$^\dagger$" if latex else SECONDARY
    if recipe:
        out += r"$^\ddagger$" if latex else OTHER_RECIPE
    return out


@dataclass(frozen=True)
class Cell:
    """One table cell: our runs' numbers for a setting, the paper's, and their difference.

    comparable: the row is in the paper's setting (levels compared); else rise/paper_rise compare shapes.
    """

    mean: float | None
    std: float | None
    n: int
    note: str  # what the non-finished runs of this cell are
    paper: float | None
    secondary: bool
    recipe: str = ""  # the paper number's recipe, where not the GN paper's (‡)
    comparable: bool = True
    base: bool = False  # the row's base cell (shape mode)
    rise: float | None = None  # ours − ours at the row's base (shape mode)
    paper_rise: float | None = None  # the paper's number − its number at the same base (shape mode)
    rise_secondary: bool = False
    rise_recipe: str = ""

    @property
    def delta(self) -> float | None:
        """Ours minus the paper's (only where the row is in the paper's setting)."""
        return None if self.mean is None or self.paper is None or not self.comparable else self.mean - self.paper

    def _ours(self, latex: bool) -> str:
        if self.mean is None:
            return self.note or "–"
        ours = f"{self.mean:.2f}"
        if self.n > 1:
            ours += (r" $\pm$ " if latex else " ± ") + f"{self.std:.2f} (n={self.n})"
        if self.note:
            ours += f" [+{self.note}]"
        return ours

    def text(self, latex: bool = False) -> str:
        """Paper setting: '24.3 (24.1, +0.2)', '24.3 ± 0.1 (n=3) (24.1, +0.2)', 'diverged (34.7)'.
        Shape mode: '60.92 (+60.52, paper +11.1)', '0.40 (base)', 'diverged (paper +11.1)'."""
        ours = self._ours(latex)
        if not self.comparable:
            if self.base:
                return f"{ours} (base)"
            parts = [f"{self.rise:+.2f}"] if self.rise is not None else []
            if self.paper_rise is not None:
                parts.append(f"paper {self.paper_rise:+.1f}{_marks(self.rise_secondary, self.rise_recipe, latex)}")
            return f"{ours} ({', '.join(parts)})" if parts else ours
        if self.paper is None:
            return ours
        paper = f"{_paper_text(self.paper)}{_marks(self.secondary, self.recipe, latex)}"
        return f"{ours} ({paper}, {self.delta:+.2f})" if self.delta is not None else f"{ours} ({paper})"


def make_cell(runs: pd.DataFrame, paper: tuple[float | None, bool] | Ref | None = (None, False)) -> Cell:
    """Aggregate the runs of one setting (seeds) into a cell (paper: a Ref, or (number, secondary))."""
    ok = runs[runs["status"] == "ok"]["val_err1"].astype(float)
    others = runs[runs["status"] != "ok"]
    notes = []
    for status, done, epochs in zip(others["status"], others["epochs_done"], others["epochs"]):  # three columns, not each row's Series
        notes.append(f"unfinished {done}/{epochs}" if status == "unfinished" else str(status))
    n = len(ok)
    mean = float(ok.mean()) if n else None
    std = float(ok.std(ddof=1)) if n > 1 else (0.0 if n == 1 else None)
    if isinstance(paper, Ref):
        return Cell(mean, std, n, ", ".join(notes), paper.value, paper.secondary, paper.recipe)
    paper = paper or (None, False)
    return Cell(mean, std, n, ", ".join(notes), paper[0], paper[1])


def as_shape(cells: list[tuple[Cell, Ref | None]]) -> list[Cell]:
    """A row's cells (in column order, each with its paper Ref) in shape mode: each cell's rise over the
    row's base (its first cell with a number) beside the paper's rise over the same base. The paper's
    rise needs numbers at both batches: a batch-independent reference row gives none."""
    base = next((i for i, (c, _) in enumerate(cells) if c.mean is not None), None)
    out = []
    for i, (c, r) in enumerate(cells):
        rise = paper_rise = None
        sec, recipe = False, ""
        if base is not None and i != base:
            b_cell, b_ref = cells[base]
            rise = None if c.mean is None else c.mean - b_cell.mean  # type: ignore[operator]
            if r is not None and b_ref is not None and not r.any_batch and not b_ref.any_batch:
                paper_rise = r.value - b_ref.value
                sec, recipe = r.secondary or b_ref.secondary, r.recipe or b_ref.recipe
        out.append(dataclasses.replace(c, comparable=False, base=i == base, rise=rise,
                                       paper_rise=paper_rise, rise_secondary=sec, rise_recipe=recipe))
    return out


def _comparable(grp: pd.DataFrame) -> bool:
    """True where every run of a row is in the paper's setting."""
    return "paper_setting" in grp and bool(grp["paper_setting"].fillna(False).astype(bool).all())


def _caption(what: str, labels: dict[str, bool], unlike: Iterable[str], paper_text: str, shape_text: str, cells: Iterable[Cell]) -> str:
    """A table's caption: what it shows, which mode its rows are in and what the marks mean."""
    paper_rows = [r for r, ok in labels.items() if ok]
    shape_rows = [r for r, ok in labels.items() if not ok]
    why = "; ".join(dict.fromkeys(item for u in unlike if u for item in str(u).split("; ")))  # each difference once
    if not shape_rows:
        text = f"{what}, in the paper's setting (ImageNet-1k, the paper's recipe): {paper_text}"
    elif not paper_rows:
        text = f"{what}, not in the paper's setting ({why}), so levels are not comparable: {shape_text}"
    else:
        text = f"{what}. Rows in the paper's setting: {paper_text}. Rows not in it ({', '.join(shape_rows)}: {why}): {shape_text}"
    cells = list(cells)
    notes = []
    if any((c.comparable and c.paper is not None and c.secondary)
           or (not c.comparable and c.paper_rise is not None and c.rise_secondary) for c in cells):
        notes.append(f"{SECONDARY} a secondary paper number")
    recipes = sorted({c.recipe for c in cells if c.comparable and c.paper is not None and c.recipe}
                     | {c.rise_recipe for c in cells if not c.comparable and c.paper_rise is not None and c.rise_recipe})
    if recipes:
        notes.append(f"{OTHER_RECIPE} another recipe: {'; '.join(recipes)}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def noise_floor(error_pct: float, images: int) -> float:
    """The binomial standard error, in points, of an error rate of error_pct % measured on `images` validation images:
    100·√(e(1−e)/n) (±0.19 points at 24 % on ImageNet's 50,000)."""
    e = error_pct / 100
    return 100 * math.sqrt(e * (1 - e) / images)


def noise_floor_text(cells: Iterable[Cell], runs: pd.DataFrame) -> str:
    """The line under a table whose cells (some or all) rest on one seed: the binomial noise floor of the validation set
    at the median error of those cells, for each validation-set size the table's finished runs record; '' where every
    cell with a number has several seeds. Seeds add their own spread, which one seed cannot show."""
    numbered = [c for c in cells if c.mean is not None]
    single = [c.mean for c in numbered if c.n == 1]
    if not single:
        return ""
    who = "one seed per cell" if len(single) == len(numbered) else "cells of one seed"
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    recorded = [_num(v) for v in ok["val_images"]] if "val_images" in ok else [None] * len(ok)
    sizes = sorted({int(v) for v in recorded if v is not None and v > 0})
    if not sizes:
        return f"{who}: the binomial noise floor of the validation set is unknown (the runs do not record its size)"
    err = float(np.median(single))
    floors = [f"{n:,} validation images is ±{noise_floor(err, n):.2f} points" for n in sizes]
    text = f"{who}: the binomial noise floor of {', of '.join(floors)} at {err:.1f} % error"
    if any(v is None or v <= 0 for v in recorded):
        text += " (unknown for runs that do not record their validation-set size)"
    return text


# ---------------------------------------------------------------- the evaluation the tables show (report --eval-mode)

# ema: population statistics from the EMA (val_err1, the paper's); the others are eval.modes' extra evaluations.
EVAL_MODES = ("ema", *rundir.MODE_METRIC_KEYS)
MODE_TEXT = {"precise": "PreciseBN population statistics", "batch": "mini-batch statistics (per normalization batch of norm.batch images)"}


def check_eval_mode(mode: str) -> None:
    """A one-line error where `mode` is not an evaluation mode."""
    if mode not in EVAL_MODES:
        from ablation.errors import AblationError

        raise AblationError(f"report --eval-mode: unknown mode {mode!r}; valid: {', '.join(EVAL_MODES)}")


def _batch_independent(norm: Any) -> bool:
    """True for a built-in norm without batch or population statistics (GN, LN, ...): every mode evaluates it alike."""
    try:
        info = registry.lookup(str(norm))
    except Exception:  # noqa: BLE001 - a name the registry does not know (a user norm): not known to be independent
        return False
    return info is not None and not info.batch_dependent and not info.running_stats


def in_eval_mode(runs: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(runs with val_err1 the chosen mode's paper metric, the finished runs that lack it, the variants taken as they are).

    A batch-independent built-in norm (GN, LN, ...) evaluates the same in every mode, so its val_err1 stands. Any
    other finished run without the mode's number is never given the EMA's: its status becomes 'no <mode> eval', so
    its cell and Figure 1 mark it as they mark a run that did not finish."""
    if mode == "ema":
        return runs, [], []
    key = rundir.MODE_METRIC_KEYS[mode][0]
    shown = runs.copy()
    same = shown["norm"].map(_batch_independent).astype(bool)
    value = shown[key].astype(float) if key in shown else pd.Series(np.nan, index=shown.index)
    shown["val_err1"] = value.where(~same, shown["val_err1"])
    lacking = (shown["status"] == "ok") & ~same & shown["val_err1"].isna()
    shown.loc[lacking, "status"] = f"no {mode} eval"
    return shown, list(shown.loc[lacking, "run_id"]), sorted(set(shown.loc[same, "variant"]))


def _mode_caption(tables: list[Table], mode: str, lacking: list[str], same: list[str]) -> list[Table]:
    """The tables with their captions saying which evaluation they show (unchanged for the EMA's)."""
    if mode == "ema":
        return tables
    text = f"; evaluated with {MODE_TEXT[mode]} (report --eval-mode {mode}), not the EMA's population statistics"
    if same:
        text += f"; {', '.join(same)}: batch-independent, the same in every mode"
    if lacking:
        text += f"; {len(lacking)} finished run(s) without this evaluation are marked 'no {mode} eval'"
    return [dataclasses.replace(t, caption=t.caption + text) for t in tables]


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A report table: cells by row and column, plus a caption (and a line under it: the noise floor of one seed)."""

    name: str
    caption: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    extra: dict[tuple[str, str], str]  # columns that are not cells (Δ vs baseline)
    extra_columns: list[str]
    footer: str = ""  # a line under the table (noise_floor_text)

    def frame(self, latex: bool = False) -> pd.DataFrame:
        """The table as strings, rows by columns."""
        data = []
        for r in self.rows:
            row = {c: self.cells[(r, c)].text(latex) if (r, c) in self.cells else "" for c in self.columns}
            row.update({c: self.extra.get((r, c), "") for c in self.extra_columns})
            data.append(row)
        return pd.DataFrame(data, index=self.rows, columns=self.columns + self.extra_columns)

    def markdown(self) -> str:
        """A Markdown table with its caption."""
        df = self.frame()
        head = "| | " + " | ".join(map(str, df.columns)) + " |"
        sep = "|---" * (len(df.columns) + 1) + "|"
        body = ["| " + str(i) + " | " + " | ".join(df.loc[i]) + " |" for i in df.index]
        footer = f"\n_{self.footer}_\n" if self.footer else ""
        return f"**{self.caption}**\n\n" + "\n".join([head, sep, *body]) + "\n" + footer

    def latex(self) -> str:
        """A LaTeX tabular with its caption as a comment."""
        df = self.frame(latex=True)
        cols = "l" + "c" * len(df.columns)
        esc = lambda s: str(s).replace("%", r"\%").replace("_", r"\_").replace("#", r"\#")  # noqa: E731
        lines = [f"% {self.caption}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
                 " & ".join(["", *map(esc, df.columns)]) + r" \\", r"\midrule"]
        lines += [" & ".join([esc(i), *(esc(v) if "$" not in str(v) else str(v).replace("%", r"\%") for v in df.loc[i])]) + r" \\"
                  for i in df.index]
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [f"% {self.footer}"] if self.footer else []
        return "\n".join(lines) + "\n"

    def long(self) -> pd.DataFrame:
        """Machine-readable CSV form: one row per cell with the numbers."""
        out = []
        for (r, c), cell in self.cells.items():
            out.append({
                "row": r, "column": c, "ours_mean": cell.mean, "ours_std": cell.std, "n": cell.n,
                "not_finished": cell.note, "paper": cell.paper,
                "paper_secondary": cell.secondary, "paper_recipe": cell.recipe, "delta": cell.delta, "paper_setting": cell.comparable,
                "base": cell.base, "rise": cell.rise, "paper_rise": cell.paper_rise,
            })
        for (r, c), v in self.extra.items():
            out.append({"row": r, "column": c, "ours_mean": _num(v.split(" ")[0]) if v else None})
        return pd.DataFrame(out)


ROW_KEYS = ["model", "variant", "setting"]


def _row_label(model: str, var: str, setting: str, models: int) -> str:
    """Row label: the variant, with the model when several are present and what else sets it apart."""
    extra = [model] if models > 1 else []
    extra += [setting] if setting else []
    return f"{var} [{'; '.join(extra)}]" if extra else var


def batch_size_table(runs: pd.DataFrame, ref: pd.DataFrame) -> Table:
    """Table 2: error vs images per GPU, one row per norm variant (the paper's setting: ours (paper, Δ);
    elsewhere: each row's rise over its largest batch beside the paper's)."""
    batches = sorted(runs["batch_per_gpu"].dropna().unique(), reverse=True)
    models = runs["model"].nunique()
    cells, rows, modes, unlike = {}, [], {}, []
    for (model, var, setting), grp in runs.groupby(ROW_KEYS, sort=False, dropna=False):
        label = _row_label(model, var, setting, models)
        rows.append(label)
        first = grp.iloc[0]
        comparable = modes[label] = _comparable(grp)
        if not comparable:
            unlike += list(grp["unlike_paper"].fillna("")) if "unlike_paper" in grp else []
        row = []
        for b in batches:
            sub = grp[grp["batch_per_gpu"] == b]
            if not sub.empty:
                r = _ref_for(ref, BATCH_TABLES, first, int(b), loose=not comparable)
                row.append((f"{int(b)}", make_cell(sub, r), r))
        pairs = [(c, r) for _, c, r in row]
        shaped = [c for c, _ in pairs] if comparable else as_shape(pairs)
        for (col, _, _), cell in zip(row, shaped):
            cells[(label, col)] = cell
    caption = _caption("Top-1 val error (%) vs images per GPU", modes, unlike, "ours (paper, Δ = ours − paper)",
                       "ours (our rise over the row's base, the paper's rise over the same batches), the base being the row's largest "
                       "images per GPU with a number; the paper's rises are ResNet-50 on ImageNet, its GN at G=32", cells.values())
    return Table("table_batch_size", caption, rows, [f"{int(b)}" for b in batches], cells, {}, [],
                 noise_floor_text(cells.values(), runs))


def _at_batch(runs: pd.DataFrame, batch: int | None) -> tuple[pd.DataFrame, int]:
    """Runs at `batch` images per GPU (default: 32 if present, else the largest)."""
    present = sorted(runs["batch_per_gpu"].dropna().unique())
    b = batch if batch is not None else (32 if 32 in present else int(present[-1]))
    return runs[runs["batch_per_gpu"] == b], int(b)


def baseline_variants(names: list[str]) -> list[str]:
    """Variant labels for --baseline names (bn, gn, gn16, ln, or a variant label itself)."""
    out = []
    for n in names:
        n = n.strip()
        if n.startswith("gn") and n[2:].isdigit():
            out.append(variant({"name": "gn", "groups": int(n[2:])}))
        elif n in registry.names():
            out.append(variant({"name": n}))
        else:
            out.append(n)
    return out


def resolve_baselines(names: list[str], present: Iterable[str]) -> list[str]:
    """Baseline labels that exist in the results: `gn` falls back to the only GN variant there is; absent ones are warned about."""
    present = list(dict.fromkeys(present))
    out = []
    for name, label in zip(names, baseline_variants(names)):
        if label not in present and name.strip() == "gn":
            gns = [v for v in present if v.startswith("GN (")]
            if len(gns) == 1:
                label = gns[0]
        if label in present:
            out.append(label)
        else:
            log.warning("baseline %r (%s) is not among the results' variants (%s); no Δ against it", name, label, ", ".join(present))
    return out


def norm_table(runs: pd.DataFrame, ref: pd.DataFrame, baselines: list[str], batch: int | None = None) -> Table:
    """Table 1: every norm variant at one batch size, with Δ to each baseline (ours − ours; for rows not in
    the paper's setting, the paper's own Δ beside it, since their levels are not the paper's)."""
    sub, b = _at_batch(runs, batch)
    models = sub["model"].nunique()
    cells, rows, extra, modes, unlike = {}, [], {}, {}, []
    means: dict[tuple[str, str, str], float | None] = {}
    refs: dict[tuple[str, str, str], Ref | None] = {}
    firsts: dict[tuple[str, str, str], Any] = {}
    for (model, var, setting), grp in sub.groupby(ROW_KEYS, sort=False, dropna=False):
        label = _row_label(model, var, setting, models)
        first = grp.iloc[0]
        comparable = modes[label] = _comparable(grp)
        if not comparable:
            unlike += list(grp["unlike_paper"].fillna("")) if "unlike_paper" in grp else []
        r = _ref_for(ref, NORM_TABLES, first, b, loose=not comparable)
        cell = make_cell(grp, r)
        cells[(label, "error")] = cell if comparable else dataclasses.replace(cell, comparable=False)
        means[(model, var, setting)] = cell.mean
        refs[(model, var, setting)] = r
        firsts[(model, var, setting)] = first
        rows.append(label)
    base_cols = [f"Δ vs {bv}" for bv in baselines]
    for (model, var, setting), m in means.items():
        label = _row_label(model, var, setting, models)
        for bv, col in zip(baselines, base_cols):
            ref_mean = means.get((model, bv, setting))
            if m is not None and ref_mean is not None:
                text = f"{m - ref_mean:+.2f}"
                mine, theirs = refs[(model, var, setting)], refs.get((model, bv, setting))
                if not modes[label] and var != bv and mine is not None and theirs is not None:
                    text += (f" (paper {mine.value - theirs.value:+.1f}"
                             f"{_marks(mine.secondary or theirs.secondary, mine.recipe or theirs.recipe, False)})")
                extra[(label, col)] = text
    caption = _caption(f"Top-1 val error (%) at {b} images per GPU", modes, unlike,
                       "ours (paper, Δ = ours − paper); Δ vs baselines are ours − ours",
                       "the error column is ours alone; Δ vs baselines read ours − ours "
                       "(the paper's Δ between the same norms, ResNet-50 on ImageNet)", cells.values())
    return Table("table_norms", caption, rows, ["error"], cells, extra, base_cols, noise_floor_text(cells.values(), sub))


def group_tables(runs: pd.DataFrame, ref: pd.DataFrame, batch: int | None = None) -> list[Table]:
    """Table 3, both halves: fixed G (LN is G=1) and fixed channels per group (IN is 1)."""
    sub, b = _at_batch(runs, batch)
    out = []
    for half, key, one, table in (("groups", "groups", "ln", "table3_fixed_groups"),
                                  ("channels per group", "channels_per_group", "in", "table3_fixed_channels_per_group")):
        gn = (sub[(sub["norm"] == "gn") & sub[key].notna()] if key == "channels_per_group"
              else sub[(sub["norm"] == "gn") & sub["channels_per_group"].isna()])
        if "weight_std" in sub:  # Table 3 is plain GN: GN+WS runs are a variant of their own
            gn = gn[~gn["weight_std"].fillna(False).astype(bool)]
        cols: dict[int, pd.DataFrame] = {}
        for v, grp in gn.groupby(gn[key].map(lambda x: int(x) if _num(x) is not None else 32) if key == "groups" else gn[key].astype(int)):
            cols[int(v)] = grp
        ones = sub[sub["norm"] == one]
        if not ones.empty:
            cols[1] = ones
        if not cols:
            continue
        models = sub["model"].nunique()
        by_row: dict[str, list[tuple[str, Cell, Ref | None]]] = {}
        modes: dict[str, bool] = {}
        unlike: list[str] = []
        rows: list[str] = []
        for v in sorted(cols, reverse=True):
            for (model, setting), grp in cols[v].groupby(["model", "setting"], sort=False, dropna=False):
                label = _row_label(model, "GN", setting, models)
                if label not in rows:
                    rows.append(label)
                comparable = _comparable(grp)
                modes[label] = modes.get(label, True) and comparable
                if not comparable:
                    unlike += list(grp["unlike_paper"].fillna("")) if "unlike_paper" in grp else []
                norm = "gn" if v != 1 else one
                g = v if key == "groups" else None
                cpg = v if key == "channels_per_group" else None
                r = paper_ref(ref, (table,), model, norm, b, g, cpg, loose=not comparable)
                by_row.setdefault(label, []).append((str(v), make_cell(grp, r), r))
        cells: dict[tuple[str, str], Cell] = {}
        for label, row in by_row.items():
            shaped = [c for _, c, _ in row] if modes[label] else as_shape([(c, r) for _, c, r in row])
            for (col, _, _), cell in zip(row, shaped):
                cells[(label, col)] = cell
        name = "table_groups" if key == "groups" else "table_channels_per_group"
        what = f"GN with a fixed number of {half} (1 = {one.upper()}), {b} images per GPU"
        caption = _caption(what, modes, unlike, "ours (paper, Δ = ours − paper)",
                           "ours (our rise over the row's base, the paper's rise over the same columns), "
                           f"the base being the row's largest number of {half} with a number", cells.values())
        used = pd.concat(list(cols.values()))
        out.append(Table(name, caption, rows, [str(v) for v in sorted(cols, reverse=True)], cells, {}, [],
                         noise_floor_text(cells.values(), used)))
    return out


# ---------------------------------------------------------------- figures


def _style() -> Any:
    """matplotlib with a paper-like style, headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 120, "savefig.bbox": "tight"})
    return plt


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    """Save a figure as PNG and PDF, both cropped to the figure's tight box as the PNG's savefig finds it."""
    import matplotlib

    # savefig(bbox_inches="tight") lays the figure out once more per file to find its box: found once here (the same
    # box, so the same PNG; the PDF's own layout, at 72 dpi, would find one a fraction of a point wider or narrower).
    fig.draw_without_rendering()
    box = fig.get_tightbbox().padded(matplotlib.rcParams["savefig.pad_inches"])
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        with atomic_path(p, durable=False) as tmp:
            fig.savefig(tmp, format=p.suffix[1:], bbox_inches=box)
    return paths


def _batch_axis(ax: Any, batches: Any) -> None:
    """A log2 x axis of images per GPU, from large to small as in the paper's Figure 1."""
    ticks = sorted(batches, reverse=True)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(int(x)) for x in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("images per GPU (log scale)")


def paper_points(grp: pd.DataFrame, ref: pd.DataFrame, xs: list[Any], ys: list[float]) -> tuple[list[tuple[int, float]], str, dict]:
    """The paper's dashed line for one row, (points, label, the references by batch): its own levels for a row in the
    paper's setting, else its rises drawn from our base (xs[0], ys[0]: the row's largest batch); a rise that would pass
    100 % error is left out (a base near chance leaves no room for it, and an error above 100 % is none)."""
    comparable, first = _comparable(grp), grp.iloc[0]
    paper_b = sorted({int(b) for b in grp["batch_per_gpu"].dropna()}
                     | {int(b) for b in ref[ref["table"] == "table2_batch_size"]["batch_per_gpu"].dropna()}, reverse=True)
    refs = {b: _ref_for(ref, BATCH_TABLES, first, b, loose=not comparable) for b in paper_b}
    if comparable:
        return [(b, r.value) for b, r in refs.items() if r is not None and (not r.any_batch or b in set(xs))], "paper", refs
    if not xs:
        return [], "", refs
    base = refs.get(int(xs[0]))
    pts = [(b, ys[0] + r.value - base.value) for b, r in refs.items()
           if r is not None and base is not None and not r.any_batch and not base.any_batch]
    return [p for p in pts if p[1] <= 100.0], f"paper's rise from our {int(xs[0])}", refs


def figure_error_vs_batch(runs: pd.DataFrame, ref: pd.DataFrame, out: Path, mode: str = "ema") -> list[Path]:
    """Val error vs images per GPU (log2 axis), one line per variant with error bars (the std over seeds) where a point
    has several, the paper's numbers dashed in the line's colour: its own levels for a row in the paper's setting, else
    its rises drawn from our base (the row's largest batch), so the shapes compare (error_vs_batch_figure)."""
    plt = _style()
    fig = error_vs_batch_figure(runs, ref, mode)
    paths = _save(fig, out, "fig_error_vs_batch")
    plt.close(fig)
    return paths


def error_vs_batch_figure(runs: pd.DataFrame, ref: pd.DataFrame, mode: str = "ema") -> Any:
    """figure_error_vs_batch's figure, not saved (close it with matplotlib.pyplot.close); mode: the evaluation its
    val_err1 is (report --eval-mode; in_eval_mode), named on the axis where it is not the EMA's."""
    plt = _style()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    batches = sorted(runs["batch_per_gpu"].dropna().unique(), reverse=True)
    ticks = set(batches)
    for (model, var, setting), grp in runs.groupby(ROW_KEYS, sort=False, dropna=False):
        xs, ys, es, bad = [], [], [], []
        for b in batches:
            cell = make_cell(grp[grp["batch_per_gpu"] == b])
            if cell.mean is not None:
                xs.append(b), ys.append(cell.mean), es.append(cell.std if cell.n > 1 else 0.0)
            elif cell.note:
                bad.append((b, cell.note))
        label = _row_label(model, var, setting, runs["model"].nunique())
        line = ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", capsize=3, label=label)
        color = line[0].get_color()
        for b, note in bad:  # a run that did not finish is shown as such, at the top of the axis
            ax.annotate(f"{var}: {note}", (b, 1.0), xycoords=("data", "axes fraction"),
                        fontsize=7, rotation=90, va="top", ha="center", color=color)
            ax.plot([b], [1.0], marker="x", transform=ax.get_xaxis_transform(), color=color, clip_on=False)
        pts, what, refs = paper_points(grp, ref, xs, ys)
        if pts:
            recipe = any(r.recipe for r in refs.values() if r is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", marker="o", markerfacecolor="none", color=color, alpha=0.7,
                    label=f"{what}: {var}{OTHER_RECIPE if recipe else ''}")
            ticks |= {p[0] for p in pts}
    _batch_axis(ax, ticks)
    ax.set_ylabel("top-1 val error (%)" if mode == "ema" else f"top-1 val error (%), {mode} eval")
    if mode != "ema":
        ax.set_title(f"evaluated with {MODE_TEXT[mode]}", fontsize=8)
    ax.legend(fontsize=7)
    return fig


def figure_curves(runs: pd.DataFrame, curves: pd.DataFrame, out: Path, batch: int | None = None) -> list[Path]:
    """The paper's Figure 4: train and val error vs epoch per variant, at one batch size."""
    plt = _style()
    sub, b = _at_batch(runs, batch)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    # one run per variant: the lowest seed; its curves from one pass over the curves, not one pass per variant
    shown = [(key, grp.sort_values("seed").iloc[0]) for key, grp in sub.groupby(ROW_KEYS, sort=False, dropna=False)]
    picked = curves[curves["run_id"].isin([run["run_id"] for _, run in shown])]
    for (model, var, setting), run in shown:
        c = picked[picked["run_id"] == run["run_id"]].sort_values("epoch")
        label = _row_label(model, var, setting, sub["model"].nunique()) + ("" if run["status"] == "ok" else f" ({run['status']})")
        axes[0].plot(c["epoch"], c["train_err1"], label=label)
        axes[1].plot(c["epoch"], c["val_err1"], label=label)
    for ax, what in zip(axes, ("train", "val")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{what} error (%)")
        ax.set_title(f"{what} error, {b} images per GPU", fontsize=10)
    axes[1].legend(fontsize=8)
    paths = _save(fig, out, "fig_curves")
    plt.close(fig)
    return paths


PANEL_ORDER = {"bn": 0, "gn": 1}  # Figure 5's panels: BN's rows first, then GN's, then the others as they come


def val_error_vs_epoch_figure(runs: pd.DataFrame, curves: pd.DataFrame) -> Any:
    """The paper's Figure 5, not saved (close it with matplotlib.pyplot.close): one panel per norm variant present (a
    table's row: BN's first, then GN's, then the others), one curve per images per GPU (the lowest seed's run), val
    error vs epoch, the same colour for a batch size in every panel and one y axis for all."""
    plt = _style()
    batches = sorted(runs["batch_per_gpu"].dropna().unique(), reverse=True)
    colours = {b: f"C{i % 10}" for i, b in enumerate(batches)}
    models = runs["model"].nunique()
    groups = list(runs.groupby(ROW_KEYS, sort=False, dropna=False))
    groups.sort(key=lambda kg: PANEL_ORDER.get(str(kg[1]["norm"].iloc[0]), len(PANEL_ORDER)))  # stable: the others as they come
    shown = [(key, [(b, sub.sort_values("seed").iloc[0]) for b, sub in grp.groupby("batch_per_gpu", sort=False)]) for key, grp in groups]
    picked = curves[curves["run_id"].isin([run["run_id"] for _, row in shown for _, run in row])]
    cols = min(len(shown), 3) or 1
    rows = -(-len(shown) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True, squeeze=False)
    for ax, ((model, var, setting), row) in zip(axes.flat, shown):
        for b, run in sorted(row, key=lambda x: -x[0]):
            c = picked[picked["run_id"] == run["run_id"]].sort_values("epoch")
            label = f"{int(b)} images/GPU" + ("" if run["status"] == "ok" else f" ({run['status']})")
            ax.plot(c["epoch"], c["val_err1"], color=colours[b], label=label)
        ax.set_title(_row_label(model, var, setting, models), fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("val error (%)")
    for ax in list(axes.flat)[len(shown):]:  # the grid's empty places
        ax.set_visible(False)
    return fig


def figure_val_error_vs_epoch(runs: pd.DataFrame, curves: pd.DataFrame, out: Path) -> list[Path]:
    """The paper's Figure 5 as fig_val_error_vs_epoch.{png,pdf} (val_error_vs_epoch_figure)."""
    plt = _style()
    fig = val_error_vs_epoch_figure(runs, curves)
    paths = _save(fig, out, "fig_val_error_vs_epoch")
    plt.close(fig)
    return paths


def figure_delta(runs: pd.DataFrame, baselines: list[str], out: Path, mode: str = "ema") -> list[Path]:
    """Difference of each variant's error to each baseline's, vs images per GPU (mode: as in error_vs_batch_figure)."""
    plt = _style()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    batches = sorted(runs["batch_per_gpu"].dropna().unique(), reverse=True)
    mean = {k: make_cell(g).mean for k, g in runs.groupby([*ROW_KEYS, "batch_per_gpu"], dropna=False)}
    rows = list(runs.groupby(ROW_KEYS, sort=False, dropna=False).groups)
    for base in baselines:
        for model, var, setting in rows:
            if var == base:
                continue
            pts = [
                (b, mean[(model, var, setting, b)] - mean[(model, base, setting, b)])
                for b in batches
                if mean.get((model, var, setting, b)) is not None and mean.get((model, base, setting, b)) is not None
            ]
            if pts:
                label = _row_label(model, f"{var} − {base}", setting, runs["model"].nunique())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    _batch_axis(ax, batches)
    ax.set_ylabel("Δ top-1 val error (points)" if mode == "ema" else f"Δ top-1 val error (points), {mode} eval")
    if ax.get_legend_handles_labels()[0]:  # no baseline among the results: an empty figure, no legend
        ax.legend(fontsize=8)
    paths = _save(fig, out, "fig_delta_vs_batch")
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- CSV files

CSV_PARALLEL_ROWS = 100_000  # from this many rows to write on, a table's CSV is made by forked processes, a piece of rows each
PIECE_RUNS = 64  # a piece of a CSV ends before a run whose id's CRC-32 is 0 modulo this (about this many runs a piece)
_BY_VALUE = ("i", "u", "f", "b", "O")  # numpy kinds of columns pandas writes value by value (numbers, booleans, strings)
_piece_of: pd.DataFrame | None = None  # the table being written, for the forked processes


def _csv_text(df: pd.DataFrame, start: int, stop: int) -> bytes:
    """to_csv's bytes of rows start:stop of df, without the header."""
    return _floats_as_objects(df.iloc[start:stop]).to_csv(index=False, header=False).encode("utf-8")


def _csv_piece(bounds: tuple[int, int]) -> bytes:
    """_csv_text of rows start:stop of the table being written (in a forked process)."""
    return _csv_text(_piece_of, *bounds)  # type: ignore[arg-type]


def _floats_as_objects(df: pd.DataFrame) -> pd.DataFrame:
    """df with each float64 column as Python floats (object dtype): to_csv writes the same text, with less CPU."""
    # pandas writes a float64 column as numpy's str of each value, an object column's floats as the csv module's repr of
    # each: both are the shortest text that reads back as the same double, with the same switch to exponent notation
    # (numpy's str of a float64 is Python's repr), and NaN is na_rep in both. repr is the cheaper: curves.csv's rows
    # take a quarter to a third less CPU so. Other dtypes (float32's shortest text is not a double's) stay as they are.
    floats = [i for i, t in enumerate(df.dtypes) if isinstance(t, np.dtype) and t == np.float64]
    if not floats:
        return df
    df = df.copy(deep=False)
    for i in floats:
        df.isetitem(i, df.iloc[:, i].astype(object))
    return df


def _by_value(df: pd.DataFrame) -> bool:
    """True where pandas writes each of the table's cells on its own (number, boolean and string columns)."""
    return all(isinstance(t, np.dtype) and t.kind in _BY_VALUE or isinstance(t, pd.StringDtype) for t in df.dtypes)


def csv_pieces(df: pd.DataFrame, bounds: list[tuple[int, int]], workers: int | None = None) -> Iterator[bytes]:
    """to_csv's bytes (no header) of each range of rows, in order, as they are taken: made by forked processes (workers: as
    collect's readers), started at once so that the caller goes on meanwhile, where there are many rows; else made here."""
    global _piece_of
    rows = sum(stop - start for start, stop in bounds)
    n = reader_count(workers, PARALLEL_MIN_FOLDERS) if rows >= CSV_PARALLEL_ROWS and len(bounds) > 1 else 1
    if n <= 1:
        return (_csv_text(df, start, stop) for start, stop in bounds)
    _piece_of = df  # what the forked processes see: with fork, every worker starts at the first submit, below
    try:
        ex = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))
        made = ex.map(_csv_piece, bounds)
    finally:
        _piece_of = None
    taken = _taken(made, ex)
    weakref.finalize(taken, ex.shutdown, wait=False, cancel_futures=True)  # dropped before it was taken (an error meanwhile)
    return taken


def _taken(made: Iterator[bytes], ex: ProcessPoolExecutor) -> Iterator[bytes]:
    """The pieces as the processes give them, the processes ended after the last (or when the caller stops taking)."""
    try:
        yield from made
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def piece_bounds(df: pd.DataFrame) -> list[tuple[int, int]]:
    """A table's rows in pieces: a new piece starts at a run (a change of run_id) whose id's CRC-32 is 0 modulo PIECE_RUNS,
    so pieces stay as they were where runs are added, removed or changed elsewhere; one piece without a run_id column."""
    if not len(df):
        return []
    if "run_id" not in df.columns:
        return [(0, len(df))]
    ids = df["run_id"].to_numpy(dtype=object)
    changes = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = [0] + [int(i) for i in changes if zlib.crc32(str(ids[i]).encode()) % PIECE_RUNS == 0]
    return list(zip(starts, starts[1:] + [len(df)]))


def write_csv(df: pd.DataFrame, path: str | Path, workers: int | None = None) -> None:
    """df.to_csv(path, index=False), a large table's pieces of rows made by pandas in forked processes.

    pandas writes a table's header and then its rows a piece at a time (to_csv's chunksize), a number, boolean or
    string column's values each on its own: the header and the pieces' texts, joined, are the same bytes. A table
    with any other kind of column (dates, categories, ...) is written by one to_csv call.
    """
    if len(df) < CSV_PARALLEL_ROWS or not _by_value(df):
        df.to_csv(path, index=False)
        return
    size = -(-len(df) // 8)
    pieces = csv_pieces(df, [(i, min(i + size, len(df))) for i in range(0, len(df), size)], workers)
    with open(path, "wb") as f:
        f.write(df.iloc[:0].to_csv(index=False).encode("utf-8"))
        f.writelines(pieces)


def _write_csv_output(df: pd.DataFrame, out: Path, name: str, outputs: _Outputs, versions: tuple[str, ...]) -> None:
    """Write out/name as write_csv would, unless it is there as the same table made it (_start_csv_output, waited for)."""
    _start_csv_output(df, out, name, outputs, versions)()


def _start_csv_output(df: pd.DataFrame, out: Path, name: str, outputs: _Outputs, versions: tuple[str, ...]) -> Callable[[], None]:
    """Begin _write_csv_output: the pieces of rows (piece_bounds) that are the same as in the file there are to be copied
    from it, the others are made by pandas from now on (by forked processes where there are many; a small table: whole);
    returns the function that writes the file."""
    if len(df) < CSV_PARALLEL_ROWS or not _by_value(df):
        digest = _digest(df, versions)
        if outputs.fresh([name], digest):
            return lambda: None

        def whole() -> None:
            with atomic_path(out / name, durable=False) as tmp:
                df.to_csv(tmp, index=False)
                outputs.made([name], digest, tmp)

        return whole
    bounds = piece_bounds(df)
    header = df.iloc[:0].to_csv(index=False).encode("utf-8")
    if not outputs.recorded([name]):  # no file there to keep or copy from: every piece is made, and digested meanwhile
        todo, old = list(range(len(bounds))), {}
        pieces = csv_pieces(df, bounds)
        digests = _piece_digests(df, bounds, versions)
        digest = _digest(header, digests)
    else:
        digests = _piece_digests(df, bounds, versions)
        digest = _digest(header, digests)
        if outputs.fresh([name], digest):
            return lambda: None
        old = outputs.old_pieces(name)
        todo = [i for i, d in enumerate(digests) if d not in old]
        pieces = csv_pieces(df, [bounds[i] for i in todo])

    def finish() -> None:
        made, wanted = iter(pieces), set(todo)  # written as they come (in todo's order), not all held first
        record, pos = [], len(header)
        with atomic_path(out / name, durable=False) as tmp, open(tmp, "wb") as f, outputs.open_old(name, bool(old)) as src:
            f.write(header)
            for i, d in enumerate(digests):
                if i in wanted:
                    data = next(made)
                else:
                    start, stop = old[d]
                    data = os.pread(src.fileno(), stop - start, start)  # type: ignore[union-attr]
                f.write(data)
                record.append([d, pos, pos + len(data)])
                pos += len(data)
            if next(made, None) is not None:  # none is left: taking the end ends the processes (and waits for them)
                raise AssertionError("more pieces of curves.csv made than asked for")
            f.flush()
            outputs.made([name], digest, tmp, pieces=record)

    return finish


# ---------------------------------------------------------------- outputs already made

OUTPUTS_NAME = ".report-outputs.json"  # in the report's folder: which outputs are what which inputs made
OUTPUTS_VERSION = 3
FIGURES = ("fig_error_vs_batch", "fig_curves", "fig_delta_vs_batch", "fig_val_error_vs_epoch")


def _digest(*parts: Any) -> str:
    """A digest of tables (numbers by their bytes, other columns by pandas' hash of their values) and other values (repr)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, pd.DataFrame):
            _hash_rows(h, part, _hashed_columns(part), 0, len(part))
        else:
            h.update(repr(part).encode() + b"\0")
    return h.hexdigest()


def _hashed_columns(df: pd.DataFrame) -> list[np.ndarray]:
    """Each column as _digest hashes it: numbers as their bytes (-0.0 and each NaN as written, not as equal), any other
    column as pandas' hash of each value (a value's hash is its own, whatever the others: a slice's is the slice of these)."""
    out = []
    for _, col in df.items():
        if isinstance(col.dtype, np.dtype) and col.dtype.kind in "iufb":
            out.append(np.ascontiguousarray(col.to_numpy()))
        else:
            out.append(pd.util.hash_pandas_object(col, index=False).to_numpy())
    return out


def _hash_rows(h: Any, df: pd.DataFrame, columns: list[np.ndarray], start: int, stop: int) -> None:
    """Feed rows start:stop of df (its _hashed_columns) to the hash, as _digest feeds df.iloc[start:stop]."""
    h.update(repr((list(df.columns), [str(t) for t in df.dtypes], stop - start)).encode())
    for a in columns:
        h.update(a[start:stop].tobytes())


def _piece_digests(df: pd.DataFrame, bounds: list[tuple[int, int]], *rest: Any) -> list[str]:
    """_digest(df.iloc[start:stop], *rest) of each range of rows, the table's columns hashed once (not once a piece)."""
    columns, tail = _hashed_columns(df), b"".join(repr(part).encode() + b"\0" for part in rest)
    out = []
    for start, stop in bounds:
        h = hashlib.sha256()
        _hash_rows(h, df, columns, start, stop)
        h.update(tail)
        out.append(h.hexdigest())
    return out


def _identity(path: Path) -> list[int] | None:
    """A file's size, mtime_ns and inode, or None where there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class _Outputs:
    """The outputs in a report's folder that are still what the same inputs made them (not made again), as a JSON file there.

    Each output is recorded with the digest of what it was made from and its identity once renamed into place: one
    changed since (edited, deleted, replaced by a concurrent report) no longer matches, and is made again.
    """

    def __init__(self, out: Path):
        self.out, self.path, self.new, self.pieces = out, out / OUTPUTS_NAME, {}, {}
        self.old, self.old_piece_lists = {}, {}
        self.inputs, self.files, self.warnings = None, [], []  # the last report's: what made it, its files in order, its warnings
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("version") == OUTPUTS_VERSION:
                self.old, self.old_piece_lists = dict(doc["outputs"]), dict(doc["pieces"])
                self.inputs, self.files, self.warnings = doc["inputs"], list(doc["files"]), list(doc["warnings"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning(f"{self.path} is unreadable ({type(e).__name__}); every output is made again")

    def unchanged(self, inputs: str) -> bool:
        """True where the last report here was made from inputs of this digest and each of its files is as it left it."""
        return (self.inputs == inputs and bool(self.files)
                and all(isinstance(self.old.get(n), list) and self.old[n][1] == _identity(self.out / n) for n in self.files))

    def recorded(self, names: list[str]) -> bool:
        """True where every one of these outputs is recorded as the file there (made from inputs of some digest)."""
        return all(isinstance(self.old.get(n), list) and len(self.old[n]) == 2 and self.old[n][1] == _identity(self.out / n) for n in names)

    def fresh(self, names: list[str], digest: str) -> bool:
        """True where every one of these outputs is there as made from inputs of this digest."""
        if not all(isinstance(self.old.get(n), list) and self.old[n] == [digest, _identity(self.out / n)] for n in names):
            return False
        self.new.update({n: self.old[n] for n in names})
        self.pieces.update({n: self.old_piece_lists[n] for n in names if n in self.old_piece_lists})
        return True

    def made(self, names: list[str], digest: str, written: Path | None = None, pieces: list[list[Any]] | None = None) -> None:
        """Record these outputs as made (just now) from inputs of this digest (written: the one output's temporary file,
        about to be renamed into place with its identity: a concurrent report's file renamed over it is not taken for it;
        pieces: its pieces' digests and byte ranges)."""
        self.new.update({n: [digest, _identity(written or self.out / n)] for n in names})
        if pieces is not None:
            self.pieces[names[0]] = pieces

    def old_pieces(self, name: str) -> dict[str, tuple[int, int]]:
        """digest -> byte range of the pieces of the file there, where it is the one recorded (else none)."""
        old, pieces = self.old.get(name), self.old_piece_lists.get(name)
        if not (isinstance(old, list) and len(old) == 2 and old[1] == _identity(self.out / name) and isinstance(pieces, list)):
            return {}
        return {d: (start, stop) for d, start, stop in pieces}

    @contextmanager
    def open_old(self, name: str, wanted: bool) -> Iterator[Any]:
        """The recorded file, open, where wanted (else None); ValueError where it was replaced since old_pieces looked."""
        if not wanted:
            yield None
            return
        with open(self.out / name, "rb") as f:
            st = os.fstat(f.fileno())
            if [st.st_size, st.st_mtime_ns, st.st_ino] != self.old[name][1]:
                raise ValueError(f"{self.out / name} was replaced while being read")
            yield f

    def save(self, inputs: str, files: list[str], warnings: list[str]) -> None:
        """Write the record: each output's digest and identity, and what made this report (inputs, its files, its warnings)."""
        doc = {"version": OUTPUTS_VERSION, "outputs": self.new, "pieces": self.pieces, "inputs": inputs, "files": files,
               "warnings": warnings}
        write_text(self.path, json.dumps(doc) + "\n", durable=False)


# ---------------------------------------------------------------- the report


def all_tables(runs: pd.DataFrame, ref: pd.DataFrame, bases: list[str]) -> list[Table]:
    """The report's tables, in order: by batch size (the main one), by norm, then the group tables."""
    return [batch_size_table(runs, ref), norm_table(runs, ref, bases), *group_tables(runs, ref)]


class Report:
    """What `ablation report` produced: its files, and the tables behind them.

    Where every output was already there as the same inputs made it, nothing is collected or written: runs,
    curves and tables are made on first use (status_counts and main_table read the files instead).
    """

    def __init__(self, files: list[Path], made: tuple[pd.DataFrame, pd.DataFrame, list[Table]] | None = None,
                 make: Callable[[], tuple[pd.DataFrame, pd.DataFrame, list[Table]]] | None = None):
        self.files, self._made, self._make = files, made, make

    def _frames(self) -> tuple[pd.DataFrame, pd.DataFrame, list[Table]]:
        if self._made is None:
            self._made = self._make()  # type: ignore[misc]
        return self._made

    @property
    def runs(self) -> pd.DataFrame:
        """runs.csv's table: one row per run."""
        return self._frames()[0]

    @property
    def curves(self) -> pd.DataFrame:
        """curves.csv's table: one row per run and epoch."""
        return self._frames()[1]

    @property
    def tables(self) -> list[Table]:
        """The tables: by batch size, by norm, then the group tables."""
        return self._frames()[2]

    def _file(self, name: str) -> Path:
        return next(p for p in self.files if p.name == name)

    def status_counts(self) -> dict[str, int]:
        """Runs by status (ok, diverged, failed, unfinished)."""
        runs = self._made[0] if self._made else pd.read_csv(self._file("runs.csv"), usecols=["status"])
        return {str(k): int(v) for k, v in runs["status"].value_counts().items()}

    def main_table(self) -> str:
        """The table by batch size (the paper's Table 2), as Markdown."""
        return self._made[2][0].markdown() if self._made else self._file(f"{BATCH_TABLE}.md").read_text()


BATCH_TABLE = "table_batch_size"


def _reference_text(folder: Path) -> str:
    """The reference CSVs' names and contents (part of what a report's outputs are made from)."""
    return "".join(f"{f.name}\0{f.read_text()}\0" for f in sorted(folder.glob("*.csv")))


@contextmanager
def _warnings_kept(kept: list[str]) -> Iterator[None]:
    """Keep the text of each warning the `ablation` logger gives meanwhile (a report of unchanged inputs says them again)."""
    def keep(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            kept.append(record.getMessage())
        return True  # a filter, not a handler: where the logger has no handler, the warning still reaches stderr

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def build(roots: list[str | Path], out: str | Path, baselines: list[str] | None = None, reference: str | Path | None = None,
          timings: dict[str, float] | None = None, eval_mode: str = "ema") -> Report:
    """Collect the runs under roots and write tables, figures and CSVs to out (_build), the cyclic garbage collector paused:
    the collected runs are millions of objects that each of its passes would walk again, in this process and in every
    forked child that makes a figure or a piece of curves.csv (its walks would also copy their pages)."""
    with gc_paused():
        return _build(roots, out, baselines, reference, timings, eval_mode)


def _build(roots: list[str | Path], out: str | Path, baselines: list[str] | None = None, reference: str | Path | None = None,
          timings: dict[str, float] | None = None, eval_mode: str = "ema") -> Report:
    """Collect the runs under roots and write tables, figures and CSVs to out; `timings` gets the seconds of each phase
    (find, read, frames: ablation.collect; csv, tables, figures). Where nothing that makes them changed since the last
    report into `out` (the run folders' files, the sweeps' links, the reference numbers, the options, the versions of
    the code and libraries) and its outputs are as it left them, nothing is read or written again. eval_mode: the
    evaluation the tables, Figure 1 and the Δ figure show (EVAL_MODES; in_eval_mode); runs.csv and curves.csv hold every one."""
    check_eval_mode(eval_mode)
    out = Path(out)
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - t
        t = now

    # A folder that holds no record of outputs and no collect index has nothing to compare the files' identities with:
    # the readers take each folder's as they read it, not a stat of every file beforehand (the survey's larger half).
    first = not (out / OUTPUTS_NAME).exists() and not (out / runfiles.INDEX_NAME).exists()
    surveyed = survey(roots, stats=not first)
    if not surveyed.folders:  # before anything is made: a report that found nothing to report leaves no folder behind
        from ablation.errors import AblationError

        raise AblationError(f"no run folders under {', '.join(map(str, roots))}")
    lap("find")
    ref_dir = reference_dir(reference)
    versions = (pd.__version__, np.__version__)
    asked = baselines or ["bn", "gn"]

    def inputs_digest(surveyed: Survey) -> str:
        return _digest(surveyed.digest(), _reference_text(ref_dir), asked, versions, _matplotlib_version(), provenance.code_version(),
                       recipe.recipe_text(), *([eval_mode] if eval_mode != "ema" else []))  # the EMA's: the digest as before the option

    inputs = None if first else inputs_digest(surveyed)
    outputs = _Outputs(out)

    def frames() -> tuple[pd.DataFrame, pd.DataFrame, list[Table]]:
        runs, curves = collect(roots, timings, index=out / runfiles.INDEX_NAME, surveyed=surveyed)
        lap("frames")
        ref = load_reference(ref_dir)
        bases = resolve_baselines(asked, runs["variant"])
        shown, lacking, same = in_eval_mode(runs, eval_mode)
        return runs, curves, _mode_caption(all_tables(shown, ref, bases), eval_mode, lacking, same)

    if inputs is not None and outputs.unchanged(inputs):
        for warning in outputs.warnings:
            log.warning(warning)
        lap("read")
        return Report([out / name for name in outputs.files], make=frames)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    extra: list[Path] = []  # the run folders whose metrics hold more than the usual keys: the mechanism table's only candidates
    identities: list[Any] = []
    try:
        with _warnings_kept(warnings):
            runs, curves = collect(roots, timings, index=out / runfiles.INDEX_NAME, surveyed=surveyed, extra=extra, identities=identities)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if inputs is None:
        surveyed = surveyed.with_identities(identities)
        inputs = inputs_digest(surveyed)
    t = time.perf_counter()
    ref = load_reference(ref_dir)
    with _warnings_kept(warnings):
        bases = resolve_baselines(asked, runs["variant"])
        shown, lacking, same = in_eval_mode(runs, eval_mode)  # what the tables and Figure 1 show; runs.csv keeps every mode
        if lacking:
            log.warning(f"report --eval-mode {eval_mode}: {len(lacking)} finished run(s) have no {eval_mode} evaluation (their eval.modes "
                        f"lack it), e.g. {lacking[0]}: their cells are marked 'no {eval_mode} eval', not given the EMA's number")
    # Every output is written beside its name and renamed over it: a reader (or a report killed half-way)
    # sees each file old or new, never cut. One that is there as the same inputs made it is left as it is.
    figures = [f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "pdf")]

    def figures_digest() -> str:
        return _digest(runs, curves, ref, bases, versions, _matplotlib_version(), Path(__file__).read_bytes(),
                       *([shown, eval_mode] if eval_mode != "ema" else []))

    def draw() -> None:
        figure_error_vs_batch(shown, ref, out, eval_mode)
        figure_curves(runs, curves, out)  # per-epoch curves: the EMA's (curves.csv has every mode's columns)
        figure_delta(shown, bases, out, eval_mode)
        figure_val_error_vs_epoch(runs, curves, out)

    # The figures are drawn by a forked child while this process makes the tables and CSVs (one core each).
    # Where the figures are not all recorded as the files there (a fresh folder), they are drawn without a look at their
    # digest, made meanwhile (a quarter second less before the child starts).
    digest = figures_digest() if outputs.recorded(figures) else None
    drawn = None if digest is not None and outputs.fresh(figures, digest) else background(draw)
    # curves.csv's pieces are made by forked processes from here on, while this process makes the tables.
    curves_csv = _start_csv_output(curves, out, "curves.csv", outputs, versions)
    digest = digest or figures_digest()
    tables = _mode_caption(all_tables(shown, ref, bases), eval_mode, lacking, same)
    table_files = []
    for table in tables:
        for ext, text in (("md", table.markdown()), ("tex", table.latex()), ("csv", table.long().to_csv(index=False))):
            name = f"{table.name}.{ext}"
            write_text(out / name, text, durable=False)
            outputs.made([name], _digest(text))
            table_files.append(out / name)
    from ablation.results.compare import significance_files  # table_significance.md/.csv: each norm vs each baseline, tested

    for name, text in significance_files(runs, surveyed.folders, bases):
        write_text(out / name, text, durable=False)
        outputs.made([name], _digest(text))
        table_files.append(out / name)
    lap("tables")
    _write_csv_output(runs, out, "runs.csv", outputs, versions)
    curves_csv()
    lap("csv")
    # Where any run recorded extra evaluation modes (eval.modes): table_mechanism.{md,csv} and fig_mechanism.{png,pdf}.
    table_files += write_mechanism(extra, out)
    if drawn is not None:
        if not drawn():
            draw()  # the child failed: drawn again here, where its error (if it is one) is raised with its cause
        outputs.made(figures, digest)
    files = [out / "runs.csv", out / "curves.csv", *table_files, *(out / name for name in figures)]
    outputs.save(inputs, [p.name for p in files], warnings)
    lap("figures")
    return Report(files, made=(runs, curves, tables))


# ---------------------------------------------------------------- the mechanism decomposition (eval.modes)


def mechanism_figure(frame: pd.DataFrame, curves: pd.DataFrame) -> Any:
    """fig_mechanism: per norm and total batch, error vs normalization batch in every mode (left) and EMA vs PreciseBN
    validation error per epoch at each normalization batch (right)."""
    plt = _style()
    groups = list(frame.groupby(["variant", "model", "total_batch"], sort=True))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.6 * len(groups)), squeeze=False)
    styles = (("val_ema", "val: population (EMA)", "-", "o"), ("val_precise", "val: population (PreciseBN)", "-", "s"),
              ("val_batch", "val: mini-batch statistics", "-", "^"), ("train_err1", "train: batch statistics", "--", "x"))
    for (key, grp), (left, right) in zip(groups, axes):
        var, model, total = key
        grp = grp.sort_values("norm_batch", ascending=False)
        for col, label, ls, marker in styles:
            have = grp[grp[col].notna()]
            if len(have):
                left.plot(have["norm_batch"], have[col], ls, marker=marker, label=label)
        _batch_axis(left, grp["norm_batch"])
        left.set_xlabel("normalization batch (log scale)")
        left.set_ylabel("top-1 error (%)")
        left.set_title(f"{var}, {model}, total batch {total}")
        left.legend(fontsize=8)
        mine = curves[(curves["variant"] == var) & (curves["total_batch"] == total)]
        for i, (nb, c) in enumerate(sorted(mine.groupby("norm_batch"), key=lambda kv: -kv[0])):
            c = c.groupby("epoch")[["val_ema", "val_precise"]].mean().reset_index()
            colour = f"C{i}"
            right.plot(c["epoch"], c["val_ema"], "-", color=colour, label=f"norm batch {nb}: EMA")
            if c["val_precise"].notna().any():
                right.plot(c["epoch"], c["val_precise"], "--", color=colour, label=f"norm batch {nb}: PreciseBN")
        right.set_xlabel("epoch")
        right.set_ylabel("val top-1 error (%)")
        right.set_title("EMA (solid) vs PreciseBN (dashed) per epoch")
        right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_mechanism(folders: list[Path], out: Path) -> list[Path]:
    """table_mechanism.{md,csv} and fig_mechanism.{png,pdf} in out, where any run recorded an extra evaluation mode; else nothing."""
    runs, curves = mechanism.read_runs(folders)
    if not runs:
        return []
    frame = mechanism.table(runs)
    write_text(out / "table_mechanism.md", mechanism.markdown(frame), durable=False)
    write_text(out / "table_mechanism.csv", frame.to_csv(index=False), durable=False)
    fig = mechanism_figure(frame, pd.DataFrame(curves, columns=mechanism.CURVE_COLUMNS))
    plt = _style()
    paths = _save(fig, out, "fig_mechanism")
    plt.close(fig)
    return [out / "table_mechanism.md", out / "table_mechanism.csv", *paths]


def _matplotlib_version() -> str:
    """matplotlib's version, without importing pyplot."""
    from importlib.metadata import version

    return version("matplotlib")
