"""The mechanism decomposition (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): a BN-like norm's error at small
normalization batches split into its two causes, from the evaluation modes each run recorded (eval.modes). Torch-free.

For each run, each mode's number is the paper's metric of its column of metrics.jsonl (median of the last
metric_epochs epochs): train_err1 (batch statistics, training augmentation), val_err1 (EMA population statistics),
val_err1_precise (PreciseBN population statistics) and val_err1_batch (mini-batch evaluation in normalization batches).
Per norm and fixed total batch, over the normalization batches:

    inconsistency = population error - mini-batch error     (the train-test inconsistency; population = PreciseBN
                                                             where the run recorded it, else the EMA)
    noise         = mini-batch error - mini-batch error at the largest normalization batch
                                                            (what training with few images' statistics costs)
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from ablation import rundir
from ablation.results.collect import variant

PRECISE, BATCH = rundir.MODE_METRIC_KEYS["precise"][0], rundir.MODE_METRIC_KEYS["batch"][0]
COLUMNS = ["variant", "model", "total_batch", "norm_batch", "batch_per_gpu", "gpus", "seeds",
           "train_err1", "val_ema", "val_precise", "val_batch", "inconsistency", "noise"]
CURVE_COLUMNS = ["variant", "total_batch", "norm_batch", "seed", "epoch", "val_ema", "val_precise", "val_batch", "train_err1"]


def _metric(rows: list[dict[str, Any]], key: str, last: int) -> float | None:
    """The paper's metric of one column (None where no row holds it)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return rundir.paper_metric(values, last) if values else None


def read_runs(folders: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one record per run that evaluated in more than one mode, their per-epoch rows) from the run folders' metrics.jsonl."""
    runs, curves = [], []
    for folder in folders:
        rows = rundir.read_jsonl(Path(folder) / rundir.METRICS) if (Path(folder) / rundir.METRICS).exists() else []
        if not any(PRECISE in r or BATCH in r for r in rows):
            continue
        cfg = rundir.read_run_config(folder) or {}
        norm, last = cfg.get("norm", {}), cfg.get("metric_epochs", 5)
        bpg, gpus = cfg.get("batch_per_gpu"), cfg.get("gpus")
        own = {"variant": variant(norm, cfg.get("model", {})), "total_batch": bpg * gpus, "norm_batch": norm.get("batch") or bpg}
        runs.append({**own, "model": cfg.get("model", {}).get("name"), "batch_per_gpu": bpg, "gpus": gpus, "seed": cfg.get("seed"),
                     "train_err1": _metric(rows, "train_err1", last), "val_ema": _metric(rows, "val_err1", last),
                     "val_precise": _metric(rows, PRECISE, last), "val_batch": _metric(rows, BATCH, last)})
        curves += [{**own, "seed": cfg.get("seed"), "epoch": r["epoch"], "val_ema": r["val_err1"], "val_precise": r.get(PRECISE),
                    "val_batch": r.get(BATCH), "train_err1": r["train_err1"]} for r in rows]
    return runs, curves


def _mean(values: list[float | None]) -> float | None:
    """The mean over seeds of the values there are (None where there are none)."""
    have = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(have) if have else None


def table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (norm variant, model, total batch, normalization batch), seeds averaged, with the decomposition's two parts."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["variant"], r["model"], r["total_batch"], r["norm_batch"]), []).append(r)
    out = []
    for (var, model, total, nb), group in sorted(cells.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2], -kv[0][3])):
        row = {"variant": var, "model": model, "total_batch": total, "norm_batch": nb, "batch_per_gpu": group[0]["batch_per_gpu"],
               "gpus": group[0]["gpus"], "seeds": len(group)}
        for key in ("train_err1", "val_ema", "val_precise", "val_batch"):
            row[key] = _mean([g[key] for g in group])
        population = row["val_precise"] if row["val_precise"] is not None else row["val_ema"]
        row["inconsistency"] = population - row["val_batch"] if population is not None and row["val_batch"] is not None else None
        out.append(row)
    frame = pd.DataFrame(out, columns=COLUMNS)
    for (var, model, total), idx in frame.groupby(["variant", "model", "total_batch"]).groups.items():
        largest = frame.loc[idx].sort_values("norm_batch").iloc[-1]["val_batch"]
        frame.loc[idx, "noise"] = frame.loc[idx, "val_batch"] - largest if largest is not None and not pd.isna(largest) else None
    return frame


def _num(v: Any) -> str:
    """A table cell: two decimals, or a dash where the mode was not evaluated."""
    return "–" if v is None or pd.isna(v) else f"{v:.2f}"


def markdown(frame: pd.DataFrame) -> str:
    """table_mechanism.md: error (%) by normalization batch in every mode, and the two causes of the rise."""
    head = ("| norm | total batch | norm batch | train (batch stats) | val EMA | val PreciseBN | val mini-batch "
            "| inconsistency (population − mini-batch) | noise (mini-batch − largest) |")
    lines = [head, "|" + "---|" * 9]
    for _, r in frame.iterrows():
        lines.append(f"| {r['variant']} | {r['total_batch']} | {r['norm_batch']} | {_num(r['train_err1'])} | {_num(r['val_ema'])} | "
                     f"{_num(r['val_precise'])} | {_num(r['val_batch'])} | {_num(r['inconsistency'])} | {_num(r['noise'])} |")
    note = ("\nTop-1 error (%), median of each run's last metric_epochs epochs, mean over seeds. Population = PreciseBN where "
            "recorded, else the EMA; inconsistency = population − mini-batch (train–test inconsistency); noise = mini-batch "
            "error above that at the largest normalization batch (training with few images' statistics).\n")
    return "\n".join(lines) + "\n" + note
