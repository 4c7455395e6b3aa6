"""The run folder contract: every file name in one place, atomic writes, the final status.

Torch-free: the launcher, `ablation status` and the aggregator read run folders through this module.

    <run_id>/
      config.yaml     resolved config, its run_id and the derived values (written once)
      config.json     the same document as JSON, for machines (the aggregator reads it; older folders lack it)
      env.json        versions, git commit, host, devices, SLURM ids; `starts` lists every (re)start
      metrics.jsonl   one JSON line per finished epoch (rewritten whole, so never duplicated on resume)
      metrics.npy     metrics.jsonl's columns for machines (numpy structured array, a field per METRIC_KEYS), rewritten
                      after it; absent where a row holds other keys (eval.modes) or a column mixes ints and floats
      steps.jsonl     optional: one line per step (log_steps=true), appended
      checkpoint.pt   latest training state (model, optimizer, step, epoch, partial-epoch sums)
      final.json      written last: status ok | diverged | failed, the paper's metric, GPU-hours
      failures.jsonl  one line per failed start (stage, rank, step, reason), appended: the retry count
      train.log       human-readable log (never parsed)
      tb/             optional (tracking=tensorboard): TensorBoard event files, one per start (ablation.train.tracking)
      wandb/          optional (tracking=wandb): wandb's own files, offline runs for `wandb sync` among them
      predictions/    per-image results of every evaluation (numpy .npy, read with read_predictions):
        labels.npy      uint16 [N]: each validation image's true class, in the validation set's order (written once)
        val.json        images N, classes C, k, the data fingerprints (written once)
        epoch_NNN.npy   uint16 [N, k]: each image's top-k predicted classes, best first, after epoch NNN

Readers never see half a file and never crash on what a crash leaves:
  - whole files (config.yaml, config.json, env.json, metrics.jsonl, final.json, predictions/*, manifest.json) are written to a temporary
    file, fsynced, renamed over the old one and the folder fsynced: a reader sees the old or the new content;
  - appended files (steps.jsonl, a sweep's jobs.jsonl) get each batch of whole lines in one write() on an
    O_APPEND descriptor, so a crash, or a reader racing the writer, sees at most one incomplete last line;
    read_jsonl ignores a last line that does not parse, and the next append first cuts that torn tail off;
  - a file that is there but damaged (empty, cut, garbled: a disk that lost data) raises CorruptFile naming
    the file (and line); final_status() reads a damaged final.json as a failed run, which names the file.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import operator
import os
import re
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ablation import faults
from ablation.errors import AblationError, one_line

if TYPE_CHECKING:
    import numpy as np

CONFIG = "config.yaml"
CONFIG_JSON = "config.json"
ENV = "env.json"
METRICS = "metrics.jsonl"
METRICS_COLUMNS = "metrics.npy"  # metrics.jsonl's twin: what the aggregator reads (10,000 runs: arrays, not a million dicts)
STEPS = "steps.jsonl"
CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"
LOG = "train.log"
LOCK = ".lock"
FAILURES = "failures.jsonl"
TENSORBOARD = "tb"
WANDB = "wandb"
PREDICTIONS = "predictions"  # folder of per-image results: LABELS, VAL_META and one predictions_file(epoch) per evaluation
LABELS = "labels.npy"
VAL_META = "val.json"
TOPK = 5  # predicted classes kept per image (fewer when the dataset has fewer classes)

_UMASK = os.umask(0)
os.umask(_UMASK)

# A finished run is not trained again: ok is done, and a diverged run would diverge again (it is deterministic).
TERMINAL = ("ok", "diverged")

# The epoch record's keys, in order: the contract the aggregator reads.
METRIC_KEYS = (
    "epoch",
    "lr",
    "train_loss",
    "train_err1",
    "val_err1",
    "val_err5",
    "images_per_s",
    "epoch_seconds",
    "wall_seconds",
)
# Each extra evaluation mode's fields (eval.modes; ablation.config.EVAL_MODES): in a metrics.jsonl row only where the
# run evaluated that way, so every older folder (rows of METRIC_KEYS alone) still reads. ema is val_err1/val_err5.
MODE_METRIC_KEYS = {
    "precise": ("val_err1_precise", "val_err5_precise"),  # PreciseBN population statistics, beside the EMA
    "batch": ("val_err1_batch", "val_err5_batch"),  # validation in normalization batches of norm.batch images
}


class CorruptFile(AblationError, ValueError):
    """A run-folder file is there but is not what was written (empty, cut or garbled): the message names it."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable; a file system that cannot fsync a folder is let be."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS, errno.EACCES):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    durable: fsync the data before the rename and the folder after it, so the new file survives a crash
    (run-folder files). Without it (the report's outputs, which can be rebuilt) a reader still never
    sees half a file, and a 100 MB curves.csv is not forced to disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results on shared storage must stay readable
    try:
        yield Path(tmp)
        faults.hit(f"write:{path.name}")  # tests kill here: the data is written, the rename not yet done
        if durable:
            with open(tmp, "rb") as f:  # the data must be on disk before the rename makes it visible
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)  # the rename itself must survive a crash, not only the data
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    """Atomically write a text file (durable: see atomic_path)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write a binary file (durable)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]], *, durable: bool = True) -> None:
    """Atomically write JSON lines (the whole file: a resumed run never duplicates a line)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows), durable=durable)


def write_metrics(folder: str | Path, rows: list[dict[str, Any]], *, durable: bool = True) -> None:
    """metrics.jsonl (the record), then its twin metrics.npy (metric_array), each atomically; where the rows have no
    array, a twin left by earlier rows is removed. The twin is written second, so it is never older than the lines it
    mirrors (metric_twin checks that)."""
    folder = Path(folder)
    write_jsonl(folder / METRICS, rows, durable=durable)
    array = metric_array(rows)
    if array is None:
        (folder / METRICS_COLUMNS).unlink(missing_ok=True)
        return
    with atomic_path(folder / METRICS_COLUMNS, durable=durable) as tmp:
        tmp.write_bytes(npy_bytes(array))


_INT64 = range(-(2**63), 2**63)


def metric_columns(rows: list[dict[str, Any]], *, other_keys: bool = False) -> list[tuple[str, tuple[Any, ...]]] | None:
    """Each of METRIC_KEYS' values over the rows, in order, with its kind: 'd' where every value is a float, 'q' where
    every one is an int64 int; None where there are no rows, a row lacks a key or holds another one (other_keys: left
    out instead), or a column mixes types (then only the rows themselves hold the metrics)."""
    if not rows or not other_keys and any(len(r) != len(METRIC_KEYS) for r in rows):
        return None
    try:
        columns = list(zip(*map(operator.itemgetter(*METRIC_KEYS), rows)))
    except KeyError:
        return None
    out = []
    for col in columns:
        types = set(map(type, col))
        if types == {float}:
            out.append(("d", col))
        elif types == {int} and min(col) in _INT64 and max(col) in _INT64:
            out.append(("q", col))
        else:
            return None
    return out


def metric_array(rows: list[dict[str, Any]]) -> np.ndarray | None:
    """The metrics rows as metrics.npy holds them: a numpy structured array, a field per METRIC_KEYS in order, float64 or
    int64 as metric_columns finds them; None where it finds none (a row with another key among them)."""
    import numpy as np

    columns = metric_columns(rows)
    if columns is None:
        return None
    array = np.empty(len(rows), dtype=[(key, "<f8" if code == "d" else "<i8") for key, (code, _) in zip(METRIC_KEYS, columns)])
    for key, (_, col) in zip(METRIC_KEYS, columns):
        array[key] = col
    return array


@functools.cache
def _twin_dtype() -> Any:
    """The dtype of the trainer's metric_array: epoch an int64, every other metric a float64."""
    import numpy as np

    return np.dtype([(k, "<i8" if k == "epoch" else "<f8") for k in METRIC_KEYS])


@functools.lru_cache(maxsize=256)
def _twin_head(rows: int) -> bytes:
    """The header np.save writes for `rows` rows of the trainer's metric_array: a file that starts with it (and holds their
    bytes) is read without numpy parsing its header again: a literal_eval per file, most of reading a twin.
    A twin another numpy wrote with another header is read by np.load."""
    import numpy as np

    data = npy_bytes(np.zeros(rows, _twin_dtype()))
    return data[: len(data) - rows * _twin_dtype().itemsize]


def metric_twin(folder: str | Path, data: bytes, jsonl_mtime_ns: int) -> np.ndarray | None:
    """metrics.npy's array where it mirrors `data` (metrics.jsonl's bytes, modified at jsonl_mtime_ns): written after
    it, of METRIC_KEYS' int64 and float64 fields, one row per line of whole lines, and its last row the last line's
    values and types; else None (a twin from an older write, or none: read the lines). A middle line it does not check
    is the same record: the trainer writes both files from one history."""
    import io

    import numpy as np

    path = Path(folder) / METRICS_COLUMNS
    lines = data.count(b"\n")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_mtime_ns < jsonl_mtime_ns:
                return None
            blob = f.read()
        head = _twin_head(lines)
        dtype = _twin_dtype()
        if blob.startswith(head) and len(blob) == len(head) + lines * dtype.itemsize:
            array = np.frombuffer(blob, dtype, lines, len(head))  # what np.load reads, less the parse of the header
        else:
            array = np.load(io.BytesIO(blob), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    names = array.dtype.names
    if array.ndim != 1 or names != METRIC_KEYS or any(array.dtype[k].str not in ("<f8", "<i8") for k in names):
        return None
    if not data.endswith(b"\n") or len(array) != lines:
        return None
    try:
        last = json.loads(data[data.rfind(b"\n", 0, len(data) - 1) + 1 :])
    except ValueError:
        return None
    values = array[-1].tolist()
    if not isinstance(last, dict) or tuple(last) != METRIC_KEYS:
        return None
    same = all(type(a) is type(b) and (a == b or a != a and b != b) for a, b in zip(last.values(), values))
    return array if same else None


def _read_bytes(p: Path) -> bytes | None:
    """The file's bytes, or None when it is not there (also when it went away since it was listed)."""
    try:
        return p.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _why(e: ValueError) -> str:
    """A JSON or UTF-8 decoding error in a few words."""
    return f"{e.msg}, byte {e.pos}" if isinstance(e, json.JSONDecodeError) else str(e)


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file's content, or None when it does not exist; CorruptFile when empty or garbled."""
    p = Path(path)
    data = _read_bytes(p)
    if data is None:
        return None
    if not data.strip(b" \t\r\n\x00"):
        raise CorruptFile(f"{p} is empty ({len(data)} bytes)")
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise CorruptFile(f"{p} is not valid JSON ({_why(e)})") from None
    if not isinstance(doc, dict):
        raise CorruptFile(f"{p} is not a JSON object")
    return doc


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSON-lines file ([] when missing).

    A last line that does not parse is ignored, with or without its newline: a crash during an append,
    or a reader racing a writer, leaves at most that (a whole last row that only lacks its newline is
    kept). A line that does not parse before the last one is damage no crash of ours can leave (a full
    disk, a hand edit, files glued by an older version): CorruptFile naming the file and the line.
    """
    return read_jsonl_and_text(path)[0]


def read_jsonl_and_text(path: str | Path) -> tuple[list[dict[str, Any]], bytes | None]:
    """read_jsonl(path), and the file's bytes when they are exactly those rows, one whole line each (else None)."""
    p = Path(path)
    data = _read_bytes(p)
    if not data:
        return [], None
    if data.endswith(b"\n"):
        # The common case, whole rows one per line: one parse of the file as a JSON array (1.8x faster than
        # line by line: a report reads a million rows); one row per line is checked by the count, anything
        # else (a torn or damaged line, a blank one) is read line by line below.
        try:
            rows = json.loads(b"[" + data[:-1].replace(b"\n", b",") + b"]")
        except ValueError:
            rows = None
        if rows is not None and len(rows) == data.count(b"\n") and all(isinstance(r, dict) for r in rows):
            return rows, data
    lines = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # a torn last line: the write it belongs to never completed
            raise CorruptFile(f"{p}: line {n} is not a JSON row ({_why(e)}); fix or delete that line") from None
        rows.append(row)
    return rows, None


def read_config(path: str | Path, warnings: list[str] | None = None) -> Any:
    """A run's config.yaml document: from the config.json beside it where the trainer wrote one (the same values, read
    with json), else as yaml.safe_load reads config.yaml (older folders). A damaged config.json is reported in `warnings`
    (else logged) and config.yaml read."""
    p = Path(path)
    if p.name == CONFIG:
        try:
            doc = read_json(p.with_name(CONFIG_JSON))
        except CorruptFile as e:
            why = f"{e}; {CONFIG} is read instead"
            if warnings is None:
                logging.getLogger("ablation").warning(why)
            else:
                warnings.append(why)
            doc = None
        if doc is not None:
            return doc
    import yaml

    return yaml.safe_load(p.read_text())


def config_json_text(doc: dict[str, Any]) -> str | None:
    """config.json's text for a config.yaml document, or None where JSON cannot hold the same values
    (a key that is not a string, a date, a NaN: the folder then has config.yaml alone)."""
    try:
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError):
        return None
    return text if json.loads(text) == doc else None


def read_run_config(folder: str | Path, warnings: list[str] | None = None) -> Any:
    """A run folder's config document (read_config of its config.yaml: config.json where there is one)."""
    return read_config(Path(folder) / CONFIG, warnings)


def append_jsonl(path: str | Path, rows: list[dict[str, Any]], *, fsync: bool = False) -> None:
    """Append rows to a JSON-lines file so that a crash can leave at most one incomplete last line.

    All rows go in one write() on an O_APPEND descriptor (a text file's buffer could split them into
    several), under an exclusive flock so that appenders never interleave. A torn last line left by an
    earlier crash is cut off first (it never was a whole row), so the first new row is not glued to it.
    fsync=True also puts the rows on disk before returning: for rare records (jobs.jsonl); a file appended
    every few steps (steps.jsonl) is not fsynced, a crash losing its last rows is harmless.
    """
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if not data:
        return
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: appenders are one process per file anyway
            pass
        _cut_torn_tail(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
            _fsync_dir(path.parent)
    finally:
        os.close(fd)  # also releases the flock


def _cut_torn_tail(fd: int) -> None:
    """If the file does not end in a newline, end its last whole row or cut off the fragment after it."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    cut, end = 0, size
    while end > 0:
        start = max(0, end - (1 << 16))
        i = os.pread(fd, end - start, start).rfind(b"\n")
        if i >= 0:
            cut = start + i + 1
            break
        end = start
    try:
        whole = isinstance(json.loads(os.pread(fd, size - cut, cut)), dict)
    except ValueError:
        whole = False
    if whole:
        os.write(fd, b"\n")
    else:
        os.ftruncate(fd, cut)


def paper_metric(val_err1: list[float], last: int = 5) -> float | None:
    """The paper's number: median top-1 val error of the last `last` epochs (None before any epoch)."""
    return statistics.median(val_err1[-last:]) if val_err1 else None


# ---------------------------------------------------------------- per-image results: predictions/
#
# Every evaluation writes, per validation image, its top-k predicted classes (uint16, best first, ties as torch.topk
# breaks them), rows in the validation set's order (the val ImageFolder's samples, whatever the process layout). The
# labels (uint16 [N]) and val.json ({"images", "classes", "k", "fingerprint", "val_fingerprint"}) once per run.
# numpy only: the aggregator and `ablation compare` read these without torch.

_EPOCH_FILE = re.compile(r"epoch_(\d{3,})\.npy")
_NPY_MAGIC = b"\x93NUMPY"


class NoPredictions(AblationError):
    """A run folder has no per-image results (for that epoch): a run trained before they were recorded, or not evaluated yet."""


def predictions_file(epoch: int) -> str:
    """The name of one evaluation's file in predictions/: epoch_001.npy ... epoch_100.npy (epochs from 1)."""
    return f"epoch_{epoch:03d}.npy"


def predictions_epochs(folder: str | Path) -> list[int]:
    """The epochs (from 1, ascending) whose per-image results a run folder holds; [] for none (older folders)."""
    try:
        with os.scandir(Path(folder) / PREDICTIONS) as it:
            names = [e.name for e in it]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m[1]) for n in names if (m := _EPOCH_FILE.fullmatch(n)) and n == predictions_file(int(m[1])))


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file numpy.save writes for an array (no pickles): the same array gives the same bytes."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write the file atomically unless it already holds exactly these bytes (a once-per-run file, checked each time)."""
    if _read_bytes(path) != data:
        write_bytes(path, data)


def write_predictions(folder: str | Path, epoch: int, topk: np.ndarray, labels: np.ndarray, meta: dict[str, Any]) -> None:
    """Write one evaluation's per-image results into folder/predictions/, each file atomically: labels.npy and val.json
    where missing or different (so once per run), then epoch_NNN.npy (rewritten with the same bytes when a resumed run
    evaluates the epoch again). topk: uint16 [N, k]; labels: uint16 [N]; both in the validation set's order; meta:
    val.json's content (images N, classes, k, fingerprints)."""
    import numpy as np

    n, k = meta["images"], meta["k"]
    if topk.dtype != np.uint16 or labels.dtype != np.uint16 or topk.shape != (n, k) or labels.shape != (n,):
        raise ValueError(f"per-image results must be uint16 [{n}, {k}] and labels uint16 [{n}], not {topk.dtype} {tuple(topk.shape)} "
                         f"and {labels.dtype} {tuple(labels.shape)}")
    d = Path(folder) / PREDICTIONS
    _write_if_changed(d / LABELS, npy_bytes(labels))  # before any epoch file: a reader that finds one finds the labels
    _write_if_changed(d / VAL_META, (json.dumps(meta, indent=2) + "\n").encode())
    write_bytes(d / predictions_file(epoch), npy_bytes(topk))


def prune_predictions(folder: str | Path, done: int) -> None:
    """Remove the results of the epochs after `done`: a start resuming from a checkpoint of epoch `done` evaluates them
    again (as metrics.jsonl is rewritten from the checkpointed history, predictions/ holds the epochs it lists)."""
    for epoch in predictions_epochs(folder):
        if epoch > done:
            (Path(folder) / PREDICTIONS / predictions_file(epoch)).unlink(missing_ok=True)


def _spans(epochs: list[int]) -> str:
    """1-3, 5 for [1, 2, 3, 5]."""
    spans: list[list[int]] = []
    for e in epochs:
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _no_predictions(folder: Path) -> str:
    """Why a run folder has no per-image results, in one line."""
    if not folder.is_dir():
        return f"{folder}: no such run folder"
    try:
        evaluated = bool(read_jsonl(folder / METRICS))
    except CorruptFile:
        evaluated = True
    if not evaluated:
        return f"{folder}: no per-image results yet (no epoch evaluated); they are written to {PREDICTIONS}/ after each evaluation"
    return (f"{folder}: no per-image results (run trained before they were recorded in {PREDICTIONS}/); "
            "retrain it in a new results folder to compare it image by image")


def _read_npy(path: Path, shape: tuple[int, ...], classes: int) -> np.ndarray:
    """A uint16 .npy file of this shape, its values below `classes`; CorruptFile naming the file otherwise."""
    import io

    import numpy as np

    data = _read_bytes(path)
    if data is None:
        raise CorruptFile(f"{path} is missing (the run folder lost it)")
    if not data.startswith(_NPY_MAGIC):
        raise CorruptFile(f"{path} is not a numpy .npy file ({len(data)} bytes" + (", empty)" if not data else ", no .npy header)"))
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise CorruptFile(f"{path} is cut or garbled ({one_line(e)})") from None
    want = f"uint16 {list(shape)}"
    if array.dtype != np.uint16 or array.shape != shape:
        raise CorruptFile(f"{path} holds {array.dtype} {list(array.shape)}, not {want} as {VAL_META} says")
    if array.size and int(array.max()) >= classes:
        raise CorruptFile(f"{path} holds class {int(array.max())}, beyond the {classes} classes {VAL_META} says")
    return array


def read_predictions(folder: str | Path, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """(labels uint16 [N], top-k uint16 [N, k], epoch, val.json) of one evaluation of a run: `epoch` (from 1), or the last
    epoch present (None). NoPredictions (one line) for a folder without them (older runs) or without that epoch;
    CorruptFile naming the file for a damaged one."""
    folder = Path(folder)
    epochs = predictions_epochs(folder)
    if not epochs:
        raise NoPredictions(_no_predictions(folder))
    if epoch is None:
        epoch = epochs[-1]
    elif epoch not in epochs:
        raise NoPredictions(f"{folder}: no per-image results for epoch {epoch} ({PREDICTIONS}/ holds epochs {_spans(epochs)})")
    d = folder / PREDICTIONS
    meta = read_json(d / VAL_META)
    if meta is None:
        raise CorruptFile(f"{d / VAL_META} is missing (the run folder lost it)")
    sizes = {key: meta.get(key) for key in ("images", "classes", "k")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()):
        raise CorruptFile(f"{d / VAL_META} does not give images, classes and k as positive integers ({sizes})")
    n, classes, k = sizes["images"], sizes["classes"], sizes["k"]
    labels = _read_npy(d / LABELS, (n,), classes)
    topk = _read_npy(d / predictions_file(epoch), (n, k), classes)
    return labels, topk, epoch, meta


class RunDir:
    """Paths of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / CONFIG
        self.config_json = self.root / CONFIG_JSON
        self.env = self.root / ENV
        self.metrics = self.root / METRICS
        self.steps = self.root / STEPS
        self.checkpoint = self.root / CHECKPOINT
        self.final = self.root / FINAL
        self.log = self.root / LOG
        self.lock = self.root / LOCK
        self.failures = self.root / FAILURES
        self.tensorboard = self.root / TENSORBOARD
        self.wandb = self.root / WANDB
        self.predictions = self.root / PREDICTIONS

    def final_status(self) -> dict[str, Any] | None:
        """final.json's content, or None while the run has not ended.

        A damaged final.json (written atomically, so only a disk that lost data leaves one) reads as a
        failed run whose reason names the file: shown as such, and retried with --retry-failed.
        """
        try:
            return read_json(self.final)
        except CorruptFile as e:
            logging.getLogger("ablation").warning(f"{e}: the run counts as failed")
            return {"status": "failed", "reason": f"unreadable final status: {e}", "val_err1": None}

    def is_finished(self) -> bool:
        """True when the run ended in a terminal status (ok or diverged)."""
        final = self.final_status()
        return bool(final) and final.get("status") in TERMINAL


def is_locked(rd: RunDir) -> bool:
    """True while a live trainer holds the run folder's lock (kernel lock on this or a lock-sharing host, or a fresh lock file)."""
    from ablation import lock

    return lock.is_held(rd.lock)
