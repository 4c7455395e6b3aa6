"""Report: the paper's tables and figures from collected runs, with the paper's numbers beside ours.

Torch-free. Every number comes from runs.csv / curves.csv (ablation.collect), which come from run
folders; the paper's numbers come from results/reference/*.csv, one file per paper.

Cells read "ours (paper, Δ)" with Δ = ours − paper; ours is "mean ± std (n=k)" when several seeds
finished; a paper number marked † is secondary (a third-party transcription). A cell whose runs did
not finish says so (diverged, failed, unfinished k/n) instead of showing a number.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ablation.norms import registry
from ablation.collect import CURVE_COLUMNS, collect_with_text, csv_header, variant, write_csv

log = logging.getLogger("ablation")

REFERENCE_DIRS = (Path("results/reference"), Path(__file__).resolve().parents[1] / "results" / "reference")
PAPER_MODELS = {"resnet50": "ResNet-50", "resnet101": "ResNet-101"}


# ---------------------------------------------------------------- reference numbers


def reference_dir(explicit: str | Path | None = None) -> Path:
    """The folder of reference CSVs: explicit, ./results/reference, or the repository's."""
    if explicit:
        return Path(explicit)
    return next((d for d in REFERENCE_DIRS if d.is_dir()), REFERENCE_DIRS[-1])


def load_reference(folder: Path) -> pd.DataFrame:
    """All reference CSVs of a folder, each file one paper (its name in the `paper` column)."""
    frames = [pd.read_csv(f).assign(paper=f.stem) for f in sorted(folder.glob("*.csv"))]
    cols = ["paper", "table", "model", "norm", "batch_per_gpu", "groups", "channels_per_group", "val_error_pct", "status"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def _num(v: Any) -> float | None:
    """A float, or None for empty/NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def paper_number(ref: pd.DataFrame, tables: tuple[str, ...], model: str | None, norm: str, batch: int, groups: Any = None, cpg: Any = None) -> tuple[float | None, bool]:
    """(the paper's error for this setting, is it secondary) from the given tables, or (None, False)."""
    paper_model = PAPER_MODELS.get(str(model), "ResNet-50")  # small models are compared by shape to ResNet-50
    label = registry.label(norm)
    rows = ref[(ref["table"].isin(tables)) & (ref["norm"] == label) & (ref["batch_per_gpu"] == batch)]
    rows = rows[rows["model"] == paper_model] if (rows["model"] == paper_model).any() else rows[rows["model"] == "ResNet-50"]
    if norm == "gn":
        if _num(cpg) is not None:
            rows = rows[rows["channels_per_group"].map(_num) == _num(cpg)]
        else:
            rows = rows[rows["groups"].map(_num) == (_num(groups) or 32)]
    if rows.empty:
        return None, False
    row = rows.iloc[0]
    return float(row["val_error_pct"]), row["status"] == "secondary"


# ---------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One table cell: our runs' numbers for a setting, the paper's, and their difference."""

    mean: float | None
    std: float | None
    n: int
    note: str  # what the non-finished runs of this cell are
    paper: float | None
    secondary: bool

    @property
    def delta(self) -> float | None:
        """Ours minus the paper's."""
        return None if self.mean is None or self.paper is None else self.mean - self.paper

    def text(self, latex: bool = False) -> str:
        """'24.3 (24.1, +0.2)', '24.3 ± 0.1 (n=3) (24.1, +0.2)', 'diverged (34.7)'."""
        if self.mean is None:
            ours = self.note or "–"
        else:
            ours = f"{self.mean:.2f}"
            if self.n > 1:
                ours += (r" $\pm$ " if latex else " ± ") + f"{self.std:.2f} (n={self.n})"
            if self.note:
                ours += f" [+{self.note}]"
        if self.paper is None:
            return ours
        mark = (r"$^\dagger$" if latex else "†") if self.secondary else ""
        paper = f"{self.paper:.1f}{mark}"
        return f"{ours} ({paper}, {self.delta:+.2f})" if self.delta is not None else f"{ours} ({paper})"


def make_cell(runs: pd.DataFrame, paper: tuple[float | None, bool] = (None, False)) -> Cell:
    """Aggregate the runs of one setting (seeds) into a cell."""
    ok = runs[runs["status"] == "ok"]["val_err1"].astype(float)
    others = runs[runs["status"] != "ok"]
    notes = []
    for _, r in others.iterrows():
        notes.append(f"unfinished {r['epochs_done']}/{r['epochs']}" if r["status"] == "unfinished" else str(r["status"]))
    n = len(ok)
    mean = float(ok.mean()) if n else None
    std = float(ok.std(ddof=1)) if n > 1 else (0.0 if n == 1 else None)
    return Cell(mean, std, n, ", ".join(notes), paper[0], paper[1])


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A report table: cells by row and column, plus a caption."""

    name: str
    caption: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    extra: dict[tuple[str, str], str]  # columns that are not cells (Δ vs baseline)
    extra_columns: list[str]

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
        return f"**{self.caption}**\n\n" + "\n".join([head, sep, *body]) + "\n"

    def latex(self) -> str:
        """A LaTeX tabular with its caption as a comment."""
        df = self.frame(latex=True)
        cols = "l" + "c" * len(df.columns)
        esc = lambda s: str(s).replace("%", r"\%").replace("_", r"\_").replace("#", r"\#")  # noqa: E731
        lines = [f"% {self.caption}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule", " & ".join(["", *map(esc, df.columns)]) + r" \\", r"\midrule"]
        lines += [" & ".join([esc(i), *(esc(v) if "$" not in str(v) else str(v).replace("%", r"\%") for v in df.loc[i])]) + r" \\" for i in df.index]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def long(self) -> pd.DataFrame:
        """Machine-readable CSV form: one row per cell with the numbers."""
        out = []
        for (r, c), cell in self.cells.items():
            out.append({"row": r, "column": c, "ours_mean": cell.mean, "ours_std": cell.std, "n": cell.n, "not_finished": cell.note, "paper": cell.paper, "paper_secondary": cell.secondary, "delta": cell.delta})
        for (r, c), v in self.extra.items():
            out.append({"row": r, "column": c, "ours_mean": _num(v) if v else None})
        return pd.DataFrame(out)


ROW_KEYS = ["model", "variant", "setting"]


def _row_label(model: str, var: str, setting: str, models: int) -> str:
    """Row label: the variant, with the model when several are present and what else sets it apart."""
    extra = [model] if models > 1 else []
    extra += [setting] if setting else []
    return f"{var} [{'; '.join(extra)}]" if extra else var


def batch_size_table(runs: pd.DataFrame, ref: pd.DataFrame) -> Table:
    """Table 2: error vs images per GPU, one row per norm variant."""
    batches = sorted(runs["batch_per_gpu"].dropna().unique(), reverse=True)
    models = runs["model"].nunique()
    cells, rows = {}, []
    for (model, var, setting), grp in runs.groupby(ROW_KEYS, sort=False, dropna=False):
        label = _row_label(model, var, setting, models)
        rows.append(label)
        first = grp.iloc[0]
        for b in batches:
            sub = grp[grp["batch_per_gpu"] == b]
            if not sub.empty:
                paper = paper_number(ref, ("table2_batch_size", "resnet101", "batch_renorm"), model, first["norm"], int(b), first["groups"], first["channels_per_group"])
                cells[(label, f"{int(b)}")] = make_cell(sub, paper)
    return Table("table_batch_size", "Top-1 val error (%) vs images per GPU: ours (paper, Δ)", rows, [f"{int(b)}" for b in batches], cells, {}, [])


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
    """Table 1: every norm variant at one batch size, with Δ to each baseline."""
    sub, b = _at_batch(runs, batch)
    models = sub["model"].nunique()
    cells, rows, extra = {}, [], {}
    means: dict[tuple[str, str, str], float | None] = {}
    for (model, var, setting), grp in sub.groupby(ROW_KEYS, sort=False, dropna=False):
        label = _row_label(model, var, setting, models)
        first = grp.iloc[0]
        paper = paper_number(ref, ("table1_norm_methods", "footnote3_weightnorm", "table2_batch_size"), model, first["norm"], b, first["groups"], first["channels_per_group"])
        cells[(label, "error")] = make_cell(grp, paper)
        means[(model, var, setting)] = cells[(label, "error")].mean
        rows.append(label)
    base_cols = [f"Δ vs {bv}" for bv in baselines]
    for (model, var, setting), m in means.items():
        label = _row_label(model, var, setting, models)
        for bv, col in zip(baselines, base_cols):
            ref_mean = means.get((model, bv, setting))
            if m is not None and ref_mean is not None:
                extra[(label, col)] = f"{m - ref_mean:+.2f}"
    return Table("table_norms", f"Top-1 val error (%) at {b} images per GPU: ours (paper, Δ); Δ vs baselines are ours − ours", rows, ["error"], cells, extra, base_cols)


def group_tables(runs: pd.DataFrame, ref: pd.DataFrame, batch: int | None = None) -> list[Table]:
    """Table 3, both halves: fixed G (LN is G=1) and fixed channels per group (IN is 1)."""
    sub, b = _at_batch(runs, batch)
    out = []
    for half, key, one, table in (("groups", "groups", "ln", "table3_fixed_groups"), ("channels per group", "channels_per_group", "in", "table3_fixed_channels_per_group")):
        gn = sub[(sub["norm"] == "gn") & sub[key].notna()] if key == "channels_per_group" else sub[(sub["norm"] == "gn") & sub["channels_per_group"].isna()]
        cols: dict[int, pd.DataFrame] = {}
        for v, grp in gn.groupby(gn[key].map(lambda x: int(x) if _num(x) is not None else 32) if key == "groups" else gn[key].astype(int)):
            cols[int(v)] = grp
        ones = sub[sub["norm"] == one]
        if not ones.empty:
            cols[1] = ones
        if not cols:
            continue
        models = sub["model"].nunique()
        cells, rows = {}, []
        for v in sorted(cols, reverse=True):
            for (model, setting), grp in cols[v].groupby(["model", "setting"], sort=False, dropna=False):
                label = _row_label(model, "GN", setting, models)
                if label not in rows:
                    rows.append(label)
                norm = "gn" if v != 1 else one
                g = v if key == "groups" else None
                cpg = v if key == "channels_per_group" else None
                cells[(label, str(v))] = make_cell(grp, paper_number(ref, (table,), model, norm, b, g, cpg))
        name = "table_groups" if key == "groups" else "table_channels_per_group"
        caption = f"GN with a fixed number of {half} (1 = {one.upper()}), {b} images per GPU: ours (paper, Δ)"
        out.append(Table(name, caption, rows, [str(v) for v in sorted(cols, reverse=True)], cells, {}, []))
    return out


# ---------------------------------------------------------------- figures


def _style() -> Any:
    """matplotlib with a paper-like style, headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 120, "savefig.bbox": "tight"})
    return plt


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    """Save a figure as PNG and PDF."""
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p)
    return paths


def _batch_axis(ax: Any, batches: Any) -> None:
    """A log2 x axis of images per GPU, from large to small as in the paper's Figure 1."""
    ticks = sorted(batches, reverse=True)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(int(x)) for x in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("images per GPU (log scale)")


def figure_error_vs_batch(runs: pd.DataFrame, ref: pd.DataFrame, out: Path) -> list[Path]:
    """Val error vs images per GPU (log2 axis), one line per variant, the paper's BN and GN dashed."""
    plt = _style()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    batches = sorted(runs["batch_per_gpu"].dropna().unique(), reverse=True)
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
        for b, note in bad:  # a run that did not finish is shown as such, at the top of the axis
            ax.annotate(f"{var}: {note}", (b, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top", ha="center", color=line[0].get_color())
            ax.plot([b], [1.0], marker="x", transform=ax.get_xaxis_transform(), color=line[0].get_color(), clip_on=False)
    paper = ref[ref["table"] == "table2_batch_size"]
    for norm, grp in paper.groupby("norm"):
        grp = grp.sort_values("batch_per_gpu", ascending=False)
        ax.plot(grp["batch_per_gpu"], grp["val_error_pct"], linestyle="--", color="gray" if norm == "BN" else "black", alpha=0.7, label=f"paper {norm} (ResNet-50)")
    _batch_axis(ax, set(batches) | set(paper["batch_per_gpu"]))
    ax.set_ylabel("top-1 val error (%)")
    ax.legend(fontsize=8)
    paths = _save(fig, out, "fig_error_vs_batch")
    plt.close(fig)
    return paths


def figure_curves(runs: pd.DataFrame, curves: pd.DataFrame, out: Path, batch: int | None = None) -> list[Path]:
    """The paper's Figure 4: train and val error vs epoch per variant, at one batch size."""
    plt = _style()
    sub, b = _at_batch(runs, batch)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    for (model, var, setting), grp in sub.groupby(ROW_KEYS, sort=False, dropna=False):
        run = grp.sort_values("seed").iloc[0]  # one run per variant: the lowest seed
        c = curves[curves["run_id"] == run["run_id"]].sort_values("epoch")
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


def figure_delta(runs: pd.DataFrame, baselines: list[str], out: Path) -> list[Path]:
    """Difference of each variant's error to each baseline's, vs images per GPU."""
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
    ax.set_ylabel("Δ top-1 val error (points)")
    ax.legend(fontsize=8)
    paths = _save(fig, out, "fig_delta_vs_batch")
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    """What `ablation report` produced."""

    runs: pd.DataFrame
    curves: pd.DataFrame
    tables: list[Table]
    files: list[Path]


def build(roots: list[str | Path], out: str | Path, baselines: list[str] | None = None, reference: str | Path | None = None,
          timings: dict[str, float] | None = None) -> Report:
    """Collect the runs under roots and write tables, figures and CSVs to out; `timings` gets the seconds of each phase
    (find, read, frames: ablation.collect; csv, tables, figures)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, curves, curves_text = collect_with_text(roots, timings)
    if runs.empty:
        from ablation.errors import AblationError

        raise AblationError(f"no run folders under {', '.join(map(str, roots))}")
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - t
        t = now

    ref = load_reference(reference_dir(reference))
    bases = resolve_baselines(baselines or ["bn", "gn"], runs["variant"])
    files = []
    write_csv(runs, out / "runs.csv")
    if curves_text is None or list(curves.columns) != CURVE_COLUMNS:
        write_csv(curves, out / "curves.csv")
    else:  # made while reading the metrics: the same text as the table's
        with open(out / "curves.csv", "w", encoding="utf-8", newline="") as f:
            f.write(csv_header(CURVE_COLUMNS))
            for piece in curves_text:
                f.write(piece)
    files += [out / "runs.csv", out / "curves.csv"]
    lap("csv")
    tables = [batch_size_table(runs, ref), norm_table(runs, ref, bases), *group_tables(runs, ref)]
    for table in tables:
        (out / f"{table.name}.md").write_text(table.markdown())
        (out / f"{table.name}.tex").write_text(table.latex())
        table.long().to_csv(out / f"{table.name}.csv", index=False)
        files += [out / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")]
    lap("tables")
    files += figure_error_vs_batch(runs, ref, out)
    files += figure_curves(runs, curves, out)
    files += figure_delta(runs, bases, out)
    lap("figures")
    return Report(runs, curves, tables, files)
