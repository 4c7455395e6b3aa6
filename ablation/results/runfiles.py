"""The per-epoch half of collecting run folders: metrics.jsonl and final.json into compact pieces.

ablation.collect reads the configs and assembles the tables; the work that grows with epochs (parse
every metrics line, keep each metric as a column, write each epoch's curves.csv line) is done here,
chunk by chunk, in this process or in worker processes. Torch-free and pandas-free.

A curves.csv line is made as pandas' to_csv makes it from the curves table: the run's columns (put in
by the caller for the placeholder RUN) and then each metric, a float as numpy's str() writes a float64
(which is Python's repr(); '' for NaN), an int as str(). That holds only where the whole column of the
table is float64 (every value a float) or int64 (every value an int): each chunk says what its values
were, and the caller uses the text only when every chunk agrees.
"""

from __future__ import annotations

import array
import gc
import itertools
import json
import operator
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from ablation import rundir

RUN = "\x00"  # stands for a run's own columns at the start of each of its curves.csv lines
_RUN_KEYS = frozenset(("run_id", "variant", "batch_per_gpu", "seed"))
_KEYS = rundir.METRIC_KEYS
_KEY_LIST = list(_KEYS)


@dataclass
class Chunk:
    """What reading some run folders' metrics and final status gave."""

    runs: list[dict[str, Any]]  # per folder: the runs.csv fields from metrics.jsonl and final.json, and its val_err1 list under "_val"
    counts: list[int]  # per folder: its epochs (rows of curves.csv)
    warnings: list[str]  # damaged files, in the order met: the caller logs them
    rows: list[list[dict[str, Any]]] | None = None  # the metrics rows, when asked for
    kinds: dict[str, str] = field(default_factory=dict)  # per metric: 'float', 'int' or 'empty' when every value was one; absent: neither
    columns: dict[str, array.array] = field(default_factory=dict)  # per metric of a kind: its values ('d' or 'q')
    blocks: list[str] | None = None  # per folder: its curves.csv lines, each starting with RUN; None where the rows are not regular


def final_status(path: str, warnings: list[str]) -> dict[str, Any] | None:
    """rundir.RunDir.final_status(), its warning appended to `warnings` instead of logged."""
    try:
        return rundir.read_json(path)
    except rundir.CorruptFile as e:
        warnings.append(f"{e}: the run counts as failed")
        return {"status": "failed", "reason": f"unreadable final status: {e}", "val_err1": None}


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a while (as it was, after).

    Reading run folders makes millions of objects that stay alive (rows, values, tables) and no reference
    cycles: each of the collector's full passes walks them all again, and it makes many (a third of the
    time reading 10,000 folders). Reference counting frees what is dropped as before.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_chunk(folders: list[str], keep_rows: bool = False) -> Chunk:
    """Read these run folders' metrics and final status: their run fields, metric columns and curves.csv lines."""
    with gc_paused():
        return _read_chunk(folders, keep_rows)


def _read_chunk(folders: list[str], keep_rows: bool) -> Chunk:
    """read_chunk(), the collector as it is."""
    warnings: list[str] = []
    runs, counts, values, texts, kept = [], [], [], [], []
    regular, get = True, operator.itemgetter(*_KEYS)
    for folder in folders:
        try:
            rows, text = rundir.read_jsonl_and_text(os.path.join(folder, rundir.METRICS))  # a torn last line (a crash, or an append in flight) is left out
        except rundir.CorruptFile as e:
            warnings.append(f"{e}; the run's epochs are left out")
            rows, text = [], None
        val = [r["val_err1"] for r in rows]
        last_wall = rows[-1]["wall_seconds"] if rows else None
        n = len(rows)
        if keep_rows:
            kept.append(rows)
        if regular:
            if set(map(len, rows)) - {len(_KEYS)} and any(len(r) != len(_KEYS) and r.keys() & _RUN_KEYS for r in rows):
                regular = False  # a row that would overwrite a run's column
            else:
                try:
                    values.append(list(map(get, rows)))
                    texts.append(text if text is not None and all(map(_KEY_LIST.__eq__, map(list, rows))) else None)  # key order: see _text_block
                except KeyError:
                    regular = False  # a row without a metric: NaN there, and the column's type changes
        final = final_status(os.path.join(folder, rundir.FINAL), warnings)  # a damaged final.json reads as failed
        status = final["status"] if final else "unfinished"
        ok = status == "ok"
        runs.append(
            {
                "status": status,
                "reason": final.get("reason") if final else None,
                # The paper's metric exists only for a run that finished: anything else stays empty.
                "val_err1": final.get("val_err1") if ok else None,
                "val_err5": final.get("val_err5") if ok else None,
                "best_val_err1": min(val) if val and ok else None,
                "epochs_done": n,
                "gpu_hours": final.get("gpu_hours") if final else None,
                "wall_seconds": final.get("wall_seconds") if final else last_wall,
                "_val": val,
            }
        )
        counts.append(n)
    chunk = Chunk(runs, counts, warnings, kept if keep_rows else None)
    if regular:
        _columns_and_blocks(chunk, values, texts)
    return chunk


def _columns_and_blocks(chunk: Chunk, values: list[list[tuple[Any, ...]]], texts: list[bytes | None]) -> None:
    """Fill the chunk's kinds and columns from its rows' values (per folder, a tuple per row), and its blocks where
    every column has one kind (from the folder's metrics.jsonl text where it is the writer's, see _text_block)."""
    columns = list(zip(*itertools.chain.from_iterable(values))) or [()] * len(_KEYS)  # one pass: a tuple per metric
    regular = True
    for key, col in zip(_KEYS, columns):
        types = set(map(type, col))
        if types == {float}:
            chunk.kinds[key], chunk.columns[key] = "float", array.array("d", col)
        elif types == {int}:
            try:
                chunk.columns[key] = array.array("q", col)
                chunk.kinds[key] = "int"
            except OverflowError:
                regular = False
        elif not types:
            chunk.kinds[key], chunk.columns[key] = "empty", array.array("d")
        else:
            regular = False
    if regular:
        chunk.blocks = [_text_block(text, rows) or _metric_block(rows) for rows, text in zip(values, texts)]


# Numbers only (the kinds say so): no separator spaces to strip, and no container can hold itself.
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _metric_block(rows: list[tuple[Any, ...]]) -> str:
    """A folder's curves.csv lines, each starting with RUN: floats as repr() (numpy's str() of a float64), ints as
    str(), NaN as nothing, infinities as inf and -inf ('' for no rows).

    json's encoder writes floats and ints exactly so (float.__repr__, int.__repr__), all rows in one call (a
    folder's rows at a time: its lines are then the rows' brackets swapped for line ends); its only other
    tokens for numbers, NaN, Infinity and -Infinity, are swapped for pandas' ones.
    """
    if not rows:
        return ""
    return RUN + _pandas_tokens(_ENCODER.encode(rows)[2:-2]).replace("],[", _LINE) + os.linesep


def _pandas_tokens(text: str) -> str:
    """JSON's tokens for NaN, Infinity and -Infinity swapped for what to_csv writes: nothing, inf, -inf."""
    if "N" in text or "I" in text:
        text = text.replace("NaN", "").replace("Infinity", "inf")
    return text


_LINE = os.linesep + RUN  # between two rows of a folder
# What json.dumps(row) (rundir.write_jsonl: the trainer's metrics.jsonl) writes around the values of a row
# whose keys are _KEYS in order: the first key, the ones between values, the line end.
_OPENING = '{"' + _KEYS[0] + '": '
_BETWEEN = [(f', "{k}": ', ",") for k in _KEYS[1:]]


def _text_block(data: bytes | None, rows: list[tuple[Any, ...]]) -> str | None:
    """_metric_block(rows) cut out of the metrics.jsonl text the rows were parsed from, or None where that text is
    not json.dumps' of the rows (the caller then encodes them).

    json.dumps writes a float as repr() and an int as str(), as _metric_block does, so only the key names and
    braces differ: dropping them leaves curves.csv's lines without formatting a number again (a third of the
    time of reading a folder). The caller passes text only where every row's keys are _KEYS in order, and its
    kinds say each column holds only floats or only ints; anything else that could differ (other spacing or
    separators, strings, nested values) leaves a quote, a brace, a bracket or a space behind, or another
    count of commas or lines, and then the text is not used.
    """
    if data is None or not rows:
        return None
    text = data.decode()
    if not text.startswith(_OPENING):
        return None
    body = text[len(_OPENING) :].replace("\n" + _OPENING, "\n" + RUN)
    for old, new in _BETWEEN:
        body = body.replace(old, new)
    body = body.replace("}", "")
    if any(c in body for c in '"{[] ') or body.count(",") != len(rows) * (len(_KEYS) - 1) or body.count("\n") != len(rows):
        return None
    body = _pandas_tokens(body)
    return RUN + (body if os.linesep == "\n" else body.replace("\n", os.linesep))
