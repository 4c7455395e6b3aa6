"""The run folder contract: every file name in one place, atomic writes, the final status.

Torch-free: the launcher, `ablation status` and the aggregator read run folders through this module.

    <run_id>/
      config.yaml     resolved config, its run_id and the derived values (written once)
      env.json        versions, git commit, host, devices, SLURM ids; `starts` lists every (re)start
      metrics.jsonl   one JSON line per finished epoch (rewritten whole, so never duplicated on resume)
      steps.jsonl     optional: one line per step (log_steps=true)
      checkpoint.pt   latest training state (model, optimizer, step, epoch, partial-epoch sums)
      final.json      written last: status ok | diverged | failed, the paper's metric, GPU-hours
      train.log       human-readable log (never parsed)
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CONFIG = "config.yaml"
ENV = "env.json"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"
LOG = "train.log"
LOCK = ".lock"

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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results on shared storage must stay readable
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write JSON lines (the whole file: a resumed run never duplicates a line)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it does not exist."""
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All lines of a JSON-lines file ([] when missing)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def paper_metric(val_err1: list[float], last: int = 5) -> float | None:
    """The paper's number: median top-1 val error of the last `last` epochs (None before any epoch)."""
    return statistics.median(val_err1[-last:]) if val_err1 else None


class RunDir:
    """Paths of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / CONFIG
        self.env = self.root / ENV
        self.metrics = self.root / METRICS
        self.steps = self.root / STEPS
        self.checkpoint = self.root / CHECKPOINT
        self.final = self.root / FINAL
        self.log = self.root / LOG
        self.lock = self.root / LOCK

    def final_status(self) -> dict[str, Any] | None:
        """final.json's content, or None while the run has not ended."""
        return read_json(self.final)

    def is_finished(self) -> bool:
        """True when the run ended in a terminal status (ok or diverged)."""
        final = self.final_status()
        return bool(final) and final.get("status") in TERMINAL


def is_locked(rd: RunDir) -> bool:
    """True while a live trainer holds the run folder's lock (kernel lock on this or a lock-sharing host, or a fresh lock file)."""
    from ablation import lock

    return lock.is_held(rd.lock)
