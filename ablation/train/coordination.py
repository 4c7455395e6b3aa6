"""Coordination of a run's processes: agreeing to stop, and ending every rank when one fails.

- StopVote: a stop signal may reach the processes at different steps; they agree, once per step, on a
  CPU (gloo) group so the vote never waits for the GPU, and all stop at the same step boundary.
- FailureGuard: when rank k raises (a bad image, a full disk), the others are typically blocked in a
  collective that would only time out after many minutes (NCCL) or error with a meaningless "connection
  closed" (gloo). Rank k writes an abort note into the run folder (created exclusively: the first
  failure wins); a watchdog thread on every rank polls for it, and rank 0 records the failing rank and
  its error in final.json. A rank whose main thread is still blocked after a grace period exits there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ablation.train.distributed import DistEnv

log = logging.getLogger("ablation")
ABORT = ".abort.json"  # the first failing rank's note (run-folder file, hidden: not part of the results)
POLL_S = 0.2  # how often the watchdog looks for a peer's abort note
GRACE_S = 10.0  # how long a blocked main thread gets to notice a peer's failure by itself
EXIT_FAILED = 1


class StopVote:
    """Whether to stop now, agreed by every process; call poll() the same number of times on each."""

    def __init__(self, env: DistEnv, should_stop: Callable[[], bool]):
        self.should_stop = should_stop
        self.group = dist.new_group(backend="gloo") if env.world_size > 1 else None
        self.flag = torch.zeros(1)
        self.pending: Any = None

    def poll(self) -> bool:
        """True when some process asked to stop (one process: now; several: by the previous poll)."""
        local = bool(self.should_stop())
        if self.group is None:
            return local
        agreed = False
        if self.pending is not None:
            self.pending.wait()
            agreed = self.flag.item() > 0
        self.flag = torch.tensor([float(local)])
        self.pending = dist.all_reduce(self.flag, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Finish the vote in flight (every process must call it, after the same number of polls)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        if self.group is not None:
            # Destroyed here, not at interpreter exit: a gloo group freed that late aborts the process.
            dist.destroy_process_group(self.group)
            self.group = None


def eval_polls(num_images: int, env: DistEnv, batch: int) -> int:
    """Evaluation batches every rank has (ranks take every world_size-th image): safe to vote on."""
    fewest = len(range(env.world_size - 1, num_images, env.world_size))
    return math.ceil(fewest / batch)


class FailureGuard:
    """Records the first failure of any rank and brings every rank down promptly.

    record(reason, rank) writes the failed final.json (rank 0 calls it, once); it is given by the
    trainer so this module does not know the run folder's contract beyond the abort note.
    """

    def __init__(self, root: Path, env: DistEnv, record: Callable[[str, int], None]):
        self.path = Path(root) / ABORT
        self.env, self.record = env, record
        self.token = ""
        self.recorded = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Agree on this start's token (so an old note never counts) and start the watchdog."""
        if self.env.is_main:
            self.path.unlink(missing_ok=True)
        token = [uuid.uuid4().hex if self.env.is_main else ""]
        if self.env.world_size > 1:
            dist.broadcast_object_list(token, src=0)
            self._thread = threading.Thread(target=self._watch, name="ablation-failure-watch", daemon=True)
            self._thread.start()
        self.token = token[0]

    def close(self) -> None:
        """Stop the watchdog and wait for it: a daemon thread still alive at interpreter exit can abort the process."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def peer_failure(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        """The abort note of this start, waiting up to wait_s for one to appear."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                note = json.loads(self.path.read_text())
                if note.get("token") == self.token:
                    return note
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S)

    def failed(self, reason: str) -> tuple[int, str]:
        """This rank raised: leave the note for the others, and on rank 0 record the first failure.

        Returns (failing rank, its reason): a peer's earlier failure wins over a collective error it caused here.
        """
        self.note(reason)
        rank, why = self.env.rank, reason
        # A collective that lost a peer fails here too; give the peer's own note a moment to appear.
        note = self.peer_failure(wait_s=3.0 if self.env.world_size > 1 else 0.0)
        if note is not None:
            rank, why = note["rank"], note["reason"]
        if self.env.is_main:
            self._record_once(why, rank)
        return rank, why

    def note(self, reason: str) -> None:
        """Create the abort note unless another rank already did (first failure wins)."""
        if self.env.world_size == 1:
            return
        doc = {"token": self.token, "rank": self.env.rank, "host": socket.gethostname(),
               "pid": os.getpid(), "reason": reason, "time": time.time()}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        except OSError:
            return  # e.g. the disk is full: the peers will see the collective fail instead
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc))

    def _record_once(self, reason: str, rank: int) -> None:
        """Write the failed final.json once, whichever thread gets here first."""
        with self._lock:
            if self.recorded:
                return
            self.recorded = True
        self.record(reason, rank)

    def _watch(self) -> None:
        """Poll for a peer's abort note; give the main thread GRACE_S to notice, then record and exit."""
        while not self._stop.wait(POLL_S):
            note = self.peer_failure()
            if note is None or note["rank"] == self.env.rank:
                continue
            log.error(f"rank {note['rank']} failed: {note['reason']}; ending rank {self.env.rank}")
            if self._stop.wait(GRACE_S) or self.recorded:
                return  # the main thread saw the failure itself (or the run ended)
            if self.env.is_main:
                self._record_once(note["reason"], note["rank"])
            for h in log.handlers:
                h.flush()
            os._exit(EXIT_FAILED)
