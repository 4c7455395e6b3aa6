"""`ablation compare A B`: is A's error lower than B's, and by how much, with its uncertainty; and the report's
significance table. Torch-free.

A and B are each a run folder (or a folder of run folders: the seeds of one setting), or a selector over a results
root: `key=value` words in one argument, e.g. "norm=gn batch_per_gpu=2", whose keys are runs.csv's columns (norm,
variant, model, batch_per_gpu, seed, groups, setting, run_id ...) or any config key (norm.name, optim.lr ...).
Each side must be runs of one setting, every one finished, each with its per-image results (predictions/): the
images both sides got right or wrong pair up, and give the exact McNemar test and a paired bootstrap interval; two or
more seeds a side give the seed-level difference with Welch's t interval.

The per-image files (predictions/, the run-folder contract: docs/run-folder.md) are read through ablation.rundir's
readers; two runs' images pair where their validation sets' fingerprints (val.json's val_fingerprint) are equal.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ablation import rundir
from ablation.errors import AblationError
from ablation.results import collect, runfiles, statistics

DRAWS = 10_000
SIGNIFICANCE_TABLE = "table_significance"
# Selector keys that name a runs.csv column; any other key is a config key (norm.name, optim.lr, ...).
COLUMNS = ("run_id", "model", "norm", "variant", "setting", "groups", "channels_per_group", "weight_std", "r_max", "d_max", "gpus",
           "batch_per_gpu", "global_batch", "seed", "epochs", "status")


class CompareError(AblationError):
    """A comparison that cannot be made as asked: one line, exit 2."""


# ---------------------------------------------------------------- per-image results (rundir's readers)


def _prediction_epochs(folder: str | Path) -> list[int]:
    """The epochs whose per-image results a run folder holds, in order."""
    return rundir.predictions_epochs(folder)


def _val_info(folder: str | Path) -> dict[str, Any] | None:
    """predictions/val.json ({images, classes, k, fingerprint, val_fingerprint}), or None where there is none; the set the
    images pair on is `val_fingerprint` (the validation images and labels alone), else the older `fingerprint`."""
    path = Path(folder) / rundir.PREDICTIONS / rundir.VAL_META
    try:
        doc = rundir.read_json(path)
    except rundir.CorruptFile as e:
        raise CompareError(str(e)) from None
    if doc is not None and not isinstance(doc, dict):
        raise CompareError(f"{path} is not a JSON object")
    if doc is not None and doc.get("val_fingerprint"):
        doc = {**doc, "fingerprint": doc["val_fingerprint"]}
    return doc


def _load_predictions(folder: str | Path, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], top-k classes [N, k]) of a run folder's per-image results at an epoch."""
    try:
        labels, topk, _, _ = rundir.read_predictions(folder, epoch)
    except (rundir.CorruptFile, rundir.NoPredictions) as e:
        raise CompareError(str(e)) from None
    return labels, topk


def correct(folder: str | Path, epoch: int) -> np.ndarray:
    """Per image, True where the run's top-1 class at that epoch is the true one."""
    labels, topk = _load_predictions(folder, epoch)
    return topk[:, 0] == labels


# ---------------------------------------------------------------- runs and selectors


def runs_under(roots: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every run under the roots as collect() makes its runs.csv row (one per run id, settings labelled among them),
    with `_folder` (where it was read) and `_flat` (its config's result fields, dotted keys)."""
    surveyed = collect.survey(roots)
    runs = []
    for folder, entry in zip(surveyed.folders, runfiles.read_folders([str(f) for f in surveyed.folders])):
        run = collect.run_from(folder, entry)
        run["_folder"], run["_flat"] = folder, run["_fields"]
        runs.append(run)
    runs = collect.one_per_run_id(runs)
    collect.label_settings(runs)
    return runs


def parse_selector(text: str) -> list[tuple[str, str]]:
    """'norm=gn batch_per_gpu=2' -> [(norm, gn), (batch_per_gpu, 2)] as written (shell quoting allowed: variant='GN (G=32)')."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise CompareError(f"selector {text!r}: {e}") from None
    out = []
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise CompareError(f"selector {text!r}: {w!r} is not key=value (e.g. norm=gn batch_per_gpu=2)")
        out.append((key, value))
    if not out:
        raise CompareError("an empty selector: give key=value words, e.g. 'norm=gn batch_per_gpu=2'")
    return out


def _value(run: dict[str, Any], key: str) -> Any:
    """A run's value under a selector key (a runs.csv column, else a config key; norm.name is the norm column)."""
    if key in COLUMNS:
        return run.get(key)
    return run["_flat"].get(key, _MISSING)


_MISSING = object()


def _has(run: dict[str, Any], key: str) -> bool:
    return key in COLUMNS or key in run["_flat"]


def _matches(value: Any, text: str) -> bool:
    """A run's value equals a selector's written one: as text, or as the YAML value it reads as (2 == 2.0, true)."""
    if value is _MISSING:
        return False
    if isinstance(value, float) and math.isnan(value):
        value = None
    if str(value) == text or (value is None and text.lower() in ("none", "null", "~", "")):
        return True
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    if isinstance(parsed, bool) or isinstance(value, bool):
        return isinstance(parsed, bool) and isinstance(value, bool) and parsed == value
    if isinstance(parsed, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(float(parsed), float(value))
    if isinstance(value, str) and not isinstance(parsed, str):
        try:
            return json.loads(value) == parsed  # a list or mapping, kept as JSON text in the fields
        except ValueError:
            return False
    return parsed == value


def _shown(v: Any) -> str:
    return "none" if v is None or v is _MISSING or (isinstance(v, float) and math.isnan(v)) else str(v)


def _order(text: str) -> tuple[int, float, str]:
    """Numbers first, in numeric order, then text."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _setting_key(run: dict[str, Any]) -> tuple[Any, ...]:
    return (run["model"], run["variant"], run["setting"], run["batch_per_gpu"])


def describe(run: dict[str, Any]) -> str:
    """'GN (G=32), 2 images per GPU' (with the model where not ResNet-50, and the setting where it has one)."""
    text = f"{run['variant']}, {run['batch_per_gpu']} images per GPU"
    if run.get("model") not in (None, "resnet50"):
        text += f", {run['model']}"
    return text + (f" [{run['setting']}]" if run.get("setting") else "")


@dataclass
class Side:
    """One side of a comparison: what was asked and the runs it names (one setting, its seeds in order)."""

    name: str  # "A" or "B"
    asked: str
    where: str  # 'norm=gn batch_per_gpu=2 under results', or a folder
    runs: list[dict[str, Any]]
    correct: list[np.ndarray] = field(default_factory=list)  # per run, at the epoch read

    @property
    def seeds(self) -> list[Any]:
        return [r["seed"] for r in self.runs]

    def header(self) -> str:
        seeds = ", ".join(map(str, self.seeds))
        return f"{self.name}: {describe(self.runs[0])}, seed{'s' if len(self.runs) > 1 else ''} {seeds} ({self.where})"


def select(runs: list[dict[str, Any]], selector: str, where: str, name: str) -> list[dict[str, Any]]:
    """The runs a selector names, refused where it names none or runs of more than one setting."""
    pairs = parse_selector(selector)
    for key, _ in pairs:
        if not any(_has(r, key) for r in runs):
            raise CompareError(f"{name}: no run under {where} has a field {key!r} (keys: {', '.join(COLUMNS)}, or a config key such as "
                               "norm.name or optim.lr)")
    chosen = [r for r in runs if all(_matches(_value(r, k), v) for k, v in pairs)]
    if not chosen:
        present = "; ".join(f"{k} is one of {', '.join(sorted({_shown(_value(r, k)) for r in runs}, key=_order))}" for k in dict(pairs))
        raise CompareError(f"{name}: no run under {where} matches {selector!r} ({present})")
    return _one_setting(chosen, name, repr(selector))


def _one_setting(runs: list[dict[str, Any]], name: str, what: str) -> list[dict[str, Any]]:
    """The runs, sorted by seed, where they are of one setting; else a refusal naming the settings."""
    settings = list(dict.fromkeys(map(_setting_key, runs)))
    if len(settings) > 1:
        shown = "; ".join(describe(next(r for r in runs if _setting_key(r) == s)) for s in settings[:6])
        more = f"; and {len(settings) - 6} more" if len(settings) > 6 else ""
        raise CompareError(f"{name}: {what} matches runs of {len(settings)} settings ({shown}{more}): add keys to pick one "
                           "(e.g. batch_per_gpu=, variant=)")
    return sorted(runs, key=lambda r: (r["seed"] is None, r["seed"] if isinstance(r["seed"], int) else 0, str(r["run_id"])))


def resolve(asked: str, results: str | Path, name: str, root_runs: list[dict[str, Any]] | None = None) -> Side:
    """A side from its argument: a run folder (or a folder of one setting's run folders), else a selector over results."""
    path = Path(asked)
    if path.exists():
        if not path.is_dir():
            raise CompareError(f"{name}: {asked} is a file, not a run folder")
        runs = runs_under([path])
        if not runs:
            raise CompareError(f"{name}: no run folder at or under {asked}")
        return Side(name, asked, asked, _one_setting(runs, name, asked))
    if "=" not in asked:
        raise CompareError(f"{name}: {asked!r} is neither a run folder nor a selector (key=value words, e.g. 'norm=gn batch_per_gpu=2')")
    if root_runs is None:
        root_runs = runs_under([results])
    where = f"{asked} under {results}"
    return Side(name, asked, where, select(root_runs, asked, str(results), name))


# ---------------------------------------------------------------- checks


def _check_finished(side: Side) -> None:
    """Every run of the side finished (status ok); else a refusal naming those that did not."""
    bad = [r for r in side.runs if r["status"] != "ok"]
    if bad:
        shown = ", ".join(f"{r['run_id']} ({_status_text(r)})" for r in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise CompareError(f"{side.name}: {len(bad)} of its {len(side.runs)} run(s) did not finish: {shown}; compare finished runs "
                           "(pick seeds with seed=)")


def _status_text(run: dict[str, Any]) -> str:
    if run["status"] == "unfinished":
        return f"unfinished, {run['epochs_done']}/{run['epochs']} epochs"
    return str(run["status"])


@dataclass(frozen=True)
class Images:
    """The validation images both sides were read on: their count, fingerprint, the epoch read and why that one."""

    n: int
    fingerprint: str
    epoch: int
    why: str  # 'the last', '--epoch', 'the last every run has'


def check_predictions(sides: list[Side], epoch: int | None) -> Images:
    """The per-image results both sides are read at: refused where a run has none, the validation sets differ, or
    the epoch is missing in a run."""
    runs = [(s, r) for s in sides for r in s.runs]
    missing = [r for _, r in runs if _val_info(r["_folder"]) is None or not _prediction_epochs(r["_folder"])]
    if missing:
        names = ", ".join(str(r["_folder"]) for r in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CompareError(f"no per-image results ({rundir.PREDICTIONS}/) in {names}: trained before ablation recorded them, so these runs "
                           "cannot be compared image by image")
    infos = {id(r): _val_info(r["_folder"]) for _, r in runs}
    prints = {s.name: sorted({str(infos[id(r)].get("fingerprint")) for r in s.runs}) for s in sides}  # type: ignore[union-attr]
    if any(len(p) > 1 for p in prints.values()):
        name = next(n for n, p in prints.items() if len(p) > 1)
        raise CompareError(f"{name}'s runs were validated on different sets (fingerprints {', '.join(prints[name])})")
    if len({p[0] for p in prints.values()}) > 1:
        shown = ", ".join(f"{p[0]} ({n})" for n, p in prints.items())
        raise CompareError(f"A and B were validated on different sets (fingerprints {shown}): their images do not pair")
    images = {int(infos[id(r)].get("images", -1)) for _, r in runs}  # type: ignore[union-attr]
    if len(images) > 1:
        raise CompareError(f"the runs' validation sets hold different numbers of images ({', '.join(map(str, sorted(images)))})")
    epochs = {id(r): _prediction_epochs(r["_folder"]) for _, r in runs}
    if epoch is not None:
        lacking = [(s, r) for s, r in runs if epoch not in epochs[id(r)]]
        if lacking:
            s, r = lacking[0]
            raise CompareError(f"{s.name}: epoch {epoch} has no per-image results in {r['_folder']} (its epochs: "
                               f"{_ranges(epochs[id(r)])})")
        why = "--epoch"
    else:
        common = set.intersection(*(set(e) for e in epochs.values()))
        if not common:
            lasts = ", ".join(f"{s.name}'s last {max(max(epochs[id(r)]) for r in s.runs)}" for s in sides)
            raise CompareError(f"no epoch has per-image results in every run ({lasts}): pass --epoch N of one they share")
        epoch = max(common)
        why = "the last" if all(max(e) == epoch for e in epochs.values()) else "the last every run has"
    return Images(images.pop(), prints[sides[0].name][0], epoch, why)


def _ranges(epochs: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out, start = [], None
    for i, e in enumerate(epochs):
        start = e if start is None else start
        if i + 1 == len(epochs) or epochs[i + 1] != e + 1:
            out.append(f"{start}-{e}" if e != start else f"{e}")
            start = None
    return ", ".join(out) or "none"


# ---------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class Pair:
    """One seed of A against one seed of B, image by image."""

    seed_a: Any
    seed_b: Any
    err_a: float
    err_b: float
    b: int  # images only A gets right
    c: int  # images only B gets right
    p: float  # exact McNemar


@dataclass
class Comparison:
    """Everything `ablation compare` says."""

    a: Side
    b: Side
    images: Images
    pairs: list[Pair]
    paired_by: str  # 'seed' or 'seed order'
    draws: int
    boot: tuple[float, float, float]  # A − B of the seed-averaged per-image error, its 95 % interval
    noise: float  # binomial standard error of one run's error on these images, at the mean error of both sides
    summary_a: statistics.SeedSummary
    summary_b: statistics.SeedSummary
    seeds: statistics.SeedDifference | None  # with two or more seeds a side
    share: float | None  # of the seed pairs, those in which A beats B

    def significant(self) -> bool:
        """At 95 %: the t interval excludes 0 (two or more seeds a side), else McNemar's p < 0.05 (one run a side), else the
        bootstrap interval excludes 0."""
        if self.seeds is not None:
            return self.seeds.lo > 0 or self.seeds.hi < 0
        if len(self.a.runs) == 1 and len(self.b.runs) == 1:
            return self.pairs[0].p < 1 - statistics.LEVEL
        return self.boot[1] > 0 or self.boot[2] < 0

    def conclusion(self) -> str:
        """One line in plain words: how much lower or higher A's error is, its interval and test, and whether that is significant."""
        if self.seeds is not None:
            d, lo, hi = self.seeds.diff, self.seeds.lo, self.seeds.hi
            test = f"Welch t-test over seeds, p {p_is(self.seeds.p)}"
        else:
            d, lo, hi = self.boot
            test = f"bootstrap over images{f', McNemar p {p_is(self.pairs[0].p)}' if len(self.pairs) == 1 else ''}"
        how = f"{abs(d):.2f} points {'lower' if d < 0 else 'higher'} than B's" if d else "the same as B's"
        text = f"A's error is {how} (A − B = {d:+.2f}, 95 % interval {lo:+.2f} to {hi:+.2f}; {test}): "
        if not self.significant():
            text += "no significant difference at 95 %"
        else:
            text += f"{'A' if d < 0 else 'B'} is better at 95 %"
        if self.seeds is None:
            text += " (one seed on a side: this is about these trained models on these images, not about another seed)"
        return text

    def lines(self) -> list[str]:
        """The comparison as text, a line each."""
        im = self.images
        out = [self.a.header(), self.b.header(),
               f"per-image results of epoch {im.epoch} ({im.why}), top-1, on {im.n:,} validation images (set {im.fingerprint})", "",
               f"per image (paired by {self.paired_by}; b: images only A gets right, c: only B):",
               f"  {'seeds A/B':<10} {'A error':>8} {'B error':>8} {'A − B':>7} {'b':>7} {'c':>7} {'McNemar p':>10}"]
        for p in self.pairs:
            out.append(f"  {f'{p.seed_a}/{p.seed_b}':<10} {p.err_a:8.2f} {p.err_b:8.2f} {p.err_a - p.err_b:+7.2f} {p.b:7d} {p.c:7d} "
                       f"{p_text(p.p):>10}")
        if len(self.pairs) > 1:
            out.append(f"  pooled over the {len(self.pairs)} pairs: b = {sum(p.b for p in self.pairs)}, c = {sum(p.c for p in self.pairs)}")
        d, lo, hi = self.boot
        what = "" if len(self.a.runs) == 1 and len(self.b.runs) == 1 else " of the seed-averaged error"
        out.append(f"  paired bootstrap over images{what} ({self.draws:,} draws): A − B = {d:+.2f} points, 95 % interval "
                   f"{lo:+.2f} to {hi:+.2f}")
        out.append(f"  one run's error on {im.n:,} images has a binomial standard error of {self.noise:.2f} points")
        if self.seeds is not None:
            s = self.seeds
            out += ["", f"per seed (top-1 error at epoch {im.epoch}):", f"  A: {self.summary_a.text()}", f"  B: {self.summary_b.text()}",
                    f"  A − B: {s.diff:+.2f} points, 95 % interval {s.lo:+.2f} to {s.hi:+.2f} (Welch t"
                    f"{'' if math.isnan(s.df) else f', {s.df:.1f} degrees of freedom'}, p {p_is(s.p)})",
                    f"  A beats B in {self.share:.0%} of the {len(self.a.runs) * len(self.b.runs)} seed pairs (a tie counts half)"]
        return [*out, "", self.conclusion()]

    def as_json(self) -> dict[str, Any]:
        """The numbers, as one JSON document."""
        def side(s: Side, summary: statistics.SeedSummary) -> dict[str, Any]:
            first = s.runs[0]
            return {"asked": s.asked, "variant": first["variant"], "model": first["model"], "setting": first["setting"],
                    "batch_per_gpu": first["batch_per_gpu"], "seeds": s.seeds, "run_ids": [r["run_id"] for r in s.runs],
                    "folders": [str(r["_folder"]) for r in s.runs], "mean": summary.mean, "std": _finite(summary.std), "n": summary.n}

        doc: dict[str, Any] = {
            "a": side(self.a, self.summary_a), "b": side(self.b, self.summary_b),
            "epoch": self.images.epoch, "epoch_chosen": self.images.why, "images": self.images.n, "fingerprint": self.images.fingerprint,
            "paired_by": self.paired_by,
            "pairs": [{"seed_a": p.seed_a, "seed_b": p.seed_b, "err_a": p.err_a, "err_b": p.err_b, "b": p.b, "c": p.c, "p": p.p}
                      for p in self.pairs],
            "bootstrap": {"diff": self.boot[0], "lo": self.boot[1], "hi": self.boot[2], "draws": self.draws},
            "noise_floor": self.noise, "seeds": None, "significant": self.significant(), "conclusion": self.conclusion(),
        }
        if self.seeds is not None:
            s = self.seeds
            doc["seeds"] = {"diff": s.diff, "lo": s.lo, "hi": s.hi, "p": s.p, "df": _finite(s.df), "share_a_beats_b": self.share}
        return doc


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else v


def p_is(p: float) -> str:
    """'= 0.021' or '< 1e-300': a p-value after its name."""
    text = p_text(p)
    return text if text.startswith("<") else f"= {text}"


def p_text(p: float) -> str:
    """A p-value as read: 0.021, 0.0004, 3.1e-12, '< 1e-300' (below what a float holds); '—' where there is none."""
    if p is None or math.isnan(p):
        return "—"
    if p < 1e-300:
        return "< 1e-300"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _pairs(a: Side, b: Side) -> tuple[list[tuple[int, int]], str]:
    """Index pairs of A's and B's runs: by equal seeds where they share any, else in seed order (as many as the fewer side)."""
    common = [s for s in a.seeds if s in set(b.seeds)]
    if common:
        return [(a.seeds.index(s), b.seeds.index(s)) for s in common], "seed"
    n = min(len(a.runs), len(b.runs))
    return [(i, i) for i in range(n)], "seed order"


def _error(ok: np.ndarray) -> float:
    return float(100.0 * (1.0 - ok.mean()))


def run_comparison(a: Side, b: Side, epoch: int | None = None, draws: int = DRAWS) -> Comparison:
    """The comparison of two resolved sides (their runs' status and per-image results checked first)."""
    if draws < 1:
        raise CompareError(f"--draws must be at least 1, got {draws}")
    for side in (a, b):
        _check_finished(side)
    images = check_predictions([a, b], epoch)
    for side in (a, b):
        side.correct = [correct(r["_folder"], images.epoch) for r in side.runs]
    index, by = _pairs(a, b)
    pairs = []
    for i, j in index:
        ca, cb = a.correct[i], b.correct[j]
        bb, cc, p = statistics.mcnemar(ca, cb)
        pairs.append(Pair(a.seeds[i], b.seeds[j], _error(ca), _error(cb), bb, cc, p))
    share_a, share_b = np.mean(a.correct, axis=0), np.mean(b.correct, axis=0)
    boot = statistics.paired_bootstrap(share_a, share_b, draws=draws)
    errs_a, errs_b = [_error(c) for c in a.correct], [_error(c) for c in b.correct]
    summary_a, summary_b = statistics.seed_summary(errs_a), statistics.seed_summary(errs_b)
    seeds = share = None
    if len(errs_a) >= 2 and len(errs_b) >= 2:
        seeds = statistics.seed_difference(errs_a, errs_b)
        share = statistics.share_a_beats_b(errs_a, errs_b)
    noise = statistics.binomial_noise_floor((summary_a.mean + summary_b.mean) / 2, images.n)
    return Comparison(a, b, images, pairs, by, draws, boot, noise, summary_a, summary_b, seeds, share)


def compare(a: str, b: str, results: str | Path = "results", epoch: int | None = None, draws: int = DRAWS) -> Comparison:
    """`ablation compare A B`: each side a run folder or a selector over `results`."""
    root_runs = None
    if any(not Path(x).exists() and "=" in x for x in (a, b)):
        if not Path(results).is_dir():
            raise CompareError(f"results folder not found: {results} (selectors pick runs under --results)")
        root_runs = runs_under([results])
    return run_comparison(resolve(a, results, "A", root_runs), resolve(b, results, "B", root_runs), epoch, draws)


# ---------------------------------------------------------------- the report's significance table

SIGNIFICANCE_COLUMNS = ["model", "variant", "setting", "batch_per_gpu", "baseline", "diff", "lo", "hi", "p", "n", "n_baseline", "test",
                        "epoch", "note"]


def _folders_by_name(folders: Iterable[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for f in folders:
        out.setdefault(Path(f).name, []).append(Path(f))
    return out


def _per_image(run_ids: list[str], by_name: dict[str, list[Path]]) -> list[Path] | None:
    """The folder of each run (found by its run id as folder name) with per-image results, or None where one has none."""
    out = []
    for rid in run_ids:
        found = [f for f in by_name.get(str(rid), []) if _val_info(f) is not None and _prediction_epochs(f)]
        if not found:
            return None
        out.append(found[0])
    return out


def _row(a: pd.DataFrame, b: pd.DataFrame, by_name: dict[str, list[Path]], draws: int) -> dict[str, Any]:
    """One line of the significance table: A's finished runs against the baseline's, at one setting and batch."""
    a_ok, b_ok = a[a["status"] == "ok"], b[b["status"] == "ok"]
    row: dict[str, Any] = {"n": len(a_ok), "n_baseline": len(b_ok), "diff": None, "lo": None, "hi": None, "p": None, "test": "—",
                           "epoch": None, "note": ""}
    if a_ok.empty or b_ok.empty:
        row["note"] = "no finished run on either side" if a_ok.empty and b_ok.empty else "no finished run" if a_ok.empty else \
            "no finished baseline run"
        return row
    if len(a_ok) >= 2 and len(b_ok) >= 2:
        s = statistics.seed_difference(a_ok["val_err1"].astype(float), b_ok["val_err1"].astype(float))
        row.update(diff=s.diff, lo=s.lo, hi=s.hi, p=s.p, test="Welch t-test over seeds")
        return row
    fa, fb = _per_image(list(a_ok["run_id"]), by_name), _per_image(list(b_ok["run_id"]), by_name)
    if fa is None or fb is None:
        row["note"] = "one seed on a side and no per-image results: no test"
        return row
    runs = [{"run_id": str(f.name), "_folder": f, "seed": None} for f in fa + fb]
    sides = [Side("A", "", "", runs[:len(fa)]), Side("B", "", "", runs[len(fa):])]
    try:
        images = check_predictions(sides, None)
    except CompareError as e:
        row["note"] = str(e)
        return row
    ca = np.mean([correct(f, images.epoch) for f in fa], axis=0)
    cb = np.mean([correct(f, images.epoch) for f in fb], axis=0)
    d, lo, hi = statistics.paired_bootstrap(ca, cb, draws=draws)
    row.update(diff=d, lo=lo, hi=hi, epoch=images.epoch)
    if len(fa) == 1 and len(fb) == 1:
        row.update(p=statistics.mcnemar(ca.astype(bool), cb.astype(bool))[2], test="McNemar + paired bootstrap over images")
    else:
        row.update(test="paired bootstrap over images (seed-averaged)")
    return row


def significance_table(runs: pd.DataFrame, folders: Iterable[Path], baselines: list[str], draws: int = DRAWS) -> pd.DataFrame:
    """For each variant at each images per GPU, its difference to each baseline variant at the same model, setting and
    images per GPU (points, variant − baseline), with a 95 % interval and p-value: Welch's t-test over the paper metric
    of two or more finished seeds a side; else, one run (or one on a side) with per-image results, the paired bootstrap
    over images of the last epoch every run has (and McNemar's exact p for one run a side); else no test, and why."""
    by_name = _folders_by_name(folders)
    out = []
    groups = {k: g for k, g in runs.groupby(["model", "variant", "setting", "batch_per_gpu"], sort=False, dropna=False)}
    for (model, var, setting, batch), grp in groups.items():
        for base in baselines:
            other = groups.get((model, base, setting, batch))
            if var == base or other is None:
                continue
            row = {"model": model, "variant": var, "setting": setting, "batch_per_gpu": batch, "baseline": base}
            row.update(_row(grp, other, by_name, draws))
            out.append(row)
    df = pd.DataFrame(out, columns=SIGNIFICANCE_COLUMNS).astype({"epoch": "Int64", "n": int, "n_baseline": int})
    if not df.empty:
        df = df.sort_values(["baseline", "model", "setting", "batch_per_gpu"], ascending=[True, True, True, False], kind="stable")
    return df.reset_index(drop=True)


def significance_markdown(df: pd.DataFrame) -> str:
    """The significance table as Markdown, with its caption."""
    models = df["model"].nunique() if not df.empty else 1
    caption = ("Each norm's top-1 val error minus each baseline's at the same images per GPU (points; negative: lower error "
               "than the baseline), with a 95 % interval and p-value. Welch t-test: two or more finished seeds a side, "
               "over the paper metric; McNemar + paired bootstrap: one run a side, over the per-image results of the last "
               "epoch both have; — : no test (the note says why)")
    head = "| norm | images per GPU | vs | difference | 95 % interval | p | seeds | test |"
    lines = [f"**{caption}**", "", head, "|---" * 8 + "|"]
    for r in df.itertuples():
        label = r.variant
        extra = ([r.model] if models > 1 else []) + ([r.setting] if r.setting else [])
        if extra:
            label += f" [{'; '.join(map(str, extra))}]"
        diff = "—" if _none(r.diff) else f"{r.diff:+.2f}"
        interval = "—" if _none(r.lo) else f"{r.lo:+.2f} to {r.hi:+.2f}"
        test = r.test if not r.note else f"{r.test} ({r.note})" if r.test != "—" else r.note
        if not _none(r.epoch):
            test += f", epoch {int(r.epoch)}"
        lines.append(f"| {label} | {_int(r.batch_per_gpu)} | {r.baseline} | {diff} | {interval} | {p_text(_nan(r.p))} | "
                     f"{r.n} vs {r.n_baseline} | {test} |")
    if df.empty:
        lines.append("| (no variant shares an images-per-GPU setting with a baseline) | | | | | | | |")
    return "\n".join(lines) + "\n"


def _none(v: Any) -> bool:
    """None, NaN or pandas' NA."""
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _nan(v: Any) -> float:
    return math.nan if _none(v) else float(v)


def _int(v: Any) -> str:
    return str(int(v)) if not _none(v) else "?"


def significance_files(runs: pd.DataFrame, folders: Iterable[Path], baselines: list[str]) -> list[tuple[str, str]]:
    """(file name, text) of table_significance.md and .csv, for the report."""
    df = significance_table(runs, folders, baselines)
    return [(f"{SIGNIFICANCE_TABLE}.md", significance_markdown(df)), (f"{SIGNIFICANCE_TABLE}.csv", df.to_csv(index=False))]
