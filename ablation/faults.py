"""Fault injection for the fault-campaign tests: kill, raise or fill the disk at a named point. Torch-free.

Set ``ABLATION_FAULT=<point>:<n>[:<action>]`` to act at the n-th time this process reaches ``point``
(for ``step``, n is the optimizer step just finished); ``ABLATION_FAULT_RANK=<r>`` limits it to one rank.
Actions: ``kill`` (SIGKILL, the default: nothing gets to clean up), ``raise`` (a RuntimeError, as a
bug or a bad file would), ``enospc`` (OSError ENOSPC, as a full disk would), ``term`` and ``usr2``
(send SIGTERM or SIGUSR2 to this process, as preemption or a time limit would). Points used by the code:

  setup            once, after the run folder is locked and before the model is built
  step             after each optimizer step (n = the step count)
  eval             before each evaluation batch
  write:<name>     inside every atomic write of run-folder file <name>, after the data is in the
                   temporary file and before the rename (e.g. write:checkpoint.pt, write:metrics.jsonl)

Unset (always, outside tests), `hit` is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "ABLATION_FAULT"
FAULT_RANK_ENV = "ABLATION_FAULT_RANK"
ACTIONS = ("kill", "raise", "enospc", "term", "usr2")

_counts: dict[str, int] = {}


def _spec() -> tuple[str, int, str] | None:
    """(point, n, action) from the environment, or None."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    parts = raw.split(":")
    action = parts.pop() if parts[-1] in ACTIONS else "kill"
    if len(parts) < 2 or not parts[-1].isdigit():
        raise ValueError(f"{FAULT_ENV}={raw!r}: expected <point>:<n>[:{'|'.join(ACTIONS)}]")
    name, n = ":".join(parts[:-1]), parts[-1]
    return name, int(n), action


def _this_rank() -> bool:
    """True when no rank is named or this process is the named rank."""
    want = os.environ.get(FAULT_RANK_ENV)
    return want is None or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == want


def hit(point: str, count: int | None = None) -> None:
    """Mark that this process reached `point` (the count-th time, if given); act when it is the chosen one."""
    spec = _spec() if FAULT_ENV in os.environ else None
    if spec is None or spec[0] != point or not _this_rank():
        return
    if count is None:
        count = _counts[point] = _counts.get(point, 0) + 1
    if count != spec[1]:
        return
    action = spec[2]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action in ("term", "usr2"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGUSR2)
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise RuntimeError(f"injected fault at {point} #{count}")


def reset() -> None:
    """Forget how often each point was reached: a test that injects faults in-process starts the next count from zero."""
    _counts.clear()
