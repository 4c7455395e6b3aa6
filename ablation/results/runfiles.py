"""What the collector reads of each run folder, as plain data, kept in an index so that an unchanged folder is read once.

A folder's entry holds its config document (config.json, else config.yaml), final.json, and its metrics.jsonl
rows as one column per metric (or the rows themselves where they are not one float or int per metric): from
metrics.npy where that twin mirrors metrics.jsonl (rundir.metric_twin), else from the lines. It is
keyed by the identity (size, mtime_ns, inode) of each file it was read from, taken before reading: a file
changed since no longer matches, and its folder is read again. Torch-free and pandas-free.

The index is one pickle of plain data (dicts, lists, tuples, strings, bytes, numbers; loaded with an unpickler
that refuses anything else): pieces of entries by folder, each pickled on its own (the readers' own pieces where
they read every folder, so a first report does not pickle its 10,000 entries twice). It is written atomically (a
temporary file renamed over the old one), so concurrent reports each leave a whole index (the last one's). An index
that cannot be read or is of another version is ignored, with a one-line warning, and rebuilt.
"""

from __future__ import annotations

import array
import io
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

from ablation import rundir
from ablation.gcpause import gc_paused

log = logging.getLogger("ablation")

INDEX_NAME = ".collect-index.pkl"  # in the report's output folder: run folders stay as the trainer wrote them
# Bump when an entry's content changes (2: "extra", the rows' keys beyond METRIC_KEYS, and "modes"; 3: metrics.npy's identity;
# 4: the entries in pickled pieces, as the readers made them).
INDEX_VERSION = 4
_KEYS = rundir.METRIC_KEYS
# The extra evaluation modes' fields (eval.modes: val_err1_precise, val_err5_precise, val_err1_batch, val_err5_batch).
MODE_KEYS = tuple(k for keys in rundir.MODE_METRIC_KEYS.values() for k in keys)
_RUN_KEYS = frozenset(("run_id", "variant", "batch_per_gpu", "seed"))  # a metrics row holding one sets that curves column

Identity = tuple[Any, ...]


def stat_of(path: str) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of a file or folder, or None where there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def identity(folder: str) -> Identity:
    """The identities of the files a folder's entry is read from: its config (config.json, else config.yaml), metrics, final
    status, metrics' twin (metrics.npy)."""
    config = stat_of(os.path.join(folder, rundir.CONFIG_JSON))
    name = rundir.CONFIG_JSON if config is not None else rundir.CONFIG
    if config is None:
        config = stat_of(os.path.join(folder, rundir.CONFIG))
    return (name, config, stat_of(os.path.join(folder, rundir.METRICS)), stat_of(os.path.join(folder, rundir.FINAL)),
            stat_of(os.path.join(folder, rundir.METRICS_COLUMNS)))


def final_status(path: str, warnings: list[str]) -> dict[str, Any] | None:
    """rundir.RunDir.final_status(), its warning appended to `warnings` instead of logged."""
    try:
        return rundir.read_json(path)
    except rundir.CorruptFile as e:
        warnings.append(f"{e}: the run counts as failed")
        return {"status": "failed", "reason": f"unreadable final status: {e}", "val_err1": None}


def _columns(rows: list[dict[str, Any]]) -> dict[str, tuple[str, bytes]] | None:
    """Each metric's values as (array typecode, bytes), where every row has every metric and no run column, and each
    metric's values are all floats ('d') or all int64 ints ('q') (rundir.metric_columns, other keys let be); else None
    (the rows are kept as they are)."""
    if set(map(len, rows)) - {len(_KEYS)} and any(r.keys() & _RUN_KEYS for r in rows):
        return None
    columns = rundir.metric_columns(rows, other_keys=True)
    return None if columns is None else {key: (code, array.array(code, col).tobytes()) for key, (code, col) in zip(_KEYS, columns)}


def _array_columns(metrics: Any) -> dict[str, tuple[str, bytes]]:
    """A metric array's columns as (array typecode, bytes in this machine's order: what the collector's frames read)."""
    return {k: ("d", metrics[k].astype("=f8").tobytes()) if metrics.dtype[k].kind == "f" else ("q", metrics[k].astype("=i8").tobytes())
            for k in _KEYS}


def _mode_columns(rows: list[dict[str, Any]], extra: list[str]) -> dict[str, tuple[str, bytes]]:
    """Each extra evaluation mode's values (float64 bytes, NaN on an epoch without a number) among the rows' extra keys
    (extra_keys): {} where they hold none."""
    out = {}
    for key in (k for k in MODE_KEYS if k in extra):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            out[key] = ("d", array.array("d", [float(v) if isinstance(v, (int, float)) else math.nan for v in values]).tobytes())
    return out


def mode_values(entry: dict[str, Any], key: str) -> list[float] | None:
    """An entry's per-epoch values of one extra mode's field (NaN on an epoch without one), or None where no epoch has it."""
    found = entry.get("modes", {}).get(key)
    return array.array(found[0], found[1]).tolist() if found else None


def read_folder(folder: str) -> dict[str, Any]:
    """One run folder's entry: its files' identity, config document, final status, metric columns (or rows), warnings."""
    key = identity(folder)  # before reading: a file replaced meanwhile is read again next time
    warnings: list[str] = []
    config = rundir.read_run_config(folder, warnings)
    final = final_status(os.path.join(folder, rundir.FINAL), warnings)  # a damaged final.json reads as failed
    entry = {"identity": key, "config": config, "final": final, "warnings": warnings, "decoded_on": decoded_on(folder, config)}
    twin = _twin(folder) if key[4] is not None else None
    if twin is not None:  # metrics.npy mirrors metrics.jsonl: its columns, no line parsed
        entry.update(n=len(twin), val=twin["val_err1"].tolist(), last_wall=twin["wall_seconds"][-1].item(), columns=_array_columns(twin),
                     rows=None, extra=[])
        return entry
    try:
        rows = rundir.read_jsonl(os.path.join(folder, rundir.METRICS))  # a torn last line (a crash, or an append in flight) is left out
    except rundir.CorruptFile as e:
        warnings.append(f"{e}; the run's epochs are left out")
        rows = []
    columns = _columns(rows) if rows else {}
    entry.update(n=len(rows), val=[r["val_err1"] for r in rows], last_wall=rows[-1]["wall_seconds"] if rows else None, columns=columns,
                 rows=None if columns is not None else rows, extra=extra_keys(rows, columns))
    modes = _mode_columns(rows, entry["extra"])
    if modes:  # only a run that evaluated in extra modes carries the key
        entry["modes"] = modes
    return entry


def _twin(folder: str) -> Any:
    """The folder's metrics.npy array where it mirrors its metrics.jsonl (rundir.metric_twin), else None."""
    try:
        with open(os.path.join(folder, rundir.METRICS), "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime_ns
            data = f.read()
    except OSError:
        return None
    return rundir.metric_twin(folder, data, mtime)


def extra_keys(rows: list[dict[str, Any]], columns: dict[str, Any] | None) -> list[str]:
    """The keys of metrics rows beside METRIC_KEYS (extra evaluation modes' metrics), sorted."""
    # Kept in the entry so that only the folders holding some are read again for the mechanism table, not all of them.
    if columns is not None and all(len(r) == len(_KEYS) for r in rows):
        return []  # each row has every metric key (_columns took them all) and no other: nothing to look through
    return sorted(set().union(*rows) - set(_KEYS))


def decoded_on(folder: str, config: Any) -> list[str]:
    """Where a device-decode run's training pixels were decoded ('cpu', 'cuda'; every start's), from its env.json.

    Only device-decode's pixels depend on the device (nvJPEG vs libjpeg-turbo) and the device is not in the run id,
    so only those runs' env.json is read; [] for any other run, or one without the record.
    """
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or data.get("pipeline") != "device-decode":
        return []
    try:
        env = rundir.read_json(os.path.join(folder, rundir.ENV)) or {}
    except rundir.CorruptFile:
        return []
    found = {s.get("decoded_on") for s in env.get("starts", []) if isinstance(s, dict)} | {env.get("decoded_on")}
    return sorted(v for v in found if isinstance(v, str))


def read_folders(folders: list[str]) -> list[dict[str, Any]]:
    """read_folder of each (a piece of work for one worker process)."""
    with gc_paused():
        return [read_folder(f) for f in folders]


def read_piece(folders: list[str]) -> bytes:
    """read_folders' entries by folder, pickled: a worker's piece, which the collector unpickles (entries_of) and keeps,
    as it is, in the index (not pickled a second time there)."""
    return pickle.dumps(dict(zip(folders, read_folders(folders))), protocol=pickle.HIGHEST_PROTOCOL)


def entries_of(piece: bytes) -> dict[str, dict[str, Any]]:
    """A piece's entries by folder (plain data only: _PlainUnpickler)."""
    with gc_paused():
        doc = _PlainUnpickler(io.BytesIO(piece)).load()
    if not isinstance(doc, dict):
        raise pickle.UnpicklingError(f"a piece of entries is a {type(doc).__name__}, not a dict")
    return doc


def metric_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """An entry's metrics rows (as read from metrics.jsonl, or rebuilt from its columns with the same keys and values)."""
    if entry["rows"] is not None:
        return entry["rows"]
    if not entry["n"]:
        return []
    columns = [array.array(code, data).tolist() for code, data in (entry["columns"][k] for k in _KEYS)]
    rows = [dict(zip(_KEYS, values)) for values in zip(*columns)]
    for key, (code, data) in entry.get("modes", {}).items():  # the extra modes' fields, NaN where an epoch has none
        for row, value in zip(rows, array.array(code, data).tolist()):
            row[key] = value
    return rows


def run_fields(entry: dict[str, Any]) -> dict[str, Any]:
    """The runs.csv fields from an entry's metrics and final status, and its val_err1 list under "_val"."""
    final = entry["final"]
    val = entry["val"]
    status = final["status"] if final else "unfinished"
    ok = status == "ok"
    return {
        "status": status,
        "reason": final.get("reason") if final else None,
        # The paper's metric exists only for a run that finished: anything else stays empty.
        "val_err1": final.get("val_err1") if ok else None,
        "val_err5": final.get("val_err5") if ok else None,
        "best_val_err1": min(val) if val and ok else None,
        "epochs_done": entry["n"],
        "gpu_hours": final.get("gpu_hours") if final else None,
        "wall_seconds": final.get("wall_seconds") if final else entry["last_wall"],
        "_val": val,
    }


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain data only: a pickle naming any class or function is refused (an index is never code)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def load_index(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The entries of the index at path by folder ({} where there is none; one warning where it is unreadable or of another version)."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            doc = _PlainUnpickler(f).load()
    except FileNotFoundError:
        return {}
    except Exception as e:  # noqa: BLE001 - whatever is wrong with a cache, it is rebuilt
        log.warning(f"collect index {path} is unreadable ({type(e).__name__}: {e}); every run folder is read again")
        return {}
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION:
        got = doc.get("version") if isinstance(doc, dict) else type(doc).__name__
        log.warning(f"collect index {path} is of version {got}, not {INDEX_VERSION}; every run folder is read again")
        return {}
    if not isinstance(doc.get("pieces"), list) or not all(isinstance(p, bytes) for p in doc["pieces"]):
        log.warning(f"collect index {path} holds no list of pieces; every run folder is read again")
        return {}
    entries: dict[str, dict[str, Any]] = {}
    try:
        for piece in doc["pieces"]:
            entries.update(entries_of(piece))
    except Exception as e:  # noqa: BLE001 - as above
        log.warning(f"collect index {path} is unreadable ({type(e).__name__}: {e}); every run folder is read again")
        return {}
    return entries


def save_index(path: str | Path, entries: dict[str, dict[str, Any]] | None = None, pieces: list[bytes] | None = None) -> None:
    """Write the index atomically (not forced to disk: it can be rebuilt): the entries by folder, or the readers' pieces
    (read_piece) as they are, where they hold every entry."""
    if pieces is None:
        pieces = [pickle.dumps(entries or {}, protocol=pickle.HIGHEST_PROTOCOL)]
    with rundir.atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
        pickle.dump({"version": INDEX_VERSION, "pieces": pieces}, f, protocol=pickle.HIGHEST_PROTOCOL)
