"""Collect run folders into tidy tables (runs.csv, curves.csv). Torch-free: reads only run-folder files.

Every run folder under the given roots becomes one row, whatever its state: a diverged, failed or
unfinished run keeps its row and its status, and its metric stays empty (NaN), never a number.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import logging
import multiprocessing
import operator
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ablation import config, rundir, sweepdir
from ablation.errors import ConfigError
from ablation.gcpause import gc_paused
from ablation.norms import registry
from ablation.results import recipe, runfiles

log = logging.getLogger("ablation")

# Config fields that are table axes of their own, so they never split a row.
AXIS_FIELDS = ("seed", "batch_per_gpu", "model.name")
# Config fields the variant's name shows (variant()), so they are not repeated in the setting.
VARIANT_FIELDS = ("model.weight_std",)

RUN_COLUMNS = [
    "run_id", "sweeps", "model", "norm", "variant", "setting", "groups", "channels_per_group", "weight_std", "r_max", "d_max",
    "gpus", "batch_per_gpu", "global_batch", "seed", "epochs", "train_images", "val_images", "num_classes", "paper_setting", "unlike_paper",
    "deviations",
    "status", "reason", "val_err1", "val_err5", "best_val_err1", "last_val_err1", "epochs_done", "gpu_hours", "wall_seconds", "config_hash",
]

# The paper's setting (Wu & He §4.1): its recipe (results/paper_recipe.yaml: every result-affecting field but the axes
# it sweeps) on ImageNet-1k (1,000 classes, 1,281,167 train and 50,000 val images). Only runs in it are compared with
# the paper's numbers level for level.
PAPER_MODELS = tuple(recipe.paper_recipe()["models"])
PAPER_IMAGE_SIZE = recipe.paper_recipe()["fields"]["data.image_size"]
IMAGENET_TOLERANCE = recipe.paper_recipe()["dataset"]["tolerance"]  # a copy missing a few images is still ImageNet; a 10 % subset is not


def norm_value(norm: dict[str, Any], key: str) -> Any:
    """A norm field from config.yaml, else the registry's paper default for that norm (None where neither)."""
    value = norm.get(key)
    if value is not None:
        return value
    try:
        info = registry.lookup(norm.get("name", "bn"))
    except ConfigError:
        return None
    return dict(info.defaults).get(key) if info else None


def _takes(name: str, key: str) -> bool:
    """True where the registry says this built-in norm takes the norm.<key> field."""
    try:
        info = registry.lookup(name)
    except ConfigError:
        return False
    return info is not None and key in info.params


def variant_norm_keys(name: str) -> tuple[str, ...]:
    """The norm.* fields that variant() shows for a norm of this name."""
    if name == "gn":
        return ("norm.name", "norm.groups", "norm.channels_per_group")
    if name == "bn":
        return ("norm.name", "norm.running_stats")
    return ("norm.name", *(f"norm.{k}" for k in ("groups", "r_max", "d_max") if _takes(name, k)))


def variant(norm: dict[str, Any], model: dict[str, Any] | None = None) -> str:
    """A display name for a norm, its parameters and the model fields that go with it:
    BN, GN (G=32), GN (16 ch/group), GN+WS (G=32), BRN (r_max=1.5, d_max=0.5), LN, mypkg.norms:f."""
    name = norm.get("name", "bn")
    ws = "+WS" if (model or {}).get("weight_std") else ""
    if name == "gn":
        if norm.get("channels_per_group"):
            return f"GN{ws} ({norm['channels_per_group']} ch/group)"
        return f"GN{ws} (G={norm.get('groups') or 32})"
    label = registry.label(name) + ws
    if name == "bn" and norm.get("running_stats", "rank0") != "rank0":
        label += f" ({norm['running_stats']} running stats)"
    fields = [k.split(".", 1)[1] for k in variant_norm_keys(name)[1:]]
    shown = [f"{f}={norm_value(norm, f)}" for f in fields if norm_value(norm, f) is not None]
    if name != "bn" and shown:
        label += f" ({', '.join(s.replace('groups=', 'G=') for s in shown)})"
    return label


def unlike_paper(cfg: dict[str, Any], fields: dict[str, Any] | None = None) -> str:
    """How a run's config.yaml differs from the paper's setting, grouped and short ('10 epochs, not 100; 1 GPU, not 8;
    cosine schedule, not step'); '' where it does not (paper_differences).

    fields: the config's result fields (result_fields), where the caller has them.
    """
    return "; ".join(paper_differences(cfg, fields)[0])


_DEVIATIONS: dict[tuple[Any, ...], tuple[list[tuple[str, Any, Any]], list[str]]] = {}


def paper_differences(cfg: dict[str, Any], fields: dict[str, Any] | None = None) -> tuple[list[str], list[tuple[str, Any, Any]]]:
    """(how a run differs from the paper's setting, short items; its result fields that differ from the paper's recipe).

    The data must be ImageNet-1k by the counts the trainer records in config.yaml (derived: num_classes,
    train_images, val_images; recipe.dataset_differences); the result-affecting fields (result_fields) the paper's
    recipe (recipe.deviations: the axes the paper sweeps aside). A config that is not a mapping differs in its data.
    """
    cfg = cfg if isinstance(cfg, dict) else {}
    fields = _fields(cfg) if fields is None else fields
    model = cfg.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    key = (name, *((k, v) for k, v in fields.items() if k != "seed"))  # runs that differ in their seed differ alike
    try:
        found = _DEVIATIONS.get(key)
    except TypeError:  # a value that is no key (an unvalidated config's own kind of value): not kept
        key, found = None, None
    if found is None:
        devs = recipe.deviations(fields)
        found = (devs, recipe.summary(devs, name if name in PAPER_MODELS else None))
        if key is not None:
            if len(_DEVIATIONS) > 10_000:
                _DEVIATIONS.clear()
            _DEVIATIONS[key] = found
    devs, items = found
    return recipe.dataset_differences(cfg.get("derived")) + items, devs


def result_fields(cfg_doc: dict[str, Any]) -> dict[str, Any]:
    """The result-affecting fields of a run's config.yaml, flattened. A config this version cannot validate
    (a norm or a field it does not know) gives its written values instead (_written_fields)."""
    try:
        cfg = config.normalized(config.from_dict(cfg_doc))
    except ConfigError:
        flat = _written_fields(cfg_doc)
    else:
        flat = config.flatten(config.canonical(config.hash_view(cfg)))
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in flat.items()}


def _written_fields(cfg_doc: Any) -> dict[str, Any]:
    """A config.yaml's values as result_fields would give them, without validating it: written keys,
    fields that are not hashed and optional fields at their default are left out; unknown keys are kept."""
    if not isinstance(cfg_doc, dict):
        return {}
    flat = config.flatten(config.canonical({k: v for k, v in cfg_doc.items() if k not in config.WRITTEN_KEYS}))
    out = {}
    for key, value in flat.items():
        f = _field(key)
        omitted_default = f is not None and f.metadata.get("omit_if_default") and value == config.canonical(f.default)
        if f is not None and (not f.metadata.get("hash", True) or omitted_default):
            continue
        out[key] = value
    return out


def _field(key: str) -> Any:
    """The dataclass field of RunConfig behind a dotted key, or None."""
    import dataclasses
    import typing

    cls: Any = config.RunConfig
    f = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        f = next((x for x in dataclasses.fields(cls) if x.name == part), None)
        if f is None:
            return None
        cls = typing.get_type_hints(cls).get(part)
    return f


# result_fields by config (less its written keys and seed): 10,000 runs are a few dozen settings times their seeds.
_FIELDS: dict[str, dict[str, Any] | None] = {}
_SEEDS = range(2**31)


def _fields(cfg_doc: dict[str, Any]) -> dict[str, Any]:
    """result_fields(cfg_doc), computed once per config that differs in more than its seed."""
    return _seed_fields(cfg_doc)[0]


def _seed_fields(cfg_doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(_fields(cfg_doc), whether they are its setting's, which differ from another seed's in the seed alone).

    A config's fields are taken to differ from another seed's in the seed alone only after checking it for
    seeds 0 and 1 (else that config is computed every time).
    """
    seed = cfg_doc.get("seed")
    if type(seed) is not int or seed not in _SEEDS:
        return result_fields(cfg_doc), False
    rest = {k: v for k, v in cfg_doc.items() if k not in config.WRITTEN_KEYS and k != "seed"}
    key = repr(rest)
    if key not in _FIELDS:
        if len(_FIELDS) > 10_000:
            _FIELDS.clear()
        f0, f1 = result_fields({**rest, "seed": 0}), result_fields({**rest, "seed": 1})
        same = f0.get("seed") == 0 and f1.get("seed") == 1 and f0.keys() == f1.keys() and all(f0[k] == f1[k] for k in f0 if k != "seed")
        _FIELDS[key] = f0 if same else None
    base = _FIELDS[key]
    if base is None:
        return result_fields(cfg_doc), False
    return {**base, "seed": seed}, True


def find_run_folders(roots: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding config.yaml and metrics or a final status) under the roots, links followed, each once.

    As os.walk(followlinks=True) top-down (the first path to a folder is the one kept), but each folder
    (by device and inode) is listed once: a sweep's links to 10,000 run folders cost a stat each, not a listing.
    """
    seen: dict[tuple[int, int], Path] = {}
    visited: set[tuple[int, int]] = set()
    skip = (sweepdir.SLURM, sweepdir.LOGS, sweepdir.CONFIGS)  # a sweep folder's own files: no run folders there

    def walk(top: str, key: tuple[int, int]) -> None:
        if key in visited:
            return
        visited.add(key)
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError:
            return
        dirs, files = [], set()
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                dirs.append(e)
            else:
                files.add(e.name)
        if rundir.CONFIG in files and (rundir.METRICS in files or rundir.FINAL in files or rundir.ENV in files):
            seen.setdefault(key, Path(top))
            return  # a run folder holds no run folders
        for e in dirs:
            if e.name in skip:
                continue
            try:
                st = e.stat()  # through a link: the folder it leads to
            except OSError:
                continue
            walk(os.path.join(top, e.name), (st.st_dev, st.st_ino))

    for root in roots:
        root = Path(root)
        if not root.exists():
            from ablation.errors import AblationError

            raise AblationError(f"results folder not found: {root}")
        st = root.stat()
        walk(str(root), (st.st_dev, st.st_ino))
    return sorted(seen.values(), key=lambda p: p.name)


def sweep_links(roots: list[Path]) -> list[tuple[str, frozenset[str]]]:
    """(sweep name, the run folder names its runs/ links lead to) of each sweep folder (with a manifest) at or under a root.

    Each sweep's runs/ folder is listed once (not once per run folder: 10,000 runs, a second each time).
    """
    linked: list[tuple[str, frozenset[str]]] = []
    for root in roots:
        for manifest in [root / sweepdir.MANIFEST, *sorted(root.glob(f"*/{sweepdir.MANIFEST}"))]:
            runs = manifest.parent / sweepdir.RUNS_LINKS
            try:
                with os.scandir(runs) as it:
                    names = frozenset(e.name for e in it if os.path.exists(e.path))  # a link to nothing links to no run
            except OSError:
                names = frozenset()
            linked.append((manifest.parent.name, names))
    return linked


def _sweep_index(linked: list[tuple[str, frozenset[str]]]) -> Callable[[str], str]:
    """name -> names of the sweeps that link to a run folder of that name."""

    def sweeps(name: str) -> str:
        return ",".join(sorted({sweep for sweep, names in linked if name in names}))

    return sweeps


@dataclass(frozen=True)
class Survey:
    """What a collect reads, before reading it: the run folders under the roots, their files' identities (size, mtime,
    inode) and the sweeps' links. Two equal surveys read the same: a report whose inputs' survey is unchanged is too."""

    folders: list[Path]
    identities: list[runfiles.Identity] | None  # None: not taken (survey(stats=False)); collect's readers take them
    links: list[tuple[str, frozenset[str]]]
    predictions: list[Any]  # each folder's per-image results folder (its mtime moves when a file is renamed into it), or None

    def digest(self) -> str:
        """A hash of the whole survey (its identities taken)."""
        if self.identities is None:
            raise ValueError("a survey without its files' identities has no digest (collect(identities=) takes them)")
        links = [(name, sorted(names)) for name, names in self.links]
        return hashlib.sha256(repr(([str(f) for f in self.folders], self.identities, links, self.predictions)).encode()).hexdigest()

    def with_identities(self, identities: list[runfiles.Identity]) -> Survey:
        """This survey with its folders' identities (as collect's readers took them)."""
        return dataclasses.replace(self, identities=identities)


def survey(roots: Iterable[str | Path], stats: bool = True) -> Survey:
    """The survey of the run folders and sweeps under the roots (a stat of each run folder's files; nothing read).

    stats=False leaves the files' identities out (None): where nothing read before is to be compared with them, the
    readers take each folder's as they read it (collect(identities=)), not a second stat of every file beforehand."""
    roots = [Path(r) for r in roots]
    folders = find_run_folders(roots)
    predictions = [runfiles.stat_of(os.path.join(f, rundir.PREDICTIONS)) for f in folders]
    return Survey(folders, [runfiles.identity(str(f)) for f in folders] if stats else None, sweep_links(roots), predictions)



# _config_part by config (less its run id, hash and seed), where its result fields are its setting's: a run's part is
# another seed's with its own run id, hash and seed (a third of the frames' time for 10,000 runs of a few dozen settings).
_PARTS: dict[bytes, tuple[dict[str, Any], dict[str, Any], Any]] = {}
_OWN_KEYS = frozenset(("run_id", "config_hash", "seed"))


def _config_part(folder: Path, cfg: Any) -> tuple[dict[str, Any], Any]:
    """The runs.csv fields that come from a run folder's config document (its result fields under `_fields`), and its metric_epochs."""
    cfg = cfg or {}
    seed = cfg.get("seed") if isinstance(cfg, dict) else None
    # Keyed by its pickle (a third of repr's time; equal bytes are equal plain data, and an equal config pickled otherwise
    # only misses the memo).
    key = pickle.dumps({k: v for k, v in cfg.items() if k not in _OWN_KEYS}, pickle.HIGHEST_PROTOCOL) \
        if type(seed) is int and seed in _SEEDS else None
    if key is not None and key in _PARTS:
        run, fields, metric_epochs = _PARTS[key]
        own = {"run_id": cfg.get("run_id", folder.name), "seed": seed, "config_hash": cfg.get("config_hash")}
        return {**run, **own, "_fields": {**fields, "seed": seed}}, metric_epochs
    run, shared, metric_epochs = _config_part_made(folder, cfg)
    if key is not None and shared:
        if len(_PARTS) > 10_000:
            _PARTS.clear()
        _PARTS[key] = (dict(run), run["_fields"], metric_epochs)  # a copy: the caller adds to its run
    return run, metric_epochs


def _config_part_made(folder: Path, cfg: Any) -> tuple[dict[str, Any], bool, Any]:
    """(_config_part's fields, whether its result fields are its setting's (_seed_fields), metric_epochs), made."""
    norm = cfg.get("norm", {})
    model = cfg.get("model", {})
    fields, shared = _seed_fields(cfg)
    items, devs = paper_differences(cfg, fields)
    unlike = "; ".join(items)
    brn = norm.get("name") == "brn"
    run = {
        "run_id": cfg.get("run_id", folder.name),
        "model": model.get("name"),
        "norm": norm.get("name"),
        "variant": variant(norm, model),
        "groups": norm.get("groups") if norm.get("name") == "gn" else None,
        "channels_per_group": norm.get("channels_per_group"),
        "weight_std": bool(model.get("weight_std", False)),
        "r_max": norm_value(norm, "r_max") if brn else None,
        "d_max": norm_value(norm, "d_max") if brn else None,
        "gpus": cfg.get("gpus"),
        "batch_per_gpu": cfg.get("batch_per_gpu"),
        "global_batch": cfg.get("derived", {}).get("global_batch"),
        "seed": cfg.get("seed"),
        "epochs": cfg.get("epochs"),
        "train_images": cfg.get("derived", {}).get("train_images"),
        "val_images": cfg.get("derived", {}).get("val_images"),
        "num_classes": cfg.get("derived", {}).get("num_classes"),
        "paper_setting": not unlike,
        "unlike_paper": unlike,
        "deviations": recipe.deviations_text(devs),
        "config_hash": cfg.get("config_hash"),
        "_fields": fields,
    }
    return run, shared, cfg.get("metric_epochs", 5)


def _curve_rows(run: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's rows of curves.csv (before its setting is known)."""
    own = {"run_id": run["run_id"], "variant": run["variant"], "batch_per_gpu": run["batch_per_gpu"], "seed": run["seed"]}
    return [{**own, **r} for r in rows]


def run_from(folder: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """A run's row of runs.csv (less sweeps and setting) from its folder's entry (runfiles.read_folder); its warnings logged."""
    for w in entry["warnings"]:
        log.warning(w)
    run, metric_epochs = _config_part(folder, entry["config"])
    part = runfiles.run_fields(entry)
    val = part.pop("_val")
    run.update(part)
    run["last_val_err1"] = rundir.paper_metric(val, metric_epochs)
    run["_decoded_on"] = entry.get("decoded_on") or []  # an index from before the field: not known
    if "modes" in entry:
        run.update(mode_metrics(entry, metric_epochs, run["status"] == "ok"))
    return run


# runs.csv's column per extra evaluation mode (eval.modes): its paper metric, like val_err1 for the EMA.
MODE_RUN_COLUMNS = [keys[0] for keys in rundir.MODE_METRIC_KEYS.values()]  # val_err1_precise, val_err1_batch


def mode_metrics(entry: dict[str, Any], metric_epochs: int, ok: bool) -> dict[str, float | None]:
    """A run's paper metric (median of its last metric_epochs epochs) in each extra mode it recorded; like val_err1, only
    for a finished run (None otherwise)."""
    out = {}
    for key in MODE_RUN_COLUMNS:
        values = runfiles.mode_values(entry, key)
        if values is not None:
            have = [v for v in values if v == v]  # NaN: an epoch evaluated without this mode
            out[key] = rundir.paper_metric(have, metric_epochs) if ok else None
    return out


def read_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One run folder as a row of runs.csv and its rows of curves.csv."""
    entry = runfiles.read_folder(str(folder))
    run = run_from(folder, entry)
    return run, _curve_rows(run, runfiles.metric_rows(entry))


CURVE_COLUMNS = ["run_id", "variant", "setting", "batch_per_gpu", "seed", *rundir.METRIC_KEYS]
# From this many run folders to read on, they are read by worker processes (one per usable core).
PARALLEL_MIN_FOLDERS = 1000
_CHUNK = 500  # run folders per piece of work


def collect(roots: Iterable[str | Path], timings: dict[str, float] | None = None, workers: int | None = None,
            index: str | Path | None = None, surveyed: Survey | None = None,
            extra: list[Path] | None = None, identities: list[runfiles.Identity] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) tables of every run folder under the roots.

    timings: gets the seconds of each phase (find, read, frames). workers: processes reading the run folders
    (default: one per usable core from PARALLEL_MIN_FOLDERS folders to read on, where this process can fork: a
    single-threaded process on Linux; 1: this process alone). index: a file keeping what was read of each folder
    (runfiles): a folder whose files are unchanged since is not read again, and the file is rewritten.
    surveyed: the roots' survey, where the caller has made it. extra: gets the run folders whose metrics rows hold keys
    beside rundir.METRIC_KEYS (extra evaluation modes: the only ones the mechanism table reads). identities: gets each
    folder's files' identities as read (a survey made without them reads every folder: there is nothing to compare).
    """
    with gc_paused():  # the configs, rows and tables made here are many and hold no cycles
        return _collect(roots, timings, workers, index, surveyed, extra, identities)


def _collect(roots: Iterable[str | Path], timings: dict[str, float] | None, workers: int | None, index: str | Path | None,
             surveyed: Survey | None, extra: list[Path] | None,
             identities: list[runfiles.Identity] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """collect(), the collector as it is."""
    clock = _Clock(timings)
    if surveyed is None:
        surveyed = survey(roots)
        clock.lap("find")
    folders = surveyed.folders
    paths = [str(f) for f in folders]
    known = runfiles.load_index(index) if surveyed.identities is not None else {}
    entries: list[dict[str, Any] | None] = []
    for p, ident in zip(paths, surveyed.identities or [None] * len(paths)):
        e = known.get(p)
        entries.append(e if e is not None and e.get("identity") == ident else None)
    missing = [i for i, e in enumerate(entries) if e is None]
    sweeps = _sweep_index(surveyed.links)
    runs = []
    pieces: list[bytes] = []  # the readers' pickled pieces, in order (where they are processes)
    with _reader(reader_count(workers, len(missing)), pieces) as read:
        arriving = iter(read([paths[i] for i in missing]))
        for i, folder in enumerate(folders):
            # Each run's row is made as its entry comes: this process works while the readers read, not after them.
            entry = entries[i]
            if entry is None:
                entry = entries[i] = next(arriving)
            run = run_from(folder, entry)
            run["sweeps"] = sweeps(folder.name)
            runs.append(run)
    saved = None
    if index is not None and len(missing) == len(paths) and pieces:  # every entry in the readers' pieces: kept as they are
        saved = background(functools.partial(runfiles.save_index, index, pieces=pieces))  # while the tables are made
    elif index is not None and (missing or len(known) != len(paths)):
        saved = background(lambda: runfiles.save_index(index, dict(zip(paths, entries))))
    del read, arriving, pieces  # the pieces' bytes are held by the index's writer alone (a forked child: this process holds none)
    clock.lap("read")
    if extra is not None:
        extra.extend(f for f, e in zip(folders, entries) if e["extra"])  # type: ignore[index]
    if identities is not None:
        identities.extend(e["identity"] for e in entries)  # type: ignore[index]
    every = list(runs)  # every folder's curves count, copies of a run included
    runs = one_per_run_id(runs)
    label_settings(runs)
    warning = mixed_decode_warning(runs)
    if warning:
        log.warning(warning)
    with_modes = [e for e in entries if "modes" in e]  # type: ignore[operator]
    mode_columns = [k for k in MODE_RUN_COLUMNS if any(k in r for r in runs)] if with_modes else []
    runs_df = pd.DataFrame(runs, columns=RUN_COLUMNS + mode_columns)
    setting = dict(zip(runs_df["run_id"], runs_df["setting"]))
    curves = _curves_from_columns(every, entries, setting)  # type: ignore[arg-type]
    if curves is None:
        curves = _curves_from_rows(every, [runfiles.metric_rows(e) for e in entries], setting)  # type: ignore[arg-type]
    if with_modes:  # curves.csv's columns per extra mode, only where some run recorded one
        curves = _with_mode_curves(curves, entries, with_modes)  # type: ignore[arg-type]
    if saved is not None and not saved():
        log.warning(f"collect index {index} was not written (the next report reads every run folder again)")
    clock.lap("frames")
    return runs_df, curves


def can_fork() -> bool:
    """True where this process may fork a child that runs Python: fork exists and no other thread runs (Jupyter's do)."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


def background(work: Callable[[], Any]) -> Callable[[], bool]:
    """Run work in a forked child while this process goes on; returns a function that waits for it and tells whether it
    succeeded. Where this process may not fork, work runs here when waited for (so in the same order as the child's
    results are taken), and its exception propagates from there."""
    if not can_fork():
        def run_here() -> bool:
            work()
            return True

        return run_here
    pid = os.fork()
    if pid == 0:  # the child: never returns to the caller's code
        # What the parent made is the child's to read, never to collect: an explicit collection in the work (matplotlib's
        # figure close runs one) would walk it all again, with the collector paused the youngest generation holding it.
        gc.freeze()
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)  # no atexit handlers, no flush of the parent's buffered output
    return lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def reader_count(asked: int | None, folders: int) -> int:
    """Processes to read run folders with: 1 unless there are many folders (or asked) and this process may fork."""
    if asked is None:
        from ablation.cpus import usable_cores

        asked = min(8, usable_cores(1)[0]) if folders >= PARALLEL_MIN_FOLDERS else 1
    # fork: no re-import in the workers (spawn would run __main__ again); never from a threaded process (Jupyter).
    return max(1, asked) if can_fork() else 1


@contextmanager
def _reader(workers: int, pieces: list[bytes]) -> Iterator[Callable[[list[str]], Iterator[dict[str, Any]]]]:
    """A function reading run folders (runfiles.read_folder) in order, in pieces: here, or in `workers` forked processes
    (their pickled pieces, runfiles.read_piece, appended to `pieces` as they come)."""
    if workers <= 1:
        yield lambda paths: itertools.chain.from_iterable(map(runfiles.read_folders, _pieces(paths, _CHUNK)))
        return
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))

    def entries(piece: bytes) -> Iterator[dict[str, Any]]:
        pieces.append(piece)
        return iter(runfiles.entries_of(piece).values())

    def read(paths: list[str]) -> Iterator[dict[str, Any]]:
        size = max(50, min(_CHUNK, len(paths) // (workers * 4) or 1))  # several pieces a worker: none waits long for the last
        return itertools.chain.from_iterable(map(entries, ex.map(runfiles.read_piece, _pieces(paths, size))))

    try:
        yield read
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)  # a config that cannot be read: the rest is not waited for
        raise
    ex.shutdown(wait=True)


def _pieces(paths: list[str], size: int) -> list[list[str]]:
    """The paths in pieces of `size`."""
    return [paths[i : i + size] for i in range(0, len(paths), size)]


_INT64 = range(-(2**63), 2**63)


def _regular(run: dict[str, Any]) -> bool:
    """True when the run's columns of curves are strings (run id, variant) and int64 numbers (batch, seed)."""
    texts = type(run["run_id"]) is str and type(run["variant"]) is str
    return texts and all(type(run[k]) is int and run[k] in _INT64 for k in ("batch_per_gpu", "seed"))


class _Clock:
    """Seconds per phase into a dict (or nowhere)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        self.t = now


def _curves_from_rows(runs: list[dict[str, Any]], metrics: list[list[dict[str, Any]]], setting: dict[Any, str]) -> pd.DataFrame:
    """curves.csv's table from the row dicts (the reference construction)."""
    curves = [c for run, rows in zip(runs, metrics) for c in _curve_rows(run, rows)]
    for c in curves:
        c["setting"] = setting[c["run_id"]]
    return pd.DataFrame(curves, columns=CURVE_COLUMNS)


def _curves_from_columns(runs: list[dict[str, Any]], entries: list[dict[str, Any]], setting: dict[Any, str]) -> pd.DataFrame | None:
    """curves.csv's table from the entries' metric columns, the same as _curves_from_rows makes it, or None where that
    is not sure: no rows at all, a folder whose rows are not one float or int per metric (runfiles), a metric that is
    float in one folder and int in another, a run whose id or variant is not a string or whose batch or seed is not an int."""
    with_rows = [(run, e) for run, e in zip(runs, entries) if e["n"]]
    if not with_rows or not all(_regular(run) and e["columns"] for run, e in with_rows):
        return None
    columns = [[e["columns"][key] for _, e in with_rows] for key in rundir.METRIC_KEYS]
    out: dict[str, Any] = {}
    for key, col in zip(rundir.METRIC_KEYS, columns):
        codes = {code for code, _ in col}
        if len(codes) != 1:
            return None
        out[key] = np.frombuffer(b"".join([data for _, data in col]), dtype=np.float64 if codes == {"d"} else np.int64)
    reps = np.array([e["n"] for _, e in with_rows])
    for key in ("run_id", "variant"):
        out[key] = np.repeat(np.array([run[key] for run, _ in with_rows], dtype=object), reps)
    out["setting"] = np.repeat(np.array([setting[run["run_id"]] for run, _ in with_rows], dtype=object), reps)
    for key in ("batch_per_gpu", "seed"):
        out[key] = np.repeat(np.array([run[key] for run, _ in with_rows], dtype=np.int64), reps)
    return pd.DataFrame(out, columns=CURVE_COLUMNS)


def _with_mode_curves(curves: pd.DataFrame, entries: list[dict[str, Any]], with_modes: list[dict[str, Any]]) -> pd.DataFrame:
    """curves with a column per extra mode some run (with_modes) recorded (runfiles.MODE_KEYS), NaN on epochs evaluated
    without it, in the order of curves' rows (each entry's epochs, in the order of `entries`)."""
    keys = [k for k in runfiles.MODE_KEYS if any(k in e["modes"] for e in with_modes)]
    with_rows = [e for e in entries if e["n"]]
    out = curves.copy()
    for key in keys:
        parts = [np.array(runfiles.mode_values(e, key) or [np.nan] * e["n"], dtype=np.float64) for e in with_rows]
        column = np.concatenate(parts) if parts else np.empty(0)
        out[key] = column if len(column) == len(out) else np.nan  # rows that do not line up are never misattributed
    return out


def mixed_decode_warning(runs: list[dict[str, Any]]) -> str | None:
    """A warning where one table cell (variant, images per GPU, setting) pools device-decode runs whose pixels were decoded
    on a GPU (nvJPEG) with runs, or starts, decoded on a CPU (libjpeg-turbo); None otherwise. Takes the runs' _decoded_on."""
    cells: dict[tuple[Any, ...], set[str]] = {}
    for r in runs:
        where = r.pop("_decoded_on", None) or []
        cells.setdefault((r.get("variant"), r.get("batch_per_gpu"), r.get("setting")), set()).update(where)
    mixed = [cell for cell, where in cells.items() if len(where) > 1]
    if not mixed:
        return None
    variant, batch, setting = mixed[0]
    return (f"{len(mixed)} table cell(s) pool data.pipeline=device-decode runs decoded on a GPU (nvJPEG) and on a CPU "
            f"(libjpeg-turbo), e.g. {variant} at {batch} images per GPU{f' ({setting})' if setting else ''}: the pixels differ by a "
            "few levels; env.json's decoded_on says which run is which")


def one_per_run_id(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def label_settings(runs: list[dict[str, Any]]) -> None:
    """Set each run's `setting`: the result-affecting fields (besides its axes) that vary across the runs.

    Runs that differ only in seed share a setting and are pooled as seeds of one table cell; runs
    that differ in anything else (epochs, weight decay, ...) never are. A norm's own fields are in its
    variant's name (G, r_max ...) or, where they vary among runs of that norm (norm.momentum,
    norm.options, ...), in the setting; a field that only differs between norms (each norm's paper ε)
    sets nothing apart.
    """
    fields = [r["_fields"] for r in runs]
    keys = sorted(set(itertools.chain.from_iterable(fields)))
    text: dict[int, str] = {}  # json.dumps by value object: runs of one setting share their values (collect._fields)

    def dumps(v: Any) -> str:
        t = text.get(id(v))
        if t is None:
            t = text[id(v)] = json.dumps(v)
        return t

    varying = {
        k for k in keys if k not in AXIS_FIELDS and k not in VARIANT_FIELDS and not k.startswith("norm.") and _varies(fields, k, dumps)
    }
    by_norm: dict[Any, list[dict[str, Any]]] = {}
    for r in runs:
        by_norm.setdefault(r["norm"], []).append(r["_fields"])
    shown = {}  # per norm: the keys its runs' settings name, in order
    for name, group in by_norm.items():
        mine = varying | {k for k in keys if k.startswith("norm.") and k not in variant_norm_keys(str(name)) and _varies(group, k, dumps)}
        shown[name] = [k for k in keys if k in mine]
    for r in runs:
        f = r.pop("_fields")
        r["setting"] = ", ".join(f"{k}={f.get(k)}" for k in shown[r["norm"]])


def _varies(fields: list[dict[str, Any]], key: str, dumps: Callable[[Any], str]) -> bool:
    """True where these runs' result fields hold more than one value (as JSON) under key (a missing one is null)."""
    values = list(map(operator.methodcaller("get", key), fields))
    distinct = dict(zip(map(id, values), values))  # each object once: runs of one setting share their value objects
    return len({dumps(v) for v in distinct.values()}) > 1
