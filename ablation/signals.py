"""Stop requests: the signals that ask a run to checkpoint and stop. Torch-free.

SLURM sends SIGUSR2 (``--signal=USR2@<signal_delay_s>``) before a time limit, and SIGTERM on
preemption (and before SIGKILL on any cancel); ``kill <pid>`` sends SIGTERM too. All of them only set a
flag: the trainer checkpoints at its next step (or evaluation batch) boundary, so a checkpoint never
holds a half-applied optimizer step, and the handler never runs collectives.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    """A callable flag set by the stop signals; remembers which signal came first, and when."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """'SIGTERM', 'SIGUSR2', or None."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def handle(self, signum: int, frame: Any = None) -> None:
        """Signal handler: set the flag (a second signal changes nothing)."""
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            print(f"ablation: got {signal.Signals(signum).name}; checkpointing at the next step boundary", file=sys.stderr, flush=True)

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> StopRequest:
        """Route these signals to handle(), remembering the handlers they had."""
        for s in signals:
            self._previous[s] = signal.signal(s, self.handle)
        return self

    def previous(self, signum: int) -> Any:
        """The handler `signum` had before install()."""
        return self._previous.get(signum)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()
