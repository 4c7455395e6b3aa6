"""Collect run folders into tidy tables (runs.csv, curves.csv). Torch-free: reads only run-folder files.

Every run folder under the given roots becomes one row, whatever its state: a diverged, failed or
unfinished run keeps its row and its status, and its metric stays empty (NaN), never a number.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from ablation import config, rundir
from ablation.errors import ConfigError

log = logging.getLogger("ablation")

# Config fields that are table axes of their own, so they never split a row.
AXIS_FIELDS = ("seed", "batch_per_gpu", "model.name")

RUN_COLUMNS = [
    "run_id", "sweeps", "model", "norm", "variant", "setting", "groups", "channels_per_group", "gpus", "batch_per_gpu",
    "global_batch", "seed", "epochs", "status", "reason", "val_err1", "val_err5", "best_val_err1", "last_val_err1",
    "epochs_done", "gpu_hours", "wall_seconds", "config_hash",
]
PAPER_NAMES = {"bn": "BN", "syncbn": "SyncBN", "gn": "GN", "ln": "LN", "in": "IN", "none": "none"}


def variant(norm: dict[str, Any]) -> str:
    """A display name for a norm and its parameters: BN, GN (G=32), GN (16 ch/group), LN, mypkg.norms:f."""
    name = norm.get("name", "bn")
    if name == "gn":
        if norm.get("channels_per_group"):
            return f"GN ({norm['channels_per_group']} ch/group)"
        return f"GN (G={norm.get('groups') or 32})"
    label = PAPER_NAMES.get(name, name)
    if name == "bn" and norm.get("running_stats", "rank0") != "rank0":
        label += f" ({norm['running_stats']} running stats)"
    return label


def result_fields(cfg_doc: dict[str, Any]) -> dict[str, Any]:
    """The result-affecting fields of a run's config.yaml, flattened (empty if it no longer parses)."""
    try:
        cfg = config.normalized(config.from_dict(cfg_doc))
    except ConfigError:
        return {}
    flat = config.flatten(config._canonical(config._hash_view(cfg)))
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in flat.items()}


def find_run_folders(roots: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding config.yaml and metrics or a final status) under the roots, links followed, each once."""
    seen: dict[Path, Path] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            from ablation.errors import AblationError

            raise AblationError(f"results folder not found: {root}")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if rundir.CONFIG in filenames and (rundir.METRICS in filenames or rundir.FINAL in filenames or rundir.ENV in filenames):
                seen.setdefault(Path(dirpath).resolve(), Path(dirpath))
                dirnames[:] = []  # a run folder holds no run folders
            dirnames[:] = [d for d in dirnames if d not in ("slurm", "logs", "configs")]
    return sorted(seen.values(), key=lambda p: p.name)


def _sweeps_of(folder: Path, roots: list[Path]) -> str:
    """Names of the sweeps (sweep folders with a manifest) that link to this run folder."""
    names = []
    for root in roots:
        for manifest in [root / "manifest.json", *root.glob("*/manifest.json")]:
            if (manifest.parent / "runs" / folder.name).exists() and manifest.parent.name not in names:
                names.append(manifest.parent.name)
    return ",".join(sorted(names))


def read_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run folder as a row of runs.csv and its rows of curves.csv."""
    rd = rundir.RunDir(folder)
    cfg = yaml.safe_load(rd.config.read_text()) or {}
    try:
        rows = rundir.read_jsonl(rd.metrics)  # a torn last line (a crash, or an append in flight) is left out
    except rundir.CorruptFile as e:
        log.warning(f"{e}; the run's epochs are left out")
        rows = []
    final = rd.final_status()  # a damaged final.json reads as failed, the file named in the reason
    norm = cfg.get("norm", {})
    status = final["status"] if final else "unfinished"
    val = [r["val_err1"] for r in rows]
    metric_epochs = cfg.get("metric_epochs", 5)
    ok = status == "ok"
    run = {
        "run_id": cfg.get("run_id", folder.name),
        "model": cfg.get("model", {}).get("name"),
        "norm": norm.get("name"),
        "variant": variant(norm),
        "groups": norm.get("groups") if norm.get("name") == "gn" else None,
        "channels_per_group": norm.get("channels_per_group"),
        "gpus": cfg.get("gpus"),
        "batch_per_gpu": cfg.get("batch_per_gpu"),
        "global_batch": cfg.get("derived", {}).get("global_batch"),
        "seed": cfg.get("seed"),
        "epochs": cfg.get("epochs"),
        "status": status,
        "reason": final.get("reason") if final else None,
        # The paper's metric exists only for a run that finished: anything else stays empty.
        "val_err1": final.get("val_err1") if ok else None,
        "val_err5": final.get("val_err5") if ok else None,
        "best_val_err1": min(val) if val and ok else None,
        "last_val_err1": rundir.paper_metric(val, metric_epochs),
        "epochs_done": len(rows),
        "gpu_hours": final.get("gpu_hours") if final else None,
        "wall_seconds": final.get("wall_seconds") if final else (rows[-1]["wall_seconds"] if rows else None),
        "config_hash": cfg.get("config_hash"),
    }
    curves = [{"run_id": run["run_id"], "variant": run["variant"], "batch_per_gpu": run["batch_per_gpu"], "seed": run["seed"], **r} for r in rows]
    run["_fields"] = result_fields(cfg)
    return run, curves


def collect(roots: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) tables of every run folder under the roots."""
    roots = [Path(r) for r in roots]
    runs, curves = [], []
    for folder in find_run_folders(roots):
        run, c = read_run(folder)
        run["sweeps"] = _sweeps_of(folder, roots)
        runs.append(run)
        curves += c
    runs = _one_per_run_id(runs)
    _label_settings(runs)
    runs_df = pd.DataFrame(runs, columns=RUN_COLUMNS)
    setting = dict(zip(runs_df["run_id"], runs_df["setting"]))
    for c in curves:
        c["setting"] = setting[c["run_id"]]
    curve_cols = ["run_id", "variant", "setting", "batch_per_gpu", "seed", *rundir.METRIC_KEYS]
    return runs_df, pd.DataFrame(curves, columns=curve_cols)


def _one_per_run_id(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run id: the same run found under two roots is one run, not two seeds.

    The copy kept is the finished one, else the one with most epochs; the others are reported.
    """
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        old = best.get(r["run_id"])
        rank = lambda x: (x["status"] == "ok", x["status"] != "unfinished", x["epochs_done"])  # noqa: E731
        if old is None or rank(r) > rank(old):
            best[r["run_id"]] = r
    if len(best) < len(runs):
        log.warning(f"{len(runs) - len(best)} run folder(s) are copies of a run found elsewhere (same run id); one copy of each is used")
    kept = {id(r) for r in best.values()}
    return [r for r in runs if id(r) in kept]


def _label_settings(runs: list[dict[str, Any]]) -> None:
    """Set each run's `setting`: the result-affecting fields (besides its axes) that vary across the runs.

    Runs that differ only in seed share a setting and are pooled as seeds of one table cell; runs
    that differ in anything else (epochs, weight decay, ...) never are.
    """
    keys = sorted({k for r in runs for k in r["_fields"]})
    varying = [
        k for k in keys
        if k not in AXIS_FIELDS and not k.startswith("norm.") and len({json.dumps(r["_fields"].get(k)) for r in runs}) > 1
    ]
    for r in runs:
        fields = r.pop("_fields")
        r["setting"] = ", ".join(f"{k}={fields.get(k)}" for k in varying)
