"""Live curves (tracking=tensorboard | wandb): each epoch's metrics, from rank 0, to TensorBoard or Weights & Biases.

Off by default. The packages are optional extras (pip install 'ablation[tensorboard]', 'ablation[wandb]'), imported
only when a run asks for one; require() imports it before the trainer writes anything, so a missing package is one
line, not a failed run. The run folder stays the record: the trackers show metrics.jsonl's numbers (rundir.METRIC_KEYS)
while the run trains, with the epoch as the step, so runs of different batch sizes line up.

TensorBoard (<run>/tb/, one event file per start): as metrics.jsonl is rewritten from the checkpoint, every start
writes the checkpointed history again, behind a restart marker at epoch 1 (SummaryWriter's purge_step). Both of
TensorBoard's readers then drop what earlier starts wrote: the Python one (EventAccumulator) honours the marker, the
data server drops a tag's later points when its steps go back (tests/test_tracking.py reads a thrice-started run
back). So the curves hold each epoch once however often a run was started, a rewritten epoch shows the checkpoint's
numbers, and a run that turns tracking on when resumed shows its earlier epochs too.

wandb (<run>/wandb/): offline unless WANDB_MODE says otherwise (compute nodes often have no internet; `wandb sync`
uploads later), in the project WANDB_PROJECT (default "ablation"), named by the run id. Its id is the run id plus a tag
of the run folder's first start (env.json), so every start of one folder continues one wandb run (resume="allow"),
and a run trained again from scratch, or in another results folder, is a new one. A start sends the checkpointed
epochs the wandb run does not have yet (those after its summary's last epoch), then each epoch it trains: online,
a resumed run's summary comes from the server and nothing is sent twice; offline, wandb cannot resume (each start is
a new offline-run-* folder, and `wandb sync` of one replaces what an earlier one uploaded), so each start's folder
holds the whole curve so far and syncing the latest is enough. Epochs go after the checkpoint that holds them, so a
killed start never sent an epoch that the next start trains again.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ablation import rundir
from ablation.config import RunConfig, to_dict
from ablation.errors import ConfigError, one_line

# metrics.jsonl key -> tracker tag (the epoch is the step): grouped as TensorBoard and wandb show a tag's prefix.
TAGS = {
    "train_loss": "train/loss",
    "train_err1": "train/err1",
    "val_err1": "val/err1",
    "val_err5": "val/err5",
    "lr": "optim/lr",
    "images_per_s": "speed/images_per_s",
    "epoch_seconds": "speed/epoch_seconds",
    "wall_seconds": "speed/wall_seconds",
}
# What each tracker imports: the extra of the same name installs it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _missing(tracking: str, e: ImportError) -> ConfigError:
    """The one-line error for a tracker whose package is missing (or fails to import: then why)."""
    package = PACKAGES[tracking]
    why = "" if getattr(e, "name", None) == package else f" (importing it failed: {one_line(e)})"
    return ConfigError(f"tracking={tracking} needs the {package} package: pip install 'ablation[{tracking}]'{why}")


def require(tracking: str) -> None:
    """Import the package tracking= needs, or raise the one-line ConfigError that names its extra (off: nothing)."""
    if tracking == "off":
        return
    try:
        importlib.import_module(PACKAGES[tracking])
        if tracking == "tensorboard":
            importlib.import_module("torch.utils.tensorboard")
    except ImportError as e:
        raise _missing(tracking, e) from None


class Tracker:
    """No tracking: tracking=off, and every rank but 0."""

    def epoch(self, row: Mapping[str, Any]) -> None:
        """Show one finished epoch's metrics.jsonl row."""

    def close(self, failed: bool = False) -> None:
        """Write out what is buffered and end; failed: the run stops with an error."""


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row's values by tag (the epoch, the step, left out; a missing or null value too)."""
    return {tag: float(row[key]) for key, tag in TAGS.items() if row.get(key) is not None}


class TensorBoardTracker(Tracker):
    """Event files in <run>/tb/ through torch.utils.tensorboard; each start rewrites the history (module docstring)."""

    def __init__(self, rd: rundir.RunDir, history: Sequence[Mapping[str, Any]]):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=1: the restart marker before this start's events, so readers drop every earlier start's.
        self.writer = SummaryWriter(log_dir=str(rd.tensorboard), purge_step=1)
        for row in history:
            self._add(row)
        self.writer.flush()

    def _add(self, row: Mapping[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["epoch"]))

    def epoch(self, row: Mapping[str, Any]) -> None:
        self._add(row)
        self.writer.flush()  # on disk at each epoch's end: the curve is live, and a kill loses nothing

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def wandb_id(rd: rundir.RunDir, run_id: str) -> str:
    """The wandb run id of a run folder: its run id and a tag of its first start, the same at every start."""
    starts = (rundir.read_json(rd.env) or {}).get("starts") or [{}]
    first = starts[0]
    born = f"{first.get('time')} {first.get('host')}"
    return f"{run_id}-{hashlib.sha256(born.encode()).hexdigest()[:6]}"


class WandbTracker(Tracker):
    """A wandb run per run folder, offline unless WANDB_MODE says otherwise (module docstring)."""

    def __init__(self, cfg: RunConfig, rd: rundir.RunDir, run_id: str, history: Sequence[Mapping[str, Any]]):
        require("wandb")
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "ablation",
            name=run_id,
            id=wandb_id(rd, run_id),
            resume="allow",
            dir=str(rd.root),
            mode=os.environ.get("WANDB_MODE") or "offline",
            config=to_dict(cfg),
        )
        self.run.define_metric("epoch")
        for tag in TAGS.values():
            self.run.define_metric(tag, step_metric="epoch")  # plotted against the epoch, not wandb's own step count
        last = self.run.summary.get("epoch") or 0  # what a resumed online run has; nothing offline
        for row in history:
            if row["epoch"] > last:
                self.epoch(row)

    def epoch(self, row: Mapping[str, Any]) -> None:
        self.run.log({"epoch": int(row["epoch"]), **scalars(row)})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_tracker(cfg: RunConfig, rd: rundir.RunDir, run_id: str, history: Sequence[Mapping[str, Any]], is_main: bool) -> Tracker:
    """The tracker cfg.tracking asks for on rank 0 (history: the checkpointed metrics.jsonl rows); a no-op one elsewhere."""
    if not is_main or cfg.tracking == "off":
        return Tracker()
    if cfg.tracking == "tensorboard":
        return TensorBoardTracker(rd, history)
    return WandbTracker(cfg, rd, run_id, history)
